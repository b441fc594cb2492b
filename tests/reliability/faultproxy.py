"""A small HTTP proxy in front of the moto S3 server that injects the faults S3 clients meet in production.

Each request is forwarded unless ``decide(method, path)`` names a fault:

- ``"500"`` / ``"503"``: an S3 ``InternalError`` / ``SlowDown`` error response, nothing forwarded;
- ``"403"`` / ``"404"``: ``AccessDenied`` / ``NoSuchKey``, nothing forwarded (clients must not retry);
- ``"drop"``: the connection is closed without any response;
- ``"cut"``: forwarded, but the connection closes half-way through the response body;
- ``"slow"``: forwarded after a delay.

Every request is logged as ``(method, path, fault or "ok")`` in ``requests``.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import unquote, urlsplit

Decide = Callable[[str, str], "str | None"]

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "404": (404, "NoSuchKey", "The specified key does not exist."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def random_faults(
    share: float, seed: int = 0, kinds: tuple[str, ...] = ("500", "503", "drop", "cut", "slow")
) -> Decide:
    """Fault a ``share`` of all requests, each with one of ``kinds``, reproducibly."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def decide(method: str, path: str) -> str | None:
        with lock:
            return rng.choice(kinds) if rng.random() < share else None

    return decide


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` point clients at ``proxy.url``; set ``proxy.decide``."""

    def __init__(self, upstream: str, decide: Decide | None = None, delay_s: float = 0.3) -> None:
        self.upstream = urlsplit(upstream)
        self.decide: Decide = decide or (lambda method, path: None)
        self.delay_s = delay_s
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, key_suffix: str) -> int:
        """How many requests of ``method`` went to a path ending in ``key_suffix``."""
        return sum(1 for m, p, _ in self.requests if m == method and p.endswith(key_suffix))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = unquote(urlsplit(self.path).path)
                fault = proxy.decide(self.command, path)
                with proxy._lock:
                    proxy.requests.append((self.command, path, fault or "ok"))
                if fault in ERRORS:
                    status, code, message = ERRORS[fault]
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><Resource>{path}</Resource></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "slow":
                    time.sleep(proxy.delay_s)
                status, headers, content = self._forward(body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.end_headers()
                if fault == "cut" and len(content) > 1 and self.command != "HEAD":
                    self.wfile.write(content[: len(content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(content)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        return Handler
