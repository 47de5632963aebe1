"""A synthetic captioned dataset for the training tests: coloured shapes on textured backgrounds.

Every image shows one shape (circle, square, triangle) in one colour (red, green, blue, yellow)
on the left or the right, over a random grey texture (stripes, checks or noise); its caption names
colour, shape and position. 12 classes ("red circle" …), so chance is 1/12. Everything is seeded
from the image index, so the same index always gives the same image and caption.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
TEXTURES = ("striped", "checkered", "noisy")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _background(rng: np.random.Generator, size: int, texture: str) -> np.ndarray:
    base = rng.integers(90, 170)
    y, x = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 10))
    if texture == "striped":
        pattern = ((x + y * rng.integers(0, 2)) // period) % 2
    elif texture == "checkered":
        pattern = ((x // period) + (y // period)) % 2
    else:
        pattern = rng.random((size, size))
    grey = base + (pattern * 50 - 25) + rng.normal(0, 6, (size, size))
    return np.repeat(np.clip(grey, 0, 255)[:, :, None], 3, axis=2).astype(np.uint8)


def make_sample(index: int, size: int = 64, seed: int = 0) -> tuple[Image.Image, str, str]:
    """(image, caption, class name) of sample ``index``."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    img = Image.fromarray(_background(rng, size, texture))
    draw = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.18, 0.24))
    cx = int(size * (0.3 if pos == "left" else 0.7) + rng.integers(-2, 3))
    cy = int(size * 0.5 + rng.integers(-size // 6, size // 6 + 1))
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    caption = f"a photo of a {colour} {shape} on the {pos} of a {texture} background."
    return img, caption, f"{colour} {shape}"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(folder: Path, indices: range, size: int = 64, seed: int = 0, image_files: bool = True
                  ) -> Path:
    """Write images (PNG files) and a manifest ``manifest.parquet`` with uri/caption/label columns.

    ``image_files=False`` stores the PNG bytes in an ``image`` column instead of writing files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"image_id": [], "caption": [], "label": []}
    uris, blobs = [], []
    for i in indices:
        img, caption, label = make_sample(i, size, seed)
        rows["image_id"].append(f"syn-{i:06d}")
        rows["caption"].append(caption)
        rows["label"].append(label)
        if image_files:
            path = folder / f"syn-{i:06d}.png"
            img.save(path)
            uris.append(str(path))
        else:
            blobs.append(png_bytes(img))
    table = pa.table(rows)
    table = table.append_column("uri", pa.array(uris)) if image_files else table.append_column(
        "image", pa.array(blobs, type=pa.binary()))
    manifest = folder / "manifest.parquet"
    pq.write_table(table, manifest)
    return manifest
