"""From embeddings to predictions: one scorer per method, top-k labels, margins, explanations.

Shared by the labelling pipeline and by evaluation, so both score exactly alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bifta_core.method.scoring import (
    clip_scores,
    mean_scores,
    mean_text_vectors,
    wca_image_vectors,
    wca_scores,
    wca_scores_from_vectors,
    wca_text_vectors,
)
from bifta_core.method.registry import method as method_entry
from bifta_core.method.text_banks import LabelSetEmbeddings, TextBank


@dataclass(frozen=True)
class ScoreParams:
    """WCA hyper-parameters (WCA §3.2: image and text temperature exponents, aggregation)."""

    image_scale: float = 4.0
    text_scale: float = 2.0
    aggregation: str = "normalized"


def method_scores(
    method: str,
    class_emb: torch.Tensor,
    image_emb: torch.Tensor,
    bank: TextBank | None = None,
    view_emb: torch.Tensor | None = None,
    view_mask: torch.Tensor | None = None,
    params: ScoreParams = ScoreParams(),
) -> torch.Tensor:
    """``[B,C]`` class scores of ``method`` by its scorer in :data:`bifta_core.method.registry.METHODS`."""
    scorer = method_entry(method).scorer
    if scorer == "prompt":
        return clip_scores(image_emb, class_emb)
    if bank is None:
        raise ValueError(f"method {method} needs a text bank")
    if scorer == "mean":
        return mean_scores(image_emb, bank.desc_emb, bank.desc_class, class_emb.shape[0])
    if scorer == "wca":
        if view_emb is None or view_mask is None:
            raise ValueError(f"method {method} needs view embeddings")
        return wca_scores(
            view_emb,
            view_mask,
            image_emb,
            bank.desc_emb,
            bank.desc_class,
            class_emb,
            image_scale=params.image_scale,
            text_scale=params.text_scale,
            aggregation=params.aggregation,
        )
    raise ValueError(f"unknown method {method}")


def method_text_vectors(
    method: str, class_emb: torch.Tensor, bank: TextBank | None = None, params: ScoreParams = ScoreParams()
) -> torch.Tensor:
    """``[C,D]`` text side of ``method``'s score, computed once per label set (not per batch).

    ``prompt`` scorer: the unit class prompts; ``mean``: :func:`~bifta_core.method.scoring.mean_text_vectors`;
    ``wca``: :func:`~bifta_core.method.scoring.wca_text_vectors` (description weights included).
    """
    scorer = method_entry(method).scorer
    if scorer == "prompt":
        return F.normalize(class_emb.float(), dim=-1)
    if bank is None:
        raise ValueError(f"method {method} needs a text bank")
    if scorer == "mean":
        return mean_text_vectors(bank.desc_emb, bank.desc_class, class_emb.shape[0])
    if scorer == "wca":
        return wca_text_vectors(bank.desc_emb, bank.desc_class, class_emb, params.text_scale, params.aggregation)
    raise ValueError(f"unknown method {method}")


def method_image_vectors(
    method: str,
    image_emb: torch.Tensor,
    view_emb: torch.Tensor | None = None,
    view_mask: torch.Tensor | None = None,
    params: ScoreParams = ScoreParams(),
) -> torch.Tensor:
    """``[B,D]`` image side of ``method``'s score, the same for every label set (once per batch).

    WCA/BiFTA: ``Σ_i w_i · view_i`` (:func:`~bifta_core.method.scoring.wca_image_vectors`); others: the
    unit whole-image embedding. These are also the features explanations are ranked against.
    """
    if method_entry(method).scorer == "wca":
        if view_emb is None or view_mask is None:
            raise ValueError(f"method {method} needs view embeddings")
        return wca_image_vectors(view_emb, view_mask, image_emb, params.image_scale)
    return F.normalize(image_emb.float(), dim=-1)


def scores_from_vectors(
    method: str, image_vec: torch.Tensor, text_vec: torch.Tensor, params: ScoreParams = ScoreParams()
) -> torch.Tensor:
    """``[B,C]`` scores from :func:`method_image_vectors` and :func:`method_text_vectors`; equal to
    :func:`method_scores` on the same inputs (the same operations, split where they stop depending
    on the batch)."""
    if method_entry(method).scorer == "wca":
        return wca_scores_from_vectors(image_vec, text_vec, params.aggregation)
    return image_vec @ text_vec.to(image_vec.device).T


@dataclass
class TopK:
    """Top-k of a ``[B,C]`` score matrix, on CPU."""

    indices: torch.Tensor  # long [B,k]
    scores: torch.Tensor  # float [B,k]

    @property
    def margin(self) -> torch.Tensor:
        """top1 − top2 (0 when only one class exists)."""
        if self.scores.shape[1] < 2:
            return torch.zeros(self.scores.shape[0])
        return self.scores[:, 0] - self.scores[:, 1]


def top_k(scores: torch.Tensor, k: int) -> TopK:
    """Top-``k`` classes per row (ties resolved towards the lower class index, deterministically)."""
    k = min(k, scores.shape[1])
    s = scores.detach().float().cpu()
    # A stable descending sort keeps equal scores in class order, so reruns agree on ties.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return TopK(indices=order, scores=torch.gather(s, 1, order))



def explain(
    predicted: torch.Tensor,
    image_features: torch.Tensor,
    bank: TextBank | None,
    n: int = 3,
) -> list[list[str]]:
    """Per image, the ``n`` descriptions of its predicted class with the highest weighted similarity.

    Similarity is ``v_j · cos(feature, desc_j)`` for weighted banks (WCA/BiFTA) and the plain cosine
    otherwise; ``feature`` is the pooled view feature (or the whole image for global methods).
    """
    if bank is None or bank.desc_emb.numel() == 0:
        return [[] for _ in range(predicted.shape[0])]
    feats = F.normalize(image_features.float(), dim=-1).cpu()
    desc = bank.desc_emb.float().cpu()
    out = []
    for b, c in enumerate(predicted.tolist()):
        idx = (bank.desc_class == c).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            out.append([])
            continue
        sim = desc[idx] @ feats[b]
        if bank.weights is not None:
            sim = sim * bank.weights[idx].float()
        order = torch.sort(sim, descending=True, stable=True).indices[:n]
        out.append([bank.texts[int(idx[j])] for j in order])
    return out


def top_views(weights: torch.Tensor, view_mask: torch.Tensor, boxes: list, k: int) -> list[list[dict]]:
    """Per image, its ``k`` highest-weighted views (WCA weights, §3.2) as ``{x0, y0, x1, y1, weight}``
    in original pixels, highest first (equal weights in sampling order).

    ``weights``/``view_mask`` are ``[B, V]``; ``boxes[b]`` holds image ``b``'s views as ``[n, 4]``
    ints aligned with its first ``n`` weights. ``k <= 0`` gives empty lists.
    """
    out: list[list[dict]] = []
    w = weights.detach().float().cpu()
    counts = view_mask.sum(dim=1).tolist()
    for b, n in enumerate(counts):
        n = int(n)
        if k <= 0 or n == 0:
            out.append([])
            continue
        order = torch.sort(w[b, :n], descending=True, stable=True).indices[:k].tolist()
        box = boxes[b]
        out.append([{"x0": int(box[i][0]), "y0": int(box[i][1]), "x1": int(box[i][2]), "y1": int(box[i][3]),
                     "weight": float(w[b, i])} for i in order])
    return out


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
