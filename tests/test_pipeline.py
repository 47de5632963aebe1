"""End-to-end tests of the labelling pipeline (``run_label_job`` and ``python -m jobs.label``).

Everything runs on CPU with the tiny test architecture (``bifta-tiny-vit``, 64 px input) loaded
from a seeded random checkpoint, on a few generated images, broken files and (when
``../shared/datasets/imagenet-sample`` exists) a few real photos. Each pipeline run costs seconds
of Ray actor start-up, so runs are shared: one manifest run (schema, broken files, manifest
columns), one run with two label sets, one fresh reference run (plain class list; determinism;
kill-and-resume), plus one short run per scoring method. In-process runs share one local Ray
(2 CPUs) for the module; CLI tests start their own embedded Ray in a subprocess and are few: the
user-error exits (which fail before Ray starts) and kill-and-resume.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bifta_core.config import LabelConfig, ModelConfig
from bifta_core.errors import BiftaUserError
from pipeline_helpers import (
    CONTRACT_COLUMNS,
    HUGE_LIMIT,
    LABELSET,
    REPO_ROOT,
    part_paths,
    plain_type,
    row_differences,
    read_output,
    run_cli,
    sorted_rows,
    write_corrupt_images,
    write_generated_images,
    write_labelset,
)

SHARED_DIR = REPO_ROOT.parent / "shared"
REAL_PHOTOS = SHARED_DIR / "datasets" / "imagenet-sample"
NUM_GENERATED = 6
NUM_REAL = 3
VIEWS, MAX_VIEWS, TOP_K = 8, 4, 3


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local(local_ray):
    """The shared local Ray (conftest) for every in-process run of this module."""
    # Ray Data logs executor metrics at DEBUG; keep them out of the report of a failing test
    import ray.data  # noqa: F401  (configures its loggers on import; override after that)

    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.INFO)
    yield
    data_logger.setLevel(level)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def labelset_dir(work: Path) -> Path:
    return write_labelset(work / "labelset" / "tiny4")


@pytest.fixture(scope="module")
def cache_dir(work: Path) -> Path:
    return work / "labelset-cache"


@pytest.fixture(scope="module")
def make_config(tiny_vit_checkpoint: Path, cache_dir: Path):
    """LabelConfig for the tiny model with small views; keyword arguments override any field."""

    def make(input: Path | str, out: Path, **overrides) -> LabelConfig:
        base = dict(
            input=str(input),
            labels=overrides.pop("labels", None) or [],
            out=str(out),
            method="bifta",
            model=ModelConfig(model="bifta-tiny-vit", pretrained=str(tiny_vit_checkpoint), device="cpu"),
            num_views=VIEWS,
            max_views=MAX_VIEWS,
            top_k=TOP_K,
            batch_size=4,
            labelset_cache=str(cache_dir),
        )
        base.update(overrides)
        return LabelConfig(**base)

    return make


MISSING = "not-there.jpg"


@pytest.fixture(scope="module")
def mixed_inputs(work: Path) -> dict:
    """A manifest (``uri,label``) over generated images, real photos and broken files, plus a missing one.

    Generated and broken files sit next to the manifest and are listed by relative path; the real
    photos of ../shared (when present) are listed by absolute path.
    """
    folder = work / "mixed"
    generated = write_generated_images(folder / "imgs", NUM_GENERATED)
    corrupt = write_corrupt_images(folder / "imgs")
    entries: list[tuple[str, str]] = [(f"imgs/{p.name}", f"synthetic-{i % 2}") for i, p in enumerate(generated)]
    entries += [(f"imgs/{name}", "broken") for name in corrupt]
    labels_csv = REAL_PHOTOS / "labels.csv"
    real: dict[str, str] = {}
    if labels_csv.is_file():
        with labels_csv.open(newline="") as fh:
            for row in list(csv.DictReader(fh))[:NUM_REAL]:
                path = (REAL_PHOTOS / row["path"]).resolve()
                real[path.name] = row["class_name"]
                entries.append((str(path), row["class_name"]))
    entries.append((f"imgs/{MISSING}", "ghost"))
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        w.writerows(entries)
    return dict(folder=folder, manifest=manifest, entries=entries, corrupt=corrupt, real=real,
                generated=[p.name for p in generated])


def _run(config: LabelConfig) -> dict:
    from pipelines.pipeline import run_label_job

    return run_label_job(config)


@pytest.fixture(scope="module")
def mixed_run(ray_local, make_config, mixed_inputs, labelset_dir: Path, work: Path):
    config = make_config(mixed_inputs["manifest"], work / "out-mixed", labels=[str(labelset_dir)],
                         max_pixels=HUGE_LIMIT)
    summary = _run(config)
    return config, summary, read_output(Path(config.out))


def _by_name(table: pa.Table) -> dict[str, dict]:
    rows = {Path(r["uri"]).name: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows
    return rows


# ---------------------------------------------------------------------------------------------- 1. schema
def test_one_row_per_input_with_contract_schema(mixed_run, mixed_inputs) -> None:
    config, summary, table = mixed_run
    entries, corrupt = mixed_inputs["entries"], mixed_inputs["corrupt"]
    out = Path(config.out)

    # exactly one row per input, ids unique
    assert table.num_rows == len(entries)
    ids = table.column("image_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert sorted(_by_name(table)) == sorted(Path(u).name for u, _ in entries)
    assert summary["inputs"] == len(entries) and summary["ok"] + summary["errors"] == len(entries)

    # every contract column, each a plain Arrow type (no Ray tensor/object extension types)
    for name in CONTRACT_COLUMNS:
        assert name in table.column_names, f"missing column {name}"
    for field in table.schema:
        assert plain_type(field.type), f"{field.name} has non-plain type {field.type}"
        assert not (field.metadata or {}).get(b"ARROW:extension:name")
    for path in part_paths(out):
        schema = pq.read_schema(path)
        assert all(not (f.metadata or {}).get(b"ARROW:extension:name") for f in schema)
        assert b"ray" not in repr(schema.metadata or {}).lower().encode()

    # the whole folder reads with polars (globbing the part files), same rows
    df = pl.read_parquet(str(out / "*.parquet"))
    assert df.height == len(entries)
    assert set(CONTRACT_COLUMNS) <= set(df.columns)
    assert not any(dtype == pl.Object for dtype in df.dtypes)
    assert df.get_column("topk_labels").dtype == pl.List(pl.String)
    assert df.get_column("topk_scores").dtype == pl.List(pl.Float32)

    classes = LABELSET["classes"]
    ok_rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(ok_rows) == len(entries) - len(corrupt) - 1  # minus the missing file
    for r in ok_rows:
        scores = r["topk_scores"]
        assert len(scores) == len(r["topk_labels"]) == min(TOP_K, len(classes))
        assert scores == sorted(scores, reverse=True), f"{r['image_id']}: top-k not descending"
        assert r["topk_labels"][0] == r["label"] and r["label"] in classes
        assert len(set(r["topk_labels"])) == len(r["topk_labels"])
        assert r["score"] == pytest.approx(scores[0], abs=1e-6)
        assert r["margin"] == pytest.approx(scores[0] - scores[1], abs=1e-5)
        assert r["margin"] >= 0
        assert r["error"] is None
        assert r["views_generated"] == VIEWS
        assert 1 <= r["views_kept"] <= min(MAX_VIEWS, r["views_generated"])
        assert 1 <= len(r["explanation"]) <= 3
        assert set(r["explanation"]) <= set(LABELSET["cupl"][r["label"]]), "explanation is not of the predicted class"
        assert r["method"] == "bifta" and r["model"] == "bifta-tiny-vit"
        assert r["pretrained"] == config.model.pretrained
    assert len(set(table.column("run_id").to_pylist())) == 1
    assert table.column("run_id")[0].as_py() == summary["run_id"]
    assert len(set(table.column("label_set_id").to_pylist())) == 1
    assert (out / "_bifta_run.json").is_file() and (out / "_bifta_summary.json").is_file()


# ---------------------------------------------------------------------------------------------- 2. corrupt inputs
def test_corrupt_inputs_become_error_rows(mixed_run, mixed_inputs) -> None:
    config, summary, table = mixed_run
    corrupt = mixed_inputs["corrupt"]
    rows = _by_name(table)
    for name, reason in corrupt.items():
        r = rows[name]
        assert r["status"] == "error", f"{name} should fail to decode"
        assert r["error"] and reason in r["error"], f"{name}: unexpected reason {r['error']!r}"
        assert r["label"] is None and r["topk_labels"] is None and r["score"] is None
        assert r["views_generated"] == 0 and r["views_kept"] == 0
        assert r["run_id"] == summary["run_id"]  # error rows are still complete rows
    good = [r for name, r in rows.items() if name not in corrupt and name != MISSING]
    assert good and all(r["status"] == "ok" for r in good)
    assert summary["errors"] == len(corrupt) + 1
    assert sum(summary["error_reasons"].values()) == len(corrupt) + 1


# ---------------------------------------------------------------------------------------------- 3. manifest
def test_manifest_labels_paths_and_missing_file(mixed_run, mixed_inputs) -> None:
    _, summary, table = mixed_run
    assert "true_label" in table.column_names
    assert table.schema.field("true_label").type == pa.string()
    rows = _by_name(table)
    folder = mixed_inputs["folder"]
    for uri, label in mixed_inputs["entries"]:
        r = rows[Path(uri).name]
        assert r["true_label"] == label
        # relative entries resolve against the manifest's folder; absolute ones are kept
        expected = Path(uri) if os.path.isabs(uri) else folder / uri
        assert Path(r["uri"]) == expected.resolve()
    for name, class_name in mixed_inputs["real"].items():
        assert rows[name]["status"] == "ok" and rows[name]["true_label"] == class_name
    missing = rows[MISSING]
    assert missing["status"] == "error" and missing["error"] == "file not found"
    assert missing["true_label"] == "ghost" and missing["label"] is None
    assert summary["error_reasons"].get("file not found") == 1


# ---------------------------------------------------------------------------------------------- 4. user errors
@pytest.fixture(scope="module")
def bad_labelsets(work: Path) -> dict[str, Path]:
    root = work / "bad-labelsets"
    malformed = root / "malformed"
    malformed.mkdir(parents=True)
    (malformed / "classes.json").write_text('["tench", "goldfish"\n')
    cupl = {k: v for k, v in LABELSET["cupl"].items() if k != "goldfish"}
    undescribed = write_labelset(root / "undescribed", cupl=cupl)
    no_descriptors = write_labelset(root / "no-descriptors", **{"clip-d": None})
    return {"malformed": malformed, "undescribed": undescribed, "no-descriptors": no_descriptors,
            "missing": root / "does-not-exist"}


def _error_cases(work: Path, labelset_dir: Path, bad: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    images = work / "mixed"
    empty = work / "empty-folder"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    good = ["--labels", str(labelset_dir)]
    return {
        "missing-input": ([str(work / "no-such-folder"), *good], "input not found"),
        "empty-folder": ([str(empty), *good], "no images found"),
        "labelset-missing": ([str(images), "--labels", str(bad["missing"])], "label set not found"),
        "labelset-malformed-json": ([str(images), "--labels", str(bad["malformed"])], "not valid JSON"),
        "class-without-descriptions": ([str(images), "--labels", str(bad["undescribed"])], "goldfish"),
        "method-file-missing": ([str(images), "--labels", str(bad["no-descriptors"]), "--method", "clip-d"],
                                "clip-d.json"),
        "scale-reversed": ([str(images), *good, "--scale", "0.9,0.1"], "--scale"),
        "scale-not-numbers": ([str(images), *good, "--scale", "abc"], "--scale"),
        "bad-int-flag": ([str(images), *good, "--num-views", "many"], "--num-views"),
        "bad-choice": ([str(images), *good, "--method", "magic"], "--method"),
    }


ERROR_CASES = ["missing-input", "empty-folder", "labelset-missing", "labelset-malformed-json",
               "class-without-descriptions", "method-file-missing", "scale-reversed", "scale-not-numbers",
               "bad-int-flag", "bad-choice"]
#: The cases that also run as a real subprocess (the rest call ``jobs.label.main`` in-process).
SUBPROCESS_CASES = {"missing-input", "labelset-malformed-json", "class-without-descriptions", "scale-not-numbers"}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_cli_user_errors_exit_2_with_one_line(case: str, work: Path, labelset_dir: Path, bad_labelsets,
                                              mixed_inputs, tiny_vit_checkpoint: Path, capsys) -> None:
    args, expected = _error_cases(work, labelset_dir, bad_labelsets)[case]
    out = work / f"out-error-{case}"
    argv = [*args, "--out", str(out), "--model", "bifta-tiny-vit", "--pretrained", str(tiny_vit_checkpoint),
            "--labelset-cache", str(work / "labelset-cache"), "--quiet"]
    if case in SUBPROCESS_CASES:
        started = time.time()
        proc = run_cli(argv, timeout=120)
        code, stderr = proc.returncode, proc.stderr
        # a user error is found before Ray or the model start
        assert time.time() - started < 60
    else:
        from jobs.label import main

        code = None
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors exit from parse_args
            code = exc.code
        stderr = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr: {stderr}"
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got: {stderr!r}"
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not out.exists() or not part_paths(out)


def test_api_raises_user_error_types(make_config, work: Path, labelset_dir: Path) -> None:
    """The Python API raises BiftaUserError subclasses (no Ray started for these)."""
    from pipelines.pipeline import run_label_job

    with pytest.raises(BiftaUserError, match="input not found"):
        run_label_job(make_config(work / "nowhere", work / "o1", labels=[str(labelset_dir)]))
    with pytest.raises(BiftaUserError, match="scale"):
        run_label_job(make_config(work / "mixed", work / "o2", labels=[str(labelset_dir)], scale=(0.9, 0.1)))


# ---------------------------------------------------------------------------------------------- 5. several label sets
@pytest.fixture(scope="module")
def multi_run(ray_local, make_config, labelset_dir: Path, work: Path):
    folder = work / "multi"
    write_generated_images(folder, 4, seed=9)
    config = make_config(folder, work / "out-multi", labels=[f"a={labelset_dir}", "b=cat,dog,car"])
    summary = _run(config)
    return config, summary, read_output(Path(config.out))


def test_multiple_label_sets_one_row_each(multi_run) -> None:
    config, summary, table = multi_run
    assert "label_set" in table.column_names
    rows = table.to_pylist()
    assert table.num_rows == 2 * 4 and summary["inputs"] == 4 and summary["ok"] == 4
    assert summary["rows_written"] == 8
    pairs = {(r["image_id"], r["label_set"]) for r in rows}
    assert len(pairs) == 8
    assert {r["label_set"] for r in rows} == {"a", "b"}
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, pair in by_image.items():
        a, b = sorted(pair, key=lambda r: r["label_set"])
        # the image was decoded and encoded once: same views for both label sets
        assert a["views_generated"] == b["views_generated"] == VIEWS
        assert a["views_kept"] == b["views_kept"]
        assert a["label"] in LABELSET["classes"] and b["label"] in ("cat", "dog", "car")
        assert a["label_set_id"] != b["label_set_id"]
        assert a["run_id"] == b["run_id"]
    # all rows of one image are in the same file
    for path in part_paths(Path(config.out)):
        t = pq.read_table(path, columns=["image_id", "label_set"])
        counts: dict[str, int] = {}
        for i in t.column("image_id").to_pylist():
            counts[i] = counts.get(i, 0) + 1
        assert set(counts.values()) == {2}


# ---------------------------------------------------------------------------------------------- 6. label-set cache
def test_labelset_cache_reused(mixed_run, make_config, cache_dir: Path, labelset_dir: Path, work: Path,
                               caplog) -> None:
    config, _, first = mixed_run
    cached = sorted(cache_dir.glob("*.parquet"))
    assert cached, f"no label-set cache file in {cache_dir}"
    before = {p: p.stat().st_mtime_ns for p in cached}
    caplog.set_level(logging.INFO, logger="bifta")
    again = make_config(config.input, work / "out-cached", labels=[str(labelset_dir)], max_pixels=HUGE_LIMIT)
    _run(again)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bifta")]
    assert any("from cache" in m and "no text encoded" in m for m in messages), messages
    assert not any("encoding descriptions" in m for m in messages), messages
    assert {p: p.stat().st_mtime_ns for p in sorted(cache_dir.glob("*.parquet")) if p in before} == before
    assert not row_differences(sorted_rows(read_output(Path(again.out))), sorted_rows(first))


# ---------------------------------------------------------------------------------------------- 7, 8, 10: reference run
RESUME_IMAGES = 24
#: Settings shared by the reference runs and the CLI kill/resume runs (flags and config fields).
RESUME_FLAGS = ["--labels", "cat,dog,car", "--method", "bifta", "--model", "bifta-tiny-vit", "--num-views", "16",
                "--max-views", "16", "--iou-threshold", "1.0", "--top-k", str(TOP_K), "--shard-size", "4",
                "--batch-size", "2", "--no-labelset-cache"]
RESUME_FIELDS = dict(labels=["cat,dog,car"], method="bifta", num_views=16, max_views=16, iou_threshold=1.0,
                     top_k=TOP_K, shard_size=4, batch_size=2, labelset_cache="")


@pytest.fixture(scope="module")
def resume_images(work: Path) -> Path:
    folder = work / "resume-images"
    write_generated_images(folder, RESUME_IMAGES, seed=3)
    return folder


@pytest.fixture(scope="module")
def reference_run(ray_local, make_config, resume_images: Path, work: Path):
    """Uninterrupted, fresh run (no label-set cache) of ``--method bifta --labels cat,dog,car``."""
    config = make_config(resume_images, work / "out-reference", **RESUME_FIELDS)
    summary = _run(config)
    return config, summary, read_output(Path(config.out))


def test_bifta_with_plain_class_list(reference_run) -> None:
    """``--labels cat,dog,car`` with BiFTA: the CLIP-E templates stand in for descriptions."""
    _, summary, table = reference_run
    assert summary["label_sets"]["labels"]["classes"] == 3
    assert table.num_rows == RESUME_IMAGES and summary["ok"] == RESUME_IMAGES
    for r in table.to_pylist():
        assert r["status"] == "ok" and r["method"] == "bifta"
        assert sorted(r["topk_labels"]) == ["car", "cat", "dog"]
        assert r["views_generated"] == r["views_kept"] == 16  # IoU threshold 1.0 drops nothing
        assert 1 <= len(r["explanation"]) <= 3
        assert all(r["label"] in text for text in r["explanation"]), r["explanation"]


def test_two_fresh_runs_are_identical(reference_run, make_config, work: Path) -> None:
    """Fresh output folder, text encoded again (no cache): every column, run_id included, matches."""
    config, summary, first = reference_run
    again = make_config(config.input, work / "out-reference-again", **RESUME_FIELDS)
    second_summary = _run(again)
    second = read_output(Path(again.out))
    assert second.schema == first.schema
    assert not row_differences(sorted_rows(second), sorted_rows(first))
    assert second_summary["run_id"] == summary["run_id"]
    # the file layout is deterministic too
    assert [p.name for p in part_paths(Path(again.out))] == [p.name for p in part_paths(Path(config.out))]


# ---------------------------------------------------------------------------------------------- 8. kill and resume
# Kill-and-resume of the CLI at several moments: tests/test_data_plane.py.


# ---------------------------------------------------------------------------------------------- 9. methods
@pytest.fixture(scope="module")
def method_inputs(work: Path) -> Path:
    folder = work / "methods"
    write_generated_images(folder, 3, seed=21)
    return folder


@pytest.fixture(scope="module")
def saved_bifta(ray_local, make_config, method_inputs: Path, labelset_dir: Path, work: Path) -> Path:
    """A BiFTA run over ``method_inputs`` that kept its embeddings (float32: relabel reproduces it)."""
    config = make_config(method_inputs, work / "out-saved-bifta", labels=[str(labelset_dir)],
                         save_view_embeddings=True, embeddings_dtype="float32")
    _run(config)
    return Path(config.out)


def config_uses_views(method: str) -> bool:
    return method in ("wca", "bifta-grid")


def _relabel(saved: Path, out: Path, config: LabelConfig) -> list[dict]:
    """``bifta relabel`` of ``saved`` with ``config``'s method, views and scoring → its rows."""
    from pipelines.relabel import run_relabel_job

    given = {"labels", "out", "method", "top_k", "labelset_cache", "views"}
    relabel = LabelConfig(input=str(saved), out=str(out), labels=config.labels, method=config.method,
                          top_k=config.top_k, labelset_cache=config.labelset_cache, views=config.views)
    run_relabel_job(relabel, given=given)
    return sorted_rows(read_output(out))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wca", "cupl", "clip-d", "clip-e", "clip", "waffle", "bifta-grid"])
def test_method_variants(method: str, ray_local, make_config, method_inputs: Path, labelset_dir: Path,
                         work: Path, saved_bifta: Path) -> None:
    # WCA keeps its own preset (60 crops, no refinement); BiFTA's grid makes 3 x 3 tiles, none of
    # which overlaps another (all kept); the global methods take no crops at all
    grid = method == "bifta-grid"
    config = make_config(method_inputs, work / f"out-method-{method}", labels=[str(labelset_dir)],
                         method="bifta" if grid else method, views="grid" if grid else None,
                         num_views=None, max_views=None, save_view_embeddings=config_uses_views(method),
                         embeddings_dtype="float32")
    summary = _run(config)
    table = read_output(Path(config.out))
    # Relabelling kept embeddings gives this run's rows, run id included, without reading an image:
    # a whole-image method from BiFTA's kept whole images, WCA and the grid from their own kept views.
    saved = Path(config.out) if config.uses_views else saved_bifta
    assert not row_differences(_relabel(saved, work / f"relabel-{method}", config), sorted_rows(table))
    assert table.num_rows == 3 and summary["ok"] == 3
    method = config.method
    expected_views = {"wca": 60, "bifta": 9}.get(method, 0)
    for r in table.to_pylist():
        assert r["status"] == "ok" and r["method"] == method
        assert r["views_generated"] == expected_views and r["views_kept"] == expected_views
        assert r["label"] in LABELSET["classes"]
        assert r["topk_scores"] == sorted(r["topk_scores"], reverse=True)
        assert math.isfinite(r["score"]) and r["margin"] >= 0
        assert len(r["explanation"]) <= 3
        if method != "clip":
            assert r["explanation"], "descriptions of the predicted class expected"


def test_batches_of_only_errors_mix_with_batches_of_only_good_images(ray_local, make_config, labelset_dir: Path,
                                                                     work: Path) -> None:
    """Column types are fixed per stage, so an all-error batch (error: strings, no label) and an all-ok
    batch (error: all null) still merge; this once crashed the whole job with an Arrow type error."""
    folder = work / "all-bad-then-good"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"not an image")
    (folder / "b_broken.jpg").write_bytes(b"nor this")
    write_generated_images(folder / "z_good", 2)
    config = make_config(folder, work / "out-all-bad-then-good", labels=[str(labelset_dir)], batch_size=2)
    summary = _run(config)
    rows = read_output(Path(config.out))
    assert summary["errors"] == 2 and summary["ok"] == 2
    assert rows.num_rows == 4
    assert sorted(rows.column("status").to_pylist()) == ["error", "error", "ok", "ok"]


def test_model_facts_of_a_tag_are_cached_next_to_the_label_sets(ray_local, work: Path, tiny_vit_checkpoint: Path,
                                                                 monkeypatch) -> None:
    import pipelines.pipeline as pp

    config = LabelConfig(input="x", labels=["a,b"], out="o", labelset_cache=str(work / "facts-cache"),
                         model=ModelConfig(model="bifta-tiny-vit", pretrained="random", device="cpu"))
    first = pp.cached_model_facts(config, False, {})
    assert list((work / "facts-cache" / "facts").glob("*.json"))

    def no_task(*args, **kwargs):
        raise AssertionError("cached facts must not start a task")

    monkeypatch.setattr(pp.ray, "remote", no_task)
    assert pp.cached_model_facts(config, False, {}) == json.loads(json.dumps(first))
    # Weights from a file are inspected every time (their identity follows the file), as is a run without a cache.
    on_file = dataclasses.replace(config, model=ModelConfig(model="bifta-tiny-vit", pretrained=str(tiny_vit_checkpoint)))
    assert pp._facts_cache_path(on_file, False) is None
    assert pp._facts_cache_path(dataclasses.replace(config, labelset_cache=""), False) is None
    assert pp._facts_cache_path(config, True) != pp._facts_cache_path(config, False)
