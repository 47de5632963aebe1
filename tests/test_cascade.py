"""The cascade (``bifta label --cascade-margin T``, ``bifta_core.method.cascade``, evaluate's curve).

Pure parts first (the rule, the threshold grid, the curve, the first-stage decode); then the
pipeline on the tiny random-weights model over generated images and real JPEG photos (whose
whole image a view-less method decodes at another DCT scale than BiFTA's working resolution):
T = inf gives full BiFTA's rows, T = 0 ``--method cupl``'s labels, and an intermediate T sends
exactly the images with margin < T through views — per label set, deterministic, resumable.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from bifta_core.method.cascade import (
    CascadeSpec,
    cascade_curve,
    default_thresholds,
    first_stage_methods,
    needs_views,
    recommended_thresholds,
)
from bifta_core.config import LabelConfig, ModelConfig
from bifta_core.errors import ConfigError
from pipeline_helpers import LABELSET, part_paths, read_output, row_differences, run_cli, sorted_rows, \
    write_generated_images, write_labelset

REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "imagenet-sample"
VIEWS, MAX_VIEWS = 8, 6


# ---------------------------------------------------------------------------------------------- pure
def test_the_rule_is_margin_below_t() -> None:
    margins = np.array([0.0, 0.01, 0.02, 0.5])
    assert needs_views(margins, 0.0).tolist() == [False] * 4  # T = 0: the first stage decides everything
    assert needs_views(margins, math.inf).tolist() == [True] * 4  # T = inf: views everywhere
    assert needs_views(margins, 0.02).tolist() == [True, True, False, False]  # a margin equal to T is sure


def test_cascade_settings_are_checked() -> None:
    base = dict(input="x", labels=["a,b"], out="o")
    LabelConfig(**base, cascade_margin=0.01).validate()
    LabelConfig(**base, method="wca", cascade_margin=math.inf, cascade_first="clip").validate()
    for bad, message in (
        (dict(method="cupl", cascade_margin=0.1), "needs a method that encodes views"),
        (dict(cascade_margin=-0.1), ">= 0"),
        (dict(cascade_margin=float("nan")), ">= 0"),
        (dict(cascade_margin="high"), ">= 0"),
        (dict(cascade_margin=0.1, cascade_first="wca"), "whole-image method"),
    ):
        with pytest.raises(ConfigError, match=message):
            LabelConfig(**base, **bad).validate()
    assert "cupl" in first_stage_methods() and "bifta" not in first_stage_methods()


def test_threshold_grid_falls_between_margins() -> None:
    margins = np.array([0.05, 0.01, 0.03, 0.02, 0.04, 0.04])
    grid = default_thresholds(margins, shares=(0.5,))
    assert grid[0] == 0.0 and grid[-1] == math.inf
    middle = grid[1:-1]
    assert middle == [pytest.approx(0.035)]  # halfway between the 3rd and 4th smallest margins
    assert needs_views(margins, middle[0]).sum() == 3


def _predictions() -> pl.DataFrame:
    """Six images: cupl is right on the sure ones, bifta right on four of them, 10 views each."""
    ids = [f"im{i}" for i in range(6)]
    first = pl.DataFrame({"method": "cupl", "image_id": ids, "margin": [0.3, 0.2, 0.1, 0.05, 0.01, 0.0],
                          "true_rank": [1, 1, 2, 3, 7, 2], "views_encoded": [0] * 6})
    final = pl.DataFrame({"method": "bifta", "image_id": ids, "margin": [0.1] * 6,
                          "true_rank": [1, 2, 1, 1, 1, 6], "views_encoded": [10] * 6})
    return pl.concat([first, final]).with_columns(pl.col("margin").cast(pl.Float32))


def test_curve_ends_are_the_two_methods_and_its_cost_is_views_of_unsure_images() -> None:
    curve = cascade_curve(_predictions(), CascadeSpec("cupl", "bifta"), [0.0, 0.06, math.inf])
    rows = {r["threshold"]: r for r in curve.iter_rows(named=True)}
    assert rows[0.0]["top1"] == pytest.approx(2 / 6) and rows[0.0]["views_per_image"] == 0
    assert rows[math.inf]["top1"] == pytest.approx(4 / 6) and rows[math.inf]["views_per_image"] == 10
    # T = 0.06: im0-im2 keep cupl (ranks 1, 1, 2), im3-im5 take bifta (1, 1, 6)
    assert rows[0.06]["share_with_views"] == pytest.approx(0.5)
    assert rows[0.06]["views_per_image"] == pytest.approx(5.0)
    assert rows[0.06]["top1"] == pytest.approx(4 / 6) and rows[0.06]["top5"] == pytest.approx(5 / 6)
    best = recommended_thresholds(curve)
    assert best["1%"]["threshold"] == 0.06 and best["0.5%"]["threshold"] == 0.06  # as good as bifta, half the views
    with pytest.raises(ConfigError, match="needs the 'wca' row"):
        cascade_curve(_predictions(), CascadeSpec("cupl", "wca"))


def test_first_stage_whole_image_is_decoded_as_a_whole_image_method_decodes_it() -> None:
    from bifta_core.io.images import decode_image, working_min_side

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data, size = buf.getvalue(), 64
    views = decode_image(data, max_pixels=10**8, min_side=working_min_side(size, 0.5), whole_size=size,
                         global_min_side=size)
    alone = decode_image(data, max_pixels=10**8, min_side=size, whole_size=size)
    # short side 480: BiFTA's working side (128 px) decodes at DCT scale 1/2 (240 px), a whole-image
    # method's (64 px) at 1/4 (120 px): two different whole images, and the first stage gets cupl's
    assert views.global_whole is not None
    assert np.array_equal(views.global_whole.numpy(), alone.whole.numpy())
    assert not np.array_equal(views.whole.numpy(), alone.whole.numpy())
    png = io.BytesIO()
    img.save(png, "PNG")  # no DCT scales: one decode serves both
    assert decode_image(png.getvalue(), max_pixels=10**8, min_side=128, whole_size=size,
                        global_min_side=size).global_whole is None


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cascade")


@pytest.fixture(scope="module")
def images(work: Path) -> Path:
    """Generated images (JPEG, PNG, grey, RGBA) and, when ../shared has them, four real JPEG photos."""
    folder = work / "images"
    write_generated_images(folder, 8, seed=5)
    labels = REAL_PHOTOS / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as fh:
            for row in list(csv.DictReader(fh))[:4]:
                shutil.copy(REAL_PHOTOS / row["path"], folder / Path(row["path"]).name)
    return folder


@pytest.fixture(scope="module")
def label_sets(work: Path) -> list[str]:
    other = dict(LABELSET, classes=["goldfish", "tench", "sports car"],
                 cupl={c: LABELSET["cupl"][c][::-1] for c in ("goldfish", "tench", "sports car")})
    return [f"fish={write_labelset(work / 'ls-a')}", f"few={write_labelset(work / 'ls-b', other)}"]


@pytest.fixture(scope="module")
def make(work: Path, images: Path, label_sets: list[str], tiny_vit_checkpoint: Path):
    def config(name: str, **overrides) -> LabelConfig:
        base = dict(input=str(images), labels=label_sets, out=str(work / name), method="bifta",
                    model=ModelConfig(model="bifta-tiny-vit", pretrained=str(tiny_vit_checkpoint), device="cpu"),
                    num_views=VIEWS, max_views=MAX_VIEWS, top_k=3, batch_size=4, shard_size=5,
                    labelset_cache=str(work / "cache"))
        base.update(overrides)
        return LabelConfig(**base)

    return config


def _label(config: LabelConfig) -> tuple[dict, list[dict]]:
    from pipelines.pipeline import run_label_job

    summary = run_label_job(config)
    return summary, sorted_rows(read_output(Path(config.out)))


@pytest.fixture(scope="module")
def full(local_ray, make):
    return _label(make("full"))


@pytest.fixture(scope="module")
def first_only(local_ray, make):
    return _label(make("cupl", method="cupl"))


def _without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def test_t_infinite_gives_the_full_method_rows(local_ray, make, full) -> None:
    summary, rows = _label(make("t-inf", cascade_margin=math.inf))
    _, want = full
    # the ids differ: other settings (run id), and the label set's texts include the first stage's
    ids = ("run_id", "label_set_id")
    assert not row_differences(_without(rows, *ids), _without(want, *ids))
    assert {r["decided_by"] for r in rows} == {"bifta"}
    assert all(r["views_encoded"] == r["views_kept"] > 0 for r in rows if r["status"] == "ok")
    assert summary["share_with_views"] == 1.0 and summary["views_per_image"] == full[0]["views_per_image"] > 0
    assert summary["cascade"] == {"margin": math.inf, "first": "cupl"}


def test_t_zero_gives_the_first_stage_labels_and_encodes_no_view(local_ray, make, first_only) -> None:
    summary, rows = _label(make("t-zero", cascade_margin=0.0))
    _, want = first_only
    same = ("image_id", "label_set", "status", "label", "label_index", "score", "topk_labels", "topk_scores",
            "margin", "explanation")
    assert not row_differences([{k: r[k] for k in same} for r in rows], [{k: r[k] for k in same} for r in want])
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["decided_by"] == "cupl" and r["views_encoded"] == 0 for r in ok)
    assert summary["views_encoded"] == 0 and summary["share_with_views"] == 0.0
    if REAL_PHOTOS.is_dir():  # real JPEGs: cupl's whole image is decoded at another DCT scale than bifta's
        assert any(r["image_id"].endswith(".JPEG") for r in ok)


def test_intermediate_t_sends_exactly_the_unsure_images_through_views(local_ray, make, full, first_only) -> None:
    _, cupl_rows = first_only
    _, bifta_rows = full
    lowest: dict[str, float] = {}  # per image, its lowest first-stage margin over the label sets
    for r in cupl_rows:
        if r["status"] == "ok":
            lowest[r["image_id"]] = min(r["margin"], lowest.get(r["image_id"], math.inf))
    margins = sorted(lowest.values())
    t = float((margins[len(margins) // 2 - 1] + margins[len(margins) // 2]) / 2)  # half the images unsure
    config = make("t-mid", cascade_margin=t)
    summary, rows = _label(config)
    cupl = {(r["image_id"], r["label_set"]): r for r in cupl_rows}
    bifta = {(r["image_id"], r["label_set"]): r for r in bifta_rows}
    unsure_images = {i for i, m in lowest.items() if m < t}
    assert 0 < len(unsure_images) < len(lowest)
    for r in rows:
        if r["status"] != "ok":
            assert r["decided_by"] is None and r["views_encoded"] == 0
            continue
        key = (r["image_id"], r["label_set"])
        # each label set decides its own rows by its own margin ...
        by_first = cupl[key]["margin"] >= t
        assert r["decided_by"] == ("cupl" if by_first else "bifta")
        ref = cupl[key] if by_first else bifta[key]
        assert r["label"] == ref["label"] and r["topk_labels"] == ref["topk_labels"]
        assert r["score"] == pytest.approx(ref["score"], rel=1e-5, abs=1e-6)
        # ... and an image is encoded view by view once, when any label set is unsure of it
        assert r["views_encoded"] == (bifta[key]["views_kept"] if r["image_id"] in unsure_images else 0)
    with_views = {r["image_id"] for r in rows if r["views_encoded"] > 0}
    assert summary["share_with_views"] == pytest.approx(len(with_views) / summary["ok"], abs=1e-4)
    assert 0 < summary["views_per_image"] < full[0]["views_per_image"]

    # deterministic and resumable: a lost part file is redone to the same rows
    parts = part_paths(Path(config.out))
    assert len(parts) > 1
    parts[0].unlink()
    again, rerun = _label(config)
    assert again["skipped_already_done"] > 0 and again["processed"] < summary["processed"]
    assert not row_differences(rerun, rows)


def test_cascade_flags_are_user_errors(work: Path, images: Path, label_sets: list[str]) -> None:
    for args, message in (
        (["--method", "cupl", "--cascade-margin", "0.1"], "needs a method that encodes views"),
        (["--cascade-margin", "-1"], ">= 0"),
        (["--cascade-margin", "0.1", "--cascade-first", "wca"], "invalid choice"),
    ):
        proc = run_cli([str(images), "--labels", label_sets[0], "--out", str(work / "bad"), *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], \
            proc.stderr
