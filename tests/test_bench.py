"""Smoke tests of ``python -m jobs.bench {pgs,pipeline,cascade,relabel,pgs-train,scaling}`` and their flag checks.

The benchmarks run for real but tiny (``bifta-tiny-vit``, 64-px inputs, a handful of images), so
their targets may well be missed: exit 1 is as good as 0 here. What is checked is the contract:
the benchmark ends normally, its last stdout line is one JSON object with the documented keys, and
a bad flag is one ``error:`` line with exit 2 before any work starts. They run in this process, on
the tests' shared Ray; the scaling driver case runs one of its two sizes (two label commands of its
own), and one bad flag is given on a real command line.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bifta_core.errors import ConfigError
from jobs import bench
from pipeline_helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "imagenet-sample" / "images"
EXAMPLE_LABELSET = ROOT / "jobs" / "examples" / "labelset"
TINY = ["--model", "bifta-tiny-vit", "--pretrained", "random"]

PGS_KEYS = {"speedup_keep_0.5", "speedup_keep_0.7", "agreement_keep_0.5", "agreement_keep_0.7",
            "agreement_random_keep_0.5", "views_per_s_keep_1.0", "views_per_s_keep_0.5", "ok"}
PIPELINE_KEYS = {"ratio", "pipeline_images_per_s", "bare_encoder_images_per_s", "bare_encoders_images_per_s",
                 "encoders", "errors", "target", "ok"}
SCALING_KEYS = {"benchmark", "ok", "n", "factor", "runs", "targets", "marginal_images_per_second"}
SCALING_TARGETS = {"throughput_ratio", "driver_rss_growth", "label_set_stage_flat", "label_set_cache_hit",
                   "no_error_rows"}


def _verdict(code: int, stdout: str, stderr: str) -> tuple[int, dict, str]:
    """(exit code, last-line JSON, stderr) of a benchmark that ended normally."""
    assert code in (0, 1), f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"no output\n{stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    assert result["ok"] is (code == 0)  # exit code and verdict agree
    return code, result, stderr


def _bench(capsys, *argv: str) -> tuple[int, dict, str]:
    """``bifta bench ARGV`` in this process, on the tests' shared local Ray (``local_ray``): starting a
    Ray and importing torch in a subprocess per benchmark cost ~10 s each."""
    code = bench.main(list(argv))
    out, err = capsys.readouterr()
    return _verdict(code, out, err)


@pytest.fixture(scope="module")
def photos() -> Path:
    if not PHOTOS.is_dir() or not any(PHOTOS.iterdir()):
        pytest.skip(f"reference photos not found: expected {PHOTOS} (../shared next to the checkout)")
    return PHOTOS


# ------------------------------------------------------------------------------- smoke runs
def test_pgs_bench_smoke(photos, capsys):
    _, result, _ = _bench(capsys, "pgs", *TINY, "--photos", str(photos), "--labels", str(EXAMPLE_LABELSET),
                          "--images", "3", "--num-views", "3", "--repeats", "1")
    assert result["benchmark"] == "pgs"
    assert PGS_KEYS <= set(result)
    assert result["agreement_keep_1.0"] == 1.0  # the unmasked run is the reference
    assert 0.0 <= result["agreement_keep_0.5"] <= 1.0 and result["speedup_keep_0.5"] > 0


def test_pipeline_bench_smoke(local_ray, tmp_path, capsys):
    _, result, _ = _bench(capsys, "pipeline", *TINY, "--images", "6", "--num-views", "3", "--batch-size", "2",
                          "--workdir", str(tmp_path / "work"))
    assert result["benchmark"] == "pipeline"
    assert PIPELINE_KEYS <= set(result)
    assert result["errors"] == 0 and result["images"] == 6
    assert result["encoders"] == 1  # no GPU here: one CPU encode actor
    assert result["bare_encoders_images_per_s"] == pytest.approx(
        result["bare_encoder_images_per_s"] * result["encoders"], rel=1e-3)
    assert result["ratio"] == pytest.approx(
        result["pipeline_images_per_s"] / result["bare_encoders_images_per_s"], rel=1e-2)


def test_cascade_bench_smoke(local_ray, tmp_path, capsys):
    code, result, _ = _bench(capsys, "cascade", *TINY, "--images", "8", "--num-views", "4", "--workdir",
                             str(tmp_path / "work"))
    assert result["benchmark"] == "cascade" and result["images"] == 8
    assert [r["share_with_views"] for r in result["cascade"]] == sorted(r["share_with_views"] for r in result["cascade"])
    ours = next(r for r in result["cascade"] if r["threshold"] == result["threshold"])
    # fewer images through views is less encoder work; its T sends about half of them
    assert 0 < ours["share_with_views"] < 1 and ours["encoder_work_ratio"] < 1 and code == 0
    assert ours["views_per_image"] < result["full_views_per_image"]


def test_relabel_bench_smoke(local_ray, tmp_path, capsys):
    _, result, _ = _bench(capsys, "relabel", *TINY, "--images", "6", "--batch-size", "2", "--workdir", str(tmp_path / "w"))
    assert result["benchmark"] == "relabel" and result["images"] == 6 and result["dtype"] == "float16"
    assert result["ratio"] == pytest.approx(result["relabel_images_per_s"] / result["label_images_per_s"], rel=1e-2)
    # the tiny model's 64-wide float16 embeddings: 128 bytes of values per image, plus Parquet's own
    assert 128 <= result["bytes_per_image"] < 4000


def test_pipeline_bench_fails_on_error_rows(local_ray, tmp_path, capsys):
    """Error rows are cheap: a run with any must fail whatever its ratio, with a clear message."""
    images = tmp_path / "input"
    bench._write_images(images, 1)  # img_00000.jpg
    # Named so that each batch of 2 holds an error row (a batch of only good images next to one of
    # only broken ones currently trips a Ray schema clash in the pipeline, which is not tested here).
    for name in ("a_broken.jpg", "z_broken.jpg"):
        (images / name).write_bytes(b"not a jpeg at all")
    code, result, stderr = _bench(capsys, "pipeline", *TINY, "--input", str(images), "--num-views", "2",
                                  "--batch-size", "2", "--workdir", str(tmp_path / "work"))
    assert code == 1
    assert result["ok"] is False and result["ratio"] is None
    assert result["errors"] == 2 and result["processed"] == 3
    assert "bench pipeline FAILED: 2 of 3 images were error rows" in stderr


def test_scaling_bench_smoke(local_ray, tmp_path, capsys):
    _, result, _ = _bench(capsys, "scaling", "--only", "throughput", "--n", "4", "--factor", "2",
                          "--work-dir", str(tmp_path / "work"))
    assert result["benchmark"] == "scaling"
    assert SCALING_KEYS <= set(result)
    assert SCALING_TARGETS == set(result["targets"])
    # warm-up N, the median of three one-batch start-up runs (default --batch-size 8, capped by the 8
    # images), N, 2×N
    assert [r["name"] for r in result["runs"]] == ["warm-up", "start-up", "N", "2xN"]
    assert [r["images"] for r in result["runs"]] == [4, 8, 4, 8]
    startups = result["startup_runs_s"]
    assert len(startups) == 3 and result["targets"]["throughput_ratio"]["startup_s"] == round(sorted(startups)[1], 3)
    assert result["runs"][1]["encode_seconds"] == sorted(startups)[1]
    assert result["targets"]["no_error_rows"]["ok"] is True


def _driver_args(*argv: str):
    import argparse

    from jobs.bench_scaling import add_scaling_arguments

    parser = argparse.ArgumentParser()
    add_scaling_arguments(parser)
    return parser.parse_args(list(argv))


def test_scaling_bench_driver_case_smoke(tmp_path, monkeypatch):
    """One size of the driver case, for real: a ``bifta label`` command stopped at its first part file,
    then the same command resuming a mostly-finished OUT to the end, each watched for its peak RSS.
    (``bench scaling --only driver`` runs this for both sizes and compares them with ``driver_targets``,
    tested below without the four commands it would cost.)"""
    from jobs.bench_scaling import generate_label_set, run_driver_case

    for key, value in cli_env().items():  # the environment the commands inherit (run_driver_case drops RAY_ADDRESS)
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    args = _driver_args("--driver-shard-size", "100", "--driver-left-shards", "1", "--driver-model", "bifta-tiny-vit")
    work = tmp_path / "work"
    work.mkdir()
    labels = generate_label_set(str(work / "labelset"))
    figures = run_driver_case(str(work), 300, args, labels, str(work / "labelset-cache"))
    assert figures.rows == 300 and figures.resume_rc == 0
    assert figures.fresh_peak_rss_mb > 100 and figures.resume_peak_rss_mb > 100
    assert figures.peak_rss_mb == max(figures.fresh_peak_rss_mb, figures.resume_peak_rss_mb)
    assert 0 < figures.first_part_s < 300 and 0 < figures.resume_first_part_s <= figures.resume_total_s
    assert not (work / "driver-out-300").exists() and not (work / "driver-300.parquet").exists()  # cleaned up


def test_scaling_working_rate_leaves_out_the_start_up_run_and_its_images():
    from jobs.bench_scaling import RunFigures, working_rate

    def run(images: int, seconds: float) -> RunFigures:
        return RunFigures(name="r", images=images, images_per_second=0.0, steady_images_per_second=0.0,
                          encode_seconds=seconds, total_seconds=seconds, label_set_seconds=0.0,
                          driver_peak_rss_mb=0.0, text_encoded=False, cache_hits=1, errors=0)

    # T0 = 5 s labelled 8 images: 192 more images in 5 more seconds, at N and at 10×N alike
    assert working_rate(run(200, 10.0), 5.0, 8) == pytest.approx(38.4)
    assert working_rate(run(2000, 55.0), 5.0, 8) == pytest.approx(39.84)
    assert working_rate(run(200, 4.0), 5.0, 8) == 0.0  # shorter than T0: no rate
    assert working_rate(run(4, 6.0), 5.0, 8) == 0.0  # all within the one batch: no images beyond it, never < 0


def test_scaling_bench_driver_targets():
    from jobs.bench_scaling import DriverFigures, driver_targets

    args = _driver_args("--driver-max-growth-mb", "50", "--driver-max-peak-mb", "1200",
                        "--driver-max-first-part-s", "20")
    small = DriverFigures(rows=300, fresh_peak_rss_mb=400.0, first_part_s=5.0, resume_peak_rss_mb=420.0,
                          resume_first_part_s=4.0, resume_total_s=6.0, resume_rc=0)
    large = DriverFigures(rows=600, fresh_peak_rss_mb=430.0, first_part_s=6.0, resume_peak_rss_mb=465.0,
                          resume_first_part_s=4.0, resume_total_s=7.0, resume_rc=0)
    targets = driver_targets(small, large, args)
    assert set(targets) == {"driver_peak_growth", "driver_peak", "first_part_file", "driver_runs_complete"}
    assert targets["driver_peak_growth"]["mb"] == 45.0 and all(t["ok"] for t in targets.values())
    assert targets["driver_runs_complete"]["rc"] == {300: 0, 600: 0}
    worse = dataclasses.replace(large, resume_peak_rss_mb=480.0, first_part_s=25.0, resume_rc=-9)
    failed = {name for name, t in driver_targets(small, worse, args).items() if not t["ok"]}
    assert failed == {"driver_peak_growth", "first_part_file", "driver_runs_complete"}
    # only the large size's peak counts against --driver-max-peak-mb
    assert not driver_targets(small, large, _driver_args("--driver-max-peak-mb", "450"))["driver_peak"]["ok"]


PGS_TRAIN_KEYS = {"benchmark", "images_per_s_mask_0.0", "images_per_s_mask_0.5", "speedup_mask_0.5",
                  "kept_tokens_mask_0.0", "kept_tokens_mask_0.5", "target_speedup_mask_0.5", "ok"}


def test_pgs_train_bench_smoke(capsys):
    _, result, _ = _bench(capsys, "pgs-train", *TINY, "--batch-size", "4", "--repeats", "1")
    assert result["benchmark"] == "pgs-train"
    assert PGS_TRAIN_KEYS <= set(result)
    assert result["kept_tokens_mask_0.0"] == 16 and result["kept_tokens_mask_0.5"] == 8  # 4x4 patch grid
    assert result["speedup_mask_0.5"] == pytest.approx(
        result["images_per_s_mask_0.5"] / result["images_per_s_mask_0.0"], rel=1e-2)


PGS_TRAIN_BAD_FLAGS = [(["--batch-size", "1"], "--batch-size"), (["--repeats", "0"], "--repeats"),
                       (["--model", "bifta-tiny-rn"], "--model")]


@pytest.mark.parametrize("argv,flag", PGS_TRAIN_BAD_FLAGS, ids=[" ".join(a) for a, _ in PGS_TRAIN_BAD_FLAGS])
def test_pgs_train_bad_flag_is_one_error_line(argv, flag, capsys):
    assert bench.main(["pgs-train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


# ------------------------------------------------------------------------------- flag checks
BAD_FLAGS = [
    (["pipeline", "--view-batch-size", "0"], "--view-batch-size"),
    (["pipeline", "--images", "-3"], "--images"),
    (["pipeline", "--num-views", "0"], "--num-views"),
    (["pipeline", "--batch-size", "0"], "--batch-size"),
    (["pipeline", "--num-encoders", "0"], "--num-encoders"),
    (["pgs", "--repeats", "0"], "--repeats"),
    (["pgs", "--view-batch-size", "0"], "--view-batch-size"),
    (["pgs", "--images", "0"], "--images"),
    (["pgs", "--num-views", "-1"], "--num-views"),
    (["pgs", "--seed", "-1"], "--seed"),
    (["scaling", "--n", "0"], "--n"),
    (["scaling", "--factor", "-2"], "--factor"),
    (["scaling", "--batch-size", "0"], "--batch-size"),
    (["scaling", "--num-views", "0"], "--num-views"),
    (["scaling", "--image-side", "4"], "--image-side"),
    (["scaling", "--max-rss-growth", "-0.1"], "--max-rss-growth"),
    (["scaling", "--method", "nope"], "--method"),
    (["scaling", "--driver-rows", "10"], "--driver-rows"),
    (["scaling", "--driver-rows", "9,3"], "--driver-rows"),
    (["scaling", "--driver-shard-size", "0"], "--driver-shard-size"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_error_line_before_any_work(argv, flag, tmp_path, capsys):
    work = tmp_path / "work"
    where = {"pipeline": ["--workdir", str(work)], "scaling": ["--work-dir", str(work)],
             "pgs": ["--photos", str(tmp_path / "no-photos")]}[argv[0]]
    assert bench.main([*argv, *where]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert not work.exists()  # refused up front: nothing generated, no Ray started for it


def test_bad_flag_from_the_command_line_exits_2():
    proc = subprocess.run([sys.executable, "-m", "jobs.bench", "pgs", "--repeats", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --repeats must be a positive integer, got 0"], proc.stderr


# ------------------------------------------------------------------------------- GPU timing
class _FakeCudaModel:
    """Records encodes and synchronisations in order, as if on a GPU."""

    image_size = 8
    device = torch.device("cuda", 0)

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float()

    def encode_images(self, pixels: torch.Tensor, keep=None) -> torch.Tensor:
        self.events.append(f"encode {pixels.shape[0]}")
        return torch.zeros(pixels.shape[0], 4)


def test_bare_encoder_synchronises_the_gpu_around_the_clock(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    real_clock = bench.time.perf_counter

    def clock() -> float:
        events.append("clock")
        return real_clock()

    monkeypatch.setattr(bench.time, "perf_counter", clock)
    ips = bench.bare_encoder_images_per_second(_FakeCudaModel(events), views_per_image=2, images=2,
                                               view_batch_size=4)
    assert ips > 0
    # warm-up, sync, clock, the 2 whole images, their 4 crops (one batch of 4), sync, clock
    assert events == ["encode 2", "sync", "clock", "encode 2", "encode 4", "sync", "clock"]


def test_bare_encoder_refuses_a_zero_batch(tiny_vit_model):
    with pytest.raises(ConfigError):
        bench.bare_encoder_images_per_second(tiny_vit_model, views_per_image=2, images=2, view_batch_size=0)
