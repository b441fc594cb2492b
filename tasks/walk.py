"""Walking a local source folder: keys, sizes, mtimes and inodes of every file (the standard library only).

``strata curate`` starts the walk of a local source in a thread as it begins (:func:`prefetch`), while its
imports run and Prefect's API server boots: most of a walk is ``stat`` calls, which release the interpreter,
so the two overlap (at a million files, seconds). The flow's listing takes that walk (:func:`walk` with
``prefetched``) instead of walking again; a run without one, or whose walk failed, walks itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future

__all__ = ["Walk", "walk", "prefetch"]

Walk = tuple[list[str], list[int], list[float], list[int]]
_PREFETCHED: dict[str, Future] = {}
_LOCK = threading.Lock()


def _scan(root: str) -> Walk:
    """Keys (relative, ``/``-separated), sizes, mtimes and inodes of every file under a local folder.

    One ``scandir`` per folder and one ``stat`` per file, each folder's entries handled by list
    comprehensions: about what ``os.walk`` and a ``stat`` per file cost.
    """
    keys: list[str] = []
    stats: list[os.stat_result] = []
    pending = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as scan:
            entries = list(scan)
        pending += [(f"{prefix}{e.name}/", e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        files = [e for e in entries if e.is_file()]
        stats += [os.stat(e.path) for e in files]
        keys += [prefix + e.name for e in files]
    return keys, [s.st_size for s in stats], [s.st_mtime for s in stats], [s.st_ino for s in stats]


def prefetch(root: str) -> None:
    """Start walking the local folder ``root`` in a thread, for this process's next :func:`walk` of it."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(_scan(root))
        except BaseException as err:  # the listing walks again and raises it there, named
            future.set_exception(err)

    with _LOCK:
        _PREFETCHED[os.path.abspath(root)] = future
    threading.Thread(target=run, name="strata-walk", daemon=True).start()


def walk(root: str) -> Walk:
    """The files under ``root``: the walk :func:`prefetch` started, once, or a walk now."""
    with _LOCK:
        future = _PREFETCHED.pop(os.path.abspath(root), None)
    if future is not None:
        try:
            return future.result()
        except Exception:
            pass
    return _scan(root)
