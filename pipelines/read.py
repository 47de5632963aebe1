"""Stage 2 — read bytes (CPU tasks, I/O bound).

Each row gets its file's bytes or an ``error`` status with the reason. Reads within a batch run on
a small thread pool because S3 latency, not CPU, bounds this stage.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bifta_core import storage

READ_THREADS = 16


def _read_one(uri: str) -> tuple[bytes, str | None]:
    try:
        return storage.read_bytes(uri), None
    except Exception as exc:  # any failure of one file becomes its error row
        return b"", _reason(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = str(exc).strip().splitlines()
    return f"read failed: {text[0][:200] if text else type(exc).__name__}"


def read_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Add ``data`` (bytes), ``status`` and ``error`` columns to a batch of ``image_id, uri`` rows."""
    uris = [str(u) for u in batch["uri"]]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(uris)))) as pool:
        results = list(pool.map(_read_one, uris))
    out = dict(batch)
    out["data"] = np.array([r[0] for r in results], dtype=object)
    out["status"] = np.array(["ok" if r[1] is None else "error" for r in results], dtype=object)
    out["error"] = np.array([r[1] for r in results], dtype=object)
    return out
