"""``bifta evaluate``: every method from one encoding pass, on real ImageNet photos.

Runs the real Ray pipeline once (12 photos of ``../shared/datasets/imagenet-sample``, the tiny
random-weight ViT, 10 views per image and preset) against the first 100 ImageNet classes of
``../shared/descriptions/imagenet``. A second, smaller run (6 photos, 60 classes) is compared with
``bifta label --method clip|wca|bifta`` on the same images, seed and model. To keep text encoding
affordable on a small CPU the label set keeps the first 6 CuPL sentences, 3 descriptors and 3
templates per class (the tiny model encodes ~800 texts/s; the 1000 classes' full files hold ~117k
texts, and WaffleCLIP adds 30 per class). With random weights accuracies are
meaningless, so the tests check structure and the identities that must hold exactly.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bifta_core.errors import InputError
from bifta_core.evaluation.embeddings import embeddings_to_batch, meta_presets
from bifta_core.evaluation.metrics import ImageBatch, ViewSet, map_labels, method_names, scores_for, select_methods
from bifta_core.method.prediction import ScoreParams
from pipeline_helpers import write_imagenet_subset

N_IMAGES = 12
MODEL_FLAGS = ["--model", "bifta-tiny-vit", "--pretrained", "random", "--device", "cpu"]
# 10 views with a strict IoU threshold, so refinement drops some views of some images.
VIEW_FLAGS = ["--num-views", "10", "--iou-threshold", "0.3", "--seed", "3"]


def write_imagenet_label_set(descriptions_dir: Path, dest: Path, *, sentences: int = 6, descriptors: int = 3,
                             templates: int = 3) -> Path:
    """The published ImageNet label set's first 100 classes, with fewer texts per class."""
    return write_imagenet_subset(descriptions_dir, dest, 100, per_class={
        "cupl.json": sentences, "clip-d.json": descriptors, "clip-e.json": templates})


def write_manifest(imagenet_sample: Path, dest: Path, n: int = N_IMAGES, extra: list[tuple[str, str]] = ()) -> Path:
    """``path,label`` manifest of the first ``n`` photos (``class_name`` as the label)."""
    with open(imagenet_sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    with open(dest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([str(imagenet_sample / r["path"]), r["class_name"]])
        for path, label in extra:
            w.writerow([path, label])
    return dest


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def label_set(descriptions_dir: Path, work: Path) -> Path:
    return write_imagenet_label_set(descriptions_dir, work / "imagenet-small")


@pytest.fixture(scope="module")
def manifest(imagenet_sample: Path, work: Path) -> Path:
    return write_manifest(imagenet_sample, work / "manifest.csv")


@pytest.fixture(scope="module")
def evaluated(label_set: Path, manifest: Path, work: Path) -> Path:
    """One real evaluation run: all methods, protocol on, embeddings saved."""
    from jobs.evaluate import main

    out = work / "eval"
    rc = main([str(manifest), "--labels", str(label_set), "--out", str(out), *MODEL_FLAGS, *VIEW_FLAGS,
               "--desc-top-k", "3", "--protocol-runs", "3", "--protocol-views", "3", "--save-embeddings",
               "--batch-size", "6", "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 0
    return out


def _predictions(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "predictions.parquet")


def _scores_by_method(out: Path, method: str) -> torch.Tensor:
    p = _predictions(out).filter(pl.col("method") == method).sort("image_id")
    return torch.tensor(p["true_score"].to_list())


def _saved(out: Path) -> pa.Table:
    """The saved embeddings of an evaluation (``OUT/embeddings/part-*.parquet``) as one table."""
    files = sorted((out / "embeddings").glob("part-*.parquet"))
    assert files, f"no embeddings under {out}"
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)


def _embeddings(out: Path) -> tuple[ImageBatch, list[str]]:
    table = _saved(out)
    presets = meta_presets(json.loads(table.schema.metadata[b"bifta"]))
    return embeddings_to_batch(table, [0] * table.num_rows, presets), table.column("true_label").to_pylist()


def _label_set_embeddings(label_set: Path, work: Path, methods: list[str] | None = None):
    """The evaluation's text banks, from the label-set cache the run filled (no text encoded)."""
    from bifta_core.config import LabelConfig, ModelConfig
    from bifta_core.evaluation.metrics import bank_specs_for
    from pipelines.evaluate_stages import load_eval_label_set, prepare_eval_label_set
    from pipelines.pipeline import model_config

    config = LabelConfig(input="x", labels=[str(label_set)], out="x", desc_top_k=3,
                         labelset_cache=str(work / "lscache"),
                         model=ModelConfig(model="bifta-tiny-vit", pretrained="random", device="cpu"))
    ls = load_eval_label_set(config)
    specs = bank_specs_for(select_methods(methods), 0.99, 3, waffle_seed=3)  # --seed 3 of VIEW_FLAGS
    emb, hit = prepare_eval_label_set(config, ls, specs, model_config(config))
    assert hit, "the evaluation run should have cached the label set"
    return ls, emb


# --------------------------------------------------------------------------------------- run


def test_metrics_have_every_method_and_the_contract_columns(evaluated: Path) -> None:
    metrics = pl.read_parquet(evaluated / "metrics.parquet")
    for col in ("method", "top1", "top5", "n", "top1_std", "top5_std"):
        assert col in metrics.columns
    assert metrics["method"].to_list() == method_names()
    assert set(metrics["n"].to_list()) == {N_IMAGES}
    for col in ("top1", "top5", "top1_std", "top5_std", "ece"):
        assert all(0.0 <= v <= 1.0 for v in metrics[col].to_list())
    assert all(t1 <= t5 for t1, t5 in zip(metrics["top1"].to_list(), metrics["top5"].to_list()))

    per_class = pl.read_parquet(evaluated / "per_class.parquet")
    assert {"method", "class", "n", "top1"} <= set(per_class.columns)
    assert per_class.group_by("method").agg(pl.col("n").sum())["n"].to_list() == [N_IMAGES] * len(method_names())

    preds = _predictions(evaluated)
    assert preds.height == N_IMAGES * len(method_names())
    assert (preds["correct"] == (preds["true_rank"] == 1)).all()
    assert preds["true_label"].str.contains("tench").any()

    report = (evaluated / "report.md").read_text()
    for png in ("accuracy.png", "confidence.png", "reliability.png", "worst_classes.png"):
        assert f"({png})" in report
        assert (evaluated / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random model weights" in report
    summary = json.loads((evaluated / "evaluate_summary.json").read_text())
    assert summary["images"] == N_IMAGES and summary["errors"] == 0 and summary["random_weights"] is True


def test_every_table_says_which_model_and_that_weights_are_random(evaluated: Path) -> None:
    for name in ("metrics.parquet", "per_class.parquet", "predictions.parquet"):
        df = pl.read_parquet(evaluated / name)
        assert df.schema["random_weights"] == pl.Boolean, name
        assert df["random_weights"].to_list() == [True] * df.height, name
        assert set(df["model"].to_list()) == {"bifta-tiny-vit"} and set(df["pretrained"].to_list()) == {"random"}
    metrics = pl.read_parquet(evaluated / "metrics.parquet")
    presets = dict(zip(metrics["method"].to_list(), metrics["view_preset"].to_list()))
    assert presets["clip"] is None and presets["cupl"] is None
    assert {presets[m] for m in ("wca", "wca+refined-desc", "wca/sum")} == {"wca"}
    assert {presets[m] for m in method_names() if m.startswith("bifta") and "grid" not in m} == {"bifta"}
    assert {presets[m] for m in method_names() if "grid" in m} == {"bifta-grid"}


def test_protocol_reports_mean_and_std_over_runs(evaluated: Path) -> None:
    metrics = pl.read_parquet(evaluated / "metrics.parquet")
    views = metrics.filter(pl.col("views") != "none")
    assert set(views["protocol_runs"].to_list()) == {3}
    assert set(views["protocol_views"].to_list()) == {3}
    whole = metrics.filter(pl.col("views") == "none")
    assert set(whole["top1_std"].to_list()) == {0.0}
    # Without views the protocol changes nothing: mean == the deterministic accuracy.
    assert whole["top1"].to_list() == whole["top1_full"].to_list()


def test_methods_differ_where_they_must(evaluated: Path) -> None:
    def differ(a: str, b: str) -> bool:
        return not torch.allclose(_scores_by_method(evaluated, a), _scores_by_method(evaluated, b))

    assert differ("clip", "cupl")
    assert differ("clip", "clip-e")
    assert differ("cupl", "clip-d")
    assert differ("wca", "bifta")
    assert differ("wca", "wca+refined-desc")  # description refinement changes the text side
    assert differ("wca", "wca/sum")  # aggregation changes the score
    assert differ("cupl", "wca")  # views change the image side


def test_view_refinement_only_matters_for_images_that_lost_views(evaluated: Path) -> None:
    batch, _ = _embeddings(evaluated)
    bifta = batch.views["bifta"]
    full = (bifta.view_kept == bifta.view_mask).all(dim=1)
    assert not bool(full.all()), "IoU 0.3 should drop some views; pick a stricter threshold"
    ids = batch.image_ids
    preds = _predictions(evaluated)
    # The view-refinement ablation is on BiFTA's views: all sampled vs kept by IoU refinement.
    for all_views, kept_views in (("bifta-unrefined-desc-views", "bifta-unrefined-desc"),
                                  ("bifta-unrefined-views", "bifta")):
        a = preds.filter(pl.col("method") == all_views).sort("image_id")
        b = preds.filter(pl.col("method") == kept_views).sort("image_id")
        order = {i: k for k, i in enumerate(a["image_id"].to_list())}
        same = [a["true_score"][order[i]] == b["true_score"][order[i]] for i in ids]
        for i, image_full in enumerate(full.tolist()):
            if image_full:
                assert same[i], f"{ids[i]}: all views kept, so all-view and kept-view scores must be equal"
        assert not all(same)


def test_wca_and_bifta_rows_use_their_own_views(evaluated: Path) -> None:
    batch, _ = _embeddings(evaluated)
    assert set(batch.views) == {"wca", "bifta", "bifta-grid"}
    wca, bifta = batch.views["wca"], batch.views["bifta"]
    # Different scale ranges, so different crops; and each preset's whole image is decoded at its own
    # working resolution (1/alpha × the input size), as bifta label decodes it for that method.
    assert not torch.allclose(wca.view_emb, bifta.view_emb)
    assert not torch.equal(wca.image_emb, bifta.image_emb)
    assert not torch.equal(batch.image_emb, bifta.image_emb)
    # --iou-threshold overrides both presets (as in bifta label), so WCA's views are refined too here.
    assert not bool((wca.view_kept == wca.view_mask).all())


def test_embeddings_file_layout(evaluated: Path) -> None:
    table = _saved(evaluated)
    assert table.num_rows == N_IMAGES
    assert str(table.schema.field("image_emb").type) == "fixed_size_list<element: float>[64]"
    for p in ("wca", "bifta"):
        assert str(table.schema.field(f"{p}_image_emb").type) == "fixed_size_list<element: float>[64]"
        assert table.schema.field(f"{p}_view_emb").type.value_type.list_size == 64
        assert [len(v) for v in table.column(f"{p}_view_kept").to_pylist()] == [10] * N_IMAGES
        assert [len(v) for v in table.column(f"{p}_view_emb").to_pylist()] == [10] * N_IMAGES
    meta = json.loads(table.schema.metadata[b"bifta"])
    assert meta["format"] == 2
    assert meta["model"] == "bifta-tiny-vit" and meta["pretrained"] == "random" and meta["seed"] == 3
    assert meta["views"]["wca"] == {"name": "wca", "scale": [0.1, 0.9], "num_views": 10, "iou_threshold": 0.3,
                                    "max_views": 10, "generator": "random", "grid": 3}
    assert meta["views"]["bifta"] == {"name": "bifta", "scale": [0.5, 0.9], "num_views": 10, "iou_threshold": 0.3,
                                      "max_views": 10, "generator": "random", "grid": 3}
    # BiFTA's grid views: 3 x 3 tiles whatever --num-views says; --iou-threshold still refines them.
    assert meta["views"]["bifta-grid"] == {"name": "bifta-grid", "scale": [1 / 3, 1 / 3], "num_views": 9,
                                           "iou_threshold": 0.3, "max_views": 9, "generator": "grid", "grid": 3}
    assert [len(v) for v in table.column("bifta-grid_view_emb").to_pylist()] == [9] * N_IMAGES


# ----------------------------------------------------------------------------- re-scoring


def test_from_embeddings_reproduces_metrics_without_encoding(evaluated: Path, label_set: Path, work: Path,
                                                            monkeypatch) -> None:
    import pipelines.evaluate as ev
    from jobs.evaluate import main

    def no_encoding(*a, **k):
        raise AssertionError("--from-embeddings must not encode images")

    monkeypatch.setattr(ev, "run_shards", no_encoding)
    out = work / "rescored"
    rc = main(["--from-embeddings", str(evaluated), "--labels", str(label_set), "--out", str(out),
               "--desc-top-k", "3", "--protocol-runs", "3", "--protocol-views", "3",
               "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 0
    cols = ["method", "top1", "top5", "n", "top1_std", "top5_std", "ece"]
    a = pl.read_parquet(evaluated / "metrics.parquet").select(cols)
    b = pl.read_parquet(out / "metrics.parquet").select(cols)
    assert a.equals(b)
    assert _predictions(evaluated).equals(_predictions(out))

    # Other scoring parameters re-score the same embeddings.
    out2 = work / "rescored-scale"
    rc = main(["--from-embeddings", str(evaluated), "--labels", str(label_set), "--out", str(out2),
               "--desc-top-k", "3", "--image-scale", "0", "--methods", "wca,cupl",
               "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 0
    m2 = pl.read_parquet(out2 / "metrics.parquet")
    assert m2["method"].to_list() == ["cupl", "wca"]
    assert "top1_std" not in m2.columns
    assert _scores_by_method(evaluated, "cupl").equal(_scores_by_method(out2, "cupl"))
    assert not torch.allclose(_scores_by_method(evaluated, "wca"), _scores_by_method(out2, "wca"))


def test_from_embeddings_refuses_another_model(evaluated: Path, label_set: Path, work: Path, capsys) -> None:
    from jobs.evaluate import main

    rc = main(["--from-embeddings", str(evaluated), "--labels", str(label_set), "--out", str(work / "x"),
               "--model", "bifta-tiny-rn", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model must match" in err[0]
    rc = main(["--from-embeddings", str(evaluated), "--labels", str(label_set), "--out", str(work / "x"),
               "--num-views", "4", "--quiet"])
    assert rc == 2
    assert "view settings are fixed" in capsys.readouterr().err


def test_clip_e_with_the_clip_prompt_as_only_template_equals_clip(evaluated: Path, label_set: Path,
                                                                   work: Path) -> None:
    from jobs.evaluate import main

    ls = work / "clip-prompt-only"
    ls.mkdir()
    (ls / "classes.json").write_text((label_set / "classes.json").read_text())
    (ls / "clip-e.json").write_text(json.dumps(["a photo of a {}."]))
    out = work / "clip-e-eval"
    rc = main(["--from-embeddings", str(evaluated), "--labels", str(ls), "--out", str(out),
               "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 0
    metrics = pl.read_parquet(out / "metrics.parquet")
    # No cupl.json / clip-d.json: those methods are skipped, not failed.
    assert metrics["method"].to_list() == ["clip", "clip-e"]
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert {"cupl", "wca", "bifta", "clip-d"} <= set(summary["skipped"])
    assert "clip-d.json" in summary["skipped"]["clip-d"]
    preds = _predictions(out)
    clip = preds.filter(pl.col("method") == "clip")
    clip_e = preds.filter(pl.col("method") == "clip-e")
    exact = ["image_id", "label", "true_rank", "top5_labels"]
    assert clip.select(exact).equals(clip_e.select(exact))
    # CLIP-E re-normalises the (single) template mean, which may move the last float bit.
    for col in ("score", "margin", "true_score"):
        assert torch.allclose(torch.tensor(clip[col].to_list()), torch.tensor(clip_e[col].to_list()), atol=1e-6)
    # …and CLIP equals the CLIP row of the full evaluation (same embeddings, same prompts).
    assert _scores_by_method(evaluated, "clip").equal(_scores_by_method(out, "clip"))


def test_wca_with_the_whole_image_as_only_view_and_uniform_weights_equals_cupl(evaluated: Path, label_set: Path,
                                                                              work: Path) -> None:
    batch, labels = _embeddings(evaluated)
    ls, emb = _label_set_embeddings(label_set, work)
    batch.true_index = torch.tensor(map_labels(labels, ls.classes, ls.synonyms))
    ones = torch.ones(len(batch), 1, dtype=torch.bool)
    whole = ImageBatch(batch.image_ids, batch.true_index, batch.image_emb,
                       {"wca": ViewSet(batch.image_emb, batch.image_emb[:, None, :], ones, ones)})
    methods = {m.name: m for m in select_methods(None)}
    # exp(-inf) = 0 turns the description softmax into a uniform average.
    uniform = ScoreParams(image_scale=4.0, text_scale=float("-inf"))
    cupl = scores_for(methods["cupl"], emb, whole, uniform)
    wca = scores_for(methods["wca"], emb, whole, uniform)
    assert torch.allclose(wca, cupl, atol=1e-5)
    # With the paper's text temperature the description weights are no longer uniform.
    assert not torch.allclose(scores_for(methods["wca"], emb, whole, ScoreParams()), cupl, atol=1e-5)


# -------------------------------------------------------------------------------- inputs


def list_eval_inputs(spec: str) -> pa.Table:
    """The evaluation's listing of ``spec`` (its sources read in this process, no Ray) as one table."""
    import tempfile

    from pipelines.inputs import ListingOptions, list_source, plan_sources, read_shard_inputs

    out = tempfile.mkdtemp()
    options = ListingOptions(shard_size=1000, require_labels=True)
    shards = [s for src in plan_sources(spec) for s, _ in list_source(src, out, options)[0]["shards"]]
    return pa.concat_tables([read_shard_inputs(out, s) for s in shards])


def test_folder_input_uses_subfolder_names_as_labels(imagenet_sample: Path, tmp_path: Path) -> None:
    photos = sorted((imagenet_sample / "images").iterdir())[:3]
    for cls, photo in zip(["tench", "tench", "Electric_Ray"], photos):
        (tmp_path / cls).mkdir(exist_ok=True)
        os.symlink(photo, tmp_path / cls / photo.name)
    table = list_eval_inputs(str(tmp_path))
    assert sorted(table.column("true_label").to_pylist()) == ["Electric_Ray", "tench", "tench"]
    assert map_labels(["Electric_Ray", "TENCH"], ["tench", "electric ray"]) == [1, 0]

    (tmp_path / photos[0].name).symlink_to(photos[0])
    with pytest.raises(InputError, match="one sub-folder per class"):
        list_eval_inputs(str(tmp_path))


def test_unknown_labels_are_one_clear_error(imagenet_sample: Path, label_set: Path, work: Path, tmp_path: Path,
                                            capsys) -> None:
    from jobs.evaluate import main

    photos = [str(p) for p in sorted((imagenet_sample / "images").iterdir())[-2:]]
    bad = write_manifest(imagenet_sample, tmp_path / "bad.csv", 2,
                         extra=[(photos[0], "flying carpet"), (photos[1], "hovercraft")])
    rc = main([str(bad), "--labels", str(label_set), "--out", str(tmp_path / "o"), *MODEL_FLAGS, *VIEW_FLAGS,
               "--desc-top-k", "3", "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "'flying carpet'" in err[0] and "'hovercraft'" in err[0]

    rc = main([str(bad), "--labels", str(label_set), "--out", str(tmp_path / "o"), "--label-column", "species",
               *MODEL_FLAGS, "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 2
    assert "no 'species' column" in capsys.readouterr().err

    with pytest.raises(InputError, match="name no class"):
        map_labels(["tench", "unicorn"], ["tench"])


def test_bad_method_and_protocol_flags(label_set: Path, manifest: Path, tmp_path: Path, capsys) -> None:
    from jobs.evaluate import main

    rc = main([str(manifest), "--labels", str(label_set), "--out", str(tmp_path), "--methods", "clip,magic"])
    assert rc == 2 and "magic" in capsys.readouterr().err
    rc = main([str(manifest), "--labels", str(label_set), "--out", str(tmp_path), "--protocol-runs", "3"])
    assert rc == 2 and "--protocol-views" in capsys.readouterr().err


# ------------------------------------------------------------- evaluate == bifta label


SMALL_IMAGES = 6
SMALL_FLAGS = ["--num-views", "8", "--seed", "1", "--batch-size", "3"]


@pytest.fixture(scope="module")
def small_label_set(descriptions_dir: Path, work: Path) -> Path:
    """The first 60 ImageNet classes (the first 6 sample photos are among them), 4 CuPL sentences each."""
    src = descriptions_dir / "imagenet"
    dest = work / "imagenet-60"
    dest.mkdir()
    classes = json.loads((src / "classes.json").read_text())[:60]
    cupl = json.loads((src / "cupl.json").read_text())
    (dest / "classes.json").write_text(json.dumps(classes))
    (dest / "cupl.json").write_text(json.dumps({c: cupl[c][:4] for c in classes}))
    return dest


@pytest.fixture(scope="module")
def small_manifest(imagenet_sample: Path, work: Path) -> Path:
    return write_manifest(imagenet_sample, work / "small.csv", SMALL_IMAGES)


def test_wca_bifta_and_clip_rows_predict_what_bifta_label_predicts(small_label_set: Path, small_manifest: Path,
                                                                    work: Path) -> None:
    """Same images, seed, model and view flags: evaluate's rows equal ``run_label_job``'s predictions."""
    from bifta_core.config import LabelConfig, ModelConfig
    from bifta_core.method.seeding import generator_for
    from bifta_core.method.views import refine_boxes, sample_boxes
    from jobs.evaluate import main
    from PIL import Image
    from pipelines.pipeline import run_label_job

    out = work / "small-eval"
    rc = main([str(small_manifest), "--labels", str(small_label_set), "--out", str(out), *MODEL_FLAGS, *SMALL_FLAGS,
               "--method", "clip", "--method", "wca,bifta", "--save-embeddings",
               "--labelset-cache", str(work / "lscache"), "--quiet"])
    assert rc == 0
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert metrics["method"].to_list() == ["clip", "wca", "bifta"]  # --method is --methods, repeatable
    preds = _predictions(out)

    # The saved views are the label pipeline's boxes: WCA samples 8 at 0.1-0.9 and keeps all of them;
    # BiFTA samples 8 at 0.5-0.9 and keeps those IoU refinement (0.85) keeps, seeded per image.
    table = _saved(out)
    for image_id, wca_kept, bifta_kept in zip(table.column("image_id").to_pylist(),
                                               table.column("wca_view_kept").to_pylist(),
                                               table.column("bifta_view_kept").to_pylist()):
        assert wca_kept == [True] * 8
        with Image.open(image_id) as im:
            w, h = im.size
        boxes = sample_boxes(w, h, 8, (0.5, 0.9), generator_for(1, image_id))
        expected = [False] * 8
        for k in refine_boxes(boxes, 0.85, 100).tolist():
            expected[k] = True
        assert bifta_kept == expected, image_id

    for method in ("clip", "wca", "bifta"):
        config = LabelConfig(input=str(small_manifest), labels=[str(small_label_set)], out=str(work / f"label-{method}"),
                             method=method, num_views=8, seed=1, batch_size=3, labelset_cache=str(work / "lscache"),
                             model=ModelConfig(model="bifta-tiny-vit", pretrained="random", device="cpu"))
        summary = run_label_job(config)
        assert summary["ok"] == SMALL_IMAGES
        labelled = pl.read_parquet(work / f"label-{method}" / "part-*.parquet").sort("image_id")
        evaluated_rows = preds.filter(pl.col("method") == method).sort("image_id")
        assert labelled["image_id"].to_list() == evaluated_rows["image_id"].to_list()
        assert labelled["label"].to_list() == evaluated_rows["label"].to_list(), method
        assert labelled["topk_labels"].to_list() == evaluated_rows["top5_labels"].to_list(), method
        # Same crops, same embeddings; only the padding width of a scoring batch (the most views any
        # image in it kept) may differ, which moves a refined BiFTA score by float32 rounding at most.
        assert torch.allclose(torch.tensor(labelled["score"].to_list(), dtype=torch.float64),
                              torch.tensor(evaluated_rows["score"].to_list(), dtype=torch.float64),
                              rtol=0, atol=1e-6), method
    # …and the rows are not the same method: WCA and BiFTA see different views.
    wca = preds.filter(pl.col("method") == "wca").sort("image_id")["score"].to_list()
    bifta = preds.filter(pl.col("method") == "bifta").sort("image_id")["score"].to_list()
    assert wca != bifta


# ----------------------------------------------------------------------------- user errors


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_old_or_foreign_embeddings_files_are_one_clear_error(label_set: Path, tmp_path: Path, capsys) -> None:
    import pyarrow as pa

    from jobs.evaluate import main

    old = tmp_path / "old" / "embeddings.parquet"
    old.parent.mkdir()
    vec = pa.list_(pa.float32(), 2)
    table = pa.table({"image_id": ["a"], "true_label": ["tench"],
                      "image_emb": pa.array([[1.0, 0.0]], vec),
                      "view_emb": pa.array([[[1.0, 0.0]]], pa.list_(vec)),
                      "view_kept": pa.array([[True]], pa.list_(pa.bool_()))})
    meta = {"format": 1, "model": "bifta-tiny-vit", "pretrained": "random", "views": {"num_views": 1}}
    pq.write_table(table.replace_schema_metadata({b"bifta": json.dumps(meta).encode()}), old)
    rc = main(["--from-embeddings", str(old.parent), "--labels", str(label_set), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "format 1" in line and "re-encode" in line

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    rc = main(["--from-embeddings", str(junk), "--labels", str(label_set), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "not a readable Parquet file" in _one_error_line(capsys)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--view-batch-size", "0"], "--view-batch-size"),
    (["--num-views", "0"], "--num-views"),
    (["--limit", "0"], "--limit"),
    (["--bins", "0"], "--bins"),
    (["--logit-scale", "0"], "--logit-scale"),
    (["--logit-scale", "nan"], "--logit-scale"),
    (["--image-scale", "inf"], "--image-scale"),
    (["--protocol-runs", "0", "--protocol-views", "3"], "--protocol-runs"),
    (["--method", ","], "--method"),
    (["--method", "wca", "--method", "magic"], "magic"),
    (["--iou-threshold", "2"], "--iou-threshold"),
    (["--scale", "0.9,0.1"], "--scale"),
    (["--bins", "ten"], "--bins"),
    (["--view-preset", "wca"], "--view-preset"),
    (["--from-embeddings", "x", "--save-embeddings"], "exclude each other"),
    (["--cascade-first", "bifta"], "whole-image row"),
    (["--cascade-method", "cupl"], "row scored on views"),
])
def test_bad_flags_are_one_error_line_before_any_work(flags: list[str], message: str, label_set: Path,
                                                      manifest: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import pipelines.evaluate as ev
    from jobs.evaluate import main

    def no_work(*a, **k):
        raise AssertionError("a bad flag must be refused before any work starts")

    monkeypatch.setattr(ev, "run_evaluation", no_work)
    try:
        rc = main([str(manifest), "--labels", str(label_set), "--out", str(tmp_path / "o"), *flags])
    except SystemExit as exc:  # flag syntax errors exit from argparse, with the same one line
        rc = exc.code
    assert rc == 2
    assert message in _one_error_line(capsys)


def test_report_echoes_a_released_preset(evaluated: Path) -> None:
    from bifta_core.config import LabelConfig
    from bifta_core.evaluation.report import render_report
    from pipelines.pipeline import preset_record

    context = {"model": "m", "pretrained": "random", "label_set": "l", "classes": 4, "images": N_IMAGES,
               **preset_record(LabelConfig(preset="bifta-cub"))}
    files = render_report(pl.read_parquet(evaluated / "metrics.parquet"), pl.read_parquet(evaluated / "per_class.parquet"),
                          pl.read_parquet(evaluated / "predictions.parquet"), context)
    report = files["report.md"].decode("utf-8")
    assert "- preset: `bifta-cub` (tmlr-group/BiFTA configs/cub.yaml + main.py" in report
    assert "num_views 300" in report and "bifta0.99_top50" in report  # values and the released-code note
    rows = pl.read_parquet(evaluated / "metrics.parquet")["method"].to_list()
    assert {"waffle", "wca-grid", "bifta-grid"} <= set(rows)


def test_cascade_curve_ends_are_the_first_stage_and_full_method_rows(evaluated: Path) -> None:
    """cascade.parquet from the one encoding pass: T = 0 is the cupl row of metrics.parquet, T = inf
    the bifta row (all-views accuracy: this run also has the repeated-run protocol), and the report
    plots it and names the cheapest T within 1 and 0.5 top-1 points of BiFTA."""
    curve = pl.read_parquet(evaluated / "cascade.parquet")
    metrics = {r["method"]: r for r in pl.read_parquet(evaluated / "metrics.parquet").to_dicts()}
    rows = {r["threshold"]: r for r in curve.to_dicts()}
    assert set(curve["first"]) == {"cupl"} and set(curve["final"]) == {"bifta"}
    zero, full = rows[0.0], rows[float("inf")]
    assert (zero["top1"], zero["top5"]) == (metrics["cupl"]["top1"], metrics["cupl"]["top5"])
    assert zero["views_per_image"] == 0 and zero["share_with_views"] == 0
    assert (full["top1"], full["top5"]) == (metrics["bifta"]["top1_full"], metrics["bifta"]["top5_full"])
    bifta_views = _predictions(evaluated).filter(pl.col("method") == "bifta")["views_encoded"]
    assert full["views_per_image"] == pytest.approx(bifta_views.mean()) and bifta_views.min() > 0
    assert curve.height > 2 and curve["share_with_views"].is_sorted()  # a grid between the two ends
    summary = json.loads((evaluated / "evaluate_summary.json").read_text())
    recommended = summary["cascade"]["recommended"]
    assert set(recommended) == {"1%", "0.5%"}
    for tol, row in recommended.items():
        assert row["top1"] >= full["top1"] - float(tol.rstrip("%")) / 100 - 1e-9
        cheaper = curve.filter(pl.col("views_per_image") < row["views_per_image"])
        assert (cheaper["top1"] < full["top1"] - float(tol.rstrip("%")) / 100 - 1e-9).all()
    report = (evaluated / "report.md").read_text()
    assert "## Cascade" in report and "![cascade](cascade.png)" in report
    assert f"--cascade-margin {recommended['1%']['threshold']:.6g}" in report
    assert (evaluated / "cascade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
