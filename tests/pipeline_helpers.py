"""Builders and readers for the pipeline tests: synthetic photos, broken files, label sets, outputs.

Kept free of pytest fixtures so a test module (or a debugging session) can call them directly.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The output contract: every one of these columns, with a plain (non-extension) Arrow type.
CONTRACT_COLUMNS = (
    "image_id", "uri", "status", "error", "label", "score", "topk_labels", "topk_scores", "margin", "method",
    "views_generated", "views_kept", "explanation", "model", "pretrained", "label_set_id", "run_id",
)

#: A small label set with every role file, so each method has its texts.
LABELSET = {
    "classes": ["tench", "goldfish", "tabby cat", "sports car"],
    "cupl": {
        "tench": ["a tench is a greenish freshwater fish.", "a photo of a tench held by an angler.",
                  "the tench has small red eyes."],
        "goldfish": ["a goldfish is a small orange fish.", "goldfish swim in a bowl.",
                     "a goldfish has shiny golden scales."],
        "tabby cat": ["a tabby cat has a striped coat.", "a tabby cat sleeps on a sofa.",
                      "the tabby has an M-shaped mark on its forehead."],
        "sports car": ["a sports car is low and fast.", "a red sports car on a race track.",
                       "a sports car has two doors and a spoiler."],
    },
    "clip-d": {
        "tench": ["olive green scales", "a thick body"],
        "goldfish": ["orange colour", "a small fish"],
        "tabby cat": ["striped fur", "pointed ears"],
        "sports car": ["a low body", "large wheels"],
    },
    "clip-e": ["a photo of a {}.", "a blurry photo of a {}.", "a drawing of a {}."],
}


# ---------------------------------------------------------------------------------------------- images
def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: compresses and resamples like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    r = 127 + 120 * np.sin(x / width * (3 + seed % 5) + phase[0])
    g = 127 + 120 * np.cos(y / height * (2 + seed % 3) + phase[1])
    b = 127 + 120 * np.sin((x + y) / (width + height) * 4 + phase[2])
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 10, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_generated_images(folder: Path, n: int, *, seed: int = 0, prefix: str = "gen") -> list[Path]:
    """``n`` small synthetic photos in varied sizes, formats and modes (JPEG, PNG, grey, RGBA)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = 72 + (i * 23) % 90, 64 + (i * 37) % 110
        img = Image.fromarray(photo_like(w, h, seed * 1000 + i))
        kind = i % 4
        if kind == 0:
            path = folder / f"{prefix}{i:03d}.jpg"
            path.write_bytes(encode(img, "JPEG", quality=90))
        elif kind == 1:
            path = folder / f"{prefix}{i:03d}.png"
            path.write_bytes(encode(img, "PNG"))
        elif kind == 2:
            path = folder / f"{prefix}{i:03d}.jpeg"
            path.write_bytes(encode(img.convert("L"), "JPEG", quality=85))
        else:
            path = folder / f"{prefix}{i:03d}.png"
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.fromarray(np.full((h, w), 200, dtype=np.uint8)))
            path.write_bytes(encode(rgba, "PNG"))
        paths.append(path)
    return paths


def _png_with_bad_crc() -> bytes:
    """A valid small PNG whose IHDR checksum is wrong."""
    data = bytearray(encode(Image.fromarray(photo_like(40, 30, 7)), "PNG"))
    # 8-byte signature, 4-byte length, 'IHDR', 13 bytes of header, then the 4-byte CRC at offset 29.
    assert data[12:16] == b"IHDR"
    struct.pack_into(">I", data, 29, (zlib.crc32(bytes(data[12:29])) ^ 0xDEADBEEF) & 0xFFFFFFFF)
    return bytes(data)


#: Broken inputs and the substring expected in each one's ``error`` (with max_pixels=HUGE_LIMIT).
HUGE_LIMIT = 1_000_000
CORRUPT_EXPECTED = {
    "bad_truncated.jpg": "truncated",
    "bad_empty.jpg": "empty file",
    "bad_text.jpg": "not an image",
    "bad_crc.png": "",  # Pillow rejects it while reading the header; any non-empty reason will do
    "bad_huge.png": "too large",
}


def write_corrupt_images(folder: Path) -> dict[str, str]:
    """Write the files of :data:`CORRUPT_EXPECTED`; returns {file name: expected reason substring}."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(Image.fromarray(photo_like(120, 90, 3)), "JPEG", quality=90)
    (folder / "bad_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "bad_empty.jpg").write_bytes(b"")
    (folder / "bad_text.jpg").write_text("this is a text file with a .jpg name\n" * 4)
    (folder / "bad_crc.png").write_bytes(_png_with_bad_crc())
    # 1100x1000 = 1.1 MP, above HUGE_LIMIT; a flat colour keeps the file a few kB.
    (folder / "bad_huge.png").write_bytes(encode(Image.new("RGB", (1100, 1000), (20, 140, 60)), "PNG"))
    return dict(CORRUPT_EXPECTED)


# ---------------------------------------------------------------------------------------------- label sets
def write_labelset(folder: Path, spec: dict[str, Any] = LABELSET, **overrides: Any) -> Path:
    """A label-set folder (classes.json, cupl.json, clip-d.json, clip-e.json) in ``folder``."""
    spec = {**spec, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    files = {"classes": "classes.json", "cupl": "cupl.json", "clip-d": "clip-d.json", "clip-e": "clip-e.json"}
    for key, name in files.items():
        if spec.get(key) is not None:
            (folder / name).write_text(json.dumps(spec[key], indent=1))
    return folder


def write_imagenet_subset(descriptions_dir: Path, dest: Path, classes: int = 100, *,
                          files: Iterable[str] = ("classes.json", "cupl.json", "clip-d.json", "clip-e.json"),
                          per_class: dict[str, int] | None = None) -> Path:
    """The published ImageNet label set's first ``classes`` classes (in ``dest``), keeping each of
    ``files`` that exists; ``per_class`` caps the texts per class of a file (``{"cupl.json": 6}``)
    or the templates of ``clip-e.json``. The sample photos are of every fifth class, so the first 20
    photos' classes are among the first 100; the 1000 classes' texts would cost tests minutes of text
    encoding on a small CPU."""
    src = descriptions_dir / "imagenet"
    dest.mkdir(parents=True, exist_ok=True)
    names = json.loads((src / "classes.json").read_text())[:classes]
    caps = per_class or {}
    for name in files:
        if not (src / name).exists():
            continue
        data = json.loads((src / name).read_text())
        if name == "classes.json":
            data = names
        elif isinstance(data, dict):
            data = {c: data[c][: caps.get(name)] for c in names if c in data}
        else:  # templates
            data = data[: caps.get(name)]
        (dest / name).write_text(json.dumps(data))
    return dest


# ---------------------------------------------------------------------------------------------- outputs
def part_paths(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def read_output(out: Path) -> pa.Table:
    """All published part files of ``out`` as one table (pyarrow, no Ray)."""
    paths = part_paths(out)
    assert paths, f"no part files in {out}: {sorted(os.listdir(out))}"
    return pa.concat_tables([pq.read_table(p) for p in paths])


def sorted_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts in (image_id, label_set) order, for comparing runs."""
    return sorted(table.to_pylist(), key=lambda r: (r["image_id"], r.get("label_set") or ""))


def plain_type(t: pa.DataType) -> bool:
    """True for a non-extension Arrow type whose nested children are plain too."""
    if isinstance(t, pa.ExtensionType):
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return plain_type(t.value_type)
    if pa.types.is_struct(t):
        return all(plain_type(f.type) for f in t)
    return True


# ---------------------------------------------------------------------------------------------- CLI
def cli_env() -> dict[str, str]:
    """Environment for a ``python -m jobs.<command>`` subprocess: its own embedded Ray (never a cluster in
    RAY_ADDRESS), repo importable."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def label_cmd(args: Iterable[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.label", *map(str, args)]


def run_cli(args: Iterable[str], *, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(label_cmd(args), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():  # structs: top_views' boxes
        return all(_close(a[k], b[k], tol) for k in a)
    return a == b


def row_differences(got: list[dict[str, Any]], want: list[dict[str, Any]], limit: int = 5,
                    tol: float = 1e-5) -> list[str]:
    """Readable differences between two row lists in the same order (empty when equal).

    Floats (scores, margins, view weights) may differ by ``tol`` (relative): the encoder batches images in arrival
    order, and a view encoded next to other neighbours moves in the last float bits (README,
    determinism). Everything else — labels, ids, top-k order, counts — must be equal; ``tol=0`` asks
    for bit-identical rows."""
    if len(got) != len(want):
        return [f"{len(got)} rows != {len(want)} rows"]
    out = []
    for a, b in zip(got, want):
        for key in sorted(set(a) | set(b)):
            if not _close(a.get(key), b.get(key), tol):
                out.append(f"{a.get('image_id')}[{key}]: {a.get(key)!r} != {b.get(key)!r}")
                if len(out) >= limit:
                    return out
    return out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a ``start_new_session`` child and every process of its session (its embedded Ray)."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) == proc.pid and int(parts[0]) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(parts[0]), signal.SIGKILL)
