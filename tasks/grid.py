"""The sample grid: a few images per category and purpose, drawn into one small PNG for people.

The PNG is part of each version (``sample_grid.png``); the run's summary artifact embeds a small JPEG of it
(:func:`markdown`), so the Prefect UI shows it whatever the manifest root is (a browser cannot open
``file://`` or private bucket URLs).
"""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import Sequence

import fsspec
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from loader import manifest as m
from strata.storage import naming, uri_path
from tasks.policy import stage

THUMB = 96
UI_BUDGET = 100_000  # characters of the grid's data URI in the summary artifact
JPEG_MAX_SIDE = 65_535  # pixels: the format's limit


def grid_samples(manifest: pd.DataFrame, per_cell: int = 4) -> pd.DataFrame:
    """Up to ``per_cell`` rows per (category, purpose), spread evenly over the keys: the grid's cells.

    Args:
        manifest: rows in key order (as every version is written).
    """
    picks = []
    for _, rows in sorted(manifest.groupby([m.CATEGORY, m.PURPOSE], sort=False).indices.items()):
        step = max(1, len(rows) // per_cell)
        picks.append(np.asarray(rows)[::step][:per_cell])
    return manifest.iloc[np.concatenate(picks)] if picks else manifest.iloc[0:0]


def draw(cells: Sequence[tuple[str, Sequence[bytes | None]]], thumb: int = THUMB) -> bytes:
    """A PNG: one row per labelled cell, its images as thumbnails (a grey square where bytes are missing)."""
    columns = max((len(images) for _, images in cells), default=1)
    label_width = 160
    canvas = Image.new("RGB", (label_width + columns * (thumb + 4), max(1, len(cells)) * (thumb + 4)), "white")
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (label, images) in enumerate(cells):
        top = row * (thumb + 4)
        pen.text((4, top + thumb // 2 - 6), label, fill="black", font=font)
        for column, data in enumerate(images):
            tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
            if data is not None:
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.seek(0)
                        image.draft("RGB", (thumb, thumb))
                        tile = image.convert("RGB")
                        tile.thumbnail((thumb, thumb))
                except OSError:
                    pass  # a file that cannot be shown stays a grey square; the grid is for people
            canvas.paste(tile, (label_width + column * (thumb + 4), top))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def markdown(png: bytes, caption: str, budget: int = UI_BUDGET) -> str:
    """The grid as markdown the Prefect UI renders: inline, as a JPEG data URI of at most ``budget`` characters.

    The UI loads an artifact whole, and a grid of photos as PNG runs to hundreds of kB; a JPEG scaled down
    until it fits keeps every run's summary quick to open. A grid that does not fit even at a quarter of its
    size (hundreds of categories) is named instead of shown.
    """
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR: decide before decoding it
    if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
        return _too_large(caption)
    with Image.open(io.BytesIO(png)) as image:
        grid = image.convert("RGB")
    scale = 1.0
    while scale >= 0.25:
        size = (max(1, round(grid.width * scale)), max(1, round(grid.height * scale)))
        scale *= 0.8
        if max(size) > JPEG_MAX_SIDE:
            continue
        buffer = io.BytesIO()
        grid.resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=80, optimize=True)
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        if len(uri) <= budget:
            return f"![{caption}]({uri})"
    return _too_large(caption)


def _too_large(caption: str) -> str:
    return f"{caption}: the sample grid is too large to show here; it is `{m.GRID_FILE}` in the version."


@stage("report")
def grid_task(fs: fsspec.AbstractFileSystem, manifest: pd.DataFrame, per_cell: int = 4) -> bytes:
    """Read a few images per category and purpose and draw the sample grid (Prefect task)."""
    picks = grid_samples(manifest, per_cell)
    cells: list[tuple[str, list[bytes | None]]] = []
    for (category, purpose), cell in picks.groupby([m.CATEGORY, m.PURPOSE], sort=True):
        images: list[bytes | None] = []
        for path in cell[m.PATH]:
            try:
                with naming("report", path):
                    images.append(fs.cat_file(uri_path(fs, path)))
            except FileNotFoundError:
                images.append(None)
        cells.append((f"{category} / {purpose}", images))
    return draw(cells)
