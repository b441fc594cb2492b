"""The sample grid: a few images per category and purpose, drawn into one small PNG for people.

The PNG is part of each version (``sample_grid.png``); the run's summary artifact embeds it (:func:`markdown`),
so the Prefect UI shows it whatever the manifest root is (a browser cannot open ``file://`` or private
bucket URLs).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import fsspec
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from loader import manifest as m
from strata.storage import naming, uri_path
from tasks.policy import stage

THUMB = 96


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


def markdown(png: bytes, caption: str) -> str:
    """The grid as markdown the Prefect UI renders: the PNG inline, as a data URI."""
    return f"![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})"


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
