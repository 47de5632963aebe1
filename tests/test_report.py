"""``bifta report``: polars analytics over a ``bifta label`` output folder.

The end-to-end tests label 10 photos of ``../shared/datasets/imagenet-sample`` plus a missing file
and a corrupt one, against the first 100 ImageNet classes (from ``../shared/descriptions/imagenet``;
CLIP needs only the class prompts, CLIP-E its default templates) and a three-class list, with the tiny random-weight ViT. The
analytics functions are also checked on a hand-made table where every number is known.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest

from bifta_core.review import analytics
from bifta_core.errors import ConfigError, InputError
from pipeline_helpers import write_imagenet_subset
from tests.s3_server import S3Server

N_PHOTOS = 10
MODEL_FLAGS = ["--model", "bifta-tiny-vit", "--pretrained", "random", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def manifest(imagenet_sample: Path, work: Path) -> Path:
    with open(imagenet_sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:N_PHOTOS]
    corrupt = work / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG" * 10)
    path = work / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        for r in rows:
            w.writerow([str(imagenet_sample / r["path"]), r["class_name"]])
        w.writerow([str(work / "missing.jpg"), "tench"])
        w.writerow([str(corrupt), "tench"])
    return path


@pytest.fixture(scope="module")
def imagenet_classes(descriptions_dir: Path, work: Path) -> Path:
    return write_imagenet_subset(descriptions_dir, work / "imagenet-classes", files=["classes.json"])


def _label(manifest: Path, labels: Path, out: Path, method: str, cache: Path) -> Path:
    from jobs.label import main

    rc = main([str(manifest), "--labels", f"imagenet={labels}", "--labels", "animals=cat,dog,bird", "--out", str(out),
               "--method", method, *MODEL_FLAGS, "--labelset-cache", str(cache), "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def clip_run(manifest: Path, imagenet_classes: Path, work: Path) -> Path:
    return _label(manifest, imagenet_classes, work / "clip", "clip", work / "lscache")


@pytest.fixture(scope="module")
def clip_e_run(manifest: Path, imagenet_classes: Path, work: Path) -> Path:
    return _label(manifest, imagenet_classes, work / "clip-e", "clip-e", work / "lscache")


def _report(argv: list[str], capsys) -> tuple[int, str, str]:
    from jobs.report import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------------------- end to end


def test_report_counts_quantiles_errors_and_review_queue(clip_run: Path, capsys) -> None:
    rc, out, _ = _report([str(clip_run), "--min-margin", "0.002", "--min-score", "0.1"], capsys)
    assert rc == 0
    report = json.loads((clip_run / "_report" / "report.json").read_text())

    ov = report["overview"]
    assert ov["images"] == N_PHOTOS + 2 and ov["ok_images"] == N_PHOTOS and ov["error_images"] == 2
    assert ov["label_sets"] == ["animals", "imagenet"] and ov["methods"] == ["clip"]

    counts = pl.DataFrame(report["label_counts"])
    per_ls = counts.group_by("label_set").agg(pl.col("n").sum(), pl.col("share").sum()).sort("label_set")
    assert per_ls["n"].to_list() == [N_PHOTOS, N_PHOTOS]
    assert all(abs(s - 1.0) < 1e-9 for s in per_ls["share"].to_list())
    assert set(counts.filter(pl.col("label_set") == "animals")["label"].to_list()) <= {"cat", "dog", "bird"}

    q = pl.DataFrame(report["quantiles"])
    assert sorted(zip(q["label_set"].to_list(), q["metric"].to_list())) == [
        ("animals", "margin"), ("animals", "score"), ("imagenet", "margin"), ("imagenet", "score")]
    for r in q.iter_rows(named=True):
        assert r["n"] == N_PHOTOS
        assert r["min"] <= r["q05"] <= r["q25"] <= r["q50"] <= r["q75"] <= r["q95"] <= r["max"]
    margins = q.filter(pl.col("metric") == "margin")
    assert (margins["min"] >= 0).all()

    errors = {e["reason"]: e for e in report["errors"]}
    assert set(errors) == {"file not found", "cannot decode image"}
    assert errors["file not found"]["images"] == 1 and errors["file not found"]["example_image_id"].endswith("missing.jpg")

    assert {a["label_set"] for a in report["accuracy"]} == {"animals", "imagenet"}

    csv_rows = pl.read_csv(clip_run / "_report" / "review.csv")
    review = pl.read_parquet(clip_run / "_report" / "review.parquet")
    assert csv_rows.height == review.height == report["review"]["rows"]
    assert review.height > 0
    assert ((review["margin"] < 0.002) | (review["score"] < 0.1)).all()
    assert review["margin"].is_sorted()
    assert set(review["reason"].to_list()) <= {"low margin", "low score", "low margin+low score"}
    assert review["topk_labels"].dtype == pl.List(pl.String)
    assert "images" in out and "review queue" in out and "file not found" in out


def test_compare_a_run_with_itself_agrees_fully(clip_run: Path, tmp_path: Path, capsys) -> None:
    rc, out, _ = _report([str(clip_run), "--compare", str(clip_run), "--report-out", str(tmp_path)], capsys)
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    agreement = report["compare"]["agreement"]
    assert {a["label_set"] for a in agreement} == {"animals", "imagenet"}
    assert all(a["agreement"] == 1.0 and a["common"] == N_PHOTOS for a in agreement)
    assert report["compare"]["top_confusions"] == []
    assert (tmp_path / "review.csv").exists() and (tmp_path / "review.parquet").exists()
    assert "100.00%" in out


def test_compare_two_methods(clip_run: Path, clip_e_run: Path, tmp_path: Path, capsys) -> None:
    rc, _, _ = _report([str(clip_run), "--compare", str(clip_e_run), "--report-out", str(tmp_path)], capsys)
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for a in report["compare"]["agreement"]:
        assert a["common"] == N_PHOTOS and 0.0 <= a["agreement"] <= 1.0
        pairs = [p for p in report["compare"]["top_confusions"] if p["label_set"] == a["label_set"]]
        assert sum(p["n"] for p in pairs) <= a["common"] - a["agree"]
        assert all(p["label_a"] != p["label_b"] for p in pairs)


def test_report_reads_and_writes_s3(clip_run: Path, s3_server: S3Server, capsys) -> None:
    s3_server.create_bucket("preds")
    for f in clip_run.glob("*"):
        if f.is_file():
            s3_server.put(f"s3://preds/run/{f.name}", f.read_bytes())
    rc, out, err = _report(["s3://preds/run", "--compare", str(clip_run), "--min-margin", "0.002"], capsys)
    assert rc == 0, err
    from bifta_core.io import storage

    report = json.loads(storage.read_bytes("s3://preds/run/_report/report.json"))
    assert report["overview"]["images"] == N_PHOTOS + 2
    assert all(a["agreement"] == 1.0 for a in report["compare"]["agreement"])
    review = pl.read_parquet(io.BytesIO(storage.read_bytes("s3://preds/run/_report/review.parquet")))
    assert review.height == report["review"]["rows"]
    assert (review["margin"] < 0.002).all()
    assert storage.exists("s3://preds/run/_report/review.csv")


def test_report_errors_are_one_line(tmp_path: Path, capsys) -> None:
    rc, _, err = _report([str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    rc, _, err = _report([str(tmp_path)], capsys)
    assert rc == 2 and "no prediction files" in err


# ------------------------------------------------------------------------ pure analytics


@pytest.fixture
def table() -> pl.LazyFrame:
    rows = [
        # image, status, error, label, score, margin, label_set, true
        ("a", "ok", None, "cat", 0.30, 0.100, "pets", "cat"),
        ("b", "ok", None, "cat", 0.20, 0.001, "pets", "dog"),
        ("c", "ok", None, "dog", 0.05, 0.050, "pets", "dog"),
        ("d", "ok", None, "dog", 0.40, 0.200, "pets", "Dog"),
        ("e", "error", "file not found", None, None, None, "pets", "cat"),
        ("f", "error", "cannot decode image: truncated", None, None, None, "pets", "cat"),
        ("g", "error", "cannot decode image: bad header", None, None, None, "pets", "cat"),
        ("a", "ok", None, "car", 0.25, 0.010, "things", None),
        ("e", "error", "file not found", None, None, None, "things", None),
    ]
    cols = ["image_id", "status", "error", "label", "score", "margin", "label_set", "true_label"]
    df = pl.DataFrame(rows, schema=cols, orient="row").with_columns(
        uri=pl.col("image_id"), topk_labels=pl.concat_list(pl.col("label"), pl.lit("x")),
    )
    return df.lazy()


def test_overview_counts_and_quantiles(table: pl.LazyFrame) -> None:
    ov = analytics.overview(table)
    assert (ov["images"], ov["ok_images"], ov["error_images"], ov["rows"]) == (7, 4, 3, 9)
    counts = analytics.label_counts(table)
    assert counts.filter(pl.col("label_set") == "pets").select("label", "n").rows() == [("cat", 2), ("dog", 2)]
    assert analytics.label_counts(table, top=1).height == 2
    q = analytics.score_quantiles(table, (0.0, 0.5, 1.0)).filter(pl.col("label_set") == "pets")
    score = q.filter(pl.col("metric") == "score").row(0, named=True)
    assert score["n"] == 4 and score["q00"] == 0.05 and score["q100"] == 0.40
    assert score["q50"] == pytest.approx(0.25)


def test_error_reasons_count_images_once(table: pl.LazyFrame) -> None:
    errors = analytics.error_reasons(table)
    assert errors.select("reason", "images").rows() == [("cannot decode image", 2), ("file not found", 1)]
    assert errors.row(0, named=True)["example_image_id"] == "f"


def test_review_queue_reasons(table: pl.LazyFrame) -> None:
    review = analytics.review_queue(table, min_margin=0.02, min_score=0.1).collect()
    assert review.select("image_id", "label_set", "reason").rows() == [
        ("b", "pets", "low margin"), ("a", "things", "low margin"), ("c", "pets", "low score")]
    assert analytics.review_queue(table, None, 0.1).collect()["image_id"].to_list() == ["c"]
    with pytest.raises(ConfigError):
        analytics.review_queue(table, None, None)


def test_truth_accuracy_normalises_labels(table: pl.LazyFrame) -> None:
    acc = analytics.truth_accuracy(table).filter(pl.col("label_set") == "pets").row(0, named=True)
    assert acc["n"] == 4 and acc["top1"] == 0.75 and acc["topk"] == 0.75
    assert analytics.truth_accuracy(table.drop("true_label")) is None


def test_agreement_and_confusions(table: pl.LazyFrame) -> None:
    other = table.with_columns(
        label=pl.when(pl.col("image_id").is_in(["b", "c"])).then(pl.lit("bird")).otherwise(pl.col("label")))
    summary, confusions = analytics.agreement(table, other)
    pets = summary.filter(pl.col("label_set") == "pets").row(0, named=True)
    assert (pets["common"], pets["agree"], pets["agreement"]) == (4, 2, 0.5)
    assert summary.filter(pl.col("label_set") == "things")["agreement"].to_list() == [1.0]
    assert confusions.select("label_a", "label_b", "n").rows() == [("cat", "bird", 1), ("dog", "bird", 1)]
    with pytest.raises(InputError):
        analytics.agreement(table, other.filter(pl.col("status") != "ok"))
    with pytest.raises(InputError, match="missing column"):
        analytics.check_columns(table.drop("margin"))


# ------------------------------------------------------------------------ streaming, errors


def test_review_queue_is_streamed_to_files_never_collected(tmp_path: Path, monkeypatch) -> None:
    from jobs.report import write_review

    n = 300_000
    lf = pl.LazyFrame({"i": range(n)}).select(
        image_id=pl.format("img-{}", pl.col("i")),
        uri=pl.format("s3://b/img-{}.jpg", pl.col("i")),
        status=pl.lit("ok"),
        error=pl.lit(None, dtype=pl.String),
        label=pl.lit("cat"),
        score=(pl.col("i") % 100) / 100.0,
        margin=(pl.col("i") % 1000) / 1000.0,
        label_set=pl.lit("pets"),
        topk_labels=pl.concat_list(pl.lit("cat"), pl.lit("dog")),
        topk_scores=pl.concat_list(pl.lit(0.5), pl.lit(0.25)),
    )
    heights: list[int] = []
    collect = pl.LazyFrame.collect

    def recording_collect(self, *args, **kwargs):
        out = collect(self, *args, **kwargs)
        heights.append(out.height)
        return out

    monkeypatch.setattr(pl.LazyFrame, "collect", recording_collect)
    counts = write_review(analytics.review_queue(lf, min_margin=0.5), str(tmp_path))
    monkeypatch.undo()
    assert counts == {"rows": n // 2, "images": n // 2}
    assert max(heights, default=0) <= 1, "the review queue must be streamed to files, not collected"
    review = pl.scan_parquet(tmp_path / "review.parquet")
    assert review.select(pl.len()).collect().item() == n // 2
    assert review.collect_schema()["topk_labels"] == pl.List(pl.String)
    csv_rows = pl.scan_csv(tmp_path / "review.csv")
    assert csv_rows.select(pl.len()).collect().item() == n // 2
    first = csv_rows.head(1).collect().row(0, named=True)
    assert first["topk_labels"] == "cat|dog" and first["margin"] == 0.0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_review_csv_joins_list_columns(clip_run: Path, tmp_path: Path, capsys) -> None:
    rc, _, _ = _report([str(clip_run), "--min-margin", "1", "--report-out", str(tmp_path), "--quiet"], capsys)
    assert rc == 0
    csv_rows = pl.read_csv(tmp_path / "review.csv")
    review = pl.read_parquet(tmp_path / "review.parquet")
    assert csv_rows.height == review.height > 0
    assert csv_rows["topk_labels"].to_list() == ["|".join(v) for v in review["topk_labels"].to_list()]


@pytest.mark.parametrize("flags, message", [
    (["--top", "0"], "--top"),
    (["--min-margin", "nan"], "--min-margin"),
    (["--min-score", "inf"], "--min-score"),
    (["--no-min-margin"], "--min-score"),
    (["--top", "ten"], "--top"),
    (["--report-out", ""], "--report-out"),
])
def test_bad_report_flags_are_one_error_line(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    try:
        rc, _, err = _report([str(tmp_path), *flags], capsys)
    except SystemExit as exc:  # flag syntax errors exit from argparse, with the same one line
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_unreadable_prediction_files_are_one_error_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "part-00000.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    rc, _, err = _report([str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
