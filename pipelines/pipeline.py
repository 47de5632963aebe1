"""The labelling workflow: inputs → read → decode+views → encode+score → Parquet.

``run_label_job(config)`` is the Python API behind ``bifta label`` / ``python -m jobs.label``. It
connects to the Ray cluster in ``RAY_ADDRESS`` (what ``ray job submit`` sets) or starts an embedded
local Ray, resumes from whatever ``config.out`` already holds, and returns the run summary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import ray

from bifta_core.config import LabelConfig
from bifta_core.errors import BiftaUserError, ConfigError
from bifta_core.models import config_fingerprint, is_vit_architecture, model_preprocess
from pipelines.encode import EncodeStage
from pipelines.inputs import list_inputs
from pipelines.label_set import bank_specs, load_label_sets, plan_label_sets, prepare_label_sets
from pipelines.read import read_batch
from pipelines.views import ViewStage
from pipelines.write import RUN_FILE, SUMMARY_FILE, ResultWriter, completed_ids, output_schema, read_json, write_json

logger = logging.getLogger("bifta.pipeline")

#: Config fields that change output rows; everything else (paths, batch sizes, limits) does not.
_ROW_FIELDS = (
    "method", "num_views", "max_views", "iou_threshold", "scale", "refine_descriptions", "desc_threshold",
    "desc_top_k", "image_scale", "text_scale", "aggregation", "seed", "top_k", "max_pixels",
    "merge_duplicate_classes", "pgs_keep", "pgs_whole_image", "explain",
)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # "local": a new embedded Ray even when a `ray start` cluster runs on this machine (ray.init()
    # would silently join it, and its workers lack this driver's environment, e.g. AWS_*). The
    # embedded Ray's workers inherit this process's environment. RAY_ADDRESS=auto joins on purpose.
    kwargs: dict[str, Any] = dict(address=address or "local", ignore_reinit_error=True,
                                  logging_level=logging.WARNING)
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(**kwargs)


def model_config(config: LabelConfig) -> dict[str, Any]:
    m = config.model
    return dict(model_name=m.model, pretrained=m.pretrained, device=m.device, precision=m.precision,
                cache_dir=m.cache_dir)


def run_id_for(config: LabelConfig, label_set_hashes: list[str]) -> str:
    """Deterministic run id over the settings *in force* (presets resolved), so the same rows
    always carry the same id and a resumed run matches the run it resumes."""
    payload = {k: getattr(config, k) for k in _ROW_FIELDS}
    payload.update(
        views=dataclasses.asdict(config.view_preset()) if config.uses_views else None,
        refine_descriptions=config.refines_descriptions if config.method != "clip" else None,
        model={"model": config.model.model, "pretrained": config.model.pretrained},
        label_sets=label_set_hashes,
    )
    for key in ("num_views", "max_views", "iou_threshold", "scale"):
        payload.pop(key, None)  # folded into ``views``
    return config_fingerprint(payload)[:16]


def _unwrap(exc: BaseException) -> BaseException:
    """A user error raised inside a Ray task/actor comes back wrapped; surface the original."""
    seen = exc
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None:
            break
        if isinstance(cause, BiftaUserError):
            return cause
        seen = cause
    return exc


def worker_env(config: LabelConfig) -> dict[str, Any]:
    """Ray remote args carrying the S3 flags to workers (empty when none were given)."""
    from bifta_core import storage

    env = storage.s3_env(config.s3_endpoint_url, config.s3_region, config.s3_anon)
    return {"runtime_env": {"env_vars": env}} if env else {}


def _check_encoders(config: LabelConfig, gpus: int, cpus: int) -> None:
    """More encode actors than the cluster can place would wait forever: refuse up front."""
    n = config.num_encoders
    if n is None:
        return
    if gpus and n > gpus:
        raise ConfigError(f"--num-encoders {n} needs {n} GPUs, the cluster has {gpus}")
    if not gpus and n > max(1, cpus - 1):
        raise ConfigError(f"--num-encoders {n} needs {n} CPUs plus one for decoding, the cluster has {cpus}")


def _check_out(config: LabelConfig, run_id: str) -> None:
    previous = read_json(config.out, RUN_FILE)
    if previous and previous.get("run_id") != run_id:
        raise ConfigError(
            f"{config.out} already holds results of different settings (run {previous.get('run_id')}, "
            f"method {previous.get('config', {}).get('method')}); resume needs the same settings — use a new --out"
        )


def run_label_job(config: LabelConfig, *, on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Label every input of ``config``; returns the summary also written to ``OUT/_bifta_summary.json``."""
    from bifta_core import storage

    config.validate()
    started = time.time()
    # S3 flags become the standard variables here, and reach every Ray task/actor via runtime_env.
    os.environ.update(storage.s3_env(config.s3_endpoint_url, config.s3_region, config.s3_anon))
    inputs = list_inputs(config.input, config.limit)

    if config.pgs_keep is not None and not is_vit_architecture(config.model.model):
        raise ConfigError(f"--pgs-keep needs a ViT image tower; {config.model.model} is not supported by CLIP-PGS")
    storage.check_writable(config.out)
    loaded = load_label_sets(config)  # a bad label set is a one-line error before Ray starts
    ensure_ray()
    try:
        return _run(config, inputs, started, on_progress, loaded)
    except Exception as exc:  # user errors raised on workers surface as themselves
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise


def _run(config, inputs: pa.Table, started: float, on_progress, loaded=None) -> dict[str, Any]:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    _check_encoders(config, gpus, cpus)
    mcfg = model_config(config)
    plan = plan_label_sets(config, loaded)
    run_id = run_id_for(config, plan.hashes)
    _check_out(config, run_id)  # before any text is encoded
    label_sets = prepare_label_sets(config, mcfg, num_gpus=1 if gpus else 0, plan=plan,
                                    remote=worker_env(config))
    write_json(config.out, RUN_FILE, {"run_id": run_id, "config": config.to_dict()})

    done = completed_ids(config.out)
    todo = inputs
    if done:
        mask = pa.array([i not in done for i in inputs.column("image_id").to_pylist()])
        todo = inputs.filter(mask)
        logger.info("resuming: %d of %d images already written, %d to go", inputs.num_rows - todo.num_rows,
                    inputs.num_rows, todo.num_rows)
    has_truth = "true_label" in inputs.column_names
    schema = output_schema(has_truth)
    writer = ResultWriter(config.out, schema, config.shard_size)
    counts: Counter = Counter()
    errors: Counter = Counter()
    encode_started = time.time()
    first_output: tuple[float, int] | None = None  # (time, images) of the first batch, after start-up
    if todo.num_rows:
        ds = _dataset(config, todo, label_sets, run_id, gpus, cpus, mcfg, schema)
        last_report = 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first_output is None:
                first_output = (time.time(), len(set(batch.column("image_id").to_pylist())))
            writer.add(batch)
            first = batch.filter(pa.compute.equal(batch.column("label_set"), label_sets[0].name))
            for status, err in zip(first.column("status").to_pylist(), first.column("error").to_pylist()):
                counts[status] += 1
                if err:
                    errors[err.split(":")[0]] += 1
            now = time.time()
            if on_progress and (now - last_report > 2.0):
                last_report = now
                on_progress({"done": sum(counts.values()), "total": todo.num_rows, "errors": counts["error"],
                             "elapsed_s": now - encode_started})
        writer.close()
    finished = time.time()
    elapsed = finished - encode_started
    processed = sum(counts.values())
    steady = 0.0
    if first_output and processed > first_output[1] and finished > first_output[0]:
        # Throughput after the first batch: excludes actor start-up and model loading.
        steady = (processed - first_output[1]) / (finished - first_output[0])
    summary = {
        "run_id": run_id,
        "out": config.out,
        "inputs": inputs.num_rows,
        "skipped_already_done": inputs.num_rows - todo.num_rows,
        "processed": processed,
        "ok": counts["ok"],
        "errors": counts["error"],
        "error_reasons": dict(errors.most_common(10)),
        "label_sets": {ls.name: {"classes": ls.num_classes, "id": ls.content_hash[:16]} for ls in label_sets},
        "method": config.method,
        "model": config.model.model,
        "pretrained": config.model.pretrained,
        "random_weights": config.model.pretrained == "random",
        "files_written": len(writer.files),
        "rows_written": writer.rows_written,
        "encode_seconds": round(elapsed, 3),
        "total_seconds": round(time.time() - started, 3),
        "images_per_second": round(processed / elapsed, 3) if processed and elapsed > 0 else 0.0,
        "steady_images_per_second": round(steady, 3),
        "gpus": gpus,
    }
    write_json(config.out, SUMMARY_FILE, summary)
    return summary


def _dataset(config, todo: pa.Table, label_sets, run_id, gpus, cpus, mcfg, schema):
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic file grouping and names
    # Ray's memory-issue detector misreads the shared torch import of worker processes as per-task
    # memory and prints multi-line warnings every 30 s; bifta bounds memory by batch sizes instead.
    ctx.issue_detectors_config.detectors = []
    n = todo.num_rows
    chunk = max(config.batch_size * 2, math.ceil(n / 5000))
    ds = ray.data.from_arrow([todo.slice(i, chunk) for i in range(0, n, chunk)])

    preprocess = model_preprocess(config.model.model, config.model.pretrained)
    image_size = preprocess["size"]
    preset = dataclasses.asdict(config.view_preset()) if config.uses_views else None
    encoders = config.num_encoders or (gpus if gpus else 1)
    if gpus:
        enc_resources = dict(num_gpus=1, num_cpus=1)
        threads = None
        view_workers = max(1, cpus - encoders)
    else:
        enc_resources = dict(num_cpus=1)
        threads = max(1, (os.cpu_count() or 1) // encoders)
        view_workers = max(1, cpus - encoders)

    remote = worker_env(config)
    ds = ds.map_batches(read_batch, batch_size=config.batch_size, batch_format="numpy", num_cpus=0.25, **remote)
    ds = ds.map_batches(
        ViewStage,
        fn_constructor_kwargs=dict(image_size=image_size, preset=preset, seed=config.seed, max_pixels=config.max_pixels,
                                   resize_mode=preprocess["resize_mode"]),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=view_workers),
        num_cpus=0.5,
        **remote,
    )
    refs = [ray.put(ls) for ls in label_sets]
    specs = bank_specs(config)
    bank_key = specs[0].key if specs else None
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs=dict(
            model_cfg=mcfg, label_set_refs=refs, method=config.method, bank_key=bank_key,
            score_params=dict(image_scale=config.image_scale, text_scale=config.text_scale,
                              aggregation=config.aggregation),
            top_k=config.top_k, view_batch_size=config.view_batch_size, seed=config.seed,
            pgs_keep=config.pgs_keep, pgs_whole_image=config.pgs_whole_image, explain=config.explain,
            run_id=run_id, torch_threads=threads, schema=schema,
        ),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=encoders),
        **enc_resources,
        **remote,
    )
    return ds
