"""Model loading: tiny architectures through the real checkpoint path, random weights, errors."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch

from bifta_core.errors import BiftaUserError, ModelLoadError
from bifta_core.io.models import (
    ClipModel,
    load_model,
    register_bundled_configs,
    resolve_precision,
    resolve_pretrained,
    save_checkpoint,
)

TEXTS = ["a photo of a cat.", "a photo of a dog.", "a red sports car", ""]


def _pixels(model: ClipModel, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 3, model.image_size, model.image_size), generator=g, dtype=torch.uint8)
    return model.normalize_pixels(raw)


def _assert_same_outputs(a: ClipModel, b: ClipModel) -> None:
    x = _pixels(a)
    torch.testing.assert_close(a.encode_images(x), b.encode_images(x), rtol=0, atol=0)
    torch.testing.assert_close(a.encode_text(TEXTS), b.encode_text(TEXTS), rtol=0, atol=0)


def _assert_one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------ bundled configs


def test_bundled_configs_are_registered():
    import open_clip

    names = register_bundled_configs()
    assert {"bifta-tiny-vit", "bifta-tiny-rn"} <= set(names)
    assert {"bifta-tiny-vit", "bifta-tiny-rn"} <= set(open_clip.list_models())


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "arch, fixture",
    [("bifta-tiny-vit", "tiny_vit_checkpoint"), ("bifta-tiny-rn", "tiny_rn_checkpoint")],
)
def test_checkpoint_round_trip_gives_identical_outputs(arch, fixture, request):
    checkpoint: Path = request.getfixturevalue(fixture)
    random_model = load_model(arch, "random", device="cpu")
    loaded = load_model(arch, str(checkpoint), device="cpu")

    assert loaded.weights.kind == "file"
    assert not loaded.is_random
    assert loaded.describe()["random_weights"] is False
    assert loaded.describe()["weights"] == "file"
    assert loaded.model_name == arch
    assert loaded.image_size == random_model.image_size == 64
    _assert_same_outputs(random_model, loaded)

    sd_a, sd_b = random_model.model.state_dict(), loaded.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


def test_checkpoint_save_creates_parent_folders(tmp_path):
    model = load_model("bifta-tiny-vit", "random", device="cpu")
    target = tmp_path / "deep" / "er" / "model.pt"
    assert save_checkpoint(model, str(target)) == str(target)
    # a plain state dict: loadable with weights_only=True
    state = torch.load(target, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    # a raw nn.Module saves the same way
    other = tmp_path / "module.pt"
    save_checkpoint(model.model, str(other))
    state2 = torch.load(other, weights_only=True)
    assert state.keys() == state2.keys()


def test_file_uri_and_identity(tiny_vit_checkpoint):
    resolved = resolve_pretrained("bifta-tiny-vit", f"file://{tiny_vit_checkpoint}")
    assert resolved.kind == "file"
    assert resolved.source == str(tiny_vit_checkpoint)
    model = load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu")
    assert model.identity.startswith("bifta-tiny-vit|sha256:")
    assert model.identity != load_model("bifta-tiny-vit", "random", device="cpu").identity


def test_checkpoint_identity_follows_content_not_path_or_mtime(tiny_vit_checkpoint, tmp_path):
    """A copy of the same weights (another node's download cache, say) is the same model for caches
    and resume; changed weights are not."""
    import os
    import shutil

    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_vit_checkpoint, copy)
    os.utime(copy, (1, 1))
    same = resolve_pretrained("bifta-tiny-vit", str(copy)).identity
    assert same == resolve_pretrained("bifta-tiny-vit", str(tiny_vit_checkpoint)).identity
    changed = tmp_path / "changed.pt"
    changed.write_bytes(copy.read_bytes() + b"\0")
    assert resolve_pretrained("bifta-tiny-vit", str(changed)).identity != same


# ------------------------------------------------------------------------------ random weights


def test_random_weights_are_seeded_and_flagged():
    torch.manual_seed(123)
    a = load_model("bifta-tiny-vit", "random", device="cpu")
    torch.manual_seed(456)  # the caller's RNG state must not matter
    b = load_model("bifta-tiny-vit", "random", device="cpu")
    _assert_same_outputs(a, b)

    assert a.is_random and b.is_random
    info = a.describe()
    assert info["random_weights"] is True
    assert info["weights"] == "random"
    assert info["pretrained"] == "random"
    assert info["model"] == "bifta-tiny-vit"
    assert a.identity == "bifta-tiny-vit|random:0"


def test_random_weights_do_not_disturb_caller_rng():
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    load_model("bifta-tiny-rn", "random", device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_resnet_and_vit_differ():
    vit = load_model("bifta-tiny-vit", "random", device="cpu")
    rn = load_model("bifta-tiny-rn", "random", device="cpu")
    x = _pixels(vit, n=2)
    assert not torch.allclose(vit.encode_images(x), rn.encode_images(x))


# ------------------------------------------------------------------------------ outputs


def test_embeddings_are_unit_norm_float32(tiny_vit_model):
    model = tiny_vit_model
    img = model.encode_images(_pixels(model, n=5))
    txt = model.encode_text(TEXTS, batch_size=3)  # several batches
    for emb in (img, txt):
        assert emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5, rtol=0)
    assert img.shape == (5, model.embed_dim)
    assert txt.shape == (len(TEXTS), model.embed_dim)
    assert model.embed_dim == 64


def test_text_batching_does_not_change_results(tiny_vit_model):
    whole = tiny_vit_model.encode_text(TEXTS, batch_size=256)
    split = tiny_vit_model.encode_text(TEXTS, batch_size=1)
    torch.testing.assert_close(whole, split, atol=1e-6, rtol=0)


def test_encode_text_empty_list(tiny_vit_model):
    out = tiny_vit_model.encode_text([])
    assert out.shape == (0, 64)


def test_normalize_pixels_uses_model_constants(tiny_vit_model):
    model = tiny_vit_model
    raw = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    out = model.normalize_pixels(raw)
    for c in range(3):
        expected = (1.0 - model.mean[c]) / model.std[c]
        torch.testing.assert_close(out[0, c], torch.full((4, 4), expected), atol=1e-6, rtol=0)
    assert model.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert model.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_precision_resolves_to_fp32_on_cpu(tiny_vit_checkpoint):
    cpu = torch.device("cpu")
    for precision in ("auto", "fp32", "fp16", "bf16"):
        assert resolve_precision(precision, cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    model = load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu", precision="fp16")
    assert model.precision == "fp32"
    assert model.describe()["precision"] == "fp32"
    assert model.describe()["device"] == "cpu"
    assert next(model.model.parameters()).dtype == torch.float32


def test_bad_precision_names_flag():
    with pytest.raises(ModelLoadError, match="--precision") as info:
        load_model("bifta-tiny-vit", "random", device="cpu", precision="fp8")
    _assert_one_line(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ModelLoadError, match="--device"):
        load_model("bifta-tiny-vit", "random", device="cuda")


# ------------------------------------------------------------------------------ errors


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError) as info:
        load_model("bifta-tiny-vit", str(missing), device="cpu")
    msg = _assert_one_line(info.value)
    assert "--pretrained" in msg and str(missing) in msg and "not found" in msg


def test_checkpoint_folder_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="--pretrained") as info:
        load_model("bifta-tiny-vit", str(tmp_path), device="cpu")
    assert "folder" in _assert_one_line(info.value)


def test_unknown_tag():
    with pytest.raises(ModelLoadError) as info:
        load_model("ViT-B-32", "no_such_tag_2024", device="cpu")
    msg = _assert_one_line(info.value)
    assert "--pretrained" in msg and "no_such_tag_2024" in msg
    assert "openai" in msg  # lists the known tags


def test_empty_pretrained():
    with pytest.raises(ModelLoadError, match="--pretrained"):
        load_model("bifta-tiny-vit", "", device="cpu")


def test_unknown_architecture():
    with pytest.raises(ModelLoadError) as info:
        load_model("ViT-Q-99", "random", device="cpu")
    msg = _assert_one_line(info.value)
    assert "--model" in msg and "ViT-Q-99" in msg


def test_checkpoint_of_another_architecture(tiny_vit_checkpoint):
    with pytest.raises(ModelLoadError) as info:
        load_model("bifta-tiny-rn", str(tiny_vit_checkpoint), device="cpu")
    msg = _assert_one_line(info.value)
    assert "--pretrained" in msg and "--model" in msg and "bifta-tiny-rn" in msg


class _NotWeights:
    """A pickled object that ``torch.load(weights_only=True)`` refuses (like an old full-model pickle)."""


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "foreign-pickle"])
def test_corrupt_checkpoint_file(kind, tmp_path, tiny_vit_checkpoint):
    good = tiny_vit_checkpoint.read_bytes()
    content = {
        "text": b"this is not a torch checkpoint",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "foreign-pickle": pickle.dumps(_NotWeights(), protocol=2),
    }[kind]
    bad = tmp_path / "broken.pt"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model("bifta-tiny-vit", str(bad), device="cpu")
    msg = _assert_one_line(info.value)
    assert "--pretrained" in msg and str(bad) in msg


def test_model_load_error_is_a_user_error():
    assert issubclass(ModelLoadError, BiftaUserError)


def test_openai_without_network_fails_fast_with_clear_message():
    """No hub is reachable here: the tag resolves, the download fails quickly, the message says what to do."""
    from bifta_core.io import models

    if models._hub_reachable(timeout=2.0):
        pytest.skip("a model hub is reachable from this machine; this test covers offline machines")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("RN50", "openai", device="cpu")
    elapsed = time.monotonic() - start
    msg = _assert_one_line(info.value)
    assert "--pretrained" in msg and "openai" in msg
    assert elapsed < 30, f"offline failure took {elapsed:.1f}s"
