"""Image-side embeddings of an evaluation, as Arrow tables and one Parquet file.

``embeddings.parquet`` (format 2) holds one row per successfully encoded image:

=====================  ===========================================  =====================================
column                 type                                         meaning
=====================  ===========================================  =====================================
``image_id``           string                                       stable image identifier
``true_label``         string                                       ground-truth label as given (not mapped)
``image_emb``          fixed_size_list<float32>[D]                  whole image as CLIP/CuPL… encode it
``<P>_image_emb``      fixed_size_list<float32>[D]                  whole image at preset P's resolution
``<P>_view_emb``       list<fixed_size_list<float32>[D]>            every view sampled with preset P
``<P>_view_kept``      list<bool>                                   view kept by preset P's refinement
=====================  ===========================================  =====================================

``P`` is each view preset the evaluation encoded (``wca``, ``bifta``; see
:data:`bifta_core.evaluation.metrics.VIEW_PRESET_NAMES`); a file made without views has only the first
three columns. The schema metadata key ``bifta`` holds JSON with the model, weights, seed and the
resolved settings of each preset (``views``: ``{preset: settings}``), so ``bifta evaluate
--from-embeddings`` can refuse a mismatching model and re-score with other scoring parameters or
label sets without encoding any image. Format 1 files (one view set shared by every row) are
refused with a message saying to re-encode.

The encode actors emit a flat, Ray-friendly form instead (:data:`FLAT_SCHEMA`, every preset's
columns always present, null when not encoded): embeddings as ``list<float32>`` (views
concatenated) plus ``<P>_n_views``; :func:`flat_to_batch` and :func:`flat_to_embeddings` convert it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from bifta_core.errors import InputError
from bifta_core.evaluation.metrics import VIEW_PRESET_NAMES, ImageBatch, ViewSet

EMBEDDINGS_FORMAT = 2
META_KEY = b"bifta"
EMBEDDINGS_FILE = "embeddings.parquet"


def _preset_fields(preset: str) -> list[pa.Field]:
    return [
        pa.field(f"{preset}_image_emb", pa.list_(pa.float32())),
        pa.field(f"{preset}_n_views", pa.int32()),
        pa.field(f"{preset}_view_emb", pa.list_(pa.float32())),
        pa.field(f"{preset}_view_kept", pa.list_(pa.bool_())),
    ]


#: Columns of the encode actors' output (one row per input image, error rows included).
FLAT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("true_label", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("image_emb", pa.list_(pa.float32())),
    *[f for p in VIEW_PRESET_NAMES for f in _preset_fields(p)],
])
FLAT_COLUMNS = tuple(FLAT_SCHEMA.names)


def _check_presets(presets: Sequence[str]) -> list[str]:
    unknown = [p for p in presets if p not in VIEW_PRESET_NAMES]
    if unknown:
        raise InputError(f"unknown view preset(s) {', '.join(unknown)}; expected {', '.join(VIEW_PRESET_NAMES)}")
    return [p for p in VIEW_PRESET_NAMES if p in presets]


def embeddings_schema(dim: int, presets: Sequence[str] = (), meta: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of ``embeddings.parquet`` for embedding size ``dim`` and the encoded ``presets``."""
    vec = pa.list_(pa.float32(), int(dim))
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("true_label", pa.string()),
        pa.field("image_emb", vec),
    ]
    for p in _check_presets(presets):
        fields += [
            pa.field(f"{p}_image_emb", vec),
            pa.field(f"{p}_view_emb", pa.list_(vec)),
            pa.field(f"{p}_view_kept", pa.list_(pa.bool_())),
        ]
    schema = pa.schema(fields)
    if meta is not None:
        schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return schema


def meta_presets(meta: dict[str, Any]) -> list[str]:
    """The view presets an embeddings file holds, from its metadata."""
    return _check_presets(list((meta.get("views") or {}).keys()))


def read_meta(schema: pa.Schema, source: str = "embeddings") -> dict[str, Any]:
    """The ``bifta`` metadata of an embeddings file; :class:`InputError` when absent, foreign or old."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(f"{source} is not a bifta embeddings file (no 'bifta' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InputError(f"{source} has unreadable bifta metadata") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != EMBEDDINGS_FORMAT:
        hint = (" (format 1 shares one view preset between WCA and BiFTA rows)" if fmt == 1 else "")
        raise InputError(f"{source} has embeddings format {fmt}{hint}; this bifta reads format {EMBEDDINGS_FORMAT}: "
                         "re-encode the images (bifta evaluate --save-embeddings without --from-embeddings)")
    missing = [c for p in meta_presets(meta) for c in (f"{p}_image_emb", f"{p}_view_emb", f"{p}_view_kept")
               if c not in schema.names]
    if "image_emb" not in schema.names or missing:
        raise InputError(f"{source} lacks column(s) {', '.join(missing or ['image_emb'])} its metadata announces")
    return meta


def _ok_rows(table: pa.Table) -> pa.Table:
    if "status" not in table.column_names:
        return table
    return table.filter(pa.compute.equal(table.column("status"), "ok"))


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return arr


def _flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(_combined(column).flatten().to_numpy(zero_copy_only=False), dtype=np.float32)


def _counts(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(_combined(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def flat_to_embeddings(table: pa.Table, dim: int, presets: Sequence[str] = ()) -> pa.Table:
    """Encode-actor rows (:data:`FLAT_SCHEMA`, ok rows only are kept) → ``embeddings.parquet`` rows."""
    ok = _ok_rows(table)
    n = ok.num_rows
    vec = pa.list_(pa.float32(), int(dim))

    def fixed(col: str) -> pa.Array:
        vals = _flat_values(ok.column(col)) if n else np.zeros(0, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(vals, pa.float32()), int(dim))

    columns: dict[str, pa.Array] = {
        "image_id": _combined(ok.column("image_id")).cast(pa.string()),
        "true_label": _combined(ok.column("true_label")).cast(pa.string()),
        "image_emb": fixed("image_emb"),
    }
    for p in _check_presets(presets):
        counts = _counts(ok.column(f"{p}_n_views")) if n else np.zeros(0, np.int64)
        view_vals = _flat_values(ok.column(f"{p}_view_emb")) if n else np.zeros(0, np.float32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(view_vals, pa.float32()), int(dim))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())
        kept = _combined(ok.column(f"{p}_view_kept")) if n else pa.array([], pa.list_(pa.bool_()))
        columns[f"{p}_image_emb"] = fixed(f"{p}_image_emb")
        columns[f"{p}_view_emb"] = pa.ListArray.from_arrays(offsets, inner, type=pa.list_(vec))
        columns[f"{p}_view_kept"] = kept.cast(pa.list_(pa.bool_()))
    return pa.table(columns, schema=embeddings_schema(dim, presets))


def _view_set(image_vals: np.ndarray, view_vals: np.ndarray, counts: np.ndarray,
              kept_lists: list[list[bool] | None], dim: int) -> ViewSet:
    n = int(counts.shape[0])
    vmax = int(counts.max()) if n else 0
    view_emb = torch.zeros(n, vmax, dim, dtype=torch.float32)
    view_mask = torch.zeros(n, vmax, dtype=torch.bool)
    view_kept = torch.zeros(n, vmax, dtype=torch.bool)
    flat = torch.from_numpy(view_vals.reshape(-1, dim).copy())
    start = 0
    for i in range(n):
        c = int(counts[i])
        view_emb[i, :c] = flat[start : start + c]
        view_mask[i, :c] = True
        kept = kept_lists[i]
        if kept is not None and len(kept) == c:
            view_kept[i, :c] = torch.tensor(kept, dtype=torch.bool)
        else:
            view_kept[i, :c] = True
        start += c
    return ViewSet(torch.from_numpy(image_vals.reshape(n, dim).copy()), view_emb, view_mask, view_kept)


def flat_to_batch(table: pa.Table, true_index: Sequence[int], dim: int, presets: Sequence[str] = ()) -> ImageBatch:
    """Encode-actor rows (ok rows only, aligned with ``true_index``) → :class:`ImageBatch`."""
    n = table.num_rows
    views: dict[str, ViewSet] = {}
    for p in _check_presets(presets):
        counts = _counts(table.column(f"{p}_n_views")) if n else np.zeros(0, np.int64)
        views[p] = _view_set(
            _flat_values(table.column(f"{p}_image_emb")) if n else np.zeros(0, np.float32),
            _flat_values(table.column(f"{p}_view_emb")) if n and counts.sum() else np.zeros(0, np.float32),
            counts,
            table.column(f"{p}_view_kept").to_pylist(),
            dim,
        )
    image_vals = _flat_values(table.column("image_emb")) if n else np.zeros(0, np.float32)
    return ImageBatch(
        image_ids=[str(x) for x in table.column("image_id").to_pylist()],
        true_index=torch.as_tensor(list(true_index), dtype=torch.long),
        image_emb=torch.from_numpy(image_vals.reshape(n, dim).copy()),
        views=views,
    )


def embeddings_to_batch(table: pa.Table | pa.RecordBatch, true_index: Sequence[int],
                        presets: Sequence[str] = ()) -> ImageBatch:
    """``embeddings.parquet`` rows (aligned with ``true_index``) → :class:`ImageBatch`."""
    arr = _combined(table.column("image_emb"))
    dim = int(arr.type.list_size)
    n = table.num_rows
    views: dict[str, ViewSet] = {}
    for p in _check_presets(presets):
        varr = _combined(table.column(f"{p}_view_emb"))
        counts = np.asarray(varr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        # flatten() honours slicing of the outer list (a record batch may be a slice of a larger one).
        view_vals = np.asarray(varr.flatten().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        views[p] = _view_set(_flat_values(table.column(f"{p}_image_emb")), view_vals, counts,
                             table.column(f"{p}_view_kept").to_pylist(), dim)
    image_vals = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return ImageBatch(
        image_ids=[str(x) for x in table.column("image_id").to_pylist()],
        true_index=torch.as_tensor(list(true_index), dtype=torch.long),
        image_emb=torch.from_numpy(image_vals.reshape(n, dim).copy()),
        views=views,
    )
