"""Output rows: one per (input, label set), from the scorers' columns (pure Python/Arrow types).

:func:`build_rows` turns predictions into the output table's columns (error rows carry their
reason), :func:`merge_cascade` takes each label set's rows from the cascade's first stage or from
the full method; the schema is :func:`pipelines.write.output_schema`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bifta_core.method.text_banks import LabelSetEmbeddings


@dataclass(frozen=True)
class RowContext:
    """Columns that are the same for every row of a run."""

    method: str
    model: str
    pretrained: str
    run_id: str
    random_weights: bool


def merge_cascade(
    first: list[dict[str, list]],
    final: list[dict[str, list]] | None,
    use_final: list,
    sub: np.ndarray,
    views: np.ndarray,
    names: tuple[str, str],
) -> list[dict[str, list]]:
    """Per label set, the cascade's columns: the final method's where ``use_final[set][j]`` (image
    ``j`` was among the ``sub`` images scored with views), else the first stage's; plus
    ``decided_by`` (``names``: first stage, method) and ``views_encoded`` (``views[j]``, per image)."""
    position = {int(j): k for k, j in enumerate(sub)}
    merged = []
    for ls_i, cols in enumerate(first):
        out: dict[str, list] = {key: [] for key in cols}
        out["decided_by"], out["top_views"] = [], []
        for j in range(len(views)):
            src, k, by = (final[ls_i], position[j], names[1]) if use_final[ls_i][j] else (cols, j, names[0])
            for key in cols:
                out[key].append(src[key][k])
            out["decided_by"].append(by)
            out["top_views"].append(src["top_views"][k] if "top_views" in src else None)
        out["views_encoded"] = [int(v) for v in views]
        merged.append(out)
    return merged


def build_rows(
    meta: dict[str, list],
    ok_positions: list[int],
    predictions: list[dict[str, list]],
    label_sets: list[LabelSetEmbeddings],
    ctx: RowContext,
) -> dict[str, list[Any]]:
    """One row per (input row, label set); error rows carry the reason and null predictions.

    ``meta`` holds per-input columns (image_id, uri, status, error, views_*, optional true_label);
    ``ok_positions[j]`` is the input row of the j-th scored image.
    """
    n = len(meta["image_id"])
    pos_of = {p: j for j, p in enumerate(ok_positions)}
    cols: dict[str, list[Any]] = {k: [] for k in ROW_COLUMNS}
    has_truth = "true_label" in meta
    if has_truth:
        cols["true_label"] = []
    for ls_i, ls in enumerate(label_sets):
        pred = predictions[ls_i] if predictions else None
        for i in range(n):
            j = pos_of.get(i)
            ok = j is not None
            cols["image_id"].append(meta["image_id"][i])
            cols["uri"].append(meta["uri"][i])
            cols["status"].append("ok" if ok else "error")
            cols["error"].append(None if ok else (meta["error"][i] or "unknown error"))
            for key in ("label_index", "label", "score", "topk_labels", "topk_scores", "margin", "explanation",
                        "decided_by", "top_views"):
                cols[key].append(pred[key][j] if ok else None)
            cols["views_encoded"].append(int(pred["views_encoded"][j]) if ok else 0)
            cols["method"].append(ctx.method)
            cols["views_generated"].append(int(meta["views_generated"][i]))
            cols["views_kept"].append(int(meta["views_kept"][i]))
            cols["model"].append(ctx.model)
            cols["pretrained"].append(ctx.pretrained)
            cols["random_weights"].append(ctx.random_weights)
            cols["label_set"].append(ls.name)
            cols["label_set_id"].append(ls.content_hash[:16])
            cols["run_id"].append(ctx.run_id)
            if has_truth:
                cols["true_label"].append(meta["true_label"][i])
    return cols


ROW_COLUMNS = (
    "image_id",
    "uri",
    "status",
    "error",
    "label",
    "label_index",
    "score",
    "topk_labels",
    "topk_scores",
    "margin",
    "method",
    "views_generated",
    "views_kept",
    "decided_by",
    "views_encoded",
    "top_views",
    "explanation",
    "model",
    "pretrained",
    "random_weights",
    "label_set",
    "label_set_id",
    "run_id",
)
