"""Issue 12 item 6, "any open_clip family": label and evaluate on the smallest ResNet, EVA and
ConvNeXt configs open_clip ships, with random weights and no network; SigLIP / SigLIP 2 (their
tokenizers are Hugging Face hub downloads) fail with one ``error:`` line naming what is missing;
and WCA's cosine scores do not depend on a model's ``logit_scale`` / ``logit_bias``.

Cost on 2 CPU cores: each family builds a ~100-150M-parameter model a few times (text task,
encode actor) — 3 images, 3 classes and 4 views keep the whole file to a few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image

from tests.pipeline_helpers import LABELSET, REPO_ROOT, cli_env, photo_like, read_output, write_labelset

CLASSES = ["tench", "goldfish", "tabby cat"]
#: family -> the smallest open_clip config of it (all on open_clip's bundled CLIP BPE tokenizer).
OFFLINE_FAMILIES = {"ResNet": "RN50", "EVA": "EVA02-B-16", "ConvNeXt": "convnext_tiny"}
#: family -> (config, the Hugging Face tokenizer open_clip loads for it).
HUB_TOKENIZER_FAMILIES = {
    "SigLIP": ("ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP"),
    "SigLIP 2": ("ViT-B-16-SigLIP2", "timm/ViT-B-16-SigLIP2"),
}
VIEWS = ["--num-views", "4", "--seed", "1"]


# One local Ray for the module's in-process runs (conftest.local_ray).
pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """One small photo per class in ``images/<class>/`` (evaluate's folder layout) and a 3-class label set."""
    root = tmp_path_factory.mktemp("families")
    for i, name in enumerate(CLASSES):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        Image.fromarray(photo_like(96 + 8 * i, 80, seed=i)).save(folder / f"img{i}.png")
    spec = {"classes": CLASSES, "clip-e": LABELSET["clip-e"][:2],
            "cupl": {c: LABELSET["cupl"][c][:2] for c in CLASSES},
            "clip-d": {c: LABELSET["clip-d"][c] for c in CLASSES}}
    write_labelset(root / "labels", spec)
    return {"root": root, "images": root / "images", "labels": root / "labels"}


def _label(data, out: Path, model: str, pretrained: str = "random", *extra: str) -> int:
    from jobs.label import main

    return main([str(data["images"]), "--labels", str(data["labels"]), "--out", str(out), "--method", "wca",
                 "--model", model, "--pretrained", pretrained, "--device", "cpu", *VIEWS, "--batch-size", "3",
                 "--labelset-cache", str(data["root"] / "lscache"), "--quiet", *extra])


# ------------------------------------------------------------------------------ families that run offline


@pytest.mark.parametrize("family", list(OFFLINE_FAMILIES))
def test_label_and_evaluate_run_on_family(family, data, tmp_path):
    from jobs.evaluate import main as evaluate

    arch = OFFLINE_FAMILIES[family]
    assert _label(data, tmp_path / "label", arch) == 0
    rows = read_output(tmp_path / "label").to_pylist()
    assert len(rows) == len(CLASSES)
    for r in rows:
        assert r["status"] == "ok" and not r["error"], r
        assert r["model"] == arch and r["pretrained"] == "random" and r["method"] == "wca"
        assert r["label"] in CLASSES and r["topk_labels"][0] == r["label"]
        assert sorted(r["topk_labels"]) == sorted(CLASSES)
        assert r["views_generated"] == 4 and r["views_kept"] == 4
        assert all(math.isfinite(s) and -1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in r["topk_scores"])  # cosines

    out = tmp_path / "eval"
    rc = evaluate([str(data["images"]), "--labels", str(data["labels"]), "--out", str(out), "--methods", "clip,wca",
                   "--model", arch, "--pretrained", "random", "--device", "cpu", *VIEWS, "--batch-size", "3",
                   "--labelset-cache", str(data["root"] / "lscache"), "--quiet"])
    assert rc == 0
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert metrics["method"].to_list() == ["clip", "wca"]
    assert metrics["n"].to_list() == [len(CLASSES)] * 2
    assert all(0.0 <= v <= 1.0 for v in metrics["top1"].to_list())
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["images"] == len(CLASSES) and summary["errors"] == 0 and summary["random_weights"] is True
    # evaluate's wca row scores the same views with the same model as `bifta label --method wca`.
    preds = pl.read_parquet(out / "predictions.parquet").filter(pl.col("method") == "wca").sort("image_id")
    labelled = sorted(rows, key=lambda r: r["image_id"])
    assert preds["label"].to_list() == [r["label"] for r in labelled]
    assert preds["score"].to_list() == pytest.approx([r["score"] for r in labelled], abs=1e-4)


# ------------------------------------------------------------------------------ families needing a hub tokenizer


def _hub_tokenizer_available(repo: str) -> bool:
    from bifta_core.io.models import _hf_cached

    return importlib.util.find_spec("transformers") is not None and _hf_cached(repo)


@pytest.mark.parametrize("family,job", [("SigLIP", "label"), ("SigLIP", "evaluate"), ("SigLIP 2", "evaluate")])
def test_hub_tokenizer_family_is_one_error_line(family, job, data, tmp_path, monkeypatch, capsys):
    """``label`` runs as a real CLI process, whose driver checks the model's config file before Ray
    starts (it never imports open_clip); ``evaluate`` in this process (it asks for the model identity
    on the driver)."""
    arch, repo = HUB_TOKENIZER_FAMILIES[family]
    if _hub_tokenizer_available(repo):
        pytest.skip(f"{repo} is cached and transformers is installed here: {arch} would run, not fail")
    args = [str(data["images"]), "--labels", str(data["labels"]), "--out", str(tmp_path / "out"),
            "--model", arch, "--pretrained", "random", "--device", "cpu", *VIEWS, "--no-labelset-cache", "--quiet"]
    if job == "label":
        env = {**cli_env(), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "jobs.label", *args, "--method", "wca"], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=240)
        rc, stderr = proc.returncode, proc.stderr
        assert "Ray" not in stderr and not any((tmp_path / "out").iterdir())  # refused before Ray, nothing written
    else:
        from jobs.evaluate import main as evaluate

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        rc, stderr = evaluate(args), capsys.readouterr().err
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert arch in errors[0] and repo in errors[0] and "Hugging Face hub" in errors[0], errors[0]
    if importlib.util.find_spec("transformers") is None:
        assert "transformers" in errors[0]
    assert "ray::" not in errors[0]  # the user error itself, not a wrapped Ray task failure


def test_hub_tokenizer_check_names_the_missing_parts(monkeypatch):
    from bifta_core.errors import ModelLoadError
    from bifta_core.io.models import check_hub_text_files, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_text_files("RN50")  # bundled tokenizer: nothing to check
    if _hub_tokenizer_available("timm/ViT-B-16-SigLIP2"):
        pytest.skip("timm/ViT-B-16-SigLIP2 is cached and transformers is installed here")
    with pytest.raises(ModelLoadError) as info:
        load_model("ViT-B-16-SigLIP2", "random", device="cpu")  # fails before building 375M parameters
    msg = str(info.value)
    assert "\n" not in msg and "timm/ViT-B-16-SigLIP2" in msg and "ViT-B-16-SigLIP2" in msg


# ------------------------------------------------------------------------------ logit scale / bias


#: A SigLIP-shaped tiny model (sigmoid-loss ``logit_bias``, no causal mask, last-token pooling) on
#: the bundled CLIP tokenizer (the name avoids "siglip", which would select SigLIP's tokenizer).
SIGMOID_TINY = {
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last"},
}
DESCRIPTIONS = {c: LABELSET["cupl"][c] for c in CLASSES}


def _wca_reference(model, pixels_whole, pixels_views, prompts, descriptions, image_scale=4.0, text_scale=2.0):
    """WCA (normalized aggregation) as plain loops over open_clip's raw features."""
    m, tok = model.model, model.tokenizer

    def unit(v):
        return v / v.norm()

    def cos(a, b):
        return float(unit(a) @ unit(b))

    def weighted_sum(vectors, anchor, scale):  # Σ softmax(e^scale · cos(x, anchor)) · unit(x)
        logits = [math.exp(scale) * cos(x, anchor) for x in vectors]
        top = max(logits)
        w = [math.exp(x - top) for x in logits]
        return sum(wi / sum(w) * unit(x) for wi, x in zip(w, vectors))

    with torch.no_grad():
        whole = [m.encode_image(x[None])[0] for x in pixels_whole]
        views = [[m.encode_image(v[None])[0] for v in image_views] for image_views in pixels_views]
        prompt_f = [m.encode_text(tok([p]))[0] for p in prompts]
        desc_f = [[m.encode_text(tok([t]))[0] for t in ts] for ts in descriptions]
    scores = []
    for b in range(len(whole)):
        image_vec = weighted_sum(views[b], whole[b], image_scale)
        scores.append([cos(image_vec, weighted_sum(desc_f[c], prompt_f[c], text_scale)) for c in range(len(prompts))])
    return torch.tensor(scores)


def _bifta_wca(model, pixels_whole, pixels_views, prompts, descriptions):
    from bifta_core.method.prediction import method_scores
    from bifta_core.method.text_banks import TextBank

    class_emb = model.encode_text(prompts)
    texts = [t for ts in descriptions for t in ts]
    desc_class = torch.tensor([c for c, ts in enumerate(descriptions) for _ in ts])
    bank = TextBank(key="wca", method="wca", texts=texts, desc_class=desc_class, desc_emb=model.encode_text(texts),
                    weights=None, pool_sizes=[len(ts) for ts in descriptions])
    image_emb = model.encode_images(pixels_whole)
    b, v = pixels_views.shape[:2]
    view_emb = model.encode_images(pixels_views.flatten(0, 1)).view(b, v, -1)
    mask = torch.ones(b, v, dtype=torch.bool)
    return method_scores("wca", class_emb, image_emb, bank, view_emb, mask)


def test_logit_scale_and_bias_do_not_change_wca_scores(tmp_path):
    import open_clip

    from bifta_core.io.models import load_model

    path = tmp_path / "bifta-test-sigmoid-tiny.json"
    path.write_text(json.dumps(SIGMOID_TINY))
    open_clip.add_model_config(path)
    model = load_model("bifta-test-sigmoid-tiny", "random", device="cpu")
    assert hasattr(model.model, "logit_bias") and model.model.logit_bias is not None

    g = torch.Generator().manual_seed(0)
    size = model.image_size
    whole = model.normalize_pixels(torch.randint(0, 256, (2, 3, size, size), generator=g)).cpu()
    views = model.normalize_pixels(torch.randint(0, 256, (2 * 5, 3, size, size), generator=g)).cpu()
    views = views.view(2, 5, 3, size, size)
    prompts = [f"a photo of a {c}." for c in CLASSES]
    descriptions = [DESCRIPTIONS[c] for c in CLASSES]

    def model_logits():  # what the model itself would score: scale * cosine + bias (SigLIP's sigmoid logits)
        with torch.no_grad():
            img, txt, scale, bias = model.model(whole, model.tokenizer(prompts))
        return scale * img @ txt.T + bias

    before = _bifta_wca(model, whole, views, prompts, descriptions)
    reference = _wca_reference(model, whole, views, prompts, descriptions)
    torch.testing.assert_close(before, reference, rtol=1e-5, atol=1e-5)
    logits_before = model_logits()

    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(3.0))  # CLIP's init is log(1/0.07); SigLIP's log(10)
        model.model.logit_bias.fill_(7.5)  # SigLIP's init is -10
    assert not torch.allclose(model_logits(), logits_before)  # the model's logits do move…
    after = _bifta_wca(model, whole, views, prompts, descriptions)
    assert torch.equal(before, after)  # …bifta's cosine-based WCA scores do not
    torch.testing.assert_close(after, _wca_reference(model, whole, views, prompts, descriptions), rtol=1e-5, atol=1e-5)


def test_label_job_scores_ignore_checkpoint_logit_scale(data, tmp_path, tiny_vit_checkpoint):
    """The whole label pipeline, from a checkpoint whose only change is ``logit_scale``."""
    state = torch.load(tiny_vit_checkpoint, map_location="cpu", weights_only=True)
    state["logit_scale"] = torch.full_like(state["logit_scale"], math.log(2.0))
    changed = tmp_path / "scale2.pt"
    torch.save(state, changed)

    assert _label(data, tmp_path / "a", "bifta-tiny-vit", str(tiny_vit_checkpoint)) == 0
    assert _label(data, tmp_path / "b", "bifta-tiny-vit", str(changed)) == 0
    a = sorted(read_output(tmp_path / "a").to_pylist(), key=lambda r: r["image_id"])
    b = sorted(read_output(tmp_path / "b").to_pylist(), key=lambda r: r["image_id"])
    keys = ("image_id", "label", "score", "topk_labels", "topk_scores", "margin")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert a[0]["run_id"] != b[0]["run_id"]  # the weights did change (content identity)
