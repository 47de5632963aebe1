"""Image-to-class scores: CLIP, description means (CLIP-E / CLIP-D / CuPL), WCA and BiFTA.

Notation follows WCA (Li et al., "Visual-Text Cross Alignment: Refining the Similarity Score in
Vision-Language Models", ICML 2024, Sec. 3). An image ``x`` has views ``x_1..x_V`` (random
crops) and a class ``c`` has descriptions ``t_1..t_T`` (e.g. LLM-generated). With all embeddings
L2-normalised:

* view weights      ``w_i = softmax_i(exp(image_scale) * cos(f(x_i), f(x)))``
* description weights ``v_j = softmax_j(exp(text_scale) * cos(g(t_j), g(p_c)))`` over class c's
  descriptions, where ``p_c`` is the class prompt "a photo of a {c}."
* score ``"sum"``: ``sum_i sum_j w_i v_j cos(f(x_i), g(t_j))`` (the paper's formula), which
  equals the dot product of ``sum_i w_i f(x_i)`` and ``sum_j v_j g(t_j)``;
  score ``"normalized"``: the cosine of those two weighted sums (the released code).

BiFTA uses the same score after refining views and descriptions (:mod:`bifta_core.method.views`,
:mod:`bifta_core.method.refinement`). All functions accept unnormalised embeddings, compute in
float32 and are vectorised over images and classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bifta_core.errors import ConfigError

AGGREGATIONS = ("normalized", "sum")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """float32 L2-normalised copy along the last axis (zero vectors stay zero)."""
    return F.normalize(x.to(torch.float32), dim=-1)


def _check_2d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{name} must be a 2-D tensor, got {shape}")


def _check_pair(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Two 2-D embedding matrices of the same width."""
    _check_2d(a, a_name)
    _check_2d(b, b_name)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"{a_name} and {b_name} have different embedding sizes")


def _check_desc_class(desc_class: torch.Tensor, num_desc: int, num_classes: int) -> torch.Tensor:
    """Validate the description-to-class map and that every class has a description."""
    if not isinstance(desc_class, torch.Tensor) or desc_class.ndim != 1:
        raise ConfigError("desc_class must be a 1-D tensor of class indices")
    if desc_class.shape[0] != num_desc:
        raise ConfigError(
            f"desc_class has {desc_class.shape[0]} entries for {num_desc} descriptions"
        )
    if desc_class.is_floating_point() or desc_class.is_complex():
        raise ConfigError("desc_class must hold integer class indices")
    desc_class = desc_class.to(torch.long)
    if num_desc and (int(desc_class.min()) < 0 or int(desc_class.max()) >= num_classes):
        raise ConfigError(f"desc_class values must lie in [0, {num_classes})")
    counts = torch.bincount(desc_class.cpu(), minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        shown = ", ".join(str(c) for c in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise ConfigError(f"classes without any description: {shown}")
    return desc_class


def clip_scores(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Zero-shot CLIP score: cosine between each image and each class prompt embedding.

    Returns:
        float32 ``[B, C]``.
    """
    _check_pair(image_emb, "image_emb", class_emb, "class_emb")
    return _unit(image_emb) @ _unit(class_emb).T


def class_text_vectors(
    desc_emb: torch.Tensor, desc_class: torch.Tensor, weights: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-class weighted sum of L2-normalised description embeddings, ``sum_j v_j g(t_j)``.

    Args:
        desc_emb: ``[T, D]`` description embeddings.
        desc_class: ``[T]`` class index of each description.
        weights: ``[T]`` weight of each description (e.g. :func:`description_weights`).
        num_classes: ``C``.

    Returns:
        float32 ``[C, D]`` (not normalised).
    """
    _check_2d(desc_emb, "desc_emb")
    desc_class = _check_desc_class(desc_class, desc_emb.shape[0], num_classes)
    if not isinstance(weights, torch.Tensor) or weights.shape != (desc_emb.shape[0],):
        raise ConfigError(f"weights must be a [{desc_emb.shape[0]}] tensor")
    d = _unit(desc_emb)
    out = torch.zeros((num_classes, d.shape[1]), dtype=torch.float32, device=d.device)
    return out.index_add_(0, desc_class.to(d.device), d * weights.to(d)[:, None])


def mean_scores(
    image_emb: torch.Tensor, desc_emb: torch.Tensor, desc_class: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Score against the normalised mean of a class's normalised text embeddings.

    This is prompt ensembling (CLIP-E, Radford et al. 2021), CLIP-D (Menon & Vondrick 2023) and
    CuPL (Pratt et al. 2023): ``cos(f(x), normalise(mean_j g(t_j)))``.

    Returns:
        float32 ``[B, C]``.
    """
    _check_pair(image_emb, "image_emb", desc_emb, "desc_emb")
    class_vec = mean_text_vectors(desc_emb, desc_class, num_classes)
    return _unit(image_emb).to(class_vec.device) @ class_vec.T


def mean_text_vectors(desc_emb: torch.Tensor, desc_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``normalise(mean_j g(t_j))`` per class, the text side of :func:`mean_scores` (once per label set).

    Returns:
        float32 ``[C, D]``, unit norm.
    """
    _check_2d(desc_emb, "desc_emb")
    # Normalising the mean equals normalising the plain sum, so uniform weights of 1 suffice.
    ones = torch.ones(desc_emb.shape[0], dtype=torch.float32, device=desc_emb.device)
    return _unit(class_text_vectors(desc_emb, desc_class, ones, num_classes))


def view_weights(
    view_emb: torch.Tensor,
    view_mask: torch.Tensor,
    image_emb: torch.Tensor,
    image_scale: float = 4.0,
) -> torch.Tensor:
    """WCA view weights ``w_i = softmax_i(exp(image_scale) * cos(f(x_i), f(x)))``.

    The softmax runs over each image's valid views only; padded views (``view_mask`` False) get
    weight exactly 0.

    Args:
        view_emb: ``[B, V, D]`` view embeddings (padded).
        view_mask: ``[B, V]`` bool, True for real views.
        image_emb: ``[B, D]`` full-image embeddings.
        image_scale: log of the softmax temperature multiplier (4.0 -> e^4 ~= 54.6).

    Returns:
        float32 ``[B, V]``, each row summing to 1.
    """
    if not isinstance(view_emb, torch.Tensor) or view_emb.ndim != 3:
        raise ConfigError("view_emb must be a [B, V, D] tensor")
    _check_2d(image_emb, "image_emb")
    b, v, d = view_emb.shape
    if not isinstance(view_mask, torch.Tensor) or view_mask.shape != (b, v):
        raise ConfigError(f"view_mask must be a [{b}, {v}] bool tensor")
    if image_emb.shape != (b, d):
        raise ConfigError(
            f"image_emb must be [{b}, {d}] to match view_emb, got {tuple(image_emb.shape)}"
        )
    mask = view_mask.to(device=view_emb.device, dtype=torch.bool)
    empty = torch.nonzero(~mask.any(dim=1)).flatten().tolist()
    if empty:
        raise ConfigError(f"images without any valid view: {empty[:20]}")
    views = torch.where(mask[..., None], _unit(view_emb), 0.0)  # padding may hold NaN/garbage
    cos = torch.einsum("bvd,bd->bv", views, _unit(image_emb).to(views.device))
    logits = (math.exp(image_scale) * cos).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1)


def description_weights(
    desc_emb: torch.Tensor,
    desc_class: torch.Tensor,
    class_emb: torch.Tensor,
    text_scale: float = 2.0,
) -> torch.Tensor:
    """WCA description weights ``v_j = softmax_j(exp(text_scale) * cos(g(t_j), g(p_c)))``.

    The softmax runs separately within each class's descriptions (a segment softmax computed
    with ``scatter_reduce``/``index_add``, no loop over classes), against that class's prompt
    embedding ``class_emb[c]``.

    Returns:
        float32 ``[T]``; the weights of each class's descriptions sum to 1.
    """
    _check_2d(desc_emb, "desc_emb")
    _check_2d(class_emb, "class_emb")
    if desc_emb.shape[1] != class_emb.shape[1]:
        raise ConfigError("desc_emb and class_emb have different embedding sizes")
    num_classes = class_emb.shape[0]
    desc_class = _check_desc_class(desc_class, desc_emb.shape[0], num_classes)
    d = _unit(desc_emb)
    dev = d.device
    idx = desc_class.to(dev)
    cos = (d * _unit(class_emb).to(dev)[idx]).sum(dim=-1)
    logits = math.exp(text_scale) * cos
    # Subtract each class's max before exponentiating, for numerical stability.
    seg_max = torch.full((num_classes,), float("-inf"), dtype=torch.float32, device=dev)
    seg_max = seg_max.scatter_reduce(0, idx, logits, reduce="amax", include_self=True)
    e = torch.exp(logits - seg_max[idx])
    denom = torch.zeros(num_classes, dtype=torch.float32, device=dev).index_add_(0, idx, e)
    return e / denom[idx]


def wca_text_vectors(
    desc_emb: torch.Tensor,
    desc_class: torch.Tensor,
    class_emb: torch.Tensor,
    text_scale: float = 2.0,
    aggregation: str = "normalized",
) -> torch.Tensor:
    """The text side of the WCA score, ``sum_j v_j g(t_j)`` per class (WCA Sec. 3), once per label set.

    It depends only on the label set, so a scorer computes it once instead of every batch
    (together with the description weights and the ``desc_class`` checks, which read back from
    the device). Normalised for ``"normalized"`` aggregation.

    Returns:
        float32 ``[C, D]``.
    """
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    v = description_weights(desc_emb, desc_class, class_emb, text_scale)
    text_vec = class_text_vectors(desc_emb, desc_class, v, class_emb.shape[0])
    return _unit(text_vec) if aggregation == "normalized" else text_vec


def wca_image_vectors(
    view_emb: torch.Tensor, view_mask: torch.Tensor, image_emb: torch.Tensor, image_scale: float = 4.0
) -> torch.Tensor:
    """The image side of the WCA score, ``sum_i w_i f(x_i)`` (WCA Sec. 3), not normalised.

    Independent of the label set: computed once per batch for every label set.

    Returns:
        float32 ``[B, D]``.
    """
    w = view_weights(view_emb, view_mask, image_emb, image_scale)
    mask = view_mask.to(device=view_emb.device, dtype=torch.bool)
    views = torch.where(mask[..., None], _unit(view_emb), 0.0)
    return torch.einsum("bv,bvd->bd", w, views)


def wca_scores_from_vectors(image_vec: torch.Tensor, text_vec: torch.Tensor, aggregation: str = "normalized") -> torch.Tensor:
    """Score ``[B, C]`` from :func:`wca_image_vectors` and :func:`wca_text_vectors` (same aggregation)."""
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "normalized":
        image_vec = _unit(image_vec)
    return image_vec @ text_vec.to(image_vec.device).T


def wca_scores(
    view_emb: torch.Tensor,
    view_mask: torch.Tensor,
    image_emb: torch.Tensor,
    desc_emb: torch.Tensor,
    desc_class: torch.Tensor,
    class_emb: torch.Tensor,
    image_scale: float = 4.0,
    text_scale: float = 2.0,
    aggregation: str = "normalized",
) -> torch.Tensor:
    """WCA / BiFTA visual-text cross-alignment score for every image and class.

    Equals ``wca_scores_from_vectors(wca_image_vectors(...), wca_text_vectors(...))`` (that is how
    it is computed); scorers that see many batches precompute the text side.

    Args:
        view_emb: ``[B, V, D]`` view embeddings (padded to ``V``).
        view_mask: ``[B, V]`` bool, True for real views; every image needs at least one.
        image_emb: ``[B, D]`` full-image embeddings (used only for the view weights).
        desc_emb: ``[T, D]`` description embeddings of all classes, concatenated.
        desc_class: ``[T]`` class index of each description; every class needs at least one.
        class_emb: ``[C, D]`` class prompt embeddings (used only for the description weights).
        image_scale: view softmax uses ``exp(image_scale)`` times cosine.
        text_scale: description softmax uses ``exp(text_scale)`` times cosine.
        aggregation: ``"normalized"`` (cosine of the weighted sums, released code) or ``"sum"``
            (``sum_ij w_i v_j cos(view_i, desc_j)``, the paper's formula).

    Returns:
        float32 ``[B, C]``.
    """
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    image_vec = wca_image_vectors(view_emb, view_mask, image_emb, image_scale)
    text_vec = wca_text_vectors(desc_emb, desc_class, class_emb, text_scale, aggregation)
    return wca_scores_from_vectors(image_vec, text_vec, aggregation)


def sample_view_subsets(
    view_mask: torch.Tensor, patch_n: int, n_run: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample ``patch_n`` view indices per image and run, with replacement among valid views.

    This is the repeated-run evaluation protocol of the WCA release: each run scores a random
    subset of an image's views, and accuracy is reported as mean and standard deviation over
    runs. Random numbers come from ``generator`` (CPU) as one ``[n_run, B, patch_n]`` draw.

    Returns:
        ``torch.long`` ``[n_run, B, patch_n]`` indices into the view axis of ``view_mask``.
    """
    if not isinstance(view_mask, torch.Tensor) or view_mask.ndim != 2:
        raise ConfigError("view_mask must be a [B, V] bool tensor")
    if int(patch_n) != patch_n or patch_n < 1:
        raise ConfigError(f"patch_n must be a positive integer, got {patch_n}")
    if int(n_run) != n_run or n_run < 1:
        raise ConfigError(f"n_run must be a positive integer, got {n_run}")
    mask = view_mask.to(torch.bool).cpu()
    counts = mask.sum(dim=1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ConfigError(f"images without any valid view: {empty[:20]}")
    # Valid view indices first, in their original order, for every image.
    valid_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    shape = (int(n_run), mask.shape[0], int(patch_n))
    r = torch.rand(shape, generator=generator, dtype=torch.float64)
    pos = torch.minimum(torch.floor(r * counts[None, :, None]), (counts - 1)[None, :, None]).long()
    idx = torch.gather(valid_first[None].expand(int(n_run), -1, -1), 2, pos)
    return idx.to(view_mask.device)


def wca_scores_protocol(
    view_emb: torch.Tensor,
    view_mask: torch.Tensor,
    image_emb: torch.Tensor,
    desc_emb: torch.Tensor,
    desc_class: torch.Tensor,
    class_emb: torch.Tensor,
    patch_n: int,
    n_run: int,
    generator: torch.Generator | None = None,
    **kw: object,
) -> torch.Tensor:
    """Score random view subsets of each image over ``n_run`` runs (WCA evaluation protocol).

    Each run gathers the views chosen by :func:`sample_view_subsets` (a view drawn twice counts
    twice) and scores them with :func:`wca_scores`; ``kw`` passes ``image_scale``,
    ``text_scale`` and ``aggregation`` through.

    Returns:
        float32 ``[n_run, B, C]``.
    """
    if not isinstance(view_emb, torch.Tensor) or view_emb.ndim != 3:
        raise ConfigError("view_emb must be a [B, V, D] tensor")
    b, _, d = view_emb.shape
    idx = sample_view_subsets(view_mask, patch_n, n_run, generator).to(view_emb.device)
    runs = idx.shape[0]
    gathered = torch.gather(
        view_emb[None].expand(runs, -1, -1, -1), 2, idx[..., None].expand(-1, -1, -1, d)
    )
    flat_views = gathered.reshape(runs * b, idx.shape[2], d)
    flat_mask = torch.ones(flat_views.shape[:2], dtype=torch.bool, device=view_emb.device)
    flat_images = image_emb[None].expand(runs, -1, -1).reshape(runs * b, -1)
    scores = wca_scores(
        flat_views,
        flat_mask,
        flat_images,
        desc_emb,
        desc_class,
        class_emb,
        **kw,  # type: ignore[arg-type]
    )
    return scores.reshape(runs, b, -1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float | torch.Tensor:
    """Fraction of images whose label is among the ``k`` highest-scoring classes.

    Args:
        scores: ``[B, C]`` or ``[..., B, C]`` (e.g. ``[n_run, B, C]``).
        labels: ``[B]`` true class indices.

    Returns:
        a float for ``[B, C]`` scores, else a float64 tensor of shape ``[...]`` (one per run).
        Ties between scores are broken by ``torch.topk``.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim < 2:
        raise ConfigError("scores must be a tensor of shape [..., B, C]")
    b, c = scores.shape[-2:]
    if not isinstance(labels, torch.Tensor) or labels.shape != (b,):
        raise ConfigError(f"labels must be a [{b}] tensor")
    if int(k) != k or not (1 <= k <= c):
        raise ConfigError(f"k must be an integer in [1, {c}], got {k}")
    if b == 0:
        raise ConfigError("cannot compute accuracy over zero images")
    top = scores.topk(int(k), dim=-1).indices
    hit = (top == labels.to(top.device, torch.long)[:, None]).any(dim=-1)
    acc = hit.to(torch.float64).mean(dim=-1)
    return float(acc) if scores.ndim == 2 else acc


def protocol_accuracy(
    scores_runs: torch.Tensor, labels: torch.Tensor, k: int = 1
) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0, as ``numpy.std``) of per-run top-k
    accuracy for ``[n_run, B, C]`` scores from :func:`wca_scores_protocol`."""
    if not isinstance(scores_runs, torch.Tensor) or scores_runs.ndim != 3:
        raise ConfigError("scores_runs must be a [n_run, B, C] tensor")
    acc = topk_accuracy(scores_runs, labels, k)
    assert isinstance(acc, torch.Tensor)
    return float(acc.mean()), float(acc.std(correction=0))
