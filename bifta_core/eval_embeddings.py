"""Image-side embeddings of an evaluation, as Arrow tables and one Parquet file.

``embeddings.parquet`` holds one row per successfully encoded image:

==============  ===========================================  ==========================================
column          type                                         meaning
==============  ===========================================  ==========================================
``image_id``    string                                       stable image identifier
``true_label``  string                                       ground-truth label as given (not mapped)
``image_emb``   fixed_size_list<float32>[D]                  whole-image embedding (unit norm)
``view_emb``    list<fixed_size_list<float32>[D]>            every sampled view's embedding
``view_kept``   list<bool>                                   view kept by BiFTA's IoU refinement
==============  ===========================================  ==========================================

The schema metadata key ``bifta`` holds JSON with the model, weights and view settings the
embeddings were made with, so ``bifta evaluate --from-embeddings`` can refuse a mismatching model
and re-score with other scoring parameters or label sets without encoding any image.

The encode actors emit a flat, Ray-friendly form instead (:data:`FLAT_COLUMNS`): ``image_emb`` and
``view_emb`` as ``list<float32>`` (views concatenated) plus ``n_views``; :func:`flat_to_batch` and
:func:`flat_to_embeddings` convert it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from bifta_core.errors import InputError
from bifta_core.evaluation import ImageBatch

EMBEDDINGS_FORMAT = 1
META_KEY = b"bifta"
EMBEDDINGS_FILE = "embeddings.parquet"

#: Columns of the encode actors' output (one row per input image, error rows included).
FLAT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("true_label", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("image_emb", pa.list_(pa.float32())),
    pa.field("n_views", pa.int32()),
    pa.field("view_emb", pa.list_(pa.float32())),
    pa.field("view_kept", pa.list_(pa.bool_())),
])
FLAT_COLUMNS = tuple(FLAT_SCHEMA.names)


def embeddings_schema(dim: int, meta: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of ``embeddings.parquet`` for embedding size ``dim`` with ``meta`` as metadata."""
    vec = pa.list_(pa.float32(), int(dim))
    schema = pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("true_label", pa.string()),
        pa.field("image_emb", vec),
        pa.field("view_emb", pa.list_(vec)),
        pa.field("view_kept", pa.list_(pa.bool_())),
    ])
    if meta is not None:
        schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return schema


def read_meta(schema: pa.Schema, source: str = "embeddings") -> dict[str, Any]:
    """The ``bifta`` metadata of an embeddings file; :class:`InputError` when absent or foreign."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(f"{source} is not a bifta embeddings file (no 'bifta' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != EMBEDDINGS_FORMAT:
        raise InputError(f"{source} has embeddings format {meta.get('format')}, this bifta reads {EMBEDDINGS_FORMAT}")
    return meta


def _ok_rows(table: pa.Table) -> pa.Table:
    if "status" not in table.column_names:
        return table
    return table.filter(pa.compute.equal(table.column("status"), "ok"))


def _flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)


def flat_to_embeddings(table: pa.Table, dim: int) -> pa.Table:
    """Encode-actor rows (:data:`FLAT_SCHEMA`, ok rows only are kept) → ``embeddings.parquet`` rows."""
    ok = _ok_rows(table)
    n = ok.num_rows
    image_vals = _flat_values(ok.column("image_emb"))
    vec = pa.list_(pa.float32(), int(dim))
    image_emb = pa.FixedSizeListArray.from_arrays(pa.array(image_vals, pa.float32()), int(dim))
    counts = np.asarray(ok.column("n_views").to_numpy(zero_copy_only=False), dtype=np.int64) if n else np.zeros(0, np.int64)
    view_vals = _flat_values(ok.column("view_emb")) if n else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(view_vals, pa.float32()), int(dim))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())
    view_emb = pa.ListArray.from_arrays(offsets, inner, type=pa.list_(vec))
    kept = ok.column("view_kept").combine_chunks() if n else pa.array([], pa.list_(pa.bool_()))
    return pa.table(
        {
            "image_id": ok.column("image_id").cast(pa.string()),
            "true_label": ok.column("true_label").cast(pa.string()),
            "image_emb": image_emb,
            "view_emb": view_emb,
            "view_kept": kept.cast(pa.list_(pa.bool_())),
        }
    )


def _rows_to_batch(
    image_ids: list[str],
    true_index: Sequence[int],
    image_vals: np.ndarray,
    view_vals: np.ndarray,
    counts: np.ndarray,
    kept_lists: list[list[bool]] | None,
    dim: int,
) -> ImageBatch:
    n = len(image_ids)
    image_emb = torch.from_numpy(image_vals.reshape(n, dim).copy())
    view_emb = view_mask = view_kept = None
    if n and counts.size and int(counts.min()) > 0:
        vmax = int(counts.max())
        view_emb = torch.zeros(n, vmax, dim, dtype=torch.float32)
        view_mask = torch.zeros(n, vmax, dtype=torch.bool)
        view_kept = torch.zeros(n, vmax, dtype=torch.bool)
        flat = torch.from_numpy(view_vals.reshape(-1, dim).copy())
        start = 0
        for i in range(n):
            c = int(counts[i])
            view_emb[i, :c] = flat[start : start + c]
            view_mask[i, :c] = True
            if kept_lists is not None and kept_lists[i] is not None and len(kept_lists[i]) == c:
                view_kept[i, :c] = torch.tensor(kept_lists[i], dtype=torch.bool)
            else:
                view_kept[i, :c] = True
            start += c
    return ImageBatch(
        image_ids=image_ids,
        true_index=torch.as_tensor(list(true_index), dtype=torch.long),
        image_emb=image_emb,
        view_emb=view_emb,
        view_mask=view_mask,
        view_kept=view_kept,
    )


def flat_to_batch(table: pa.Table, true_index: Sequence[int], dim: int) -> ImageBatch:
    """Encode-actor rows (ok rows only, aligned with ``true_index``) → :class:`ImageBatch`."""
    n = table.num_rows
    counts = np.asarray(table.column("n_views").to_numpy(zero_copy_only=False), dtype=np.int64)
    return _rows_to_batch(
        [str(x) for x in table.column("image_id").to_pylist()],
        true_index,
        _flat_values(table.column("image_emb")) if n else np.zeros(0, np.float32),
        _flat_values(table.column("view_emb")) if n and counts.sum() else np.zeros(0, np.float32),
        counts,
        table.column("view_kept").to_pylist(),
        dim,
    )


def embeddings_to_batch(table: pa.Table | pa.RecordBatch, true_index: Sequence[int]) -> ImageBatch:
    """``embeddings.parquet`` rows (aligned with ``true_index``) → :class:`ImageBatch`."""
    image_col = table.column("image_emb")
    arr = image_col.combine_chunks() if isinstance(image_col, pa.ChunkedArray) else image_col
    dim = int(arr.type.list_size)
    view_col = table.column("view_emb")
    varr = view_col.combine_chunks() if isinstance(view_col, pa.ChunkedArray) else view_col
    counts = np.asarray(varr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    # flatten() honours slicing of the outer list (a record batch may be a slice of a larger one).
    view_vals = np.asarray(varr.flatten().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return _rows_to_batch(
        [str(x) for x in table.column("image_id").to_pylist()],
        true_index,
        np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32),
        view_vals,
        counts,
        table.column("view_kept").to_pylist(),
        dim,
    )
