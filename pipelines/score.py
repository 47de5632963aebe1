"""Stage 5 — score encoded images against every label set and build output rows.

Runs inside the encode actor (the label-set matrices are handed to each actor once, through the
object store), so embeddings never leave the device they were computed on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bifta_core.predict import ScoreParams, explain, method_image_vectors, method_text_vectors, scores_from_vectors, top_k
from bifta_core.text_banks import LabelSetEmbeddings, TextBank


@dataclass(frozen=True)
class RowContext:
    """Columns that are the same for every row of a run."""

    method: str
    model: str
    pretrained: str
    run_id: str
    random_weights: bool


class Scorer:
    """Holds each label set's class and description matrices on the scoring device."""

    def __init__(
        self,
        label_sets: list[LabelSetEmbeddings],
        *,
        method: str,
        bank_key: str | None,
        params: ScoreParams,
        k: int,
        with_explanations: bool,
        device: torch.device,
    ) -> None:
        self.method = method
        self.params = params
        self.k = k
        self.with_explanations = with_explanations
        self.label_sets = label_sets
        # Banks as loaded (CPU) serve explanations.
        self.cpu_banks: list[TextBank | None] = [ls.banks.get(bank_key) if bank_key else None for ls in label_sets]
        # The text side of every score depends only on the label set: computed here once, on the
        # scoring device (description weights, class sums), never per batch.
        self.text_vecs: list[torch.Tensor] = []
        for ls, bank in zip(label_sets, self.cpu_banks):
            dev_bank = None if bank is None else dataclasses.replace(
                bank, desc_class=bank.desc_class.to(device), desc_emb=bank.desc_emb.to(device))
            self.text_vecs.append(method_text_vectors(method, ls.class_emb.to(device), dev_bank, params))

    def predict(
        self, image_emb: torch.Tensor, view_emb: torch.Tensor | None, view_mask: torch.Tensor | None
    ) -> list[dict[str, list]]:
        """Per label set, column lists ``label_index, label, score, topk_*, margin, explanation``."""
        results = []
        # The image side (view weights and pooled views) is shared by every label set.
        image_vec = method_image_vectors(self.method, image_emb, view_emb, view_mask, self.params)
        feats = image_vec.cpu() if self.with_explanations else None
        for ls, text_vec, cpu_bank in zip(self.label_sets, self.text_vecs, self.cpu_banks):
            scores = scores_from_vectors(self.method, image_vec, text_vec, self.params)
            top = top_k(scores, self.k)
            cols: dict[str, list] = {
                "label_index": top.indices[:, 0].tolist(),
                "label": [ls.classes[i] for i in top.indices[:, 0].tolist()],
                "score": top.scores[:, 0].tolist(),
                "topk_labels": [[ls.classes[i] for i in row] for row in top.indices.tolist()],
                "topk_scores": top.scores.tolist(),
                "margin": top.margin.tolist(),
            }
            if feats is not None:
                cols["explanation"] = explain(top.indices[:, 0], feats, cpu_bank)
            else:
                cols["explanation"] = [[] for _ in range(scores.shape[0])]
            results.append(cols)
        return results


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
