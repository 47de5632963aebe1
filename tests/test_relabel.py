"""``bifta label --save-embeddings`` and ``bifta relabel`` (kept embeddings, no image read).

Every whole-image method and WCA/BiFTA's views are checked against ``bifta label --method X`` in
``test_pipeline.test_method_variants``; here: several label sets and the cascade in one pass (the
relabelled rows equal the labelling run's, run id included), resume, images whose views were not
kept, float16 storage, and the one-line errors (another model, views the embeddings lack).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bifta_core.config import LabelConfig, ModelConfig
from bifta_core.errors import InputError
from pipeline_helpers import LABELSET, REPO_ROOT, cli_env, part_paths, read_output, row_differences, sorted_rows, \
    write_generated_images, write_labelset

REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenet-sample"
VIEWS, MAX_VIEWS = 6, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relabel")


@pytest.fixture(scope="module")
def images(work: Path) -> Path:
    folder = work / "images"
    write_generated_images(folder, 7, seed=9)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    labels = REAL_PHOTOS / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as fh:
            for row in list(csv.DictReader(fh))[:3]:
                shutil.copy(REAL_PHOTOS / row["path"], folder / Path(row["path"]).name)
    return folder


@pytest.fixture(scope="module")
def label_sets(work: Path) -> list[str]:
    other = dict(LABELSET, classes=["sports car", "tabby cat", "goldfish"],
                 cupl={c: LABELSET["cupl"][c] for c in ("sports car", "tabby cat", "goldfish")})
    return [f"a={write_labelset(work / 'ls-a')}", f"b={write_labelset(work / 'ls-b', other)}"]


@pytest.fixture(scope="module")
def make(work: Path, images: Path, label_sets: list[str], tiny_vit_checkpoint: Path):
    def config(out: str, **overrides) -> LabelConfig:
        base = dict(input=str(images), labels=label_sets, out=str(work / out), method="bifta", num_views=VIEWS,
                    max_views=MAX_VIEWS, top_k=3, batch_size=4, shard_size=4, labelset_cache=str(work / "cache"),
                    model=ModelConfig(model="bifta-tiny-vit", pretrained=str(tiny_vit_checkpoint), device="cpu"))
        base.update(overrides)
        return LabelConfig(**base)

    return config


def _label(config: LabelConfig) -> list[dict]:
    from pipelines.pipeline import run_label_job

    run_label_job(config)
    return sorted_rows(read_output(Path(config.out)))


def _relabel(source: Path, out: Path, label_sets: list[str], work: Path, **overrides) -> tuple[dict, list[dict]]:
    from pipelines.relabel import run_relabel_job

    config = LabelConfig(input=str(source), labels=label_sets, out=str(out), top_k=3,
                         labelset_cache=str(work / "cache"), **overrides)
    summary = run_relabel_job(config, given={"labels", "out", "top_k", "labelset_cache", *overrides})
    return summary, sorted_rows(read_output(out))


@pytest.fixture(scope="module")
def cascade_run(local_ray, make, work: Path) -> tuple[LabelConfig, list[dict]]:
    """BiFTA with the cascade over two label sets, keeping the views of the images that had views."""
    probe = _label(make("probe", method="cupl"))
    margins = sorted(r["margin"] for r in probe if r["status"] == "ok")
    t = (margins[len(margins) // 2 - 1] + margins[len(margins) // 2]) / 2
    config = make("labelled", cascade_margin=t, save_view_embeddings=True, embeddings_dtype="float32")
    return config, _label(config)


def test_relabel_with_the_same_settings_reproduces_the_cascade_rows(cascade_run, label_sets, work: Path) -> None:
    config, rows = cascade_run
    assert {r["decided_by"] for r in rows if r["status"] == "ok"} == {"cupl", "bifta"}
    assert {r["label_set"] for r in rows} == {"a", "b"}
    out = work / "relabel-same"
    summary, relabelled = _relabel(Path(config.out), out, label_sets, work, method="bifta",
                                   cascade_margin=config.cascade_margin)
    assert not row_differences(relabelled, rows)  # run id included: the same rows
    assert summary["ok"] == sum(r["status"] == "ok" for r in rows) // 2 and summary["errors"] == 1
    assert summary["shards_without_embeddings"] == 0

    # resume: a lost part file is redone from its embeddings, to the same rows
    parts = part_paths(out)
    assert len(parts) == len(part_paths(Path(config.out))) > 1
    parts[-1].unlink()
    again, rerun = _relabel(Path(config.out), out, label_sets, work, method="bifta",
                            cascade_margin=config.cascade_margin)
    assert 0 < again["processed"] < summary["processed"] and again["skipped_already_done"] > 0
    assert not row_differences(rerun, rows)


def test_images_whose_views_were_not_kept_are_error_rows_saying_so(cascade_run, label_sets, work: Path) -> None:
    from pipelines.relabel import MISSING_VIEWS

    config, rows = cascade_run
    summary, relabelled = _relabel(Path(config.out), work / "relabel-all-views", label_sets, work, method="bifta")
    with_views = {r["image_id"] for r in rows if r["views_encoded"]}
    for r in relabelled:
        if r["image_id"] in with_views:
            assert r["status"] == "ok" and r["decided_by"] == "bifta" and r["views_encoded"] > 0
        elif r["image_id"] != "broken.jpg":
            assert r["status"] == "error" and r["error"] == MISSING_VIEWS
    assert summary["error_reasons"].get("no saved view embeddings") == len(
        {r["image_id"] for r in rows if r["status"] == "ok"} - with_views)


def test_a_new_label_set_is_scored_without_reading_an_image(cascade_run, work: Path, images: Path,
                                                            make) -> None:
    config, rows = cascade_run
    new = write_labelset(work / "ls-new", dict(LABELSET, classes=["goldfish", "tench"],
                                               cupl={c: LABELSET["cupl"][c] for c in ("goldfish", "tench")}))
    moved = work / "images-moved"
    images.rename(moved)  # no image can be read now
    try:
        summary, relabelled = _relabel(Path(config.out), work / "relabel-new", [f"new={new}"], work, method="clip")
    finally:
        moved.rename(images)
    ok = [r for r in relabelled if r["status"] == "ok"]
    assert len(ok) == summary["ok"] == len({r["image_id"] for r in rows if r["status"] == "ok"})
    assert {r["label"] for r in ok} <= {"goldfish", "tench"} and {r["label_set"] for r in ok} == {"new"}
    assert all(r["views_generated"] == 0 and r["decided_by"] == "clip" for r in ok)


def test_float16_embeddings_halve_the_bytes_and_keep_the_labels(local_ray, make, label_sets, work: Path) -> None:
    config = make("half", method="cupl", save_embeddings=True)  # float16 by default
    rows = _label(config)
    files = sorted((Path(config.out) / "_embeddings").glob("part-*.parquet"))
    assert [f.name for f in files] == [p.name for p in part_paths(Path(config.out))]
    schema = pq.read_schema(files[0])
    assert str(schema.field("image_emb").type) == "fixed_size_list<element: halffloat>[64]"
    assert "view_emb" not in schema.names  # no --save-view-embeddings
    _, relabelled = _relabel(Path(config.out), work / "relabel-half", label_sets, work, method="cupl")
    same = sum(a["label"] == b["label"] for a, b in zip(relabelled, rows) if a["status"] == "ok")
    assert same >= 0.9 * sum(r["status"] == "ok" for r in rows)  # float16 rounding may flip a near tie
    assert max(abs(a["score"] - b["score"]) for a, b in zip(relabelled, rows) if a["status"] == "ok") < 5e-3


def test_relabel_mistakes_are_one_error_line(cascade_run, work: Path, label_sets: list[str]) -> None:
    from pipelines.relabel import run_relabel_job

    config, _ = cascade_run
    base = [sys.executable, "-m", "jobs.relabel", str(config.out), "--labels", label_sets[0]]
    for extra, message in (
        (["--model", "ViT-B-32"], "the embeddings were made with --model bifta-tiny-vit"),
        (["--method", "wca"], "the saved views are bifta's"),
        (["--seed", "3"], "relabel cannot change it"),
    ):
        proc = subprocess.run([*base, "--out", str(work / "bad"), *extra], cwd=REPO_ROOT, env=cli_env(),
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert message in lines[0], lines[0]
    with pytest.raises(InputError, match="no saved embeddings in .*images: label with `bifta label --save-embeddings`"):
        run_relabel_job(LabelConfig(input=str(work / "images"), labels=label_sets, out=str(work / "bad2")))
