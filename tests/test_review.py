"""The review page (``bifta review``), the Label Studio export and the ``top_views`` column, on real
photos of ``../shared/datasets/imagenet-sample`` labelled by the tiny random-weights model.

The page is rendered by a real headless Chromium (Debian's ``chromium``, installed by ``.ci/run``):
its DOM after the page's script ran is checked (items, boxes drawn, a filter changing the visible
count) and a screenshot must not be blank. The Label Studio file is validated against the import
format its documentation gives (tasks → data / predictions → result → choices).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from PIL import Image, ImageOps

from pipeline_helpers import REPO_ROOT, cli_env, read_output, sorted_rows, write_imagenet_subset

N_PHOTOS = 6
IMAGENET_CLASSES = 100
VIEWS = 8


@pytest.fixture(scope="module")
def labelled(imagenet_sample: Path, descriptions_dir: Path, tmp_path_factory, tiny_vit_checkpoint: Path) -> dict:
    """``bifta label`` (CLI, quiet by default) over six real photos and a broken file, against the first
    100 ImageNet classes with all their published texts."""
    work = tmp_path_factory.mktemp("review")
    images = work / "images"
    images.mkdir()
    with (imagenet_sample / "labels.csv").open(newline="") as fh:
        for row in list(csv.DictReader(fh))[:N_PHOTOS]:
            shutil.copy(imagenet_sample / row["path"], images / Path(row["path"]).name)
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")
    out = work / "out"
    labels = write_imagenet_subset(descriptions_dir, work / "imagenet", IMAGENET_CLASSES)
    proc = subprocess.run([sys.executable, "-m", "jobs.label", str(images), "--labels",
                           f"imagenet={labels}", "--out", str(out), "--model", "bifta-tiny-vit",
                           "--pretrained", str(tiny_vit_checkpoint), "--num-views", str(VIEWS), "--explain-views", "3",
                           "--no-labelset-cache"], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"work": work, "images": images, "out": out, "rows": sorted_rows(read_output(out)), "stderr": proc.stderr}


def test_the_label_set_stage_shows_progress_and_ray_stays_quiet(labelled) -> None:
    err = labelled["stderr"]
    progress = [line for line in err.splitlines() if "[bifta] label set 'imagenet':" in line]
    assert progress and re.search(r"(\d[\d,]*)/\1 texts \(100%\), [\d,]+ texts/s, eta 0s", progress[-1]), progress
    assert "[bifta] 7/7 images (100%)" in err
    # Ray Data's progress blocks and executor lines only come back with --verbose
    for noisy in ("logging_progress", "execution finished", "Running Dataset", "No pretrained weights"):
        assert noisy not in err, noisy


def test_top_views_are_the_highest_weighted_kept_views_in_original_pixels(labelled) -> None:
    from bifta_core.method.seeding import generator_for
    from bifta_core.method.views import VIEW_PRESETS, generate_boxes, refine_boxes

    preset = VIEW_PRESETS["bifta"]
    for r in labelled["rows"]:
        if r["status"] != "ok":
            assert r["top_views"] is None
            continue
        views = r["top_views"]
        assert 1 <= len(views) <= 3
        weights = [v["weight"] for v in views]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
        with Image.open(labelled["images"] / r["image_id"]) as img:
            w, h = ImageOps.exif_transpose(img).size
        sampled = generate_boxes(dataclasses.replace(preset, num_views=VIEWS, max_views=VIEWS), w, h,
                                 generator_for(0, r["image_id"]))
        kept = {tuple(sampled[i].tolist()) for i in refine_boxes(sampled, preset.iou_threshold, VIEWS).tolist()}
        for v in views:
            assert (v["x0"], v["y0"], v["x1"], v["y1"]) in kept  # one of the views the row was scored on
            assert 0 <= v["x0"] < v["x1"] <= w and 0 <= v["y0"] < v["y1"] <= h


def _dom(html_file: Path, fragment: str = "") -> str:
    from jobs.review import chromium

    return chromium(["--dump-dom", html_file.as_uri() + fragment])


def test_review_page_renders_in_chromium_with_thumbnails_boxes_and_filters(labelled) -> None:
    from jobs.review import main

    page = labelled["work"] / "review.html"
    shot = labelled["work"] / "review.png"
    assert main([str(labelled["out"]), "--html", str(page), "--screenshot", str(shot), "--quiet"]) == 0
    html = page.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html and "@import" not in html  # nothing fetched
    data = json.loads(re.search(r'<script id="bifta-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    rows = {r["image_id"]: r for r in labelled["rows"]}
    assert len(data) == len(rows) == N_PHOTOS + 1
    for item in data:
        row = rows[item["id"]]
        assert item["label"] == row["label"] and item["status"] == row["status"]
        if row["status"] == "ok":
            thumb = Image.open(io.BytesIO(base64.b64decode(item["img"].split(",", 1)[1])))
            with Image.open(labelled["images"] / item["id"]) as img:
                w, h = ImageOps.exif_transpose(img).size
            assert max(thumb.size) <= 256 and (item["w"], item["h"]) == (w, h)
            assert abs(thumb.size[0] / thumb.size[1] - w / h) < 0.02
            assert item["views"] == [dict(v) for v in row["top_views"]]
        else:
            assert item["img"] is None and item["group"] == "error"

    dom = _dom(page)
    cards = re.findall(r'<article class="card (\w+)"[^>]*?( hidden="")?>', dom)
    assert len(cards) == N_PHOTOS + 1 and not any(h for _, h in cards)
    assert dom.count('class="box"') == sum(len(rows[i["id"]]["top_views"] or []) for i in data) > 0
    assert f'{N_PHOTOS + 1} of {N_PHOTOS + 1} shown' in dom
    assert "random model weights" not in dom  # weights from a checkpoint file: no warning banner
    errors_only = _dom(page, "#status=error")
    assert f"1 of {N_PHOTOS + 1} shown" in errors_only
    assert len(re.findall(r'<article class="card \w+"[^>]*hidden=""', errors_only)) == N_PHOTOS
    # the page holds margins to 6 decimals: the lowest as it shows it (the row's float may round up)
    lowest = round(min(r["margin"] for r in labelled["rows"] if r["status"] == "ok"), 6)
    assert f"1 of {N_PHOTOS + 1} shown" in _dom(page, f"#max={lowest}")

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 900)
    low, high = img.getextrema()
    assert high - low > 100 and len(set(img.resize((64, 48)).getdata())) > 50  # not blank


def test_thumbnails_made_on_ray_workers_equal_local_ones(labelled, local_ray) -> None:
    from bifta_core.review.page import Selection
    from jobs.review import build_page

    on_ray, counts = build_page(str(labelled["out"]), Selection(), ray_above=0)
    local, _ = build_page(str(labelled["out"]), Selection())
    assert on_ray == local and counts["thumbnails"] == N_PHOTOS


#: Label Studio's task import format (Label Studio guide: "Import pre-annotated data"): a list of
#: tasks; ``data`` holds the image reference; each prediction's ``result`` holds choices results.
LABEL_STUDIO_TASKS = {
    "type": "array",
    "items": {
        "type": "object", "required": ["data"], "additionalProperties": False,
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["result"], "additionalProperties": False,
                "properties": {
                    "model_version": {"type": "string"}, "score": {"type": "number"},
                    "result": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["from_name", "to_name", "type", "value"],
                        "properties": {
                            "id": {"type": "string"}, "from_name": {"type": "string"}, "to_name": {"type": "string"},
                            "type": {"const": "choices"},
                            "value": {"type": "object", "required": ["choices"], "additionalProperties": False,
                                      "properties": {"choices": {"type": "array", "minItems": 1,
                                                                 "items": {"type": "string"}}}}}}}}}},
        },
    },
}


def _export(labelled, *extra: str) -> tuple[list[dict], str]:
    dest = labelled["work"] / f"tasks{len(extra)}.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.export", "label-studio", str(labelled["out"]), "--out",
                           str(dest), "--local-root", str(labelled["work"]), *extra], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = Path(str(dest).removesuffix(".json") + ".label_config.xml").read_text()
    return json.loads(dest.read_text()), config


def test_label_studio_export_round_trips_through_its_import_format(labelled) -> None:
    import xml.etree.ElementTree as ET

    tasks, config = _export(labelled)
    jsonschema.validate(tasks, LABEL_STUDIO_TASKS)
    assert len(tasks) == len({r["image_id"] for r in labelled["rows"]}) == N_PHOTOS + 1  # one task per image
    view = ET.fromstring(config)
    image = view.find("Image")
    choices = view.find("Choices")
    assert image.get("value") == "$image" and choices.get("toName") == image.get("name")
    classes = {c.get("value") for c in choices.findall("Choice")}
    assert len(classes) == IMAGENET_CLASSES  # every class of the label set is a choice
    rows = {r["image_id"]: r for r in labelled["rows"]}
    for t in tasks:
        row = rows[t["data"]["image_id"]]
        assert t["data"]["image"] == "/data/local-files/?d=images/" + row["image_id"]
        if row["status"] != "ok":
            assert "predictions" not in t
            continue
        (pred,) = t["predictions"]
        (result,) = pred["result"]
        assert result["from_name"] == choices.get("name") and result["to_name"] == image.get("name")
        assert result["value"]["choices"] == [row["label"]] and row["label"] in classes
        assert pred["score"] == pytest.approx(row["score"]) and row["run_id"] in pred["model_version"]
    # the reviewers' share: images with a small margin, and the error row
    cut = sorted(r["margin"] for r in labelled["rows"] if r["status"] == "ok")[2]
    review, _ = _export(labelled, "--only-review", "--min-margin", str(cut))
    jsonschema.validate(review, LABEL_STUDIO_TASKS)
    assert {t["data"]["image_id"] for t in review} == {
        r["image_id"] for r in labelled["rows"] if r["status"] != "ok" or r["margin"] < cut}
    assert len(review) == 3


def test_s3_images_are_referenced_as_label_studio_s3_storage_expects() -> None:
    from bifta_core.review.label_studio import image_url, task

    assert image_url("s3://bucket/a b/c.jpg") == "s3://bucket/a b/c.jpg"
    assert image_url("/data/x y.jpg", "/data") == "/data/local-files/?d=x%20y.jpg"
    with pytest.raises(ValueError, match="not below --local-root"):
        image_url("/elsewhere/c.jpg", "/data")
    row = {"image_id": "c.jpg", "uri": "s3://b/c.jpg", "status": "ok", "error": None, "label": "cat", "score": 0.3,
           "margin": 0.01, "label_set": "pets v2", "method": "bifta", "model": "ViT-B-32", "pretrained": "openai",
           "run_id": "r1"}
    made = task([row, {**row, "label_set": "scene", "label": "indoor"}])
    jsonschema.validate([made], LABEL_STUDIO_TASKS)
    assert [r["from_name"] for r in made["predictions"][0]["result"]] == ["pets_v2", "scene"]


def test_a_page_of_random_weight_rows_says_so() -> None:
    from bifta_core.review.page import render_page

    item = {"image_id": "a.jpg", "uri": "a.jpg", "status": "ok", "label": "cat", "topk_labels": ["cat"],
            "topk_scores": [0.3], "margin": 0.0, "group": "queue"}
    assert "random model weights" in render_page([item], {}, {"random_weights": True})
    assert "random model weights" not in render_page([item], {}, {"random_weights": False})
