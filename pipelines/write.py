"""Stage 6 — write each shard's rows as one Parquet file, on workers.

Output layout (version 2) under OUT:

    part-<shard>.parquet        every row of one shard (all label sets), sorted by image id
    _bifta_inputs/              the saved listing (``pipelines.inputs``)
    _bifta_run.json             run id, layout version, settings
    _bifta_summary.json         counts and timing, aggregated from shard statistics

Rows carry their ``shard``; the last stage of the plan (:func:`route_to_writers`) hands each batch's
rows to the :class:`ShardWriter` actor that owns the shard (a stable hash of its name), which
buffers them and, once every input of the shard has arrived, publishes ``part-<shard>.parquet``
atomically (local: temp file + rename; S3: one PUT). No row passes through the driver. A file that
exists is complete, so a resumed run lists file *names* and redoes unfinished shards whole: exactly
one row per (input, label set) wherever a run was killed. Each file's footer holds its shard's
statistics (``bifta.shard`` key-value metadata), which are also returned to the driver for the
summary. Columns are plain Arrow types, so polars, DuckDB and Spark read ``OUT/part-*.parquet``
directly; every other name under OUT starts with ``_``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bifta_core.io import storage

if TYPE_CHECKING:
    from pipelines.plan import Stage

logger = logging.getLogger("bifta.write")

LAYOUT_VERSION = 3  # 3: decided_by, views_encoded, top_views
PART_PREFIX = "part-"
RUN_FILE = "_bifta_run.json"
SUMMARY_FILE = "_bifta_summary.json"
#: The shards of the current pass and their input counts, saved by the driver for its writers: a
#: writer reads its share at start (and again if Ray restarts it), so no large argument is pinned.
PASS_FILE = "_bifta_pass.json"
STATS_KEY = b"bifta.shard"
SHARD_COLUMN = "shard"
ROUTE_BATCH_ROWS = 1024
_PART_RE = re.compile(r"^part-(\d{5}-\d{5})\.parquet$")

#: One view of ``top_views``: its box in original pixels and its WCA weight.
TOP_VIEWS_TYPE = pa.list_(pa.struct([pa.field("x0", pa.int32()), pa.field("y0", pa.int32()),
                                     pa.field("x1", pa.int32()), pa.field("y1", pa.int32()),
                                     pa.field("weight", pa.float32())]))

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
    pa.field("decided_by", pa.string()),  # the method whose answer this is (a cascade's first stage, or --method)
    pa.field("views_encoded", pa.int32()),  # views encoded for the image (0 when no view was needed)
    pa.field("top_views", TOP_VIEWS_TYPE),  # the --explain-views highest-weighted views (null: no view scored)
    pa.field("explanation", pa.list_(pa.string())),
    pa.field("model", pa.string()),
    pa.field("pretrained", pa.string()),
    pa.field("random_weights", pa.bool_()),
    pa.field("label_set", pa.string()),
    pa.field("label_set_id", pa.string()),
    pa.field("run_id", pa.string()),
]


def output_schema(with_true_label: bool) -> pa.Schema:
    """The output table's schema; ``true_label`` only when the inputs carry ground truth."""
    fields = list(_BASE_FIELDS)
    if with_true_label:
        fields.append(pa.field("true_label", pa.string()))
    return pa.schema(fields)


def part_name(shard: str) -> str:
    return f"{PART_PREFIX}{shard}.parquet"


def shard_of(path: str) -> str | None:
    """``.../part-00003-00012.parquet`` → ``00003-00012``; None for any other name."""
    m = _PART_RE.match(os.path.basename(path.rstrip("/")))
    return m.group(1) if m else None


def part_files(out: str) -> list[str]:
    """Published part files directly under ``out`` (names only: no file is opened)."""
    if not storage.exists(out):
        return []
    files, _ = storage.list_dir(out)
    return [f for f in files if os.path.basename(f).startswith(PART_PREFIX) and f.endswith(".parquet")]


def finished_shards(out: str) -> set[str]:
    """Shards whose part file is published (listed by name; hidden temp files never match)."""
    return {s for s in (shard_of(f) for f in part_files(out)) if s is not None}


def read_shard_stats(path: str) -> dict[str, Any]:
    """The statistics a writer stored in a part file's footer (reads the footer only)."""
    with storage.open_input(path) as fh:
        meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
    return json.loads(meta.get(STATS_KEY, b"{}"))


def shards_with_errors(out: str, threads: int = 32) -> set[str]:
    """Shards whose file holds error rows, from the footers' statistics (``--retry-errors``)."""
    files = [f for f in part_files(out) if shard_of(f)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        stats = list(pool.map(read_shard_stats, files))
    return {shard_of(f) for f, s in zip(files, stats) if s.get("errors", 0) > 0}  # type: ignore[misc]


def read_json(out: str, name: str) -> dict[str, Any] | None:
    path = storage.join(out, name)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def write_json(out: str, name: str, payload: dict[str, Any], *, compact: bool = False) -> str:
    path = storage.join(out, name)
    text = json.dumps(payload, separators=(",", ":"), default=str) if compact else \
        json.dumps(payload, indent=2, sort_keys=True, default=str)
    storage.write_bytes_atomic(path, text.encode("utf-8"))
    return path


def shard_stats(table: pa.Table, shard: str, seconds: float) -> dict[str, Any]:
    """Counts of one shard's rows: images, rows, ok/error images and the error reasons."""
    ids = table.column("image_id")
    errors = table.filter(pc.equal(table.column("status"), "error"))
    error_ids: dict[str, str] = dict(zip(errors.column("image_id").to_pylist(), errors.column("error").to_pylist()))
    images = len(pc.unique(ids))
    reasons = Counter(str(e or "unknown error").split(":")[0] for e in error_ids.values())
    stats = {"shard": shard, "images": images, "rows": table.num_rows, "ok": images - len(error_ids),
             "errors": len(error_ids), "error_reasons": dict(reasons), "seconds": round(seconds, 3)}
    if "views_encoded" in table.column_names:  # per image: the same on each of its label-set rows
        views = {i: v or 0 for i, v in zip(ids.to_pylist(), table.column("views_encoded").to_pylist())}
        stats.update(views_encoded=sum(views.values()), images_with_views=sum(1 for v in views.values() if v))
    return stats


class ShardWriter:
    """Buffers the rows of the shards it owns and publishes each one once it is complete.

    ``expected`` maps every shard this writer may receive to its number of inputs, each of which has
    ``rows_per_input`` rows (one per label set, told apart by ``label_set``); ``finalize`` turns a
    complete shard into the form that is stored (evaluation keeps its embeddings' own layout). A row
    seen before (same image and label set) is dropped, so a batch replayed by a retried task never duplicates rows. Pure
    Python + Arrow: the pipeline runs it as a Ray actor, tests call it directly.
    """

    def __init__(self, out: str, schema: pa.Schema, expected: dict[str, int] | None = None, *,
                 writer: tuple[int, int] | None = None, file_metadata: dict[str, str] | None = None,
                 finalize: Callable[[pa.Table], pa.Table] | None = None, rows_per_input: int = 1,
                 embeddings: dict[str, Any] | None = None) -> None:
        self.out = out
        self.schema = schema
        # ``{"dim", "dtype", "views", "meta"}``: the rows carry embeddings, kept next to each part file
        # (bifta_core.io.saved_embeddings); the buffered rows then have those columns too.
        self.embeddings = embeddings
        self._buffered = schema
        if embeddings is not None:
            from bifta_core.io.saved_embeddings import FLAT_FIELDS

            self._buffered = pa.schema([*schema, *FLAT_FIELDS])
        if expected is None:  # writer (i, n): its shards of the pass plan the driver saved under ``out``
            i, n = writer or (0, 1)
            plan = read_json(out, PASS_FILE) or {}
            expected = {s: c for s, c in plan.get("shards", {}).items() if writer_for(s, n) == i}
        self.expected = dict(expected)
        self.file_metadata = {k.encode(): v.encode() for k, v in (file_metadata or {}).items()}
        self._tables: dict[str, list[pa.Table]] = {}
        self._seen: dict[str, set[str]] = {}
        self._started: dict[str, float] = {}
        self._sort = [(c, "ascending") for c in ("image_id", "label_set") if c in schema.names]
        self.finalize = finalize  # the stored form of a complete shard (statistics are taken before it)
        self.rows_per_input = rows_per_input  # one row per label set

    def add(self, table: pa.Table) -> list[dict[str, Any]]:
        """Take rows (with a ``shard`` column); → statistics of the shards this call published."""
        published = []
        shards = table.column(SHARD_COLUMN)
        distinct = pc.unique(shards).to_pylist()
        for shard in distinct:
            if shard not in self.expected:
                raise RuntimeError(f"shard {shard} was not planned for this writer")
            part = table.filter(pc.equal(shards, shard)) if len(distinct) > 1 else table
            seen = self._seen.setdefault(shard, set())
            keys = self._keys(part)
            fresh = [k not in seen for k in keys]
            if not all(fresh):
                part = part.filter(pa.array(fresh))
                keys = [k for k, f in zip(keys, fresh) if f]
            if not part.num_rows:
                continue
            seen.update(keys)
            self._started.setdefault(shard, time.time())
            self._tables.setdefault(shard, []).append(part.drop_columns([SHARD_COLUMN]).select(self._buffered.names)
                                                      .cast(self._buffered))
            if len(seen) >= self.expected[shard] * self.rows_per_input:
                published.append(self._publish(shard))
        return published

    def _keys(self, part: pa.Table) -> list[Any]:
        """One key per row: the image, and its label set when an image has a row per label set."""
        ids = part.column("image_id").to_pylist()
        if self.rows_per_input == 1:
            return ids
        return list(zip(ids, part.column("label_set").to_pylist()))

    def _publish(self, shard: str) -> dict[str, Any]:
        table = pa.concat_tables(self._tables.pop(shard)).sort_by(self._sort)
        stats = shard_stats(table, shard, time.time() - self._started.pop(shard))
        if self.embeddings is not None:  # published first: a part file's embeddings exist once it does
            self._publish_embeddings(table, shard, stats)
            table = table.select(self.schema.names)
        if self.finalize is not None:
            table = self.finalize(table)
        meta = {**(table.schema.metadata or {}), **self.file_metadata, STATS_KEY: json.dumps(stats).encode()}
        table = table.replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes_atomic(storage.join(self.out, part_name(shard)), sink.getvalue().to_pybytes())
        del self._seen[shard]
        return stats

    def _publish_embeddings(self, table: pa.Table, shard: str, stats: dict[str, Any]) -> None:
        from bifta_core.io.saved_embeddings import SAVED_DIR, to_stored

        e = self.embeddings
        saved = to_stored(table, e["dim"], e["dtype"], e["views"], e["meta"])
        meta = {**saved.schema.metadata, STATS_KEY: json.dumps(stats).encode()}
        sink = pa.BufferOutputStream()
        pq.write_table(saved.replace_schema_metadata(meta), sink, compression="zstd")
        storage.write_bytes_atomic(storage.join(self.out, SAVED_DIR, part_name(shard)), sink.getvalue().to_pybytes())

    def open_shards(self) -> dict[str, int]:
        """Shards with rows buffered but not yet complete → rows received (none after a clean run)."""
        return {s: len(self._seen[s]) for s in self._tables}


def writer_for(shard: str, n_writers: int) -> int:
    """The writer that owns ``shard``: a stable hash, identical on every worker."""
    return zlib.crc32(shard.encode("utf-8")) % n_writers


def route_to_writers(batch: pa.Table, writers: Sequence[Any], rows_per_input: int = 1) -> pa.Table:
    """Last stage of a plan: send each shard's rows to its writer actor; → one progress row.

    The row holds the batch's image count (rows / rows per image) and the statistics of any shard that got published, so
    the driver sees progress and the summary without seeing a result row.
    """
    import ray

    shards = batch.column(SHARD_COLUMN)
    groups: dict[int, list[str]] = {}
    for shard in pc.unique(shards).to_pylist():
        groups.setdefault(writer_for(shard, len(writers)), []).append(shard)
    refs = []
    for w, owned in groups.items():
        part = batch if len(groups) == 1 else batch.filter(pc.is_in(shards, pa.array(owned, pa.string())))
        refs.append(writers[w].add.remote(part))
    published = [s for r in ray.get(refs) for s in r]
    return pa.table({"images": pa.array([batch.num_rows / rows_per_input], pa.float64()),
                     "published": pa.array([json.dumps(published)], pa.string())})


def write_stage(writers: Sequence[Any], shard_size: int, rows_per_input: int = 1) -> Stage:
    """The plan's last stage: rows to their shards' writers (light: the writers do the work). Rows are
    bundled into batches of ``ROUTE_BATCH_ROWS`` (at most a shard's size, so a bundle never holds back
    the rows that complete a shard) so a stream of small encode batches does not pay a task launch each."""
    from pipelines.plan import Stage

    return Stage("write", route_to_writers, batch_size=min(ROUTE_BATCH_ROWS, shard_size), num_cpus=0.05,
                 batch_format="pyarrow",
                 fn_kwargs={"writers": list(writers), "rows_per_input": rows_per_input})
