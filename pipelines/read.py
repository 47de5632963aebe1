"""Stage 2 — read bytes (CPU tasks, I/O bound).

Each row gets its file's bytes or an ``error`` status with the reason. Reads within a batch run on
a small thread pool because S3 latency, not CPU, bounds this stage.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from bifta_core.io import storage
from bifta_core.errors import StorageError
from pipelines.columns import to_table

if TYPE_CHECKING:
    from pipelines.plan import Stage

READ_THREADS = 16


def _read_one(uri: str) -> tuple[bytes, str | None]:
    try:
        return storage.read_bytes(uri), None
    except Exception as exc:  # any failure of one file becomes its error row
        return b"", _reason(exc)


def _reason(exc: BaseException) -> str:
    # storage.read_bytes raises StorageError chained to the OS/S3 error; look through the chain.
    for item in (exc, exc.__cause__):
        if isinstance(item, FileNotFoundError):
            return "file not found"
        if isinstance(item, IsADirectoryError):
            return "is a directory"
        if isinstance(item, PermissionError):
            return "permission denied"
    text = str(exc).strip().splitlines()
    if isinstance(exc, StorageError) and text:
        if text[0].endswith(("no such file or directory", "no such key", "no such object")):
            return "file not found"
        if "access denied" in text[0]:
            return "permission denied"
    return f"read failed: {text[0][:200] if text else type(exc).__name__}"


def read_batch(batch: dict[str, np.ndarray]) -> pa.Table:
    """Add ``data`` (bytes), ``status`` and ``error`` columns to a batch of ``image_id, uri`` rows."""
    uris = [str(u) for u in batch["uri"]]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(uris)))) as pool:
        results = list(pool.map(_read_one, uris))
    out = dict(batch)
    out["data"] = [r[0] for r in results]
    out["status"] = ["ok" if r[1] is None else "error" for r in results]
    out["error"] = [r[1] for r in results]
    return to_table(out)


#: Reads are batched at least this many files to a task: a task launch costs more than a small read.
MIN_READ_BATCH = 32


def read_stage(batch_size: int) -> Stage:
    """Reads are I/O bound (a thread pool per batch): a quarter core each."""
    from pipelines.plan import Stage

    return Stage("read", read_batch, batch_size=max(batch_size, MIN_READ_BATCH), num_cpus=0.25)

