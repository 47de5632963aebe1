"""Entry points beyond `bifta label`: label-set artifacts, the demo, CLIP-PGS in the label job."""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
import pytest

from bifta_core.config import LabelConfig, ModelConfig
from bifta_core.errors import ConfigError, LabelSetError
from bifta_core.io.label_set_artifacts import load_artifact
from jobs import demo, labelset
from pipelines.pipeline import run_label_job

EXAMPLE = Path(demo.__file__).parent / "examples" / "labelset"


# One local Ray for the module's in-process runs (conftest.local_ray).
pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:  # the manifest
    """The demo's scikit-image photos with their manifest."""
    return demo.write_example_images(tmp_path_factory.mktemp("photos"))


def _config(photos: Path, out: Path, cache: Path, **kw) -> LabelConfig:
    base = dict(
        input=str(photos), labels=[f"example={EXAMPLE}"], out=str(out), method="bifta",
        model=ModelConfig(model="bifta-tiny-vit", pretrained="random"), num_views=6, batch_size=4,
        labelset_cache=str(cache),
    )
    base.update(kw)
    return LabelConfig(**base)


def _rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "*.parquet")).sort("image_id")


def test_labelset_build_writes_every_supported_bank(tmp_path, capsys):
    artifact = tmp_path / "example.parquet"
    rc = labelset.main(["build", "--labels", f"example={EXAMPLE}", "--out", str(artifact),
                        "--model", "bifta-tiny-vit", "--pretrained", "random"])
    assert rc == 0
    emb = load_artifact(str(artifact))
    assert emb.name == "example" and emb.num_classes == 10
    assert set(emb.banks) == {"clip-e", "clip-d", "cupl", "waffle", "wca", "bifta"}
    assert len(emb.banks["waffle"].texts) == 10 * 30  # 15 random-word + 15 random-character prompts a class
    assert emb.banks["clip-e"].desc_emb.shape[0] == 10 * 80  # default templates: no clip-e.json bundled
    assert "wrote" in capsys.readouterr().out


def test_label_with_artifact_equals_label_with_folder(tmp_path, photos):
    artifact = tmp_path / "example.parquet"
    labelset.main(["build", "--labels", f"example={EXAMPLE}", "--out", str(artifact),
                   "--model", "bifta-tiny-vit", "--pretrained", "random"])
    from_folder = _config(photos, tmp_path / "a", tmp_path / "cache")
    from_artifact = _config(photos, tmp_path / "b", tmp_path / "cache2", labels=[],
                            labelset_artifacts=[str(artifact)])
    run_label_job(from_folder)
    run_label_job(from_artifact)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert a.height == b.height == 10
    assert a["label"].to_list() == b["label"].to_list()
    assert a["score"].to_list() == pytest.approx(b["score"].to_list(), abs=1e-5)


def test_artifact_for_another_model_is_refused(tmp_path, photos):
    artifact = tmp_path / "example.parquet"
    labelset.main(["build", "--labels", str(EXAMPLE), "--out", str(artifact),
                   "--model", "bifta-tiny-vit", "--pretrained", "random"])
    config = _config(photos, tmp_path / "o", tmp_path / "c", labels=[],
                     labelset_artifacts=[str(artifact)], model=ModelConfig("bifta-tiny-rn", "random"))
    with pytest.raises(LabelSetError, match="built for bifta-tiny-vit"):
        run_label_job(config)


def test_demo_runs_end_to_end_with_true_labels(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "demo"), model="bifta-tiny-vit", pretrained="random",
                              method="bifta", quiet=True)
    assert demo.run(args) == 0
    rows = _rows(tmp_path / "demo" / "predictions")
    assert rows.height == len(demo.EXAMPLE_PHOTOS)
    assert set(rows["true_label"].to_list()) == set(demo.EXAMPLE_PHOTOS.values())
    assert rows["status"].to_list() == ["ok"] * rows.height
    assert rows["random_weights"].all()
    out = capsys.readouterr().out
    assert "meaningless" in out and "bifta label — summary" in out


def test_demo_falls_back_to_random_weights_behind_a_banner(tmp_path, capsys, monkeypatch):
    from bifta_core.io.models import _hub_reachable

    if _hub_reachable():
        pytest.skip("a model hub is reachable here: the demo would download real weights, not fall back")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the label-set cache of random ViT-B-32 stays here
    args = argparse.Namespace(out=str(tmp_path / "demo"), model="ViT-B-32", pretrained="openai",
                              method="bifta", quiet=True, num_views=2, limit=3)
    assert demo.run(args) == 0
    rows = _rows(tmp_path / "demo" / "predictions")
    captured = capsys.readouterr()
    if "RANDOM weights" not in captured.err and not rows["random_weights"].any():
        pytest.skip("ViT-B-32 'openai' weights are cached on this machine: the demo has no reason to fall back")
    assert "No model hub is reachable and 'openai' weights for ViT-B-32 are not cached" in captured.err
    assert "The demo runs with RANDOM weights instead" in captured.err
    assert rows.height == 3
    assert rows["random_weights"].all()
    assert rows["status"].to_list() == ["ok"] * 3
    assert "(random weights: the labels above are meaningless)" in captured.out


def test_demo_refuses_bad_counts(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "demo"), model="bifta-tiny-vit", pretrained="random",
                              method="bifta", quiet=True, num_views=0, limit=None)
    with pytest.raises(ConfigError, match="--num-views must be a positive integer"):
        demo.run(args)
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_pgs_keep_changes_view_encoding_but_keeps_rows(tmp_path, photos):
    manifest = photos
    run_label_job(_config(manifest, tmp_path / "full", tmp_path / "c"))
    run_label_job(_config(manifest, tmp_path / "pgs", tmp_path / "c", pgs_keep=0.5))
    full, pgs = _rows(tmp_path / "full"), _rows(tmp_path / "pgs")
    assert full.height == pgs.height == 10
    assert full["views_kept"].to_list() == pgs["views_kept"].to_list()  # same views, fewer tokens each
    assert full["score"].to_list() != pgs["score"].to_list()
    # Deterministic: token selection is seeded from (seed, image id).
    run_label_job(_config(manifest, tmp_path / "pgs2", tmp_path / "c", pgs_keep=0.5))
    assert _rows(tmp_path / "pgs2")["score"].to_list() == pgs["score"].to_list()


def test_pgs_on_a_resnet_is_a_clear_error(tmp_path, photos):
    config = _config(photos, tmp_path / "o", tmp_path / "c", pgs_keep=0.5,
                     model=ModelConfig("bifta-tiny-rn", "random"))
    with pytest.raises(ConfigError, match="needs a ViT image tower"):
        run_label_job(config)
