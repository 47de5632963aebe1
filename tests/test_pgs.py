"""Tests for CLIP-PGS token selection and pruned ViT encoding (bifta_core.method.pgs)."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet

from bifta_core.method import pgs
from bifta_core.errors import ConfigError

torch.set_num_threads(1)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """0..1 RGB ``[N, 3, H, W]`` -> model-normalised view."""
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def synthetic_scenes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Normalised views: noisy gradient background with two bright textured ellipses each."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    views = []
    for _ in range(n):
        img = torch.rand(3, 1, 1, generator=gen) * 0.3 + 0.1 + 0.1 * yy
        img = img + 0.02 * torch.randn(3, size, size, generator=gen)
        for _ in range(2):
            centre = torch.rand(2, generator=gen) * 0.6 + 0.2
            radius = torch.rand(2, generator=gen) * 0.15 + 0.1
            inside = ((xx - centre[0]) / radius[0]) ** 2 + ((yy - centre[1]) / radius[1]) ** 2 <= 1
            colour = torch.rand(3, 1, 1, generator=gen) * 0.5 + 0.5
            img = torch.where(inside, colour + 0.1 * torch.sin(40 * xx + 20 * yy), img)
        views.append(img.clamp(0, 1))
    return normalise(torch.stack(views))


def tiny_vit_clip(**vision: object) -> torch.nn.Module:
    """A small random-weight open_clip CLIP whose ViT tower takes ``vision`` overrides."""
    cfg = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
           "mlp_ratio": 2.0}
    cfg.update(vision)
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=24, vision_cfg=cfg, text_cfg=TINY_TEXT).eval()


@pytest.fixture(scope="module")
def vit_b32() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def keep_mask(idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], num_patches, dtype=torch.bool).scatter_(1, idx, True)


# ------------------------------------------------------------------ patchify / edges


def test_patchify_shape_order_and_standardisation() -> None:
    x = torch.randn(2, 3, 32, 48)
    raw = pgs.patchify(x, 16, standardize=False)
    assert raw.shape == (2, 6, 3 * 16 * 16)
    # row-major patch order, like conv1: patch 4 is grid row 1, column 1
    assert torch.equal(raw[1, 4], x[1, :, 16:32, 16:32].reshape(-1))
    std = pgs.patchify(x, 16)
    assert torch.allclose(std.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(std.std(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)
    flat = pgs.patchify(torch.full((1, 3, 16, 16), 0.7), 8)
    assert torch.isfinite(flat).all() and flat.abs().max() == 0


def test_edge_map_square_border() -> None:
    rgb = torch.zeros(1, 3, 224, 224)
    rgb[:, :, 64:160, 64:160] = 1.0  # patches 4..9 of a 14x14 grid (P=16)
    edges = pgs.edge_map(normalise(rgb), MEAN, STD, 16)[0]
    assert edges.shape == (14, 14)
    assert edges.max() == pytest.approx(1.0) and edges.min() >= 0
    ring = torch.zeros(14, 14, dtype=torch.bool)
    ring[3:11, 3:11] = True
    ring[5:9, 5:9] = False  # both sides of the contour: patches 3,4 and 9,10 rows/cols
    assert edges[ring].min() > 0.3
    assert edges[6:8, 6:8].abs().max() < 1e-5  # deep inside the square
    for far in [(0, 0), (0, 13), (13, 0), (13, 13), (0, 7), (7, 0)]:
        assert edges[far].abs() < 1e-5


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_edge_map_flat_image_is_zero(level: float) -> None:
    edges = pgs.edge_map(normalise(torch.full((3, 3, 64, 64), level)), MEAN, STD, 16)
    assert edges.shape == (3, 4, 4)
    assert torch.isfinite(edges).all() and edges.abs().max() == 0


def test_edge_map_bad_arguments() -> None:
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ConfigError):
        pgs.edge_map(x, (0.5, 0.5), STD, 8)
    with pytest.raises(ConfigError):
        pgs.edge_map(x, MEAN, (0.2, 0.0, 0.2), 8)
    with pytest.raises(ConfigError):
        pgs.edge_map(x, MEAN, STD, 0)
    with pytest.raises(ConfigError):
        pgs.edge_map(torch.zeros(1, 1, 32, 32), MEAN, STD, 8)
    with pytest.raises(ConfigError):
        pgs.edge_map(x, MEAN, STD, 64)


# ------------------------------------------------------------------ similarity / sinkhorn


def test_patch_similarity_is_cosine() -> None:
    feats = torch.randn(2, 5, 7)
    feats[1, 3] = 0  # a flat patch: similarity 0, no NaN
    sim = pgs.patch_similarity(feats)
    assert sim.shape == (2, 5, 5)
    expected = torch.nn.functional.cosine_similarity(feats[0, 1], feats[0, 4], dim=0)
    assert sim[0, 1, 4] == pytest.approx(expected.item(), abs=1e-6)
    assert torch.isfinite(sim).all() and sim[1, 3].abs().max() == 0
    assert torch.allclose(sim, sim.transpose(1, 2))


@pytest.mark.parametrize("epsilon", [0.05, 0.2, 1.0])
def test_sinkhorn_doubly_stochastic_with_negative_cosines(epsilon: float) -> None:
    gen = torch.Generator().manual_seed(3)
    sim = pgs.patch_similarity(torch.randn(3, 20, 4, generator=gen))
    assert sim.min() < -0.5  # genuinely negative scores
    plan = pgs.sinkhorn(sim, iters=500, epsilon=epsilon)
    assert plan.shape == (3, 20, 20) and torch.isfinite(plan).all() and (plan >= 0).all()
    assert torch.allclose(plan.sum(2), torch.ones(3, 20), atol=1e-3)
    assert torch.allclose(plan.sum(1), torch.ones(3, 20), atol=1e-3)


def test_sinkhorn_masked_diagonal_and_extreme_scores() -> None:
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 12, 12, generator=gen) - 1e4  # far below zero: no underflow to NaN
    scores = scores.masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    plan = pgs.sinkhorn(scores, iters=1000, epsilon=0.2)
    assert torch.isfinite(plan).all()
    assert plan.diagonal(dim1=1, dim2=2).abs().max() == 0
    assert torch.allclose(plan.sum(1), torch.ones(2, 12), atol=1e-3)
    assert torch.allclose(plan.sum(2), torch.ones(2, 12), atol=1e-3)


def test_sinkhorn_default_config_is_near_doubly_stochastic() -> None:
    views = synthetic_scenes(4, 64, torch.Generator().manual_seed(5))
    sim = pgs.patch_similarity(pgs.patchify(views, 8))
    cfg = pgs.PgsConfig()
    plan = pgs.sinkhorn(sim.masked_fill(torch.eye(64, dtype=torch.bool), float("-inf")),
                        cfg.sinkhorn_iters, cfg.sinkhorn_epsilon)
    assert torch.allclose(plan.sum(1), torch.ones(4, 64), atol=1e-4)  # last step: columns
    assert (plan.sum(2) - 1).abs().max() < 0.1


@pytest.mark.parametrize("kwargs", [{"iters": 0}, {"iters": 2.5}, {"epsilon": 0.0},
                                    {"epsilon": -1.0}, {"epsilon": math.inf}])
def test_sinkhorn_bad_arguments(kwargs: dict) -> None:
    args = {"iters": 3, "epsilon": 0.1, **kwargs}
    with pytest.raises(ConfigError):
        pgs.sinkhorn(torch.zeros(1, 4, 4), **args)
    with pytest.raises(ConfigError):
        pgs.sinkhorn(torch.zeros(1, 4, 5), 3, 0.1)


# ------------------------------------------------------------------ config / counts


@pytest.mark.parametrize("kwargs", [
    {"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": True}, {"candidate_ratio": 0.0},
    {"sinkhorn_iters": 0}, {"sinkhorn_iters": 1.0}, {"sinkhorn_epsilon": 0.0},
    {"similarity_threshold": -1.0}, {"use_token_similarity": 1}, {"edge_quantile": 1.5},
    {"edge_aware_fill": "yes"},
])
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        pgs.PgsConfig(**kwargs)


def test_num_kept() -> None:
    assert pgs.num_kept(49, 0.5) == 49 - round(24.5)
    assert pgs.num_kept(196, 0.7) == 196 - round(196 * 0.3)
    assert pgs.num_kept(10, 1.0) == 10
    assert pgs.num_kept(10, 0.01) == 1  # at least one patch survives
    with pytest.raises(ConfigError):
        pgs.num_kept(0, 0.5)


# ------------------------------------------------------------------ selection


def check_indices(idx: torch.Tensor, n: int, num_patches: int, keep_ratio: float) -> None:
    keep = num_patches - round(num_patches * (1 - keep_ratio))
    assert idx.dtype == torch.long and idx.shape == (n, keep)
    assert (idx >= 0).all() and (idx < num_patches).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()  # sorted ascending, no repeats


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("size,patch", [(64, 8), (96, 32)])
def test_select_and_random_patches_counts(keep_ratio: float, size: int, patch: int) -> None:
    views = synthetic_scenes(3, size, torch.Generator().manual_seed(6))
    num_patches = (size // patch) ** 2
    idx = pgs.select_patches(views, MEAN, STD, patch, pgs.PgsConfig(keep_ratio=keep_ratio),
                             torch.Generator().manual_seed(0))
    check_indices(idx, 3, num_patches, keep_ratio)
    base = pgs.random_patches(3, num_patches, keep_ratio, torch.Generator().manual_seed(0))
    check_indices(base, 3, num_patches, keep_ratio)


def test_selection_is_deterministic_per_seed() -> None:
    views = synthetic_scenes(4, 64, torch.Generator().manual_seed(7))
    # keep 0.7: fewer drops than low-edge patches, so the random candidates/fill matter
    cfg = pgs.PgsConfig(keep_ratio=0.7)

    def run(seed: int) -> torch.Tensor:
        return pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    r1 = pgs.random_patches(4, 64, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(r1, pgs.random_patches(4, 64, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(r1, pgs.random_patches(4, 64, 0.5, torch.Generator().manual_seed(2)))


def test_flat_images_select_without_nan() -> None:
    views = normalise(torch.full((2, 3, 64, 64), 0.3))
    idx = pgs.select_patches(views, MEAN, STD, 16, pgs.PgsConfig(),
                             torch.Generator().manual_seed(0))
    check_indices(idx, 2, 16, 0.5)


def test_candidates_and_similar_patches_are_dropped_first() -> None:
    # Two textures of equal brightness (no edges): a checkerboard and its inverse, spread over
    # a 4x4 grid. Whichever texture the single candidate has, its 7 twins are flagged and the
    # 8 dropped patches must be exactly that texture group.
    tile = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2
    groups = torch.tensor([0, 1] * 8).view(4, 4)
    groups[1::2] = 1 - groups[1::2]
    rgb = torch.zeros(1, 3, 32, 32)
    for r in range(4):
        for c in range(4):
            pattern = tile if groups[r, c] == 0 else 1 - tile
            rgb[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0.3 + 0.4 * pattern
    views = normalise(rgb)
    cfg = pgs.PgsConfig(keep_ratio=0.5, candidate_ratio=0.01)
    for seed in range(6):
        kept = pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(seed))
        kept_groups = groups.flatten()[kept[0]]
        assert kept.shape == (1, 8) and (kept_groups == kept_groups[0]).all()


def test_edge_patches_protected_when_nothing_similar() -> None:
    # With an unreachable similarity threshold only candidates are flagged; candidates are
    # low-edge and the random fill takes low-edge patches first, so no high-edge patch is lost
    # while enough low-edge ones remain.
    views = synthetic_scenes(8, 64, torch.Generator().manual_seed(8))
    edges = pgs.edge_map(views, MEAN, STD, 8).flatten(1)
    low = edges <= torch.quantile(edges, 0.5, dim=1, keepdim=True)
    cfg = pgs.PgsConfig(keep_ratio=0.6, similarity_threshold=1e9)
    kept = pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(0))
    dropped = ~keep_mask(kept, 64)
    assert (dropped & ~low).sum() == 0


@pytest.mark.parametrize("size,patch", [(224, 32), (224, 16)])
def test_edge_patches_kept_more_often_than_random(size: int, patch: int) -> None:
    n = 48
    views = synthetic_scenes(n, size, torch.Generator().manual_seed(9))
    edges = pgs.edge_map(views, MEAN, STD, patch).flatten(1)
    num_patches = edges.shape[1]
    top_edge = edges >= torch.quantile(edges, 0.75, dim=1, keepdim=True)
    cfg = pgs.PgsConfig(keep_ratio=0.5)
    chosen = keep_mask(pgs.select_patches(views, MEAN, STD, patch, cfg,
                                          torch.Generator().manual_seed(0)), num_patches)
    baseline = keep_mask(pgs.random_patches(n, num_patches, 0.5,
                                            torch.Generator().manual_seed(0)), num_patches)
    pgs_frac = (chosen & top_edge).sum().item() / top_edge.sum().item()
    rand_frac = (baseline & top_edge).sum().item() / top_edge.sum().item()
    assert rand_frac < 0.6
    assert pgs_frac > rand_frac + 0.25


def test_token_similarity_option() -> None:
    model = tiny_vit_clip()
    views = synthetic_scenes(2, 32, torch.Generator().manual_seed(10))
    cfg = pgs.PgsConfig(use_token_similarity=True)
    with pytest.raises(ConfigError):
        pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = pgs.patch_embeddings(model, views)
    assert tokens.shape == (2, 16, 32)
    idx = pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(0),
                             tokens=tokens)
    check_indices(idx, 2, 16, 0.5)
    with pytest.raises(ConfigError):
        pgs.select_patches(views, MEAN, STD, 8, cfg, torch.Generator().manual_seed(0),
                           tokens=tokens[:, :5])


# ------------------------------------------------------------------ encoding


def test_vit_b32_keep_all_matches_encode_image(vit_b32: torch.nn.Module) -> None:
    assert pgs.supports_pgs(vit_b32) and pgs.supports_pgs(vit_b32.visual)
    assert pgs.patch_size_of(vit_b32) == 32 and pgs.grid_size_of(vit_b32) == (7, 7)
    views = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        ref = vit_b32.encode_image(views)
        full = pgs.encode_image_with_keep(vit_b32, views, None)
        all_idx = pgs.encode_image_with_keep(vit_b32, views, torch.arange(49).expand(2, 49))
        half = pgs.encode_image_with_keep(vit_b32.visual, views,
                                          pgs.random_patches(2, 49, 0.5, torch.Generator()))
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(all_idx, ref, atol=1e-5)
    assert half.shape == ref.shape and not torch.allclose(half, ref, atol=1e-3)


VIT_VARIANTS = [
    {},
    {"pool_type": "avg"},
    {"final_ln_after_pool": True},
    {"final_ln_after_pool": True, "pool_type": "avg"},
    {"no_ln_pre": True},
    {"patch_size": 16, "image_size": 64, "width": 48, "head_width": 24},
    {"pos_embed_type": "sin_cos_2d"},
    {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    # open_clip's parallel pooler applies ln_post(output_dim) to width tokens: needs width == dim
    {"attentional_pool": "parallel", "attn_pooler_queries": 4, "attn_pooler_heads": 2,
     "width": 24, "head_width": 12},
    {"ls_init_value": 0.1, "qk_norm": True},
]


def _variant_id(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "default"


@pytest.mark.parametrize("variant", VIT_VARIANTS, ids=_variant_id)
def test_small_vit_variants_match_encode_image(variant: dict) -> None:
    model = tiny_vit_clip(**variant)
    size = model.visual.image_size[0]
    views = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(12))
    num_patches = math.prod(pgs.grid_size_of(model))
    with torch.no_grad():
        ref = model.encode_image(views)
        for keep in (None, torch.arange(num_patches).expand(3, num_patches)):
            assert torch.allclose(pgs.encode_image_with_keep(model, views, keep), ref, atol=1e-5)
        idx = pgs.select_patches(views, MEAN, STD, pgs.patch_size_of(model), pgs.PgsConfig(),
                                 torch.Generator().manual_seed(0))
        pruned = pgs.encode_image_with_keep(model, views, idx)
    assert pruned.shape == ref.shape and torch.isfinite(pruned).all()


def test_pruned_encoding_matches_manual_per_image_computation() -> None:
    model = tiny_vit_clip()
    visual = model.visual
    views = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    keep = pgs.random_patches(3, 16, 0.4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pgs.encode_image_with_keep(model, views, keep)
        for i in range(3):
            tokens = visual.conv1(views[i:i + 1]).flatten(2)[0].t()  # [16, width]
            pos = visual.positional_embedding
            seq = [visual.class_embedding + pos[0]]  # class token first, always present
            seq += [tokens[j] + pos[j + 1] for j in keep[i].tolist()]
            x = visual.ln_pre(torch.stack(seq)[None])
            x = visual.ln_post(visual.transformer(x))
            expected = x[0, 0] @ visual.proj
            assert torch.allclose(out[i], expected, atol=1e-5)


def test_keep_idx_validation() -> None:
    model = tiny_vit_clip()
    views = torch.randn(2, 3, 32, 32)
    bad = [torch.tensor([[0, 16], [1, 2]]), torch.tensor([[0, -1], [1, 2]]),
           torch.tensor([[3, 3], [1, 2]]), torch.zeros(3, 2, dtype=torch.long),
           torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)]
    for keep in bad:
        with pytest.raises(ConfigError):
            pgs.encode_image_with_keep(model, views, keep)


def test_resnet_tower_is_rejected() -> None:
    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=32, width=8)
    clip_rn = open_clip.CLIP(embed_dim=16, text_cfg=TINY_TEXT,
                             vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8,
                                         "image_size": 32})
    for model in (resnet, clip_rn):
        assert not pgs.supports_pgs(model)
        with pytest.raises(ConfigError, match="needs a ViT image tower; ModifiedResNet"):
            pgs.encode_image_with_keep(model, torch.randn(1, 3, 32, 32))
        with pytest.raises(ConfigError):
            pgs.patch_size_of(model)
        with pytest.raises(ConfigError):
            pgs.grid_size_of(model)
