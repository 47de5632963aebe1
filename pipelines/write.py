"""Stage 6 — write Parquet (zstd), resumably.

Rows stream back to the driver and are written in files of at most ``shard_size`` images. A file
is published atomically (temporary name then rename locally; a single PUT on S3), so a file that
exists is complete: resume reads the ``image_id`` column of the published files and skips those
images. Files are named by a hash of the image ids they hold, which is deterministic for a given
input order and never collides between a run and its resumption. All rows of one image (one per
label set) always land in the same file. Columns are plain Arrow types (no Ray extension types),
so polars, DuckDB and Spark read the folder directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bifta_core import storage

logger = logging.getLogger("bifta.write")

PART_PREFIX = "part-"
RUN_FILE = "_bifta_run.json"
SUMMARY_FILE = "_bifta_summary.json"

_BASE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("label", pa.string()),
    pa.field("label_index", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("topk_labels", pa.list_(pa.string())),
    pa.field("topk_scores", pa.list_(pa.float32())),
    pa.field("margin", pa.float32()),
    pa.field("method", pa.string()),
    pa.field("views_generated", pa.int32()),
    pa.field("views_kept", pa.int32()),
    pa.field("explanation", pa.list_(pa.string())),
    pa.field("model", pa.string()),
    pa.field("pretrained", pa.string()),
    pa.field("random_weights", pa.bool_()),
    pa.field("label_set", pa.string()),
    pa.field("label_set_id", pa.string()),
    pa.field("run_id", pa.string()),
]


def output_schema(with_true_label: bool) -> pa.Schema:
    """The output table's schema; ``true_label`` only when the manifest has a ``label`` column."""
    fields = list(_BASE_FIELDS)
    if with_true_label:
        fields.append(pa.field("true_label", pa.string()))
    return pa.schema(fields)


def part_files(out: str) -> list[str]:
    """Published part files under ``out`` (temporary/hidden files are never listed)."""
    if not storage.exists(out):
        return []
    files = storage.list_files(out, {".parquet"})
    return [f for f in files if os.path.basename(f).startswith(PART_PREFIX)]


def completed_ids(out: str) -> set[str]:
    """Image ids already written under ``out`` (what a resumed run skips).

    Files are read through the storage layer's retries, so a transient S3 error stops the run
    (rerun to resume) instead of being mistaken for a damaged file. Only a file that reads but does
    not parse as Parquet — impossible for files this writer published — is moved aside and redone.
    """
    done: set[str] = set()
    for path in part_files(out):
        data = storage.read_bytes(path)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["image_id"])
        except (pa.ArrowInvalid, OSError) as exc:
            logger.warning("output file %s is not valid Parquet (%s); moved aside, its images are labelled again",
                           path, str(exc).splitlines()[0])
            storage.write_bytes_atomic(path + ".corrupt", data)
            storage.remove(path)
            continue
        done.update(table.column("image_id").to_pylist())
    return done


def read_json(out: str, name: str) -> dict[str, Any] | None:
    path = storage.join(out, name)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def write_json(out: str, name: str, payload: dict[str, Any]) -> str:
    path = storage.join(out, name)
    storage.write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode("utf-8"))
    return path


class ResultWriter:
    """Buffers result rows and publishes them as Parquet files of at most ``shard_size`` images."""

    def __init__(self, out: str, schema: pa.Schema, shard_size: int) -> None:
        self.out = out
        self.schema = schema
        self.shard_size = shard_size
        self._pending: list[pa.Table] = []
        self._pending_images = 0
        self.files: list[str] = []
        self.rows_written = 0

    def add(self, columns: dict[str, list] | pa.Table) -> None:
        """Add the rows of one encoded batch; files close at ``shard_size`` images, never mid-image."""
        table = columns if isinstance(columns, pa.Table) else pa.table(columns)
        table = table.select(self.schema.names).cast(self.schema)
        ids = list(dict.fromkeys(table.column("image_id").to_pylist()))
        whole_batch = len(ids)
        while ids:
            room = self.shard_size - self._pending_images
            take, ids = ids[:room], ids[room:]
            if len(take) == whole_batch:
                part = table
            else:
                part = table.filter(pa.compute.is_in(table.column("image_id"), value_set=pa.array(take, pa.string())))
            self._pending.append(part)
            self._pending_images += len(take)
            if self._pending_images >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_images = [], 0
        table = table.sort_by([("image_id", "ascending"), ("label_set", "ascending")])
        ids = sorted(set(table.column("image_id").to_pylist()))
        digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:20]
        path = storage.join(self.out, f"{PART_PREFIX}{digest}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
        self.files.append(path)
        self.rows_written += table.num_rows

    def close(self) -> None:
        self.flush()
