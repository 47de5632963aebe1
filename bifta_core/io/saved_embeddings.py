"""Embeddings kept by ``bifta label --save-embeddings``, read back by ``bifta relabel``.

One file per prediction shard, ``OUT/_embeddings/part-<shard>.parquet`` (the ``_`` keeps it out of
readers of the predictions), one row per input, error rows included, plain Arrow types:

=======================  =========================================  ===========================================
column                   type                                       meaning
=======================  =========================================  ===========================================
``image_id``, ``uri``    string                                     as in the predictions
``status``, ``error``    string                                     ``ok`` or ``error`` (then the reason)
``views_generated``      int32                                      views sampled (as in the predictions)
``views_kept``           int32                                      views kept by refinement
``true_label``           string                                     when the inputs had one
``image_emb``            fixed_size_list<float16|float32>[D]        the whole image as a whole-image method
                                                                    (CLIP, CuPL …) encodes it; null on errors
``view_image_emb``       fixed_size_list<…>[D]                      the whole image at the views' working
                                                                    resolution (sets the view weights)
``view_emb``             list<fixed_size_list<…>[D]>                each encoded view, in sampling order
``view_boxes``           list<fixed_size_list<int32>[4]>            its box ``x0, y0, x1, y1`` in original pixels
``view_weights``         list<float32>                              its WCA weight (WCA §3.2, ``--image-scale``)
=======================  =========================================  ===========================================

The ``view_*`` columns exist with ``--save-view-embeddings``; they are null for images whose views
were not encoded (the cascade's sure images) and on error rows. The schema metadata key
``bifta.embeddings`` holds JSON: model, weights, activation, precision and their identity, the
embedding size and type, the seed, the views in force and the run they came from — ``relabel``
refuses another model with one line. Encode actors emit a flat form (:data:`FLAT_FIELDS`, lists
of float32 on the rows of the first label set) that :func:`to_stored` turns into this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bifta_core.errors import InputError

if TYPE_CHECKING:
    from bifta_core.method.encoding import Encoded

SAVED_FORMAT = 1
SAVED_DIR = "_embeddings"
META_KEY = b"bifta.embeddings"
DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}

#: Columns the encode actors add to their rows (set on one row per image, the first label set's).
FLAT_FIELDS = [
    pa.field("emb_row", pa.bool_()),
    pa.field("emb_image", pa.list_(pa.float32())),
    pa.field("emb_view_image", pa.list_(pa.float32())),
    pa.field("emb_views", pa.list_(pa.float32())),  # every view's D values, concatenated
    pa.field("emb_view_boxes", pa.list_(pa.int32())),  # four per view
    pa.field("emb_view_weights", pa.list_(pa.float32())),
]
FLAT_NAMES = tuple(f.name for f in FLAT_FIELDS)
_ROW_COLUMNS = ("image_id", "uri", "status", "error", "views_generated", "views_kept")


def stored_schema(dim: int, dtype: str, views: bool, meta: dict[str, Any] | None = None,
                  truth: bool = False) -> pa.Schema:
    """The saved file's schema (see the module docstring; ``truth``: inputs with a ``true_label``)."""
    value = DTYPES[dtype][0]
    vec = pa.list_(value, int(dim))
    fields = [pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string()),
              pa.field("status", pa.string()), pa.field("error", pa.string()),
              pa.field("views_generated", pa.int32()), pa.field("views_kept", pa.int32()),
              *([pa.field("true_label", pa.string())] if truth else []),
              pa.field("image_emb", vec)]
    if views:
        fields += [pa.field("view_image_emb", vec), pa.field("view_emb", pa.list_(vec)),
                   pa.field("view_boxes", pa.list_(pa.list_(pa.int32(), 4))),
                   pa.field("view_weights", pa.list_(pa.float32()))]
    schema = pa.schema(fields)
    if meta is not None:
        schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return schema


def _fixed(column: pa.ChunkedArray, width: int, value: pa.DataType, np_type) -> pa.Array:
    """``list<float32>`` rows of ``width`` values (null rows allowed) → ``fixed_size_list<value>[width]``."""
    arr = column.combine_chunks()
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros((len(arr), width), dtype=np_type)
    if valid.any():
        vals = np.asarray(arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False))
        out[valid] = vals.reshape(-1, width).astype(np_type)
    return pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), value), width, mask=pa.array(~valid))


def _nested(column: pa.ChunkedArray, width: int, value: pa.DataType, np_type) -> pa.Array:
    """``list<x>`` rows of ``k·width`` values → ``list<fixed_size_list<value>[width]>`` (k per row)."""
    arr = column.combine_chunks()
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.asarray(arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64) // width
    vals = np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).astype(np_type)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(vals, value), width)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner, mask=pa.array(~valid))


def to_stored(rows: pa.Table, dim: int, dtype: str, views: bool, meta: dict[str, Any] | None = None) -> pa.Table:
    """A shard's encode-actor rows (with :data:`FLAT_FIELDS`) → its saved embeddings, one row per image."""
    value, np_type = DTYPES[dtype]
    t = rows.filter(pc.equal(rows.column("emb_row"), True)).sort_by("image_id")
    truth = "true_label" in t.column_names
    cols: dict[str, pa.Array] = {c: t.column(c).combine_chunks() for c in _ROW_COLUMNS + (("true_label",) if truth else ())}
    cols["image_emb"] = _fixed(t.column("emb_image"), dim, value, np_type)
    if views:
        cols["view_image_emb"] = _fixed(t.column("emb_view_image"), dim, value, np_type)
        cols["view_emb"] = _nested(t.column("emb_views"), dim, value, np_type)
        cols["view_boxes"] = _nested(t.column("emb_view_boxes"), 4, pa.int32(), np.int32)
        cols["view_weights"] = t.column("emb_view_weights").combine_chunks()
    return pa.table(cols, schema=stored_schema(dim, dtype, views, meta, truth))


def read_meta(schema: pa.Schema, source: str) -> dict[str, Any]:
    """The metadata of a saved embeddings file; :class:`InputError` when it is not one."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(f"{source} is not an embeddings file of `bifta label --save-embeddings`")
    meta = json.loads(raw)
    if meta.get("format") != SAVED_FORMAT:
        raise InputError(f"{source} has saved-embeddings format {meta.get('format')}, this bifta reads "
                         f"{SAVED_FORMAT}: label again with --save-embeddings")
    return meta


@dataclass
class SavedBatch:
    """Saved rows as tensors: every row's identity, the ok rows' embeddings (float32).

    ``ok[j]`` is the row of the j-th embedding; ``has_views[j]`` whether its views were saved;
    ``view_emb``/``view_mask`` are padded over the ok rows (zeros and False without views).
    """

    columns: dict[str, list]  # image_id, uri, status, error, views_generated, views_kept (, true_label)
    ok: list[int]
    image_emb: torch.Tensor  # [n_ok, D]
    view_image_emb: torch.Tensor | None = None  # [n_ok, D]
    view_emb: torch.Tensor | None = None  # [n_ok, V, D]
    view_mask: torch.Tensor | None = None  # [n_ok, V]
    has_views: np.ndarray | None = None  # bool [n_ok]
    view_boxes: list[np.ndarray] | None = None  # per ok row, int32 [n_views, 4] in original pixels


def _dense(arr: pa.Array, dim: int) -> torch.Tensor:
    vals = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return torch.from_numpy(vals.reshape(-1, dim).copy())


def to_batch(batch: pa.Table | pa.RecordBatch) -> SavedBatch:
    """Saved rows → :class:`SavedBatch` (the embeddings of error rows are null and skipped)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    columns = {c: table.column(c).to_pylist() for c in _ROW_COLUMNS + ("true_label",) if c in table.column_names}
    image = table.column("image_emb").combine_chunks()
    dim = int(image.type.list_size)
    ok = [i for i, s in enumerate(columns["status"]) if s == "ok"]
    keep = pa.array(ok, pa.int64())
    saved = SavedBatch(columns=columns, ok=ok, image_emb=_dense(image.take(keep), dim))
    if "view_emb" not in table.column_names:  # a file kept without views (a resume can mix them)
        saved.view_image_emb, saved.view_emb = torch.zeros(len(ok), dim), torch.zeros(len(ok), 0, dim)
        saved.view_mask, saved.has_views = torch.zeros(len(ok), 0, dtype=torch.bool), np.zeros(len(ok), dtype=bool)
        saved.view_boxes = [np.zeros((0, 4), dtype=np.int32) for _ in ok]
        return saved
    views = table.column("view_emb").combine_chunks().take(keep)
    has = np.asarray(views.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    counts = np.asarray(views.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    vmax = int(counts.max()) if counts.size else 0
    flat = _dense(views.flatten(), dim) if counts.sum() else torch.zeros(0, dim)
    view_emb = torch.zeros(len(ok), vmax, dim)
    mask = torch.zeros(len(ok), vmax, dtype=torch.bool)
    start = 0
    for j, c in enumerate(counts.tolist()):
        view_emb[j, :c] = flat[start:start + c]
        mask[j, :c] = True
        start += c
    whole = table.column("view_image_emb").combine_chunks().take(keep)
    view_image = torch.zeros(len(ok), dim)
    if has.any():
        view_image[torch.from_numpy(has)] = _dense(whole.filter(pa.array(has)), dim)
    saved.view_image_emb, saved.view_emb, saved.view_mask, saved.has_views = view_image, view_emb, mask, has
    boxes = table.column("view_boxes").combine_chunks().take(keep).to_pylist()
    saved.view_boxes = [np.asarray(b or [], dtype=np.int32).reshape(-1, 4) for b in boxes]
    return saved


def flat_columns(encoded: "Encoded | None", batch: dict[str, np.ndarray], ok: list[int], n: int, label_sets: int,
                 keep: dict, image_scale: float) -> dict[str, pa.Array]:
    """The :data:`bifta_core.io.saved_embeddings.FLAT_FIELDS` columns of a batch's rows: values on the
    first label set's rows (one per input, null on error rows), null on the others."""
    total = n * label_sets
    values: dict[str, list] = {f.name: [None] * total for f in FLAT_FIELDS}
    values["emb_row"] = [i < n for i in range(total)]
    if encoded is not None:
        image = encoded.image_emb.float().cpu().numpy()
        for j, i in enumerate(ok):
            values["emb_image"][i] = image[j]
        if keep.get("views") and encoded.has_views:
            weights = encoded.weights(image_scale).cpu().numpy()
            view_image = encoded.view_image.float().cpu().numpy()
            view_emb = encoded.view_emb.float().cpu().numpy()
            counts = encoded.view_mask.sum(dim=1).cpu().numpy()
            for k, j in enumerate(encoded.sub.tolist()):
                i, c = ok[j], int(counts[k])
                values["emb_view_image"][i] = view_image[k]
                values["emb_views"][i] = view_emb[k, :c].reshape(-1)
                values["emb_view_boxes"][i] = np.frombuffer(batch["boxes_original"][i], dtype=np.int32)[: 4 * c]
                values["emb_view_weights"][i] = weights[k, :c]
    return {f.name: pa.array(values[f.name], f.type) for f in FLAT_FIELDS}
