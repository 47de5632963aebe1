"""Stage 1 — list inputs once, on workers, into shards saved under the output folder.

INPUT is a folder (recursive), a glob, an ``s3://`` prefix, one manifest (``.csv``/``.parquet``) or a
folder/prefix/glob of manifests. The driver only plans *sources* (a sub-folder, a manifest file, a
range of a Parquet manifest's row groups); one Ray task per source lists or reads it and writes its
rows ``image_id, uri[, true_label]`` as shard input files of at most ``shard_size`` rows:

    OUT/_bifta_inputs/<source:05d>.parquet     one source's rows, one row group per shard
    OUT/_bifta_inputs/_index.json              shard names and sizes (written last)

A shard is the unit of work and of output: every input belongs to exactly one shard — shard
``<source>-<chunk>`` is row group ``chunk`` of its source's saved rows — and becomes
``OUT/part-<source>-<chunk>.parquet``. The listing is saved once, so a resumed run lists nothing and
the image set of a run is fixed. The driver never holds a row: image ids are checked for
duplicates by hash buckets on workers (:func:`check_duplicates`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bifta_core.io import storage
from bifta_core.errors import InputError

if TYPE_CHECKING:
    from pipelines.plan import Stage

logger = logging.getLogger("bifta.inputs")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"})
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")
URI_COLUMNS = ("uri", "path")  # ``path`` accepted as an alias (e.g. an ImageNet-style labels.csv)
INPUTS_DIR = "_bifta_inputs"
INDEX_FILE = "_index.json"
LISTING_VERSION = 1
#: Image ids are checked for duplicates in this many hash buckets, one worker task each.
DUP_BUCKETS = 16
#: A Parquet manifest is read by one task per run of row groups holding about this many rows.
SOURCE_ROWS = 1_000_000
INPUT_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("uri", pa.string()),
                          pa.field("true_label", pa.string())])


@dataclass(frozen=True)
class ListingOptions:
    """How inputs become rows: shard size and where ground truth comes from."""

    shard_size: int
    label_column: str = "label"  # manifest column copied to ``true_label`` when present
    require_labels: bool = False  # evaluation: a manifest must have ``label_column``; folders use sub-folders


@dataclass(frozen=True)
class Source:
    """One unit of listing work. ``kind``: ``files`` (listed here), ``dir`` (recursive listing),
    ``glob``, ``manifest``; ``root`` is what image ids are relative to (or a manifest's folder)."""

    index: int
    kind: str
    location: str
    root: str = ""
    row_groups: tuple[int, int] | None = None  # a Parquet manifest's row groups [a, b)
    files: tuple[str, ...] = ()


@dataclass
class Listing:
    """The saved listing of a run: shard names in order and their sizes."""

    input: str
    shards: list[tuple[str, int]]
    has_truth: bool
    limit: int | None = None

    @property
    def images(self) -> int:
        return sum(n for _, n in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"version": LISTING_VERSION, "input": self.input, "limit": self.limit, "has_truth": self.has_truth,
                "images": self.images, "shards": [list(s) for s in self.shards]}


def inputs_dir(out: str) -> str:
    return storage.join(out, INPUTS_DIR)


def source_input_path(out: str, source: int) -> str:
    """The saved rows of one source: one Parquet file, one row group per shard."""
    return storage.join(out, INPUTS_DIR, f"{source:05d}.parquet")


# ------------------------------------------------------------------------------------ planning
def _has_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def normalise_spec(spec: str) -> str:
    """A local INPUT as an absolute path (so ids and the saved listing do not depend on the cwd)."""
    if not spec:
        raise InputError("no INPUT given")
    return spec if storage.is_remote(spec) else os.path.abspath(os.path.expanduser(spec))


def _glob_root(pattern: str) -> str:
    """The fixed directory part of a glob (everything before the first component with a wildcard)."""
    fixed = []
    for part in pattern.split("/")[:-1]:
        if _has_glob(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(uri)


def _manifest_sources(files: list[str], start: int) -> list[Source]:
    """One source per CSV manifest, one per run of row groups (~SOURCE_ROWS rows) of a Parquet one."""
    sources: list[Source] = []
    for path in files:
        if path.lower().endswith(".csv"):
            sources.append(Source(start + len(sources), "manifest", path, _parent(path)))
            continue
        groups = _row_group_sizes(path)
        a, rows = 0, 0
        for g, n in enumerate(groups):
            rows += n
            if rows >= SOURCE_ROWS or g == len(groups) - 1:
                sources.append(Source(start + len(sources), "manifest", path, _parent(path), (a, g + 1)))
                a, rows = g + 1, 0
        if not groups:
            sources.append(Source(start + len(sources), "manifest", path, _parent(path), (0, 0)))
    return sources


def _row_group_sizes(path: str) -> list[int]:
    try:
        with storage.open_input(path) as fh:
            meta = pq.ParquetFile(fh).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None


def plan_sources(spec: str) -> list[Source]:
    """What to list, decided on the driver from at most one directory level (never a recursive walk).

    Raises :class:`InputError` for a missing location or a file that is neither an image nor a manifest.
    """
    spec = normalise_spec(spec)
    if _has_glob(spec):
        root = _glob_root(spec)
        if _is_manifest(spec):  # a glob of manifests: each match is read like a manifest
            files = storage.glob(spec)
            if not files:
                raise InputError(f"no manifest matches {spec}")
            return _manifest_sources(files, 0)
        return [Source(0, "glob", spec, root)]
    if _is_manifest(spec):
        if not storage.exists(spec):
            raise InputError(f"manifest not found: {spec}")
        return _manifest_sources([spec], 0)
    if storage.isdir(spec):
        files, dirs = storage.list_dir(spec)
        manifests = [f for f in files if _is_manifest(f)]
        images = [f for f in files if _is_image(f)]
        if manifests and not images and not dirs:
            return _manifest_sources(manifests, 0)
        # Top-level images are one source; each sub-folder is listed by a task of its own, so an
        # S3 prefix is listed in parallel over its common prefixes.
        sources = [Source(0, "files", spec, spec, files=tuple(images))] if images else []
        sources += [Source(len(sources) + i, "dir", d, spec) for i, d in enumerate(dirs)]
        if not sources:
            raise InputError(f"no images found in {spec} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return sources
    if storage.exists(spec):
        if not _is_image(spec):
            raise InputError(f"{spec} is neither a folder, a manifest (.csv/.parquet) nor an image file")
        return [Source(0, "files", spec, _parent(spec), files=(spec,))]
    raise InputError(f"input not found: {spec}")


# ------------------------------------------------------------------------------ reading sources
def _relative(files: list[str], root: str) -> list[str]:
    prefix = root.rstrip("/") + "/"
    return [f[len(prefix):] if root and f.startswith(prefix) else f for f in files]


def _listed(files: list[str], root: str, options: ListingOptions) -> pa.Table:
    ids = _relative(files, root)
    labels: list[str | None] = [None] * len(ids)
    if options.require_labels:
        flat = [i for i in ids if "/" not in i.strip("/")]
        if flat:
            raise InputError(
                f"{root}: evaluation needs one sub-folder per class (or a manifest with a label column); "
                f"{len(flat)} images lie directly in it, e.g. {flat[:3]}")
        labels = [i.strip("/").split("/", 1)[0] for i in ids]
    return pa.table({"image_id": ids, "uri": files, "true_label": labels}, schema=INPUT_SCHEMA)


#: A remote manifest read that fails (a 503 storm outlasting s3fs's own retries) is read again
#: from the start this many times before it is reported.
MANIFEST_ATTEMPTS = 4


def _manifest_batches(source: Source) -> Iterator[pa.Table]:
    """The manifest's rows in batches; a remote read that fails midway starts again (the batches
    already yielded are skipped), so a transient S3 error never truncates a listing."""
    done = 0
    for attempt in range(MANIFEST_ATTEMPTS):
        seen = 0
        try:
            for table in _manifest_batches_once(source):
                seen += table.num_rows
                if seen <= done:
                    continue
                fresh = table.slice(table.num_rows - (seen - done)) if seen - table.num_rows < done else table
                done = seen
                yield fresh
            return
        except InputError:
            if not storage.is_remote(source.location) or attempt + 1 == MANIFEST_ATTEMPTS:
                raise
            logger.warning("reading manifest %s failed (attempt %d of %d); reading it again",
                           source.location, attempt + 1, MANIFEST_ATTEMPTS)
            time.sleep(0.5 * 2 ** attempt)


def _manifest_batches_once(source: Source) -> Iterator[pa.Table]:
    path = source.location
    try:
        if path.lower().endswith(".csv"):
            with storage.open_input(path) as fh:
                reader = pacsv.open_csv(fh, convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in ("uri", "path", "image_id", "label", "bucket", "key")}))
                for batch in reader:
                    yield pa.Table.from_batches([batch])
        else:
            with storage.open_input(path) as fh:
                pf = pq.ParquetFile(fh)
                a, b = source.row_groups or (0, pf.metadata.num_row_groups)
                if b > a:
                    for batch in pf.iter_batches(row_groups=list(range(a, b)), batch_size=65536):
                        yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None


def _strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.cast(pa.string())


def _manifest_rows(table: pa.Table, source: Source, options: ListingOptions) -> pa.Table:
    """A manifest batch → ``image_id, uri, true_label`` (vectorised: ~10^7 rows/s, no Python loop)."""
    path, names = source.location, table.column_names
    if "bucket" in names and "key" in names and not any(c in names for c in URI_COLUMNS):
        # S3 Inventory layout (its Parquet/ORC files name these columns ``bucket`` and ``key``)
        uris = pc.binary_join_element_wise("s3://", _strings(table.column("bucket")), "/",
                                           _strings(table.column("key")), "")
        uri_col = "bucket/key"
    else:
        uri_col = next((c for c in URI_COLUMNS if c in names), None)
        if uri_col is None:
            raise InputError(f"manifest {path} has no 'uri' column (columns: {', '.join(names)})")
        uris = pc.utf8_trim_whitespace(_strings(table.column(uri_col)))
    if uris.null_count or pc.any(pc.equal(uris, "")).as_py():
        raise InputError(f"manifest {path} has empty '{uri_col}' values")
    # Relative entries are relative to the manifest, so a dataset folder can be moved as a whole.
    absolute = pc.or_(pc.starts_with(uris, "/"), pc.match_substring_regex(uris, r"^[A-Za-z][A-Za-z0-9+.\-]*://"))
    if not pc.all(absolute).as_py():
        joined = pc.binary_join_element_wise(source.root.rstrip("/"), uris, "/")
        uris = pc.if_else(absolute, uris, joined)
    if "image_id" in names:
        ids = _strings(table.column("image_id"))
        if ids.null_count or pc.any(pc.equal(ids, "")).as_py():
            raise InputError(f"manifest {path} has empty 'image_id' values")
    else:
        ids = pc.replace_substring_regex(uris, "^file://", "", max_replacements=1)
    if options.label_column in names:
        labels = _strings(table.column(options.label_column))
    elif options.require_labels:
        raise InputError(f"manifest {path} has no '{options.label_column}' column for the ground truth "
                         f"(columns: {', '.join(names)}); pick one with --label-column")
    else:
        labels = pa.nulls(len(ids), pa.string())
    return pa.table({"image_id": ids, "uri": uris, "true_label": labels}, schema=INPUT_SCHEMA)


def _source_tables(source: Source, options: ListingOptions) -> Iterator[pa.Table]:
    if source.kind == "manifest":
        for table in _manifest_batches(source):
            yield _manifest_rows(table, source, options)
        return
    yield from _listed_tables(source, options)


def _listed_tables(source: Source, options: ListingOptions) -> Iterator[pa.Table]:
    if source.kind == "files":
        files = list(source.files)
    elif source.kind == "dir":
        files = storage.list_files(source.location, IMAGE_EXTENSIONS)
    else:  # glob
        files = [f for f in storage.glob(source.location) if _is_image(f)]
    for i in range(0, len(files), 65536):
        yield _listed(files[i:i + 65536], source.root, options)


def id_hashes(ids: pa.Array | list[str]) -> np.ndarray:
    """64-bit hashes of image ids (polars' hash, fixed seeds): the duplicate check's keys."""
    import polars as pl

    return pl.Series("id", ids, dtype=pl.String).hash(seed=0x5EED).to_numpy().astype(np.uint64)


def list_source(source: Source, out: str, options: ListingOptions) -> tuple[Any, ...]:
    """Save one source's rows (a row group per shard of ``shard_size`` rows) → ``(head, *hash buckets)``.

    The head is ``{"shards": [(name, rows), ...] in order, "has_truth": any ground truth}``; each hash bucket is a sorted ``uint64`` array of
    the id hashes that fall in it (they stay in the object store; the driver only holds references).
    """
    shards: list[tuple[str, int]] = []
    has_truth = False
    buckets: list[list[np.ndarray]] = [[] for _ in range(DUP_BUCKETS)]
    pending: list[pa.Table] = []
    pending_rows = 0
    # The writer is closed (its footer written) before open_output publishes or, on an error,
    # discards the file: a failed listing leaves no half-written writer behind.
    with storage.open_output(source_input_path(out, source.index)) as fh, \
            pq.ParquetWriter(fh, INPUT_SCHEMA, compression="zstd") as writer:

        def flush(tables: list[pa.Table]) -> None:
            # one row group per shard: a shard is read back as row group ``chunk`` of its source's file
            table = pa.concat_tables(tables).combine_chunks()
            writer.write_table(table, row_group_size=table.num_rows)
            shards.append((f"{source.index:05d}-{len(shards):05d}", table.num_rows))

        for table in _source_tables(source, options):
            if not table.num_rows:
                continue
            has_truth = has_truth or table.column("true_label").null_count < table.num_rows
            h = id_hashes(table.column("image_id").combine_chunks())
            which = h % DUP_BUCKETS
            for b in range(DUP_BUCKETS):
                buckets[b].append(h[which == b])
            while table.num_rows:
                take = min(options.shard_size - pending_rows, table.num_rows)
                pending.append(table.slice(0, take))
                pending_rows += take
                table = table.slice(take)
                if pending_rows == options.shard_size:
                    flush(pending)
                    pending, pending_rows = [], 0
        if pending_rows:
            flush(pending)
    return ({"shards": shards, "has_truth": has_truth}, *[np.sort(np.concatenate(b)) if b else np.zeros(0, np.uint64) for b in buckets])


def duplicate_hashes(*parts: np.ndarray) -> np.ndarray:
    """Hashes that occur more than once across the sorted arrays of one bucket."""
    if not parts:
        return np.zeros(0, np.uint64)
    merged = np.sort(np.concatenate(parts))
    return np.unique(merged[1:][merged[1:] == merged[:-1]])


def ids_with_hashes(out: str, shards: list[str], wanted: np.ndarray) -> list[str]:
    """The image ids of ``shards`` whose hash is in ``wanted`` (names the duplicates in the error)."""
    found: list[str] = []
    for shard in shards:
        table = read_shard_inputs(out, shard)
        ids = table.column("image_id")
        found.extend(np.asarray(ids.to_pylist(), dtype=object)[np.isin(id_hashes(ids), wanted)].tolist())
    return found


#: The last source file a worker read: shards arrive in order, so consecutive shards share it.
_SOURCE_CACHE: dict[str, bytes] = {}


def read_shard_inputs(out: str, shard: str, rows: int | None = None) -> pa.Table:
    """One shard's input rows (the first ``rows`` of them when a ``--limit`` cut the shard).

    The source file is fetched whole through the storage layer's retried GET (a ranged read that
    meets a 503 is not retried by s3fs) and kept for the next shard of the same source."""
    source, chunk = (int(p) for p in shard.split("-"))
    path = source_input_path(out, source)
    if path not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()
        _SOURCE_CACHE[path] = storage.read_bytes(path)
    table = pq.ParquetFile(pa.BufferReader(_SOURCE_CACHE[path])).read_row_group(chunk)
    return table.slice(0, rows) if rows is not None else table


def read_listing(out: str) -> Listing | None:
    """The saved listing of ``out``, or None when no complete listing was saved yet."""
    path = storage.join(out, INPUTS_DIR, INDEX_FILE)
    if not storage.exists(path):
        return None
    data = json.loads(storage.read_bytes(path).decode("utf-8"))
    return Listing(input=data["input"], shards=[(s, int(n)) for s, n in data["shards"]],
                   has_truth=bool(data["has_truth"]), limit=data.get("limit"))


def save_listing(out: str, listing: Listing) -> None:
    """Publish the listing index; its presence marks the listing complete."""
    path = storage.join(out, INPUTS_DIR, INDEX_FILE)
    storage.write_bytes_atomic(path, json.dumps(listing.to_json()).encode("utf-8"))


def apply_limit(shards: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first ``limit`` inputs in listing order, as whole shards plus the head of one."""
    if limit is None:
        return shards
    kept, left = [], limit
    for name, n in shards:
        if left <= 0:
            break
        kept.append((name, min(n, left)))
        left -= n
    return kept


def build_listing(spec: str, out: str, options: ListingOptions, *, limit: int | None = None,
                  remote: dict | None = None, sources: list[Source] | None = None) -> Listing:
    """List ``spec`` into shards under ``out`` with one Ray task per source; check ids; save the index.

    Raises :class:`InputError` for an empty listing or duplicate image ids (named, a few of them).
    """
    import ray

    spec = normalise_spec(spec)
    sources = sources if sources is not None else plan_sources(spec)
    started = time.time()
    logger.info("listing %s: %d source(s), one task each", spec, len(sources))
    task = ray.remote(list_source).options(num_cpus=1, num_returns=1 + DUP_BUCKETS, **(remote or {}))
    refs = [task.remote(s, out, options) for s in sources]
    shards: list[tuple[str, int]] = []
    has_truth = options.require_labels
    last = started
    for i, r in enumerate(refs):
        head = ray.get(r[0])
        shards.extend(head["shards"])
        has_truth = has_truth or head["has_truth"]
        if time.time() - last > 10 or i + 1 == len(refs):
            last = time.time()
            logger.info("listed %d/%d sources: %d images in %d shards (%.1fs)", i + 1, len(sources),
                        sum(n for _, n in shards), len(shards), last - started)
    if not shards:
        raise InputError(f"no images found in {spec} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    # A whole core each: the listing's workers (one per core) take them, no new worker has to start.
    check = ray.remote(duplicate_hashes).options(num_cpus=1, **(remote or {}))
    dup_refs = [check.remote(*[r[1 + b] for r in refs]) for b in range(DUP_BUCKETS)]
    dups = np.concatenate([ray.get(d) for d in dup_refs])
    del refs, dup_refs  # the hash buckets leave the object store
    if dups.size:
        lookup = ray.remote(ids_with_hashes).options(num_cpus=1, **(remote or {}))
        names = [s for s, _ in shards]
        step = max(1, len(names) // 16)
        found = [i for part in ray.get([lookup.remote(out, names[k:k + step], dups) for k in range(0, len(names), step)])
                 for i in part]
        seen: set[str] = set()
        repeated = sorted({i for i in found if i in seen or seen.add(i)})
        if repeated:  # equal hashes of different ids (a 64-bit collision) are not duplicates
            raise InputError(f"{spec} lists {len(repeated)} duplicate image ids, e.g. {repeated[:3]}")
    listing = Listing(input=spec, shards=apply_limit(shards, limit), has_truth=has_truth, limit=limit)
    save_listing(out, listing)
    return listing


__all__ = [
    "IMAGE_EXTENSIONS", "INPUTS_DIR", "Listing", "ListingOptions", "MANIFEST_EXTENSIONS", "Source",
    "apply_limit", "build_listing", "duplicate_hashes", "id_hashes", "ids_with_hashes",
    "list_source", "plan_sources", "read_listing", "read_shard_inputs", "save_listing",
]


def read_shards(batch: dict[str, Any], out: str, has_truth: bool, start_gate: Any = None) -> pa.Table:
    """Plan's first stage: shard names → their input rows, each tagged with its ``shard``."""
    from pipelines.plan import pass_start_gate

    pass_start_gate(start_gate)
    tables = []
    for shard, rows in zip(batch["shard"], batch["rows"]):
        table = read_shard_inputs(out, str(shard), int(rows))
        if not has_truth:
            table = table.drop_columns(["true_label"])
        tables.append(table.append_column("shard", pa.array([str(shard)] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def shards_stage(out: str, has_truth: bool) -> Stage:
    """Reads saved shard inputs on workers, one task at a time, so shards enter the pipeline in order
    and few are open in the writers at once (one task reads ~10^5 rows/s: far ahead of any encoder)."""
    from pipelines.plan import Stage

    return Stage("shards", read_shards, batch_size=1, num_cpus=0.1, concurrency=1,
                 fn_kwargs={"out": out, "has_truth": has_truth}, start_gate="wait")


def distinct_true_labels(out: str, sources: list[int]) -> list[str | None]:
    """The distinct ground-truth labels of the saved listing (evaluation checks them before encoding)."""
    seen: set[str | None] = set()
    for source in sources:
        with storage.open_input(source_input_path(out, source)) as fh:
            column = pq.ParquetFile(fh).read(columns=["true_label"]).column("true_label")
        seen.update(pc.unique(column).to_pylist())
    return sorted(seen, key=lambda v: (v is None, v or ""))
