"""BiFTA description refinement: keep class descriptions that are relevant and not redundant.

Generated class descriptions (e.g. from an LLM) often repeat each other. BiFTA ranks a class's
descriptions by cosine similarity to the class prompt embedding ("a photo of a {c}.") and, walking
down that ranking, drops any description that is almost identical (cosine above a threshold) to
a description already kept, up to a fixed number of descriptions per class. WCA (Li et al.,
ICML 2024) uses the descriptions unrefined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bifta_core.errors import ConfigError


def normalize_text(s: str) -> str:
    """Casefold ``s``, collapse runs of whitespace into single spaces and strip the ends."""
    return " ".join(s.casefold().split())


def refine_descriptions(
    desc_emb: torch.Tensor,
    class_emb: torch.Tensor,
    threshold: float = 0.99,
    top_k: int | None = 50,
    texts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Select one class's descriptions by relevance ranking and redundancy removal (BiFTA).

    Steps:
      1. If ``texts`` is given, drop descriptions whose :func:`normalize_text` form repeats an
         earlier one (the first occurrence is kept).
      2. Rank the remaining ones by cosine to ``class_emb`` (descending; ties keep the original
         index order).
      3. Walk the ranking; keep a description only if its cosine to every kept description is
         ``<= threshold``.
      4. Stop once ``top_k`` are kept (``None``: no limit).

    Args:
        desc_emb: ``[T, D]`` description embeddings (need not be normalised).
        class_emb: ``[D]`` class prompt embedding (need not be normalised).
        threshold: redundancy threshold on cosine similarity, in ``[-1, 1]``.
        top_k: most descriptions kept, or ``None``.
        texts: the ``T`` description strings, for duplicate removal.

    Returns:
        ``torch.long`` indices into ``desc_emb`` of the kept descriptions, in rank order.
    """
    if not isinstance(desc_emb, torch.Tensor) or desc_emb.ndim != 2:
        raise ConfigError("desc_emb must be a [T, D] tensor")
    if not isinstance(class_emb, torch.Tensor) or class_emb.ndim != 1:
        raise ConfigError("class_emb must be a [D] tensor")
    if desc_emb.shape[1] != class_emb.shape[0]:
        raise ConfigError(
            f"embedding sizes differ: descriptions {desc_emb.shape[1]}, class {class_emb.shape[0]}"
        )
    if not (-1.0 <= float(threshold) <= 1.0):
        raise ConfigError(f"description threshold must be in [-1, 1], got {threshold}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or None, got {top_k}")
    n = desc_emb.shape[0]
    if texts is not None and len(texts) != n:
        raise ConfigError(f"got {len(texts)} description texts for {n} embeddings")
    if n == 0:
        return torch.empty(0, dtype=torch.long)

    candidates = list(range(n))
    if texts is not None:
        seen: set[str] = set()
        candidates = []
        for i, text in enumerate(texts):
            key = normalize_text(text)
            if key not in seen:
                seen.add(key)
                candidates.append(i)
    cand = torch.tensor(candidates, dtype=torch.long)

    # float64 keeps threshold decisions stable near the boundary.
    d = torch.nn.functional.normalize(desc_emb.detach().cpu().to(torch.float64), dim=-1)[cand]
    c = torch.nn.functional.normalize(class_emb.detach().cpu().to(torch.float64), dim=-1)
    relevance = d @ c
    # Stable sort on the negated score: descending cosine, ties in original index order.
    order = torch.sort(-relevance, stable=True).indices
    d = d[order]
    ranked = cand[order]
    redundant = (d @ d.T > float(threshold)).numpy()

    cap = len(ranked) if top_k is None else int(top_k)
    kept: list[int] = []
    for r in range(len(ranked)):
        if len(kept) >= cap:
            break
        if not any(redundant[r, k] for k in kept):
            kept.append(r)
    return ranked[torch.tensor(kept, dtype=torch.long)]
