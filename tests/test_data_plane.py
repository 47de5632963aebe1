"""The cluster-scale data plane: listing into shards, worker-side shard writers, resume by file names.

Unit tests cover the pieces without Ray (listing rules, the shard writer, the resource plan, the
output layout); end-to-end tests run the real pipeline on the tiny model: kills of the driver at
three points (then a rerun), an encode actor and a writer killed mid-run, ``--retry-errors``,
duplicate ids and an old-layout OUT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bifta_core.config import LabelConfig, ModelConfig
from bifta_core.errors import ConfigError, InputError
from pipelines.write import LAYOUT_VERSION
from pipeline_helpers import REPO_ROOT, cli_env, kill_session, label_cmd, part_paths, read_output, \
    sorted_rows, write_generated_images

N_IMAGES = 12
FLAGS = ["--labels", "cat,dog,car", "--method", "bifta", "--model", "bifta-tiny-vit", "--num-views", "6",
         "--max-views", "6", "--iou-threshold", "1.0", "--top-k", "3", "--shard-size", "3", "--batch-size", "2",
         "--no-labelset-cache"]
FIELDS = dict(labels=["cat,dog,car"], method="bifta", num_views=6, max_views=6, iou_threshold=1.0, top_k=3,
              shard_size=3, batch_size=2, labelset_cache="")


# ---------------------------------------------------------------------------------------------- listing
def _listing(tmp_path: Path, spec: str, shard_size: int = 2, **kw):
    """List ``spec`` with the tasks run in this process (no Ray): every source, then the index."""
    from pipelines.inputs import Listing, ListingOptions, apply_limit, duplicate_hashes, list_source, plan_sources

    out = str(tmp_path / "out")
    options = ListingOptions(shard_size=shard_size, **kw)
    results = [list_source(s, out, options) for s in plan_sources(spec)]
    shards = [s for r in results for s in r[0]["shards"]]
    dups = [duplicate_hashes(*[r[1 + b] for r in results]) for b in range(16)]
    return out, Listing(input=spec, shards=apply_limit(shards, None), has_truth=any(r[0]["has_truth"] for r in results)), dups


def test_folder_listing_is_one_source_per_subfolder_and_one_row_group_per_shard(tmp_path: Path) -> None:
    from pipelines.inputs import plan_sources, read_shard_inputs

    root = tmp_path / "imgs"
    write_generated_images(root / "b", 3)
    write_generated_images(root / "a", 2)
    write_generated_images(root, 1, prefix="top")
    (root / "notes.txt").write_text("not an image")
    sources = plan_sources(str(root))
    assert [(s.kind, Path(s.location).name) for s in sources] == [("files", "imgs"), ("dir", "a"), ("dir", "b")]
    out, listing, dups = _listing(tmp_path, str(root))
    assert listing.shards == [("00000-00000", 1), ("00001-00000", 2), ("00002-00000", 2), ("00002-00001", 1)]
    assert not any(d.size for d in dups)
    ids = [i for s, n in listing.shards for i in read_shard_inputs(out, s).column("image_id").to_pylist()]
    assert ids == ["top000.jpg", "a/gen000.jpg", "a/gen001.png", "b/gen000.jpg", "b/gen001.png", "b/gen002.jpeg"]
    meta = pq.ParquetFile(Path(out) / "_bifta_inputs" / "00002.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 1]


def test_manifest_rules_relative_paths_inventory_columns_and_labels(tmp_path: Path) -> None:
    from pipelines.inputs import read_shard_inputs

    folder = tmp_path / "manifests"
    folder.mkdir()
    pq.write_table(pa.table({"bucket": ["b1", "b1"], "key": ["x/1.jpg", "x/2.jpg"]}), folder / "a.parquet")
    (folder / "b.csv").write_text("uri,label\nrel/3.jpg,cat\ns3://b2/4.jpg,dog\n")
    out, listing, _ = _listing(tmp_path, str(folder), shard_size=5)
    assert listing.has_truth
    rows = [r for s, _ in listing.shards for r in read_shard_inputs(out, s).to_pylist()]
    assert [r["uri"] for r in rows] == ["s3://b1/x/1.jpg", "s3://b1/x/2.jpg", str(folder / "rel/3.jpg"), "s3://b2/4.jpg"]
    assert [r["image_id"] for r in rows] == [r["uri"] for r in rows]
    assert [r["true_label"] for r in rows] == [None, None, "cat", "dog"]


def test_big_parquet_manifest_is_read_by_several_tasks(tmp_path: Path, monkeypatch) -> None:
    import pipelines.inputs as inputs

    monkeypatch.setattr(inputs, "SOURCE_ROWS", 4)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/x/{i}.jpg" for i in range(10)]}), path, row_group_size=3)
    sources = inputs.plan_sources(str(path))
    assert [s.row_groups for s in sources] == [(0, 2), (2, 4)]
    out, listing, _ = _listing(tmp_path, str(path), shard_size=4)
    assert listing.shards == [("00000-00000", 4), ("00000-00001", 2), ("00001-00000", 4)]
    ids = [i for s, _ in listing.shards for i in inputs.read_shard_inputs(out, s).column("image_id").to_pylist()]
    assert ids == [f"/x/{i}.jpg" for i in range(10)]


def test_limit_keeps_the_first_inputs_in_listing_order() -> None:
    from pipelines.inputs import apply_limit

    shards = [("a", 3), ("b", 3), ("c", 3)]
    assert apply_limit(shards, 4) == [("a", 3), ("b", 1)]
    assert apply_limit(shards, 3) == [("a", 3)]
    assert apply_limit(shards, None) == shards


def test_duplicate_hashes_found_across_sources() -> None:
    import numpy as np

    from pipelines.inputs import duplicate_hashes, id_hashes

    a, b = np.sort(id_hashes(["x", "y"])), np.sort(id_hashes(["z", "x"]))
    assert duplicate_hashes(a, b).tolist() == id_hashes(["x"]).tolist()
    assert duplicate_hashes(a).size == 0


# ---------------------------------------------------------------------------------------------- writer
def _rows(ids: list[str], shard: str, status: str = "ok") -> pa.Table:
    from pipelines.write import output_schema

    schema = output_schema(False)
    n = len(ids)
    cols = {f.name: [None] * n for f in schema}
    cols.update(image_id=ids, uri=[f"/p/{i}" for i in ids], status=[status] * n,
                error=[None if status == "ok" else "file not found"] * n, views_generated=[0] * n,
                views_kept=[0] * n, label_set=["s"] * n, method=["clip"] * n, random_weights=[False] * n)
    return pa.table(cols, schema=schema).append_column("shard", pa.array([shard] * n, pa.string()))


def test_shard_writer_publishes_complete_shards_once_with_footer_statistics(tmp_path: Path) -> None:
    from pipelines.write import ShardWriter, output_schema, read_shard_stats, shard_of

    w = ShardWriter(str(tmp_path), output_schema(False), {"00000-00000": 3, "00000-00001": 1})
    assert w.add(_rows(["b", "a"], "00000-00000")) == []
    assert w.add(_rows(["a"], "00000-00000")) == []  # a replayed row (retried task) is dropped
    assert w.open_shards() == {"00000-00000": 2}
    published = w.add(pa.concat_tables([_rows(["c"], "00000-00000", "error"), _rows(["d"], "00000-00001")]))
    assert [p["shard"] for p in published] == ["00000-00000", "00000-00001"]
    # these rows say no view was encoded (views_encoded null): the view counts are 0
    assert published[0] | {"seconds": 0} == {"shard": "00000-00000", "images": 3, "rows": 3, "ok": 2, "errors": 1,
                                             "error_reasons": {"file not found": 1}, "seconds": 0,
                                             "views_encoded": 0, "images_with_views": 0}
    assert w.open_shards() == {}
    path = tmp_path / "part-00000-00000.parquet"
    assert shard_of(str(path)) == "00000-00000"
    table = pq.read_table(path)
    assert table.column("image_id").to_pylist() == ["a", "b", "c"] and "shard" not in table.column_names
    assert read_shard_stats(str(path))["errors"] == 1
    with pytest.raises(RuntimeError, match="not planned"):
        w.add(_rows(["z"], "00009-00000"))


def test_shard_writer_waits_for_every_label_set_row_even_when_batches_split_an_image(tmp_path: Path) -> None:
    from pipelines.write import ShardWriter, output_schema

    def label_set(table: pa.Table, name: str) -> pa.Table:
        i = table.schema.get_field_index("label_set")
        return table.set_column(i, "label_set", pa.array([name] * table.num_rows, pa.string()))

    w = ShardWriter(str(tmp_path), output_schema(False), {"00000-00000": 2}, rows_per_input=2)
    assert w.add(label_set(_rows(["x", "y"], "00000-00000"), "a")) == []  # one label set's rows only
    assert w.add(label_set(_rows(["x"], "00000-00000"), "a")) == []  # a replay
    [stats] = w.add(label_set(_rows(["x", "y"], "00000-00000"), "b"))
    assert (stats["images"], stats["rows"]) == (2, 4)
    table = pq.read_table(tmp_path / "part-00000-00000.parquet")
    assert list(zip(table.column("image_id").to_pylist(), table.column("label_set").to_pylist())) == [
        ("x", "a"), ("x", "b"), ("y", "a"), ("y", "b")]


def test_resume_reads_names_only_and_old_layouts_are_refused(tmp_path: Path) -> None:
    from pipelines.pipeline import _check_out
    from pipelines.write import finished_shards

    out = tmp_path / "out"
    out.mkdir()
    for name in ("part-00000-00000.parquet", ".part-00000-00001.parquet.x.tmp", "_bifta_run.json"):
        (out / name).write_bytes(b"not parquet at all")  # never opened
    (out / "_bifta_run.json").write_text(json.dumps({"run_id": "r", "layout": LAYOUT_VERSION}))
    assert finished_shards(str(out)) == {"00000-00000"}
    config = LabelConfig(input="x", labels=["a,b"], out=str(out))
    with pytest.raises(ConfigError, match="different settings"):
        _check_out(config, "other")
    (out / "_bifta_run.json").write_text(json.dumps({"run_id": "r"}))  # written by the first version
    with pytest.raises(ConfigError, match="older bifta .*layout 1.*new --out"):
        _check_out(config, None)
    # Layout 2 had no decided_by/views_encoded columns: its part files cannot share a folder with layout 3's.
    (out / "_bifta_run.json").write_text(json.dumps({"run_id": "r", "layout": 2}))
    with pytest.raises(ConfigError, match="older bifta .*layout 2, this version writes layout 3"):
        _check_out(config, "r")
    old = tmp_path / "old"
    old.mkdir()
    (old / "part-3f2a9c0d1e2b4a5c6d7e.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="older bifta layout"):
        _check_out(LabelConfig(input="x", labels=["a,b"], out=str(old)), None)


# ---------------------------------------------------------------------------------------------- plan
def test_plan_asks_for_gpus_on_an_autoscaling_cluster_with_nothing_up() -> None:
    from pipelines.plan import plan_resources, remote_args
    from pipelines.pipeline import encode_stage

    config = LabelConfig(input="x", labels=["a,b"], out="o", gpus=2, model=ModelConfig(device="cuda"))
    res = plan_resources(config, {}, embedded=False)  # head CPU: 0, min_workers: 0 → nothing up yet
    assert res.use_gpu and res.encoders == 2 and res.torch_threads is None and res.decoders >= 8
    stage = encode_stage(config, res, {})
    assert stage.actors == (2, 2) and stage.num_gpus == 1.0
    args = remote_args({"AWS_REGION": "r"}, stage)
    assert args["num_gpus"] == 1.0 and "CUDA_VISIBLE_DEVICES" not in args["runtime_env"]["env_vars"]
    # --device cuda alone also plans GPU actors (one until more are asked for)
    assert plan_resources(LabelConfig(input="x", labels=["a"], out="o", model=ModelConfig(device="cuda")), {},
                          embedded=False).use_gpu


def test_plan_refuses_what_an_embedded_ray_can_never_place_and_hides_gpus_from_cpu_stages() -> None:
    from pipelines.plan import Stage, plan_resources, remote_args

    with pytest.raises(ConfigError, match="2 GPU encoder"):
        plan_resources(LabelConfig(input="x", labels=["a"], out="o", gpus=2), {"CPU": 8}, embedded=True)
    with pytest.raises(ConfigError, match="--device cpu"):
        plan_resources(LabelConfig(input="x", labels=["a"], out="o", gpus=1, model=ModelConfig(device="cpu")), {},
                       embedded=False)
    res = plan_resources(LabelConfig(input="x", labels=["a"], out="o"), {"CPU": 2}, embedded=True)
    assert not res.use_gpu and res.encoders == 1 and res.torch_threads == max(1, os.cpu_count() or 1)
    cpu_stage = Stage("read", print, batch_size=4, num_cpus=0.25)
    assert remote_args({}, cpu_stage)["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""


def test_label_and_evaluate_plans_come_from_one_builder() -> None:
    from pipelines.evaluate_stages import eval_stages, view_presets
    from pipelines.pipeline import label_stages
    from pipelines.plan import describe, plan_resources

    config = LabelConfig(input="x", labels=["a,b"], out="o", model=ModelConfig(model="bifta-tiny-vit",
                                                                               pretrained="random"))
    res = plan_resources(config, {"CPU": 4}, embedded=True)
    import pyarrow as pa_

    label = describe(label_stages(config, res, [], "rid", pa_.schema([]), False))
    evaluate = describe(eval_stages(config, res, presets=view_presets(config, ["bifta"]), model_cfg={}, out="o"))
    assert [s["name"] for s in label] == ["shards", "read", "decode+views", "encode+score"]
    assert [s["name"] for s in evaluate] == ["shards", "read", "decode+views", "embed"]
    for a, b in zip(label, evaluate):  # same resources, batch sizes and concurrency, stage by stage
        assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


@pytest.mark.parametrize("gpus", [0, 2])
def test_decode_runs_as_pooled_tasks_that_never_fuse_into_the_encoders(gpus: int) -> None:
    """Decode+views is a task stage (Ray's pooled workers keep their torch import for the next run),
    and its remote arguments differ from the encoders', so Ray Data keeps it a stage of its own."""
    from ray.data._internal.logical.rules.operator_fusion import are_remote_args_compatible

    from pipelines.pipeline import label_stages
    from pipelines.plan import plan_resources, remote_args

    config = LabelConfig(input="x", labels=["a,b"], out="o", gpus=gpus,
                         model=ModelConfig(model="bifta-tiny-vit", pretrained="random"))
    res = plan_resources(config, {"CPU": 8, "GPU": gpus}, embedded=True)
    import pyarrow as pa_

    stages = {s.name: s for s in label_stages(config, res, [], "rid", pa_.schema([]), False)}
    decode, encode = stages["decode+views"], stages["encode+score"]
    assert decode.actors is None and decode.concurrency == res.decoders and not isinstance(decode.fn, type)
    assert encode.actors == (res.encoders, res.encoders)
    assert not are_remote_args_compatible(remote_args({}, decode), remote_args({}, encode))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ray_local(local_ray):
    """The shared local Ray (conftest)."""
    yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plane") / "images"
    write_generated_images(folder / "x", N_IMAGES // 2, seed=5)
    write_generated_images(folder / "y", N_IMAGES // 2, seed=6)
    return folder


def _config(images: Path, out: Path, checkpoint: Path, **overrides) -> LabelConfig:
    fields = dict(FIELDS, **overrides)
    return LabelConfig(input=str(images), out=str(out), model=ModelConfig(model="bifta-tiny-vit",
                                                                          pretrained=str(checkpoint), device="cpu"),
                       **fields)


@pytest.fixture(scope="module")
def reference(ray_local, images: Path, tmp_path_factory, tiny_vit_checkpoint: Path):
    from pipelines.pipeline import run_label_job

    out = tmp_path_factory.mktemp("plane") / "reference"
    summary = run_label_job(_config(images, out, tiny_vit_checkpoint))
    return summary, sorted_rows(read_output(out))


def _one_row_each(out: Path) -> list[dict]:
    rows = sorted_rows(read_output(out))
    keys = [(r["image_id"], r["label_set"]) for r in rows]
    assert len(keys) == len(set(keys)) == N_IMAGES, f"{len(keys)} rows, {len(set(keys))} distinct"
    return rows


def test_reference_run_layout_and_summary(reference, images: Path, tmp_path_factory) -> None:
    summary, rows = reference
    assert summary["inputs"] == summary["processed"] == summary["ok"] == N_IMAGES
    assert summary["shards"] == summary["files_written"] == 4  # two folders of 6, shards of 3
    assert summary["rows_written"] == N_IMAGES and summary["layout"] == LAYOUT_VERSION == 3
    out = Path(summary["out"])
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.startswith("_")] == [f"part-0000{s}-0000{c}.parquet" for s in (0, 1)
                                                          for c in (0, 1)]
    # Readers of the folder see predictions only (Hive convention: `_` paths are metadata).
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    assert ds.dataset(str(out), format="parquet").count_rows() == N_IMAGES
    assert pl.read_parquet(str(out / "*.parquet")).height == N_IMAGES
    con = duckdb.connect()
    [(n,)] = con.execute(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()
    assert n == N_IMAGES
    # a recursive glob sees the saved listing too; skipping `_` paths (as Spark does) leaves predictions only
    [(m,)] = con.execute(f"select count(*) from read_parquet('{out}/**/*.parquet', filename=true) "
                         "where not regexp_matches(filename, '/_')").fetchall()
    assert m == N_IMAGES


def _ray_workers(title: str) -> list[int]:
    """PIDs of this test's Ray workers whose process title contains ``title`` (children of our raylet;
    other Ray instances on the machine are left alone)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode("utf-8", "replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and title in cmdline:
            pids.append(int(entry))
    return pids


def _run_killing(title: str, images: Path, out: Path, checkpoint: Path) -> tuple[dict, list[int]]:
    """Label ``images`` into ``out`` while a thread SIGKILLs this run's Ray workers titled ``title``
    as soon as the first shard is published (others are then in flight)."""
    from pipelines.pipeline import run_label_job

    killed: list[int] = []

    def kill_when_a_shard_is_out() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if part_paths(out):
                for pid in _ray_workers(title):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.02)

    thread = threading.Thread(target=kill_when_a_shard_is_out, daemon=True)
    thread.start()
    summary = run_label_job(_config(images, out, checkpoint))
    thread.join(timeout=5)
    return summary, killed


@pytest.mark.parametrize("worker", ["EncodeStage", "ShardWriter"])
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(worker: str, reference, images: Path, tmp_path: Path,
                                                              tiny_vit_checkpoint: Path) -> None:
    """An encode actor: Ray Data restarts it and retries its batches. A shard writer: Ray restarts it
    empty, and the shards it was filling are redone by the next pass."""
    summary, killed = _run_killing(worker, images, tmp_path / "out", tiny_vit_checkpoint)
    assert killed, f"no {worker} was alive to kill"
    assert summary["ok"] == N_IMAGES
    assert not _diff(_one_row_each(tmp_path / "out"), reference[1])


def _diff(rows: list[dict], expected: list[dict]) -> list:
    from pipeline_helpers import row_differences

    return row_differences(rows, expected)


def test_retry_errors_redoes_only_shards_with_error_rows(ray_local, tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    from pipelines.pipeline import run_label_job

    folder = tmp_path / "imgs"
    write_generated_images(folder / "a", 3, seed=1)
    write_generated_images(folder / "b", 3, seed=2)
    broken = folder / "b" / "gen001.png"
    good = broken.read_bytes()
    broken.write_bytes(b"half an image")
    config = _config(folder, tmp_path / "out", tiny_vit_checkpoint)
    first = run_label_job(config)
    assert first["errors"] == 1
    a_file = tmp_path / "out" / "part-00000-00000.parquet"
    a_mtime = a_file.stat().st_mtime_ns
    broken.write_bytes(good)  # the transient problem is gone
    plain = run_label_job(config)
    assert plain["processed"] == 0  # error rows count as done on a plain resume
    retried = run_label_job(_config(folder, tmp_path / "out", tiny_vit_checkpoint, retry_errors=True))
    assert retried["processed"] == 3 and retried["errors"] == 0 and retried["skipped_already_done"] == 3
    assert a_file.stat().st_mtime_ns == a_mtime  # the shard without errors was not touched
    rows = sorted_rows(read_output(tmp_path / "out"))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}


def test_duplicate_ids_are_one_line_errors_before_any_row(ray_local, tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    from pipelines.pipeline import run_label_job

    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "a.csv").write_text("uri,image_id\n/x/1.jpg,one\n/x/2.jpg,two\n")
    (folder / "b.csv").write_text("uri,image_id\n/x/3.jpg,three\n/x/4.jpg,two\n")
    with pytest.raises(InputError, match=r"1 duplicate image ids, e.g. \['two'\]"):
        run_label_job(_config(folder, tmp_path / "out", tiny_vit_checkpoint))
    assert not part_paths(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- driver kills
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["listed", "first-shard"])
def test_driver_killed_then_rerun_gives_exactly_one_row_per_input(moment: str, reference, images: Path,
                                                                   tmp_path: Path, tiny_vit_checkpoint: Path,
                                                                   capsys, caplog) -> None:
    """SIGKILL of the driver (and its embedded Ray) after the listing, before any shard is published,
    and once the first shard is published while others are in flight; then the same command again
    (in this process, on the shared Ray: the rerun's own Ray start is not what is tested)."""
    from jobs.label import main

    out = tmp_path / "out"
    args = [images, "--out", out, "--pretrained", tiny_vit_checkpoint, *FLAGS]
    reached = {"listed": lambda: (out / "_bifta_inputs" / "_index.json").exists() and not part_paths(out),
               "first-shard": lambda: bool(part_paths(out))}[moment]
    log = tmp_path / "killed.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(label_cmd(args), cwd=REPO_ROOT, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while not reached() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            hit = reached()
        finally:
            kill_session(proc)
    assert hit, f"never reached '{moment}' before the run ended:\n" + log.read_text()[-3000:]
    before = {p.name for p in part_paths(out)}
    assert len(before) < 4, "every shard was already published: nothing was interrupted"
    # leftovers of an interrupted publish look complete but are not published names: never done
    for name in (".part-00001-00001.parquet.x1y2.tmp", "part-00001-00001.parquet.tmp"):
        (out / name).write_bytes((out / "_bifta_inputs" / "00000.parquet").read_bytes())
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="bifta"):
        rc = main([str(a) for a in args])
    assert rc == 0, capsys.readouterr().err[-3000:]
    if before:
        assert "resuming" in caplog.text, caplog.text[-2000:]
    assert not _diff(_one_row_each(out), reference[1])
    assert before <= {p.name for p in part_paths(out)}


def test_run_id_changes_with_precision_and_activation() -> None:
    from pipelines.pipeline import run_id_for

    config = LabelConfig(input="x", labels=["a,b"], out="o")
    base = {"model": "ViT-B-32", "pretrained": "openai", "precision": "fp32", "activation": "quick_gelu"}
    ids = {run_id_for(config, ["h"], {**base, **change}) for change in
           ({}, {"precision": "fp16"}, {"precision": "bf16"}, {"activation": "gelu"})}
    assert len(ids) == 4
    assert run_id_for(config, ["h"], dict(base)) == run_id_for(config, ["h"], dict(base, weights="ignored"))


def test_shard_blocks_put_the_first_shards_alone_and_cap_the_rest():
    from pipelines.plan import shard_blocks

    todo = [(f"{i:05d}-00000", 10) for i in range(1000)]
    blocks = shard_blocks(todo, early=3, max_blocks=7)
    assert [len(b) for b in blocks[:3]] == [1, 1, 1]
    assert len(blocks) == 3 + 7
    sizes = [len(b) for b in blocks[3:]]
    assert max(sizes) - min(sizes) <= 1
    assert [item for block in blocks for item in block] == todo  # every shard once, in order
    assert shard_blocks(todo[:2], early=3, max_blocks=7) == [[todo[0]], [todo[1]]]


def test_start_gate_holds_waiters_until_opened_and_times_out(ray_local) -> None:
    import ray

    from pipelines.plan import open_start_gate, start_gate_for_pass

    first, second = start_gate_for_pass(), start_gate_for_pass()
    gate, key = first
    assert second[0]._actor_id == gate._actor_id and second[1] != key  # one actor, a key per pass
    assert ray.get(gate.wait.remote(key, 0.2)) is False  # nobody opened it: the wait ends by its timeout
    waiter = gate.wait.remote(key, 30.0)
    other = gate.wait.remote(second[1], 30.0)
    ready, _ = ray.wait([waiter, other], timeout=0.5)
    assert not ready  # still held
    open_start_gate(first)
    assert ray.get(waiter, timeout=10) is True
    ready, _ = ray.wait([other], timeout=0.5)
    assert not ready  # another pass's gate stays shut
    open_start_gate(first)  # a restarted encoder opens it again: harmless
    assert ray.get(gate.wait.remote(key, 0.1)) is True
    open_start_gate(second)
    assert ray.get(other, timeout=10) is True
