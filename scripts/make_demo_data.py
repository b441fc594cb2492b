"""Regenerate the bundled demo dataset (strata/demo_data/vials) from the real vial photo in ../shared/fixtures.

Run once by a developer; the output is committed. Items are distinct views of the photo (dihedral turns,
crops, tone), kept only when their perceptual hash is far (> 12 bits) from every other item's, so the demo's
duplicate groups are exactly the planted ones:
- several photos per item (item id in the file name: ``{item}_{timestamp}.{ext}``), one item in two classes;
- an exact duplicate pair, a near duplicate (re-encoded JPEG), a truncated JPEG, a non-image file.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.inspect import phash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "vial_0_1543413266626.bmp"
OUT = ROOT / "strata" / "demo_data" / "vials"
CLASSES = {"good": 12, "bad_cap": 6, "missing_cap": 4}  # items per class: imbalanced
TURNS = [
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
]


def view(base: Image.Image, rng: np.random.Generator) -> Image.Image:
    turn = TURNS[rng.integers(len(TURNS))]
    image = base.transpose(turn) if turn is not None else base.copy()
    side = int(rng.integers(120, 224))
    x, y = (int(v) for v in rng.integers(0, 224 - side + 1, size=2))
    image = image.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BICUBIC)
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.4)))
    return ImageOps.autocontrast(image) if rng.random() < 0.3 else image


def defect(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    image = image.copy()
    draw = ImageDraw.Draw(image)
    if kind == "bad_cap":
        x, y = (int(v) for v in rng.integers(40, 160, size=2))
        draw.ellipse((x, y, x + 40, y + 25), fill=(20, 20, 20))
    elif kind == "missing_cap":
        draw.rectangle((0, 0, 224, 70), fill=(235, 235, 235))
    return image


def second_photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another photo of the same item: a small shift and a change of light."""
    dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
    shifted = image.transform(image.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=(128, 128, 128))
    return ImageEnhance.Brightness(shifted).enhance(float(rng.uniform(0.85, 1.15)))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer, format={"jpg": "JPEG", "png": "PNG", "bmp": "BMP"}[fmt], **({"quality": 85} if fmt == "jpg" else {})
    )
    return buffer.getvalue()


def main() -> None:
    rng = np.random.default_rng(2018)
    base = Image.open(FIXTURE).convert("RGB")
    shutil.rmtree(OUT, ignore_errors=True)
    accepted: list[int] = []
    item, stamp = 0, 1543412160501
    written: dict[str, list[Path]] = {}
    for category, items in CLASSES.items():
        made = 0
        while made < items:
            candidate = defect(view(base, rng), category, rng)
            hashed = phash(candidate)
            if any(bin(hashed ^ other).count("1") <= 12 for other in accepted):
                continue
            accepted.append(hashed)
            photos = [candidate] + [second_photo(candidate, rng) for _ in range(int(rng.integers(0, 3)))]
            for photo in photos:
                fmt = ["jpg", "jpg", "png", "bmp"][int(rng.integers(4)) if item % 5 else 0]
                path = OUT / category / f"{item}_{stamp}.{fmt}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode(photo, fmt))
                written.setdefault(category, []).append(path)
                stamp += int(rng.integers(400, 900))
            item += 1
            made += 1
    # The same physical vial (item 0) photographed again after its cap was removed.
    first = Image.open(written["good"][0]).convert("RGB")
    (OUT / "missing_cap" / f"0_{stamp}.jpg").write_bytes(encode(defect(first, "missing_cap", rng), "jpg"))
    # An exact duplicate: one file uploaded twice under another item id.
    shutil.copy(written["good"][3], OUT / "good" / f"900_{stamp + 1}{written['good'][3].suffix}")
    # A near duplicate: a bad_cap photo re-encoded as a low-quality JPEG under another id.
    (OUT / "bad_cap" / f"901_{stamp + 2}.jpg").write_bytes(_reencode(written["bad_cap"][1]))
    # A corrupt (truncated) JPEG, and a file that is not an image at all.
    data = encode(Image.open(written["missing_cap"][0]).convert("RGB"), "jpg")
    (OUT / "missing_cap" / f"902_{stamp + 3}.jpg").write_bytes(data[: len(data) // 3])
    (OUT / "good" / "NOTES.txt").write_text("Line 2, shift B. Not an image: strata skips and counts it.\n")
    print(f"wrote {sum(1 for _ in OUT.rglob('*'))} entries under {OUT}")


def _reencode(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=40)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
