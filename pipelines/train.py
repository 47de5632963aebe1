"""CLIP / CLIP-PGS training on Ray Train: a Ray Dataset of (image, caption) streamed to DDP workers.

Driver (:func:`run_train_job`): reads the manifest(s), plans steps and the sample stream, finds the
checkpoint to resume from, and runs a ``TorchTrainer`` (one worker per GPU, or CPU workers with
gloo). Data: ``ray.data.range`` over the remaining stream positions → CPU tasks map each position
to a manifest row (per-epoch permutation seeded from (seed, epoch)), read, decode and augment it
and tokenize its caption → ``get_dataset_shard("train")`` on every worker. Workers run
:class:`bifta_core.method.training.Trainer`; rank 0 writes checkpoints, the metrics log and the summary.

Output layout under ``--out`` (local or ``s3://``)::

    train_config.json                  settings of the run (a resume must match them)
    checkpoints/step-00001000/model.pt open_clip state dict (``bifta label --pretrained`` loads it)
    checkpoints/step-00001000/state.pt optimiser, LR schedule, grad scaler, step, stream position
    checkpoints/latest.json            the newest complete checkpoint (written last)
    model.pt                           the final weights
    metrics.csv / metrics.parquet      one row per optimiser step
    summary.json                       the end-of-run summary
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from bifta_core.io import storage
from bifta_core.errors import BiftaUserError, ConfigError, InputError
from bifta_core.method.training import TrainConfig

logger = logging.getLogger("bifta.train")

CONFIG_FILE = "train_config.json"
LATEST_FILE = "checkpoints/latest.json"
METRICS_CSV = "metrics.csv"
METRICS_PARQUET = "metrics.parquet"
SUMMARY_FILE = "summary.json"
FINAL_MODEL = "model.pt"
METRIC_COLUMNS = ("step", "epoch", "samples_seen", "loss", "lr", "logit_scale", "temperature",
                  "images_per_s", "kept_tokens", "masked_tokens", "step_seconds", "time")
#: Minimum seconds between two ``ray.train.report`` calls (see :func:`train_loop`).
REPORT_EVERY_S = 10.0
#: Settings a resumed run must share with the run it resumes (else steps would not line up).
RESUME_KEYS = ("data", "model", "pgs_mask", "steps", "epochs", "batch_size", "accum_steps", "num_workers",
               "lr", "weight_decay", "beta1", "beta2", "eps", "warmup", "seed", "aug_scale", "caption_column")


@dataclass(frozen=True)
class Plan:
    num_samples: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int

    @property
    def epoch_len(self) -> int:
        return self.steps_per_epoch * self.global_batch


# ------------------------------------------------------------------------------------ manifest
def _read_table(uri: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not uri.endswith((".parquet", ".csv")):
        raise InputError(f"--data {uri} must be a .parquet or .csv manifest")
    if not storage.exists(uri):
        raise InputError(f"--data {uri} not found")
    data = storage.read_bytes(uri)
    try:
        if uri.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data))
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"--data {uri} is not a readable manifest: {str(exc).splitlines()[0]}") from exc


def load_manifest(cfg: TrainConfig) -> pa.Table:
    """All manifests as one table ``image_id, caption`` + ``uri`` (string) or ``image`` (bytes)."""
    tables = []
    for uri in cfg.data:
        t = _read_table(uri)
        names = set(t.column_names)
        if cfg.caption_column not in names:
            raise InputError(f"--data {uri} has no '{cfg.caption_column}' column (--caption-column)")
        if cfg.uri_column in names:
            src = ("uri", t.column(cfg.uri_column).cast(pa.string()))
        elif cfg.image_column in names:
            src = ("image", t.column(cfg.image_column).cast(pa.binary()))
        else:
            raise InputError(f"--data {uri} has neither a '{cfg.uri_column}' nor an '{cfg.image_column}' column")
        if cfg.id_column in names:
            ids = t.column(cfg.id_column).cast(pa.string())
        elif src[0] == "uri":
            ids = src[1]
        else:
            ids = pa.array([f"{uri}#{i}" for i in range(t.num_rows)])
        tables.append(pa.table({"image_id": ids, "caption": t.column(cfg.caption_column).cast(pa.string()),
                                src[0]: src[1]}))
    kinds = {"uri" if "uri" in t.column_names else "image" for t in tables}
    if len(kinds) > 1:
        raise InputError("--data manifests mix uri and image-bytes columns; use one kind")
    table = pa.concat_tables(tables).combine_chunks()
    if table.num_rows == 0:
        raise InputError("--data manifests hold no rows")
    if table.column("caption").null_count:
        raise InputError(f"--data has {table.column('caption').null_count} rows without a caption")
    return table


def make_plan(cfg: TrainConfig, num_samples: int) -> Plan:
    g = cfg.global_batch
    steps_per_epoch = num_samples // g  # whole global batches only (drop_last)
    if steps_per_epoch == 0:
        raise ConfigError(f"the manifests hold {num_samples} samples, fewer than one global batch of {g} "
                          f"(--batch-size x --accum-steps x --num-workers)")
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * steps_per_epoch
    if cfg.warmup is not None and cfg.warmup > total:
        raise ConfigError(f"--warmup {cfg.warmup} is longer than the run ({total} steps)")
    return Plan(num_samples, steps_per_epoch, total, g)


# ------------------------------------------------------------------------------------ data stage
@lru_cache(maxsize=4)
def _tokenizer(model_name: str):
    import open_clip

    from bifta_core.io.models import register_bundled_configs

    register_bundled_configs()
    return open_clip.get_tokenizer(model_name)


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}
_TABLE_CACHE: dict[str, pa.Table] = {}


def _manifest(holder: list) -> pa.Table:
    """The manifest from the object store, fetched once per worker process."""
    import ray

    key = holder[0].hex()
    if key not in _TABLE_CACHE:
        _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = ray.get(holder[0])
    return _TABLE_CACHE[key]


def decode_batch(batch: dict[str, np.ndarray], *, holder: list, start: int, num_samples: int, epoch_len: int,
                 seed: int, size: int, scale: tuple[float, float], model_name: str) -> dict[str, np.ndarray]:
    """Stream positions → ``pixels`` uint8 ``[B,3,S,S]``, ``tokens`` ``[B,ctx]``, ``position``, ``epoch``.

    Every random choice (which row sits at a position, the crop) is a function of (seed, position)
    or (seed, image id, epoch), so any task on any node produces the same sample for a position.
    """
    from bifta_core.method.training import decode_train_image, sample_index

    table = _manifest(holder)
    positions = batch["id"].astype(np.int64) + start
    rows, epochs = sample_index(positions, num_samples, epoch_len, seed, _PERM_CACHE)
    sub = table.take(pa.array(rows))
    ids = sub.column("image_id").to_pylist()
    uris = sub.column("uri").to_pylist() if "uri" in sub.column_names else ids
    blobs = None if "uri" in sub.column_names else sub.column("image").to_pylist()
    pixels = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
    # A training batch cannot drop a row, so a bad image fails the run -- but the error travels as
    # data and is raised by the trainer: Ray Data wraps exceptions of a UDF and loses the type,
    # which would turn a user mistake into a traceback.
    errors = [""] * len(rows)
    for i, (image_id, epoch, uri) in enumerate(zip(ids, epochs, uris)):
        try:
            blob = storage.read_bytes(uri) if blobs is None else blobs[i]
            pixels[i] = decode_train_image(blob, size, scale, seed, image_id, int(epoch))
        except Exception as exc:
            errors[i] = f"cannot read or decode training image {uri}: {' '.join(str(exc).split())[:300]}"
    tokens = _tokenizer(model_name)(sub.column("caption").to_pylist()).numpy()
    return {"pixels": pixels, "tokens": tokens, "position": positions, "epoch": epochs,
            "error": np.array(errors, dtype=object)}


def build_dataset(cfg: TrainConfig, table: pa.Table, plan: Plan, start_step: int, image_size: int):
    """The remaining sample stream ``[start_step * G, total_steps * G)`` as a lazy Ray Dataset."""
    import ray

    start = start_step * plan.global_batch
    remaining = (plan.total_steps - start_step) * plan.global_batch
    holder = [ray.put(table)]  # wrapped in a list so Ray passes the reference, not a copy per task
    return ray.data.range(remaining).map_batches(
        decode_batch, batch_size=max(cfg.batch_size, 32), num_cpus=cfg.data_cpus,
        fn_kwargs=dict(holder=holder, start=start, num_samples=plan.num_samples, epoch_len=plan.epoch_len,
                       seed=cfg.seed, size=image_size, scale=tuple(cfg.aug_scale), model_name=cfg.model))


# ------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(out: str) -> dict[str, Any] | None:
    uri = storage.join(out, LATEST_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(uri: str) -> Any:
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def write_checkpoint(out: str, step: int, clip, trainer_state: dict[str, Any], samples_seen: int) -> str:
    """``checkpoints/step-N/{model,state}.pt``, then ``latest.json`` (so a kill mid-write is harmless)."""
    folder = f"checkpoints/step-{step:08d}"
    weights = {k: v.detach().cpu() for k, v in clip.state_dict().items()}
    storage.write_bytes_atomic(storage.join(out, folder, "model.pt"), _torch_bytes(weights))
    state = dict(trainer_state, samples_seen=samples_seen)
    storage.write_bytes_atomic(storage.join(out, folder, "state.pt"), _torch_bytes(state))
    storage.write_bytes_atomic(storage.join(out, LATEST_FILE),
                               json.dumps({"step": step, "dir": folder, "samples_seen": samples_seen}).encode())
    return storage.join(out, folder, "model.pt")


class MetricsLog:
    """Per-step rows: appended to ``metrics.csv`` every step on local disk (live), rewritten whole at
    checkpoints and at the end on object stores (no appends there). A resumed run starts from the
    rows up to its checkpoint, so the finished log holds every step exactly once."""

    def __init__(self, out: str, upto_step: int) -> None:
        self.out, self.uri = out, storage.join(out, METRICS_CSV)
        self.local = not storage.is_remote(out)
        self.rows: list[dict[str, Any]] = []
        if upto_step and storage.exists(self.uri):
            text = storage.read_bytes(self.uri).decode()
            for row in csv.DictReader(io.StringIO(text)):
                if int(row["step"]) <= upto_step:
                    self.rows.append(row)
        self.rewrite()  # drops rows of steps after the checkpoint (a killed run's tail)

    def _csv(self, rows: list[dict[str, Any]], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def rewrite(self) -> None:
        storage.write_bytes_atomic(self.uri, self._csv(self.rows, True).encode())

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.local:
            with open(self.uri, "a", encoding="utf-8") as fh:
                fh.write(self._csv([row], False))

    def write_parquet(self) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pacsv.read_csv(io.BytesIO(self._csv(self.rows, True).encode()))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(self.out, METRICS_PARQUET), buf.getvalue())


# ------------------------------------------------------------------------------------ worker loop
def rank_zero_decides(flag: bool, device) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast when the run has several DDP ranks).

    ``ray.train.report`` is a barrier across ranks, so every rank must call it at the same steps.
    A decision taken from each rank's own clock differs now and then by a step: one rank then
    waits in the report barrier while the other waits in DDP's next collective, forever.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def train_loop(loop: dict[str, Any]) -> None:
    """``train_loop_per_worker``: one DDP rank of the run (Ray Train calls it on every worker)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from bifta_core.io.models import load_model
    from bifta_core.method.training import Trainer, state_dict_sha256

    cfg = TrainConfig.from_dict(loop["config"])
    plan = Plan(**loop["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    resume = loop["resume"]
    weights = storage.join(cfg.out, resume["dir"], "model.pt") if resume else cfg.load_pretrained
    cm = load_model(cfg.model, weights, device="cpu", precision="fp32")
    # Identical initial weights on every rank come from the checkpoint / the seeded random init;
    # DDP also broadcasts rank 0's parameters at construction.
    wrap = None
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        wrap = lambda m: DistributedDataParallel(m, device_ids=ids)  # noqa: E731
    trainer = Trainer(cm.model, cfg, plan.total_steps, mean=cm.mean, std=cm.std, device=device, rank=rank,
                      world=world, wrap=wrap)
    if resume:
        trainer.load_state_dict(_torch_load(storage.join(cfg.out, resume["dir"], "state.pt")))
    log = MetricsLog(cfg.out, trainer.step) if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    micro: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = trainer.step // plan.steps_per_epoch
    started, images_done, last_ckpt = time.time(), 0, None
    last_report = started
    for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True):
        bad = [e for e in batch["error"] if e]
        if bad:
            raise InputError(bad[0] + (f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""))
        micro.append((torch.from_numpy(batch["pixels"]), torch.from_numpy(batch["tokens"]).long()))
        epoch = int(batch["epoch"][0])
        if len(micro) < cfg.accum_steps:
            continue
        result = trainer.train_step(micro)
        micro = []
        images_done += result.images
        row = {"step": result.step, "epoch": epoch, "samples_seen": result.step * plan.global_batch,
               "loss": round(result.loss, 6), "lr": result.lr, "logit_scale": round(result.logit_scale, 5),
               "temperature": round(1.0 / result.logit_scale, 6),
               "images_per_s": round(result.images / result.seconds, 2), "kept_tokens": result.kept_tokens,
               "masked_tokens": result.masked_tokens, "step_seconds": round(result.seconds, 4),
               "time": round(time.time(), 3)}
        if rank == 0:
            log.append(row)
            if result.step % cfg.checkpoint_every == 0 or result.step == plan.total_steps:
                last_ckpt = write_checkpoint(cfg.out, result.step, trainer.clip, trainer.state_dict(),
                                             result.step * plan.global_batch)
                if not log.local:
                    log.rewrite()
        # Ray Train's controller takes one report per poll (every ~2 s) and report() blocks until
        # the previous one is taken, so reporting every step would throttle training to ~0.5
        # steps/s; report at checkpoints, at the end, and at most every REPORT_EVERY_S seconds.
        # Every step is in metrics.csv regardless.
        done = trainer.step >= plan.total_steps
        timed = rank_zero_decides(time.time() - last_report >= REPORT_EVERY_S, device)
        if done or result.step % cfg.checkpoint_every == 0 or timed:
            ray.train.report(row)
            last_report = time.time()
        if done:
            break

    digest = state_dict_sha256(trainer.clip)
    digests = [digest]
    if world > 1:
        import torch.distributed as dist

        digests = [None] * world
        dist.all_gather_object(digests, digest)
    if rank == 0:
        from bifta_core.io.models import save_checkpoint

        local_final = None
        if storage.is_remote(cfg.out):
            storage.write_bytes_atomic(storage.join(cfg.out, FINAL_MODEL),
                                       _torch_bytes({k: v.detach().cpu() for k, v in trainer.clip.state_dict().items()}))
        else:
            local_final = save_checkpoint(trainer.clip, storage.join(cfg.out, FINAL_MODEL))
        log.rewrite()
        log.write_parquet()
        rows = log.rows
        run_rows = [r for r in rows if int(r["step"]) > (resume["step"] if resume else 0)]
        summary = {
            "out": cfg.out, "model": cfg.model, "pretrained": cfg.pretrained, "pgs_mask": cfg.pgs_mask,
            "steps": trainer.step, "total_steps": plan.total_steps, "resumed_from_step": resume["step"] if resume else 0,
            "steps_this_run": len(run_rows), "global_batch": plan.global_batch, "num_workers": world,
            "samples_seen": trainer.step * plan.global_batch, "num_samples": plan.num_samples,
            "epochs": trainer.step / plan.steps_per_epoch,
            "first_loss": float(rows[0]["loss"]) if rows else None,
            "final_loss": float(rows[-1]["loss"]) if rows else None,
            "final_logit_scale": float(trainer.clip.logit_scale.detach().exp()),
            "images_per_s": round(images_done / max(1e-9, time.time() - started), 2),
            "masked_tokens": int(rows[-1]["masked_tokens"]) if rows else 0,
            "seconds": round(time.time() - started, 2),
            "final_model": local_final or storage.join(cfg.out, FINAL_MODEL),
            "last_checkpoint": last_ckpt, "weights_sha256_per_rank": digests,
            "replicas_identical": len(set(digests)) == 1,
        }
        storage.write_bytes_atomic(storage.join(cfg.out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())


def _ray_train_dir() -> str:
    """Ray Train's own run folder (bifta keeps its checkpoints under --out, not here)."""
    from bifta_core.io.cache import cache_dir

    return cache_dir("ray-train")


# ------------------------------------------------------------------------------------ driver
def _check_out(cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh); refuse to mix two runs in one --out."""
    previous_cfg = storage.join(cfg.out, CONFIG_FILE)
    latest = latest_checkpoint(cfg.out)
    if storage.exists(previous_cfg):
        prev = json.loads(storage.read_bytes(previous_cfg))
        if not cfg.resume:
            raise ConfigError(f"{cfg.out} already holds a training run; pass --resume to continue it or use a new --out")
        now = cfg.to_dict()
        diff = [k for k in RESUME_KEYS if prev.get(k) != now.get(k)]
        if diff:
            raise ConfigError(f"--resume needs the settings of the run in {cfg.out}; these differ: {', '.join(diff)}")
    return latest if cfg.resume else None


def run_train_job(config: TrainConfig) -> dict[str, Any]:
    """Train per ``config`` on Ray Train; returns the summary also written to ``OUT/summary.json``."""
    import ray
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bifta_core.io.models import is_vit_architecture, model_preprocess
    from pipelines.pipeline import ensure_ray

    cfg = config.validate()
    os.environ.update(storage.s3_env(cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_anon))
    if cfg.pgs_mask > 0 and not is_vit_architecture(cfg.model):
        raise ConfigError(f"--pgs-mask needs a ViT image tower; {cfg.model} is not supported by CLIP-PGS "
                          "(use --pgs-mask 0 for plain CLIP)")
    from bifta_core.io.models import load_model

    load_model(cfg.model, cfg.load_pretrained, device="cpu")  # bad --model/--pretrained fail here, once
    table = load_manifest(cfg)
    plan = make_plan(cfg, table.num_rows)
    storage.check_writable(cfg.out)
    resume = _check_out(cfg)
    start_step = int(resume["step"]) if resume else 0
    if resume:
        # WARNING, so --quiet still says where the run picks up
        logger.warning("resuming from step %d of %d (%s)", start_step, plan.total_steps, resume["dir"])
    elif cfg.resume:
        logger.info("--resume: no checkpoint in %s yet, starting at step 0", cfg.out)
    storage.write_bytes_atomic(storage.join(cfg.out, CONFIG_FILE), json.dumps(cfg.to_dict(), indent=2).encode())
    if start_step >= plan.total_steps:
        logger.info("nothing to do: %s already holds step %d of %d", cfg.out, start_step, plan.total_steps)
        return json.loads(storage.read_bytes(storage.join(cfg.out, SUMMARY_FILE)))

    ensure_ray()
    image_size = int(model_preprocess(cfg.model)["size"])
    dataset = build_dataset(cfg, table, plan, start_step, image_size)
    env = storage.s3_env(cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_anon)
    from ray.data import ExecutionOptions

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__, "resume": resume},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        datasets={"train": dataset},
        # preserve_order: each worker sees its share of the stream in position order
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name=f"bifta-train-{os.getpid()}-{int(time.time())}",
                             storage_path=_ray_train_dir(),
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": env} if env else None),
    )
    try:
        trainer.fit()
    except Exception as exc:
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise
    return json.loads(storage.read_bytes(storage.join(cfg.out, SUMMARY_FILE)))


def _unwrap(exc: BaseException) -> BaseException:
    """A user error raised on a worker comes back wrapped by Ray Train; surface the original."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, BiftaUserError):
            return seen
        nested = getattr(seen, "worker_failures", None) or getattr(seen, "_worker_failures", None)
        if isinstance(nested, dict) and nested:
            seen = next(iter(nested.values()))
            continue
        seen = getattr(seen, "cause", None) or seen.__cause__
    return exc
