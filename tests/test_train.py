"""``bifta train``: CLIP-PGS contrastive training on Ray Train, and labelling with what it trained.

A tiny ViT (``bifta-tiny-vit``, 64-px inputs, 16 patches) is trained from scratch on synthetic
captioned images (``tests/train_helpers.py``: 12 colour x shape classes on textured backgrounds),
on CPU, in 150 steps. Asserted: the loss falls, held-out image→text retrieval rises
far above chance, the checkpoint labels held-out images through ``run_label_job`` far above
chance, two DDP workers end with identical weights, and a SIGKILL followed by ``--resume``
repeats and skips no step (and reproduces the killed run's losses exactly).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from bifta_core.errors import ConfigError
from bifta_core.method.training import (MAX_LOGIT_SCALE, TrainConfig, Trainer, cosine_lr_lambda, decode_train_image,
                                 param_groups, sample_index)
from pipelines.pipeline import EMBEDDED_RAY_SYSTEM_CONFIG
from tests.pipeline_helpers import REPO_ROOT, cli_env
from tests.train_helpers import CLASSES, make_sample, png_bytes, write_dataset

TINY = "bifta-tiny-vit"
TRAIN_IMAGES = 512
HELD_OUT = 96


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 3:
        # an embedded Ray left by an earlier test (run_label_job starts one with the machine's 2 CPUs)
        # would give the two training workers every CPU and starve their data stream
        ray.shutdown()
    started = not ray.is_initialized()
    if started:
        # 3 logical CPUs: two training workers plus one decode task at a time
        ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-data")
    train = write_dataset(root / "train", range(TRAIN_IMAGES))
    held = write_dataset(root / "held-out", range(100_000, 100_000 + HELD_OUT))
    return {"train": train, "held_out": held, "root": root}


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _retrieval_top1(model, manifest: Path) -> float:
    """Image→text top-1 over the held-out pairs: each image against every held-out caption."""
    table = pq.read_table(manifest).to_pylist()
    from PIL import Image

    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(r["uri"]).convert("RGB")).transpose(2, 0, 1).copy())
                          for r in table])
    img = model.encode_images(model.normalize_pixels(pixels))
    txt = model.encode_text([r["caption"] for r in table])
    return float(((img @ txt.t()).argmax(1) == torch.arange(len(table))).float().mean())


# ---------------------------------------------------------------------------------------------- pure parts
def test_schedule_param_groups_and_clamp() -> None:
    from bifta_core.io.models import load_model

    f = cosine_lr_lambda(warmup=10, total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))  # cosine decays monotonically after warm-up

    cm = load_model(TINY, "random", device="cpu")
    groups = param_groups(cm.model, 0.2)
    names = {id(p): n for n, p in cm.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.2
    assert "logit_scale" in no_decay and not any("bias" in n or ".ln" in n for n in decay)
    assert "visual.conv1.weight" in decay and "text_projection" in decay

    cfg = TrainConfig(data=["x"], out="x", model=TINY, steps=2, batch_size=4, lr=1.0, warmup=1, pgs_mask=0.5)
    with torch.no_grad():
        cm.model.logit_scale.fill_(MAX_LOGIT_SCALE + 0.5)
    trainer = Trainer(cm.model, cfg, 2, mean=cm.mean, std=cm.std)
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    result = trainer.train_step([(pixels, cm.tokenizer(["a", "b", "c", "d"]))])
    assert result.logit_scale <= 100.0 + 1e-4  # CLIP's temperature clamp
    assert result.kept_tokens == 8 and result.masked_tokens == 8  # 16 patches at mask 0.5


def test_accumulation_sees_the_whole_batch() -> None:
    """Two micro-batches of 4 with accumulation give the same loss and update as one batch of 8."""
    from bifta_core.io.models import load_model

    pixels = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    updated = []
    for accum in (1, 2):
        cm = load_model(TINY, "random", device="cpu")
        tokens = cm.tokenizer([f"caption {i}" for i in range(8)])
        cfg = TrainConfig(data=["x"], out="x", model=TINY, steps=1, batch_size=8 // accum, accum_steps=accum,
                          warmup=1, pgs_mask=0.0)
        trainer = Trainer(cm.model, cfg, 1, mean=cm.mean, std=cm.std)
        chunks = [(pixels[i:i + 8 // accum], tokens[i:i + 8 // accum]) for i in range(0, 8, 8 // accum)]
        result = trainer.train_step(chunks)
        updated.append((result.loss, cm.model.visual.conv1.weight.detach().clone()))
    assert updated[0][0] == pytest.approx(updated[1][0], rel=1e-5)
    assert torch.allclose(updated[0][1], updated[1][1], atol=1e-6)


def test_sample_stream_and_augmentation_are_deterministic() -> None:
    rows, epochs = sample_index(np.arange(20), num_samples=10, epoch_len=8, seed=3)
    assert sorted(rows[:8]) == sorted(set(rows[:8])) and epochs.tolist() == [0] * 8 + [1] * 8 + [2] * 4
    again, _ = sample_index(np.arange(20), num_samples=10, epoch_len=8, seed=3)
    assert rows.tolist() == again.tolist()
    # a cache shared by runs of other seeds (a reused Ray worker process) never leaks their order
    cache: dict = {}
    other, _ = sample_index(np.arange(20), num_samples=10, epoch_len=8, seed=4, perm_cache=cache)
    cached, _ = sample_index(np.arange(20), num_samples=10, epoch_len=8, seed=3, perm_cache=cache)
    assert cached.tolist() == rows.tolist() and other.tolist() != rows.tolist()
    blob = png_bytes(make_sample(0)[0])
    a = decode_train_image(blob, 32, (0.5, 1.0), 0, "img", 0)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, decode_train_image(blob, 32, (0.5, 1.0), 0, "img", 0))
    assert not np.array_equal(a, decode_train_image(blob, 32, (0.5, 1.0), 0, "img", 1))  # new crop per epoch


# ---------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("case", ["no-data", "bad-mask", "steps-and-epochs", "no-caption", "missing-manifest",
                                  "exists-no-resume", "bad-model"])
def test_cli_user_errors_one_line_exit_2(case: str, data, tmp_path: Path, capsys) -> None:
    from jobs.cli import main

    base = ["train", "--data", str(data["train"]), "--out", str(tmp_path / "out"), "--model", TINY]
    argv = {
        "no-data": ["train", "--out", str(tmp_path / "o")],
        "bad-mask": [*base, "--pgs-mask", "1.5"],
        "steps-and-epochs": [*base, "--steps", "3", "--epochs", "1"],
        "no-caption": ["train", "--data", str(data["held_out"]).replace("manifest.parquet", "nocap.csv"),
                       "--out", str(tmp_path / "o"), "--model", TINY],
        "missing-manifest": ["train", "--data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o"),
                             "--model", TINY],
        "exists-no-resume": [*base, "--steps", "1"],
        "bad-model": [*base, "--model", "ViT-Nope-99"],
    }[case]
    if case == "no-caption":
        Path(argv[2]).write_text("uri,text\na.png,hello\n")
    if case == "exists-no-resume":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "train_config.json").write_text(json.dumps(TrainConfig().to_dict()))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--batch-size"):
        TrainConfig(data=["x"], out="o", batch_size=0).validate()
    with pytest.raises(ConfigError, match="--pgs-mask"):
        TrainConfig(data=["x"], out="o", pgs_mask=1.0).validate()
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"bogus": 1})


def _report_decisions_on_rank(rank: int, init_file: str, flags: list[list[bool]], out: str) -> None:
    import torch.distributed as dist

    from pipelines.train import rank_zero_decides

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(flags))
    try:
        got = [rank_zero_decides(flag, torch.device("cpu")) for flag in flags[rank]]
    finally:
        dist.destroy_process_group()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(got))


def test_every_rank_reports_at_the_steps_rank_zero_chose(tmp_path: Path) -> None:
    """``ray.train.report`` is a barrier: ranks whose clocks disagree on "10 s since the last report"
    must still report at the same steps (else one waits in the barrier, the other in DDP, forever)."""
    from pipelines.train import rank_zero_decides

    assert rank_zero_decides(True, torch.device("cpu")) is True  # one process: its own decision
    assert rank_zero_decides(False, torch.device("cpu")) is False
    flags = [[True, False, True, False], [False, True, True, False]]  # each rank's own clock
    torch.multiprocessing.spawn(_report_decisions_on_rank, args=(str(tmp_path / "rendezvous"), flags, str(tmp_path)),
                                nprocs=2)
    got = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert got == [flags[0], flags[0]]


# ---------------------------------------------------------------------------------------------- train → label
def test_train_on_two_workers_then_label_far_above_chance(ray_local, data, tmp_path: Path) -> None:
    """Two DDP workers, each 2 micro-batches of 16 per step (global batch 64): they end with identical
    weights, and the checkpoint labels held-out images far above chance."""
    from bifta_core.config import LabelConfig, ModelConfig
    from bifta_core.io.models import load_model
    from pipelines.pipeline import run_label_job
    from pipelines.train import run_train_job

    before = _retrieval_top1(load_model(TINY, "random", device="cpu"), data["held_out"])
    out = tmp_path / "run"
    steps = 150
    summary = run_train_job(TrainConfig(
        data=[str(data["train"])], out=str(out), model=TINY, pretrained="random", pgs_mask=0.5, steps=steps,
        batch_size=16, accum_steps=2, num_workers=2, lr=2e-3, warmup=16, weight_decay=0.1, checkpoint_every=75,
        seed=0))
    assert summary["steps"] == steps and summary["steps_this_run"] == steps and summary["masked_tokens"] == 8
    assert summary["num_workers"] == 2 and summary["global_batch"] == 64
    assert len(summary["weights_sha256_per_rank"]) == 2 and summary["replicas_identical"] is True

    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert [int(r["samples_seen"]) for r in rows] == [64 * s for s in range(1, steps + 1)]
    assert {int(r["masked_tokens"]) for r in rows} == {8} and {int(r["kept_tokens"]) for r in rows} == {8}
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    assert pq.read_table(out / "metrics.parquet").num_rows == steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step-00000075", "step-00000150"]

    trained = load_model(TINY, str(out / "model.pt"), device="cpu")  # a plain open_clip state dict
    after = _retrieval_top1(trained, data["held_out"])
    chance = 1 / HELD_OUT
    assert before < 3 * chance and after >= 5 * chance and after > before + 4 * chance, (before, after)

    preds = tmp_path / "preds"
    label_summary = run_label_job(LabelConfig(
        input=str(data["held_out"]), labels=[",".join(CLASSES)], out=str(preds), method="clip",
        model=ModelConfig(model=TINY, pretrained=str(out / "model.pt"), device="cpu"), labelset_cache=""))
    assert label_summary["ok"] == HELD_OUT and label_summary["errors"] == 0
    table = pq.read_table(sorted(preds.glob("part-*.parquet"))).to_pylist()
    accuracy = np.mean([r["label"] == r["true_label"] for r in table])
    assert not any(r["random_weights"] for r in table)
    print(f"retrieval top-1 {before:.3f} -> {after:.3f} (chance {chance:.3f}); labelling accuracy {accuracy:.3f} "
          f"(chance {1 / len(CLASSES):.3f}); loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}")
    assert accuracy >= 0.3, f"labelling accuracy {accuracy:.3f} (chance {1 / len(CLASSES):.3f})"


# ---------------------------------------------------------------------------------------------- kill + resume
def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines() if len(line.split()) == 2)
            if int(s) == sid and int(p) != os.getpid()]


def test_kill_then_resume_repeats_and_skips_no_step(ray_local, data, tmp_path: Path, caplog) -> None:
    """SIGKILL ``python -m jobs.train`` (and its Ray) mid-run, then ``--resume`` in this process."""
    from pipelines.train import run_train_job

    out = tmp_path / "killed"
    steps, every, batch = 40, 8, 16
    args = [sys.executable, "-m", "jobs.train", "--data", str(data["train"]), "--out", str(out), "--model", TINY,
            "--pgs-mask", "0.5", "--steps", str(steps), "--batch-size", str(batch), "--warmup", "5",
            "--checkpoint-every", str(every), "--seed", "7", "--quiet"]
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                if (out / "metrics.csv").exists() and len(_metrics(out)) >= every + every // 2:
                    break
                time.sleep(0.02)
            finished_early = proc.poll() is not None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            for pid in _session_pids(proc.pid):  # Ray helpers of the killed run
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not finished_early, log_path.read_text()[-3000:]
    killed_rows = _metrics(out)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    resumed_from = latest["step"]
    assert resumed_from % every == 0 and 0 < resumed_from < steps
    assert len(killed_rows) < steps

    with caplog.at_level(logging.INFO, logger="bifta.train"):
        summary = run_train_job(TrainConfig(
            data=[str(data["train"])], out=str(out), model=TINY, pgs_mask=0.5, steps=steps, batch_size=batch,
            warmup=5, checkpoint_every=every, seed=7, resume=True))
    assert f"resuming from step {resumed_from}" in caplog.text
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), "a step was repeated or skipped"
    assert [int(r["samples_seen"]) for r in rows] == [batch * s for s in range(1, steps + 1)]
    # steps up to the checkpoint are the killed run's own rows; the steps it ran past the checkpoint
    # were redone from the same data position, optimiser and schedule: same losses
    assert rows[:resumed_from] == killed_rows[:resumed_from]
    for old, new in zip(killed_rows[resumed_from:], rows[resumed_from:len(killed_rows)]):
        assert math.isclose(float(old["loss"]), float(new["loss"]), rel_tol=1e-4), (old, new)
        assert float(old["lr"]) == pytest.approx(float(new["lr"]), rel=1e-9)
    assert summary["resumed_from_step"] == resumed_from and summary["steps_this_run"] == steps - resumed_from
    assert summary["steps"] == steps
