"""The GPU path, checked on the CPU (issue 11 items 2-7, issue 12 item 1).

* the batched crop cutter gives the pixels of the per-image path and costs a constant number of
  host-device transfers and no device read-backs per batch, whatever the number of images/boxes;
* float memory is bounded by ``view_batch_size``: views stay uint8 until their chunk is encoded;
* CLIP-PGS over a whole batch equals selection per image; precomputed scoring equals scoring;
* a worker given a GPU with unusable CUDA fails with one line; ``cuda:N`` maps onto the worker;
* QuickGELU follows the weights (OpenAI → QuickGELU) and enters run provenance and cache keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bifta_core.io import models
from bifta_core.method import pgs
from bifta_core.method import views
from bifta_core.errors import BiftaUserError, ConfigError, ModelLoadError
from bifta_core.method.prediction import (
    ScoreParams,
    method_image_vectors,
    method_scores,
    method_text_vectors,
    scores_from_vectors,
)
from bifta_core.method.seeding import generator_for
from bifta_core.method.text_banks import TextBank
from bifta_core.method.encoding import ViewEncoder
from pipelines.encode import load_gpu_checked_model


def _reference_crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The pre-batching cutter: one two-pass resize per box (PIL-like, pass 1 rounded to 8 bits)."""
    img = image.to(torch.float32)
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        crop = img[None, :, y0:y1, x0:x1]
        horiz = F.interpolate(crop, size=(y1 - y0, size), mode="bicubic", antialias=True, align_corners=False)
        horiz = torch.floor(horiz + 0.5).clamp_(0.0, 255.0)
        out.append(F.interpolate(horiz, size=(size, size), mode="bicubic", antialias=True,
                                 align_corners=False).clamp_(0.0, 255.0))
    return torch.cat(out) if out else torch.empty(0, 3, size, size)


def _random_batch(rng: np.random.Generator, n_images: int, n_boxes: int, seed: int = 0):
    images, boxes = [], []
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(40, 160, 2))
        images.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        boxes.append(views.sample_boxes(w, h, n_boxes, (0.1, 0.9), generator_for(seed, f"img{i}")))
    return images, boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_cutter_is_bit_identical_to_per_box_resizing(seed):
    rng = np.random.default_rng(seed)
    images, boxes = _random_batch(rng, 5, 17, seed)
    got = views.crop_resize_batch(images, boxes, 32, as_uint8=False)
    want = torch.cat([_reference_crops(im, b, 32) for im, b in zip(images, boxes)])
    assert torch.equal(got, want)
    as_uint8 = views.crop_resize_batch(images, boxes, 32)
    assert as_uint8.dtype == torch.uint8 and torch.equal(as_uint8, want.round().clamp(0, 255).to(torch.uint8))
    # crop_resize_tensor is the one-image case of the same path.
    assert torch.equal(views.crop_resize_tensor(images[0], boxes[0], 32), want[: len(boxes[0])])


def test_planned_chunks_cover_every_view_once_in_any_chunking():
    rng = np.random.default_rng(3)
    images, boxes = _random_batch(rng, 4, 9)
    plan = views.plan_views(boxes, [tuple(im.shape) for im in images])
    whole = views.cut_planned(images, plan, 0, plan.total, 24)
    pieces = torch.cat([views.cut_planned(images, plan, a, min(a + 5, plan.total), 24) for a in range(0, plan.total, 5)])
    assert torch.equal(whole, pieces)
    pad = plan.pad_index()
    image_major = views.crop_resize_batch(images, boxes, 24)
    start = 0
    for b, n in enumerate(plan.counts):
        assert torch.equal(whole[torch.from_numpy(pad[b, :n])], image_major[start : start + n])
        assert (pad[b, n:] == -1).all()
        start += n


def _read_backs(fn) -> int:
    """Device read-backs (``.item()``, ``.tolist()``, ``bool(t)``: each a blocking sync on CUDA)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


class _CountingTransfers:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = views.to_device

        def counted(tensor, device):
            self.calls += 1
            return original(tensor, device)

        import bifta_core.method.encoding as encode

        monkeypatch.setattr(views, "to_device", counted)
        monkeypatch.setattr(encode, "to_device", counted)


def _encoder_inputs(model, rng, n_images: int, n_boxes: int, ship_every: int = 0):
    from pipelines.views import cut_crops

    work, hw, boxes, ids, crops = [], [], [], [], []
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(40, 120, 2))
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = views.sample_boxes(w, h, n_boxes, (0.3, 0.9), generator_for(0, f"i{i}")).numpy().astype(np.int32)
        if ship_every and i % ship_every == 1:
            crops.append(cut_crops(px, b, model.image_size).numpy().tobytes())
            work.append(b"")
            hw.append((0, 0))
        else:
            crops.append(b"")
            work.append(px.tobytes())
            hw.append((h, w))
        boxes.append(b.tobytes())
        ids.append(f"i{i}")
    return work, hw, boxes, ids, crops


@pytest.mark.parametrize("pgs_keep", [None, 0.5])
def test_transfers_and_read_backs_per_batch_do_not_grow_with_images_or_boxes(tiny_vit_model, monkeypatch, pgs_keep):
    counter = _CountingTransfers(monkeypatch)
    encoder = ViewEncoder(tiny_vit_model, view_batch_size=16, seed=0, pgs_keep=pgs_keep, pgs_whole_image=False)
    rng = np.random.default_rng(0)
    measured = []
    for n_images, n_boxes in ((1, 3), (6, 25)):
        args = _encoder_inputs(tiny_vit_model, rng, n_images, n_boxes, ship_every=3)
        counter.calls = 0
        reads = _read_backs(lambda: encoder.encode_views(*args))
        measured.append((counter.calls, reads))
    assert measured[0] == measured[1], measured
    transfers, reads = measured[0]
    assert transfers == (3 if pgs_keep else 2)  # pixels, (PGS noise,) regrouping index
    # The cutter itself never reads back; what remains is per chunk in the model, not per view.
    images, boxes = _random_batch(np.random.default_rng(1), 6, 30)
    assert _read_backs(lambda: views.crop_resize_batch(images, boxes, 32)) == 0


def test_float_views_exist_only_one_chunk_at_a_time(tiny_vit_model, monkeypatch):
    """Peak float memory of a batch is bounded by view_batch_size, not by images × views."""
    seen = []
    original = tiny_vit_model.normalize_pixels
    monkeypatch.setattr(tiny_vit_model, "normalize_pixels", lambda x: seen.append(tuple(x.shape)) or original(x))
    cut_sizes = []
    import bifta_core.method.encoding as encode

    original_cut = encode.cut_planned
    monkeypatch.setattr(encode, "cut_planned", lambda s, p, a, b, size: cut_sizes.append(b - a) or original_cut(s, p, a, b, size))
    encoder = ViewEncoder(tiny_vit_model, view_batch_size=7, seed=0, pgs_keep=None, pgs_whole_image=False)
    args = _encoder_inputs(tiny_vit_model, np.random.default_rng(2), 5, 20)
    emb, mask = encoder.encode_views(*args)
    assert int(mask.sum()) == 100 and max(cut_sizes) <= 7 and max(s[0] for s in seen) <= 7
    assert all(s[1:] == (3, tiny_vit_model.image_size, tiny_vit_model.image_size) for s in seen)


def test_encoder_matches_per_image_reference(tiny_vit_model):
    """Whole-batch chunking equals encoding each image's views on their own (fp32 CPU)."""
    encoder = ViewEncoder(tiny_vit_model, view_batch_size=512, seed=5, pgs_keep=0.5, pgs_whole_image=False)
    args = _encoder_inputs(tiny_vit_model, np.random.default_rng(4), 4, 6, ship_every=2)
    emb, mask = encoder.encode_views(*args)
    for i in range(4):
        one = [[a[i]] for a in args]
        e1, m1 = encoder.encode_views(*one)
        n = int(m1.sum())
        torch.testing.assert_close(emb[i, :n], e1[0, :n], rtol=0, atol=1e-6)
        assert mask[i].sum() == n and not emb[i, n:].any()


def test_pgs_selection_over_a_batch_equals_selection_per_image():
    patch, cfg = 8, pgs.PgsConfig(keep_ratio=0.5)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    gen = torch.Generator().manual_seed(0)
    counts = [3, 1, 5]
    imgs = [torch.randn(n, 3, 32, 32, generator=gen) for n in counts]
    per_image = [pgs.select_patches(x, mean, std, patch, cfg, generator_for(1, f"im{k}")) for k, x in enumerate(imgs)]
    noise = torch.cat([pgs.selection_noise(n, 16, generator_for(1, f"im{k}")) for k, n in enumerate(counts)], dim=1)
    batched = pgs.select_patches(torch.cat(imgs), mean, std, patch, cfg, noise=noise)
    assert torch.equal(batched, torch.cat(per_image))
    with pytest.raises(ConfigError):
        pgs.select_patches(torch.cat(imgs), mean, std, patch, cfg, noise=noise[:, :2])


@pytest.mark.parametrize("method", ["clip", "clip-e", "cupl", "wca", "bifta"])
@pytest.mark.parametrize("aggregation", ["normalized", "sum"])
def test_precomputed_text_side_gives_the_same_scores(method, aggregation):
    gen = torch.Generator().manual_seed(0)
    c, t, d, b, v = 4, 11, 16, 3, 6
    class_emb = torch.randn(c, d, generator=gen)
    desc_class = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 2, 0, 1])
    bank = TextBank("k", method, [f"t{i}" for i in range(t)], desc_class, F.normalize(torch.randn(t, d, generator=gen), dim=-1))
    image_emb = torch.randn(b, d, generator=gen)
    view_emb = torch.randn(b, v, d, generator=gen)
    view_mask = torch.ones(b, v, dtype=torch.bool)
    view_mask[1, 4:] = False
    params = ScoreParams(aggregation=aggregation)
    want = method_scores(method, class_emb, image_emb, bank, view_emb, view_mask, params)
    text = method_text_vectors(method, class_emb, bank, params)
    image = method_image_vectors(method, image_emb, view_emb, view_mask, params)
    assert torch.equal(scores_from_vectors(method, image, text, params), want)


# ------------------------------------------------------------------------------------- devices


def test_gpu_worker_with_unusable_cuda_fails_with_one_line():
    with pytest.raises(ConfigError) as err:
        models.check_gpu_assignment([0], "auto", probe=lambda: "driver too old for CUDA 13.0")
    assert "\n" not in str(err.value) and "GPU 0" in str(err.value) and "driver too old" in str(err.value)
    with pytest.raises(ConfigError):
        models.check_gpu_assignment(["3"], "cpu", probe=lambda: None)
    models.check_gpu_assignment([], "cpu", probe=lambda: "never asked")  # CPU workers: nothing to check
    models.check_gpu_assignment([0], "cuda:1", probe=lambda: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_worker_given_a_gpu_on_a_machine_without_cuda_refuses_to_load():
    assert models.cuda_problem() is not None
    with pytest.raises(BiftaUserError) as err:
        load_gpu_checked_model(dict(model_name="bifta-tiny-vit", pretrained="random"), [0])
    assert "\n" not in str(err.value) and "CUDA" in str(err.value)
    with pytest.raises(ModelLoadError):
        models.load_model("bifta-tiny-vit", "random", device="auto", require_cuda=True)
    with pytest.raises(ModelLoadError):
        models.resolve_device("cuda:1")
    # A CPU worker (no GPU assigned) loads as before.
    assert load_gpu_checked_model(dict(model_name="bifta-tiny-vit", pretrained="random", device="cpu"), []).device.type == "cpu"


def test_device_ordinal_maps_onto_the_worker_gpu():
    assert models.actor_device("cuda:1", [1]) == "cuda:0"
    assert models.actor_device("cuda:3", [2, 3]) == "cuda:1"
    assert models.actor_device("cuda:5", [0]) == "cuda:0"  # Ray chose the GPU, not the flag
    assert models.actor_device("auto", [4]) == "cuda:0"
    assert models.actor_device("cuda:1", []) == "cuda:1"  # no Ray GPU: resolve_device validates it
    with pytest.raises(ConfigError):
        models.actor_device("gpu7", [0])


def test_fp32_disables_tf32_and_precision_resolution():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        models.set_fp32_exact(torch.device("cuda", 0))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    assert models.effective_precision("auto", on_cuda=True) == "fp16"
    assert models.effective_precision("bf16", on_cuda=False) == "fp32"
    assert models.text_precision("auto") == "fp32" and models.text_precision("fp16") == "fp16"


# ------------------------------------------------------------------------------------- QuickGELU


def _has_quick_gelu(module: torch.nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in module.modules())


def test_activation_follows_the_weights_without_network():
    assert models.resolved_activation("ViT-B-32", "openai") == "quick_gelu"
    assert models.resolved_activation("ViT-B-32", "laion2b_s34b_b79k") == "gelu"
    assert models.resolved_activation("ViT-B-32-quickgelu", "random") == "quick_gelu"
    assert models.resolved_activation("ViT-B-32", "openai", quick_gelu=False) == "gelu"
    assert models.resolved_activation("bifta-tiny-vit", "random") == "gelu"
    assert models.resolved_activation("bifta-tiny-vit", "random", quick_gelu=True) == "quick_gelu"


def test_vit_b32_for_openai_weights_is_vit_b32_quickgelu():
    """The encoder built for (ViT-B-32, openai) — random weights, never downloaded — contains
    QuickGELU and, given the same weights, computes exactly what ViT-B-32-quickgelu computes."""
    import open_clip

    activation = models.resolved_activation("ViT-B-32", "openai")
    torch.manual_seed(0)
    ours = models.build_clip("ViT-B-32", None, activation).eval()
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    reference.load_state_dict(ours.state_dict())
    assert _has_quick_gelu(ours) and _has_quick_gelu(reference)
    assert not _has_quick_gelu(models.build_clip("ViT-B-32", None, "gelu"))
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat.", "a dog"])
    with torch.inference_mode():
        assert torch.equal(ours.encode_image(x), reference.encode_image(x))
        assert torch.equal(ours.encode_text(tokens), reference.encode_text(tokens))


def test_activation_and_precision_enter_identity_and_label_set_key():
    from bifta_core.config import LabelConfig, ModelConfig
    from pipelines.label_sets import label_set_identity

    quick = models.model_identity("ViT-B-32", "openai")
    gelu = models.model_identity("ViT-B-32", "openai", quick_gelu=False)
    assert quick != gelu and quick.endswith("|quick_gelu")
    assert models.model_identity("ViT-B-32-quickgelu", "openai") != gelu

    def key(**model):
        return label_set_identity(LabelConfig(model=ModelConfig(model="ViT-B-32", pretrained="openai", **model)))

    assert key() != key(quick_gelu=False)
    assert key(precision="fp16") != key(precision="fp32") == key(precision="auto")
    prov = models.model_provenance("ViT-B-32", "openai", precision="auto", on_cuda=True)
    assert prov["activation"] == "quick_gelu" and prov["precision"] == "fp16"
    assert models.model_provenance("ViT-B-32", "openai", on_cuda=False, quick_gelu=False)["activation"] == "gelu"


def test_openai_checkpoints_are_detected_and_loaded_with_quick_gelu(tiny_vit_checkpoint, tmp_path):
    assert not models.is_openai_checkpoint(str(tiny_vit_checkpoint))
    state = torch.load(tiny_vit_checkpoint, weights_only=True)
    # A state dict saved from OpenAI's TorchScript model keeps these entries.
    openai_like = tmp_path / "openai-state.pt"
    torch.save({**state, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, openai_like)
    assert models.is_openai_checkpoint(str(openai_like))
    model = models.load_model("bifta-tiny-vit", str(openai_like), device="cpu")
    assert model.activation == "quick_gelu" and _has_quick_gelu(model.model)
    assert model.identity.endswith("|quick_gelu") and model.describe()["activation"] == "quick_gelu"
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    plain = models.load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu")
    assert plain.activation == "gelu" and not _has_quick_gelu(plain.model)
    forced = models.load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu", quick_gelu=True)
    assert forced.activation == "quick_gelu" and forced.identity != plain.identity
    # A TorchScript archive is OpenAI's release format.
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    assert models.is_openai_checkpoint(str(scripted))


def test_label_set_artifacts_with_another_activation_are_refused(tiny_vit_checkpoint, tmp_path):
    from bifta_core.config import LabelConfig, ModelConfig
    from bifta_core.errors import LabelSetError
    from bifta_core.io.label_set_artifacts import save_artifact
    from bifta_core.io.label_sets import load_label_set
    from bifta_core.method.text_banks import build_label_set_embeddings
    from pipelines.label_sets import _artifact, bank_specs, label_set_identity
    from tests.pipeline_helpers import write_labelset

    folder = write_labelset(tmp_path / "ls")
    model = models.load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu", quick_gelu=True)
    cfg = LabelConfig(labels=[str(folder)], method="clip",
                      model=ModelConfig(model="bifta-tiny-vit", pretrained=str(tiny_vit_checkpoint)))
    emb = build_label_set_embeddings(load_label_set(str(folder), "ls"), model, bank_specs(cfg))
    path = str(tmp_path / "art.parquet")
    save_artifact(emb, path)
    with pytest.raises(LabelSetError, match="activation"):
        _artifact(path, cfg, label_set_identity(cfg), bank_specs(cfg))
    cfg_quick = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quick_gelu=True))
    assert _artifact(path, cfg_quick, label_set_identity(cfg_quick), bank_specs(cfg_quick)).model == "bifta-tiny-vit"


def test_wheel_architectures_decide_which_gpus_can_run():
    cuda13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert not models._runs_on(cuda13, 7, 0)  # V100: dropped by CUDA 13
    assert models._runs_on(cuda13, 8, 9)  # L4 runs the sm_86 kernels
    assert models._runs_on(cuda13, 9, 0) and models._runs_on(cuda13, 7, 5)
    assert models._runs_on(["sm_80", "compute_90"], 10, 0)  # PTX is JIT-compiled for newer GPUs
