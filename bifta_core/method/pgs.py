"""CLIP-PGS patch generation-to-selection for ViT image towers.

Implements the token-selection half of "Seeing What Matters: Empowering CLIP with Patch
Generation-to-Selection" (Pei et al., CVPR 2025; CLIP-PGS). Instead of dropping ViT patch tokens
uniformly at random, CLIP-PGS

1. *generates* a few random candidate patches (Sec. 3.2, "Patch Generation"),
2. *selects* further patches that look like those candidates, measured by a patch similarity
   matrix normalised with optimal transport (Sec. 3.3, "Patch Selection"), while a Sobel edge map
   keeps object contours from being masked (Sec. 3.3, edge-aware selection),

and drops the selected patches so the encoder sees fewer, more informative tokens. Everything is
batched over ``N`` views and pure: randomness comes only from the ``torch.Generator`` passed in.

Conventions used throughout:

* ``images`` are ``[N, 3, H, W]`` views already normalised with the model's ``mean``/``std``;
  the patch grid is ``gh = H // P`` by ``gw = W // P`` (``P`` the patch size), ``L = gh * gw``,
  patches are numbered row-major, exactly as ``conv1`` of an open_clip ViT orders its tokens.
* Kept-patch indices are 0-based patch indices (the class token is *not* a patch and is never
  dropped), sorted ascending, shape ``[N, K]`` with the same ``K`` for every image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bifta_core.errors import ConfigError
from bifta_core.validation import integer, number

__all__ = [
    "PgsConfig",
    "selection_noise",
    "edge_map",
    "encode_image_with_keep",
    "grid_size_of",
    "num_kept",
    "patch_embeddings",
    "patch_similarity",
    "patch_size_of",
    "patchify",
    "random_patches",
    "select_patches",
    "sinkhorn",
    "supports_pgs",
]

ChannelStats = Sequence[float] | torch.Tensor

# ITU-R BT.601 luma weights: the usual "grey" of an RGB image.
_LUMA = (0.299, 0.587, 0.114)
# Below this spread an edge map is treated as flat (min-max scaling would divide by ~0).
_FLAT_RANGE = 1e-12


@dataclass(frozen=True)
class PgsConfig:
    """Hyper-parameters of CLIP-PGS token selection (Pei et al., CVPR 2025, Sec. 3.2-3.3).

    Attributes:
        keep_ratio: fraction of patch tokens kept, in ``(0, 1]``. ``round(L * (1 - keep_ratio))``
            patches are dropped (at least one patch is always kept). 0.5 is the masking ratio
            the paper trains with.
        candidate_ratio: fraction of patches pre-selected at random as candidates (Sec. 3.2);
            at least one candidate is always drawn. 0.05 follows the paper's small seed set.
        sinkhorn_iters: Sinkhorn-Knopp row/column normalisation rounds (Sec. 3.3). With the
            default temperature, 10 rounds bring row sums of natural-image plans within a few
            percent of 1 (5 rounds leave up to ~17 %) and cost little next to the encoder.
        sinkhorn_epsilon: entropic temperature applied to cosine similarities. Cosines live in
            ``[-1, 1]``; 0.2 turns a 0.2 cosine gap into an ``e``-fold mass ratio, which separates
            similar from dissimilar patches without collapsing each row onto one neighbour, and
            converges much faster than sharper temperatures (0.05-0.1).
        similarity_threshold: a patch is flagged as "similar to a candidate" when its normalised
            similarity to some candidate exceeds ``similarity_threshold / (L - 1)``, i.e. this
            many times the mass a uniform plan would give it (the diagonal is excluded, so the
            uniform off-diagonal value is ``1 / (L - 1)``). 2.0 = twice the uniform share.
        use_token_similarity: measure similarity between patch-embedding tokens (``conv1``
            outputs, see :func:`patch_embeddings`) instead of standardised pixel patches.
        edge_quantile: a patch is "low-edge" when its edge strength is at most this per-image
            quantile of the edge map; candidates are drawn among low-edge patches. 0.5 = the
            per-image median.
        edge_aware_fill: when flagged patches do not reach the drop count, drop unflagged
            low-edge patches (random order) before unflagged high-edge ones, so object contours
            survive (Sec. 3.3 edge preservation). ``False`` fills uniformly at random.
    """

    keep_ratio: float = 0.5
    candidate_ratio: float = 0.05
    sinkhorn_iters: int = 10
    sinkhorn_epsilon: float = 0.2
    similarity_threshold: float = 2.0
    use_token_similarity: bool = False
    edge_quantile: float = 0.5
    edge_aware_fill: bool = True

    def __post_init__(self) -> None:
        _check_ratio("keep_ratio", self.keep_ratio)
        _check_ratio("candidate_ratio", self.candidate_ratio)
        _check_iters(self.sinkhorn_iters)
        _check_positive("sinkhorn_epsilon", self.sinkhorn_epsilon)
        _check_positive("similarity_threshold", self.similarity_threshold)
        for name in ("use_token_similarity", "edge_aware_fill"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        q = self.edge_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ConfigError(f"edge_quantile must be a number in [0, 1], got {q!r}")


# --------------------------------------------------------------------------------------------
# argument checks


def _describe(value: object) -> str:
    """Shape of a tensor (or type name of anything else) for error messages."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def _check_ratio(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_positive(name: str, value: object) -> None:
    number(name, value, positive=True)


def _check_iters(value: object) -> None:
    integer("sinkhorn_iters", value)


def _check_patch_size(patch_size: object) -> int:
    integer("patch_size", patch_size)
    return patch_size


def _check_images(images: object, patch_size: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"images must be a [N, 3, H, W] tensor, got {_describe(images)}")
    if not images.is_floating_point():
        raise ConfigError(f"images must be a floating-point tensor, got {images.dtype}")
    if images.shape[2] < patch_size or images.shape[3] < patch_size:
        raise ConfigError(
            f"images of size {tuple(images.shape[2:])} are smaller than patch_size {patch_size}"
        )
    return images


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, uploaded once per (values, dtype, device) and then reused, so
    selecting patches chunk after chunk costs no host-to-device copy (issue 11, item 4)."""
    key = (values, dtype, str(device))
    if key not in _CONSTANTS:
        if len(_CONSTANTS) > 64:  # a handful of models per process; never grow without bound
            _CONSTANTS.clear()
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _CONSTANTS[key]


def _channel_stats(values: ChannelStats, name: str, like: torch.Tensor) -> torch.Tensor:
    """Return ``values`` as a ``[1, 3, 1, 1]`` tensor matching ``like``'s device and dtype."""
    if not isinstance(values, torch.Tensor):
        # Plain numbers are checked on the host: no device read-back per call.
        flat = [float(v) for v in values]
        if len(flat) != 3:
            raise ConfigError(f"{name} must have 3 values (one per RGB channel), got {len(flat)}")
        if not all(math.isfinite(v) for v in flat):
            raise ConfigError(f"{name} must be finite, got {flat}")
        return _constant(tuple(flat), like.dtype, like.device).view(1, 3, 1, 1)
    stats = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if stats.numel() != 3:
        raise ConfigError(f"{name} must have 3 values (one per RGB channel), got {stats.numel()}")
    if not bool(torch.isfinite(stats).all()):
        raise ConfigError(f"{name} must be finite, got {stats.tolist()}")
    return stats.view(1, 3, 1, 1)


def num_kept(num_patches: int, keep_ratio: float) -> int:
    """Number of patch tokens kept out of ``num_patches`` at ``keep_ratio``.

    ``round(num_patches * (1 - keep_ratio))`` patches are dropped (Python rounding), clamped so at
    least one patch survives; the class token comes on top. Shared by :func:`select_patches` and
    :func:`random_patches` so PGS and the random baseline keep exactly as many tokens (CLIP-PGS,
    Sec. 4, comparisons at equal masking ratio).
    """
    integer("num_patches", num_patches)
    _check_ratio("keep_ratio", keep_ratio)
    dropped = min(round(num_patches * (1.0 - keep_ratio)), num_patches - 1)
    return num_patches - dropped


# --------------------------------------------------------------------------------------------
# image statistics


def patchify(images: torch.Tensor, patch_size: int, standardize: bool = True, eps: float = 1e-6
             ) -> torch.Tensor:
    """Cut ``[N, 3, H, W]`` views into ``[N, L, 3 * P * P]`` patch vectors (CLIP-PGS Sec. 3.3).

    Patches are non-overlapping ``P x P`` tiles in row-major order (the same order as a ViT's
    ``conv1`` tokens); trailing rows/columns that do not fill a patch are ignored, as ``conv1``
    does. With ``standardize`` each patch vector is shifted to zero mean and scaled to unit
    standard deviation (``sqrt(var + eps)``), so similarity compares texture/structure rather
    than brightness; a flat patch (variance ``<= eps``) becomes the zero vector.
    """
    patch_size = _check_patch_size(patch_size)
    _check_images(images, patch_size)
    _check_positive("eps", eps)
    patches = F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)
    if not standardize:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    standardized = (patches - mean) * torch.rsqrt(var + eps)
    # Rounding leaves ~1e-4 residue in flat patches, whose direction is pure noise; zero them so
    # they are "similar to nothing" instead of randomly similar to each other.
    return torch.where(var > eps, standardized, torch.zeros_like(standardized))


def edge_map(images: torch.Tensor, mean: ChannelStats, std: ChannelStats, patch_size: int
             ) -> torch.Tensor:
    """Per-patch Sobel edge strength ``[N, gh, gw]`` in ``[0, 1]`` (CLIP-PGS Sec. 3.3).

    The normalised views are mapped back to ``0..1`` RGB with ``mean``/``std`` (clamped, since
    augmentation can overshoot), converted to luminance (BT.601) and average-pooled to the patch
    grid; the Sobel gradient magnitude is taken on that grid with replicate padding, so a patch
    scores high when its mean brightness differs from its neighbours', i.e. on object contours.
    The released implementation applies Sobel after per-patch standardisation, which removes the
    brightness differences it is meant to detect; using the un-standardised grey image is a
    deliberate fix. Each map is min-max scaled per image; a flat map becomes all zeros (no NaN).
    """
    patch_size = _check_patch_size(patch_size)
    _check_images(images, patch_size)
    mean_t = _channel_stats(mean, "mean", images)
    std_t = _channel_stats(std, "std", images)
    if not isinstance(std, torch.Tensor) and min(float(v) for v in std) <= 0:
        raise ConfigError(f"std must be positive, got {[float(v) for v in std]}")
    if isinstance(std, torch.Tensor) and not bool((std_t > 0).all()):
        raise ConfigError(f"std must be positive, got {std_t.flatten().tolist()}")
    rgb = (images * std_t + mean_t).clamp(0.0, 1.0)
    luma = _constant(_LUMA, images.dtype, images.device).view(1, 3, 1, 1)
    grey = (rgb * luma).sum(dim=1, keepdim=True)
    grid = F.avg_pool2d(grey, kernel_size=patch_size, stride=patch_size)  # [N, 1, gh, gw]

    gx = _constant(((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0)), images.dtype, images.device)
    kernels = torch.stack([gx, gx.t()]).unsqueeze(1)  # [2, 1, 3, 3]: d/dx and d/dy
    grads = F.conv2d(F.pad(grid, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grads.pow(2).sum(dim=1).sqrt()  # [N, gh, gw]

    low = magnitude.amin(dim=(1, 2), keepdim=True)
    spread = magnitude.amax(dim=(1, 2), keepdim=True) - low
    flat = spread <= _FLAT_RANGE
    scaled = (magnitude - low) / torch.where(flat, torch.ones_like(spread), spread)
    return torch.where(flat, torch.zeros_like(scaled), scaled)


def patch_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[N, L, L]`` between per-patch feature vectors ``[N, L, D]`` (Sec. 3.3).

    ``features`` are standardised pixel patches (:func:`patchify`) or patch-embedding tokens
    (:func:`patch_embeddings`). Zero vectors (flat patches) get similarity 0 to everything.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ConfigError(f"features must be a [N, L, D] tensor, got {_describe(features)}")
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def sinkhorn(scores: torch.Tensor, iters: int = 10, epsilon: float = 0.2) -> torch.Tensor:
    """Entropic optimal-transport normalisation of ``[N, L, L]`` scores (CLIP-PGS Sec. 3.3).

    Forms ``K = exp((S - max S) / epsilon)`` and alternately rescales rows and columns
    (Sinkhorn-Knopp) ``iters`` times. Convention: the result is (near) *doubly stochastic* --
    every row and every column sums to 1, so the uniform value is ``1 / L``; it equals ``L``
    times the transport plan between uniform marginals ``1 / L``. The last step normalises
    columns, so columns sum to 1 exactly and rows up to the remaining Sinkhorn error.

    Works in the log domain (``logsumexp``), so any real scores -- negative cosines included --
    and small ``epsilon`` neither overflow nor underflow. Entries set to ``-inf`` get zero mass
    (used to exclude self-similarity); every row and column needs at least one finite entry.
    """
    square = isinstance(scores, torch.Tensor) and scores.dim() == 3
    if not square or scores.shape[1] != scores.shape[2]:
        raise ConfigError(f"scores must be a square [N, L, L] tensor, got {_describe(scores)}")
    _check_iters(iters)
    _check_positive("sinkhorn_epsilon", epsilon)
    log_k = scores.float()
    # Shifting by the per-image max does not change the result; it keeps logits <= 0.
    log_k = (log_k - log_k.amax(dim=(1, 2), keepdim=True)) / epsilon
    for _ in range(iters):
        log_k = log_k - torch.logsumexp(log_k, dim=2, keepdim=True)
        log_k = log_k - torch.logsumexp(log_k, dim=1, keepdim=True)
    return log_k.exp()


# --------------------------------------------------------------------------------------------
# selection


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
             ) -> torch.Tensor:
    """Uniform ``[0, 1)`` noise drawn on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _lexsort(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-wise lexicographic ``argsort`` of ``[N, L]`` keys, most significant key first."""
    perm = torch.argsort(keys[-1], dim=1, stable=True)
    for key in reversed(keys[:-1]):
        perm = perm.gather(1, torch.argsort(key.gather(1, perm), dim=1, stable=True))
    return perm


def select_patches(
    images: torch.Tensor,
    mean: ChannelStats,
    std: ChannelStats,
    patch_size: int,
    config: PgsConfig = PgsConfig(),
    generator: torch.Generator | None = None,
    *,
    tokens: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP-PGS kept-patch indices ``[N, K]`` (Pei et al., CVPR 2025, Sec. 3.2-3.3).

    Per image, with ``L`` patches and ``D = L - num_kept(L, keep_ratio)`` to drop:

    1. *Edges*: :func:`edge_map`; "low-edge" = at most the ``config.edge_quantile`` quantile.
    2. *Generation*: ``max(1, round(L * candidate_ratio))`` candidates drawn uniformly among
       low-edge patches (from all patches only if there are too few low-edge ones).
    3. *Selection*: cosine similarity of standardised pixel patches (or of ``tokens`` when
       ``config.use_token_similarity``), self-similarity excluded, normalised with
       :func:`sinkhorn`; a patch is flagged when its normalised similarity to some candidate
       exceeds ``similarity_threshold / (L - 1)``. Candidates are flagged too.
    4. *Dropping*, in this order until exactly ``D`` are dropped: candidates; other flagged
       patches, most similar first (ties: lower edge first); then unflagged patches in random
       order -- low-edge before high-edge when ``config.edge_aware_fill`` (default), so the
       fill does not eat object contours. Note that with the default edge-aware fill and
       ``keep_ratio == 1 - edge_quantile`` the dropped set is close to the low-edge half
       whatever the random candidates are.

    Returns the remaining patch indices sorted ascending (class token excluded: it is not a patch
    and is always kept by :func:`encode_image_with_keep`). Randomness comes only from
    ``generator`` (global RNG when ``None``), so a seeded generator gives identical output.

    ``noise`` (``[2, N, L]``, from :func:`selection_noise`) replaces the draw from ``generator``.
    Every step above is per view, so views of many images can be selected in one call with their
    per-image noise concatenated along ``N`` — identical to one call per image, without a
    host-device round trip per image.
    """
    if not isinstance(config, PgsConfig):
        raise ConfigError(f"config must be a PgsConfig, got {type(config).__name__}")
    patch_size = _check_patch_size(patch_size)
    _check_images(images, patch_size)
    n, device = images.shape[0], images.device

    with torch.no_grad():
        edges = edge_map(images, mean, std, patch_size).flatten(1).float()  # [N, L]
        num_patches = edges.shape[1]
        keep = num_kept(num_patches, config.keep_ratio)
        drop = num_patches - keep
        if drop == 0:
            return torch.arange(num_patches, device=device).repeat(n, 1)

        if config.use_token_similarity:
            if tokens is None:
                raise ConfigError("use_token_similarity=True needs the patch-embedding tokens")
            if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (n, num_patches):
                raise ConfigError(
                    f"tokens must be [N={n}, L={num_patches}, D], got {tuple(tokens.shape)}"
                )
            features = tokens.to(device)
        else:
            features = patchify(images, patch_size)
        sim = patch_similarity(features)
        # A patch is trivially most similar to itself; leaving the diagonal in would let
        # self-mass dominate every row of the plan and hide the neighbours we want.
        eye = torch.eye(num_patches, dtype=torch.bool, device=device)
        plan = sinkhorn(sim.masked_fill(eye, float("-inf")), config.sinkhorn_iters,
                        config.sinkhorn_epsilon)

        # Generation: random candidates, restricted to low-edge patches.
        low_edge = edges <= torch.quantile(edges, config.edge_quantile, dim=1, keepdim=True)
        if noise is None:
            noise = _uniform((2, n, num_patches), generator, device)
        elif tuple(noise.shape) != (2, n, num_patches):
            raise ConfigError(f"noise must be [2, {n}, {num_patches}], got {_describe(noise)}")
        else:
            noise = noise.to(device)
        num_cand = min(max(1, round(num_patches * config.candidate_ratio)), num_patches)
        cand = (noise[0] + (~low_edge).float()).topk(num_cand, dim=1, largest=False).indices
        is_cand = torch.zeros_like(low_edge).scatter_(1, cand, True)

        # Selection: strongest normalised similarity from any candidate row of the plan.
        cand_rows = plan.gather(1, cand.unsqueeze(-1).expand(-1, -1, num_patches))
        affinity = cand_rows.amax(dim=1)  # [N, L]
        flagged = is_cand | (affinity > config.similarity_threshold / (num_patches - 1))

        # Drop priority tiers: 0 candidates, 1 flagged, 2 low-edge rest, 3 high-edge rest
        # (2 and 3 merge, i.e. a uniform random fill, without edge-aware fill).
        tier = torch.full_like(edges, 3.0)
        if config.edge_aware_fill:
            tier = torch.where(low_edge, torch.full_like(tier, 2.0), tier)
        tier = torch.where(flagged, torch.ones_like(tier), tier)
        tier = torch.where(is_cand, torch.zeros_like(tier), tier)
        within = torch.where(tier == 1.0, -affinity, noise[1])
        order = _lexsort([tier, within, edges])
        return order[:, drop:].sort(dim=1).values


def selection_noise(n: int, num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``[2, n, L]`` uniform noise :func:`select_patches` draws for ``n`` views, on the
    generator's device: the same numbers, in the same order, as a call with that generator."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand((2, n, num_patches), generator=generator, device=gen_device)


def random_patches(n: int, num_patches: int, keep_ratio: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline kept-patch indices ``[n, K]``: uniform random token dropping (CLIP-PGS Sec. 4).

    Keeps ``K = num_kept(num_patches, keep_ratio)`` patches per image -- exactly as many as
    :func:`select_patches` -- chosen uniformly without replacement, sorted ascending, on the
    generator's device (CPU when ``generator`` is ``None``).
    """
    integer("n", n, minimum=0)
    keep = num_kept(num_patches, keep_ratio)
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand((n, num_patches), generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


# --------------------------------------------------------------------------------------------
# open_clip ViT encoding with dropped tokens


def _vision_tower(model: nn.Module) -> nn.Module:
    """The ViT image tower of an open_clip model (or the tower itself); ConfigError otherwise."""
    from open_clip.transformer import VisionTransformer  # local: keeps import of this module light

    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        arch = type(visual).__name__
        raise ConfigError(
            f"CLIP-PGS token selection needs a ViT image tower; {arch} is not supported"
        )
    return visual


def supports_pgs(model: nn.Module) -> bool:
    """Whether ``model`` (open_clip CLIP or its ``.visual``) has a ViT tower CLIP-PGS can prune."""
    try:
        _vision_tower(model)
    except ConfigError:
        return False
    return True


def grid_size_of(model: nn.Module) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of the model's ViT tower; ``L = gh * gw`` patch tokens."""
    gh, gw = _vision_tower(model).grid_size
    return int(gh), int(gw)


def patch_size_of(model: nn.Module) -> int:
    """Square patch size ``P`` of the model's ViT tower (ConfigError for non-square patches)."""
    ph, pw = _vision_tower(model).patch_size
    if ph != pw:
        raise ConfigError(f"CLIP-PGS needs square patches, got {ph}x{pw}")
    return int(ph)


def patch_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch-embedding tokens ``[N, L, width]`` (``conv1`` output, before positional embedding).

    Input for ``PgsConfig(use_token_similarity=True)`` (CLIP-PGS Sec. 3.3 similarity variant).
    """
    visual = _vision_tower(model)
    x = visual.conv1(images)
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)


def _check_keep_idx(keep_idx: object, n: int, num_patches: int, device: torch.device
                    ) -> torch.Tensor:
    if not isinstance(keep_idx, torch.Tensor) or keep_idx.dim() != 2 or keep_idx.shape[0] != n:
        raise ConfigError(f"keep_idx must be a [N={n}, K] index tensor, got {_describe(keep_idx)}")
    if keep_idx.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"keep_idx must be an integer (long) tensor, got {keep_idx.dtype}")
    keep_idx = keep_idx.to(device=device, dtype=torch.long)
    if keep_idx.numel() == 0:
        return keep_idx
    if bool((keep_idx < 0).any()) or bool((keep_idx >= num_patches).any()):
        raise ConfigError(f"keep_idx values must lie in [0, {num_patches}) (patch indices)")
    ordered = keep_idx.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ConfigError("keep_idx must not repeat a patch index within an image")
    return keep_idx


def _global_pool(pool_type: str, x: torch.Tensor) -> torch.Tensor:
    """Mirror of open_clip 3.3.0 ``VisionTransformer._global_pool`` (pooled part only)."""
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)  # averages the kept patches only
    if pool_type == "tok":
        return x[:, 0]
    return x


def _pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mirror of open_clip 3.3.0 ``VisionTransformer._pool`` (all pooling variants)."""
    if visual.attn_pool is not None:
        if visual.attn_pool_contrastive is not None:
            x = visual.ln_post(x)
            tokens = visual.attn_pool(x)
            if visual.attn_pool_type == "parallel":
                return visual.attn_pool_contrastive(x)
            return visual.attn_pool_contrastive(tokens)
        x = visual.ln_post(visual.attn_pool(x))
        return _global_pool(visual.pool_type, x)
    if visual.final_ln_after_pool:
        return visual.ln_post(_global_pool(visual.pool_type, x))
    return _global_pool(visual.pool_type, visual.ln_post(x))


def encode_image_with_keep(model: nn.Module, images: torch.Tensor,
                           keep_idx: torch.Tensor | None = None, *, check_keep: bool = True) -> torch.Tensor:
    """Image features ``[N, D]`` from an open_clip ViT that sees only the kept patch tokens.

    Follows open_clip 3.3.0 ``VisionTransformer.forward`` step by step (``conv1``, flatten, class
    token, positional embedding, ``patch_dropout``, ``ln_pre``, transformer, pooling, ``proj``),
    but right after the positional embedding keeps only the class token and the patches in
    ``keep_idx`` (CLIP-PGS Sec. 3, masked tokens are removed, not zeroed: the speed-up comes from
    the shorter sequence). Positional embeddings are added before the gather, so every kept token
    retains its original position. ``keep_idx=None`` (or all patches) reproduces
    ``model.encode_image(images)`` (unnormalised). Runs under whatever grad mode the caller set.
    ``check_keep=False`` skips the range/duplicate checks of ``keep_idx`` (three device read-backs)
    for indices that come straight from :func:`select_patches`.
    """
    visual = _vision_tower(model)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ConfigError(f"images must be a [N, 3, H, W] tensor, got {_describe(images)}")

    x = visual.conv1(images)  # [N, width, gh, gw]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, L, width]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    if keep_idx is not None:
        if check_keep:
            idx = _check_keep_idx(keep_idx, x.shape[0], x.shape[1] - 1, x.device)
        else:
            idx = keep_idx.to(device=x.device, dtype=torch.long)
        kept = x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], kept], dim=1)  # class token always stays first

    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    pooled = _pool(visual, x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled
