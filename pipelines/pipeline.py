"""The labelling workflow: list into shards → read → decode+views → encode+score → shard writers.

``run_label_job(config)`` is the Python API behind ``bifta label`` / ``python -m jobs.label``. It
connects to the Ray cluster in ``RAY_ADDRESS`` (what ``ray job submit`` sets) or starts an embedded
local Ray, lists INPUT once into shards saved under OUT (``pipelines.inputs``), skips the shards
whose part file is published, runs the others through one Ray Data plan (``pipelines.plan``) whose
writers publish each shard as one Parquet file (``pipelines.write``), and returns the run summary.
The driver holds shard names and counts, never a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable

import pyarrow as pa
import ray

from bifta_core.io import storage
from bifta_core.config import LabelConfig
from bifta_core.method.registry import METHODS, ViewPreset
from bifta_core.errors import BiftaUserError, ConfigError, StorageError
from bifta_core.io.saved_embeddings import SAVED_DIR, SAVED_FORMAT
from bifta_core.io.models import (check_hub_text_files, config_fingerprint, is_vit_architecture, model_preprocess,
                                   model_provenance)
from pipelines.encode import EncodeStage
from pipelines.inputs import Listing, ListingOptions, build_listing, normalise_spec, plan_sources, read_listing, shards_stage
from pipelines.label_sets import bank_specs, default_cache_dir, first_stage_spec, load_label_sets, plan_label_sets, prepare_label_sets
from pipelines.plan import QUIET_ENV, Resources, Stage, env_args, is_embedded, plan_resources, run_shards
from pipelines.read import read_stage
from pipelines.views import views_stage
from pipelines.write import (
    LAYOUT_VERSION, RUN_FILE, SUMMARY_FILE, finished_shards, output_schema, part_files, read_json, shard_of,
    shards_with_errors, write_json,
)

logger = logging.getLogger("bifta.pipeline")

#: Config fields that change output rows; everything else (paths, batch sizes, limits) does not.
_ROW_FIELDS = (
    "method", "num_views", "max_views", "iou_threshold", "scale", "refine_descriptions", "desc_threshold",
    "desc_top_k", "image_scale", "text_scale", "aggregation", "seed", "top_k", "max_pixels",
    "merge_duplicate_classes", "pgs_keep", "pgs_whole_image", "explain", "explain_views",
)


#: Ray settings of an embedded Ray. Idle workers live 30 s (Ray's default is 1 s): the plan's first
#: tasks then reuse the listing's workers, and their imports, instead of starting new ones while the
#: actors load their models.
EMBEDDED_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 30_000}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # "local": a new embedded Ray even when a `ray start` cluster runs on this machine (ray.init()
    # would silently join it, and its workers lack this driver's environment, e.g. AWS_*). The
    # embedded Ray's workers inherit this process's environment. RAY_ADDRESS=auto joins on purpose.
    quiet = bool(os.environ.get(QUIET_ENV))  # see pipelines.plan.set_verbosity
    kwargs: dict[str, Any] = dict(address=address or "local", ignore_reinit_error=True,
                                  logging_level=logging.ERROR if quiet else logging.WARNING)
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
    ray.init(**kwargs)


def model_config(config: LabelConfig) -> dict[str, Any]:
    m = config.model
    return dict(model_name=m.model, pretrained=m.pretrained, device=m.device, precision=m.precision,
                cache_dir=m.cache_dir, quick_gelu=m.quick_gelu)


def model_provenance_of(config: LabelConfig, use_gpu: bool) -> dict[str, Any]:
    """Model, weights, the activation they run with and the encoders' effective precision."""
    m = config.model
    prov = model_provenance(m.model, m.pretrained, precision=m.precision, on_cuda=use_gpu, quick_gelu=m.quick_gelu,
                            cache_dir=m.cache_dir)
    return {"model": m.model, "pretrained": m.pretrained, "precision": prov["precision"],
            "activation": prov["activation"], "weights": prov["weights"]}


def model_facts(config: LabelConfig, use_gpu: bool) -> dict[str, Any]:
    """What the driver needs to know about the model — label-set cache identity, provenance (run id),
    preprocessing, whether CLIP-PGS applies — computed in a Ray task, where open_clip is imported:
    open_clip, timm and torchvision (~300 MB) stay out of the driver."""
    from pipelines.label_sets import label_set_identity

    m = config.model
    from pipelines.evaluate_stages import model_embed_dim

    return {"label_set_identity": label_set_identity(config), "provenance": model_provenance_of(config, use_gpu),
            "preprocess": model_preprocess(m.model, m.pretrained), "is_vit": is_vit_architecture(m.model),
            "embed_dim": model_embed_dim(m.model)}


#: Bump when what :func:`model_facts` returns changes shape or meaning (old cached facts are then ignored).
FACTS_FORMAT = 2


def _facts_cache_path(config: LabelConfig, use_gpu: bool) -> str | None:
    """Where the facts of an open_clip tag (or random weights) are cached, next to the label-set
    cache; None for weights from a file or URI (their identity follows the file) or with no cache."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    import bifta_core.io.models as models

    m = config.model
    if config.labelset_cache == "" or m.cache_dir or models.is_weights_location(m.pretrained):
        return None
    try:
        open_clip_version = version("open_clip_torch")
    except PackageNotFoundError:
        return None
    # The facts are computed by bifta_core.io.models (and the architecture's bundled config, if any):
    # a change to either is a new key, so no stale facts outlive the code that made them.
    sources = [models.__file__, os.path.join(os.path.dirname(models.__file__), "model_configs",
                                             f"{m.model.replace('/', '-')}.json")]
    code = hashlib.sha256()
    for source in sources:
        if os.path.exists(source):
            with open(source, "rb") as fh:
                code.update(fh.read())
    key = config_fingerprint({
        "format": FACTS_FORMAT, "model": m.model, "pretrained": m.pretrained, "quick_gelu": m.quick_gelu,
        "precision": m.precision, "use_gpu": use_gpu, "open_clip": open_clip_version, "code": code.hexdigest(),
    })
    return os.path.join(config.labelset_cache or default_cache_dir(), "facts", f"{key}.json")


def cached_model_facts(config: LabelConfig, use_gpu: bool, env: dict[str, str]) -> dict[str, Any]:
    """:func:`model_facts` from the cache when this model was inspected before (a fresh run then
    starts its workers without a model-inspection task competing with the listing), else from a
    Ray task, cached for the next run."""
    path = _facts_cache_path(config, use_gpu)
    if path:
        with contextlib.suppress(StorageError, ValueError):  # an unreadable entry is recomputed below
            cached = read_json(*os.path.split(path))
            if cached is not None:
                return cached
    facts = ray.get(ray.remote(model_facts).options(num_cpus=0, **env_args(env, gpu=False)).remote(config, use_gpu))
    if path:
        with contextlib.suppress(StorageError):  # a cache that cannot be written only costs the next run
            write_json(*os.path.split(path), facts, compact=True)
    return facts


def preset_record(config: LabelConfig) -> dict[str, Any]:
    """``{"preset": …}`` for run files and reports: the released preset and the views it resolved to."""
    if not config.preset:
        return {}
    from bifta_core.method.presets import PRESETS, describe_preset

    record = describe_preset(PRESETS[config.preset])
    record["views_in_force"] = dataclasses.asdict(config.view_preset()) if config.uses_views else None
    return {"preset": record}


def view_identity(preset: ViewPreset) -> dict[str, Any]:
    """A view preset as the run id sees it: random views hash as they did before grid views existed."""
    d = dataclasses.asdict(preset)
    if preset.generator == "random":
        d.pop("generator"), d.pop("grid")
    return d


def run_id_for(config: LabelConfig, label_set_hashes: list[str], provenance: dict[str, Any] | None = None) -> str:
    """Deterministic run id over the settings *in force* (presets and precision resolved), so the
    same rows always carry the same id and a resumed run matches the run it resumes (a resume
    never mixes fp16 and fp32 rows)."""
    payload = {k: getattr(config, k) for k in _ROW_FIELDS}
    payload.update(
        views=view_identity(config.view_preset()) if config.uses_views else None,
        refine_descriptions=config.refines_descriptions if METHODS[config.method].has_bank else None,
        model={k: (provenance or model_provenance_of(config, False))[k]
               for k in ("model", "pretrained", "precision", "activation")},
        label_sets=label_set_hashes,
    )
    for key in ("num_views", "max_views", "iou_threshold", "scale"):
        payload.pop(key, None)  # folded into ``views``
    if config.cascade:  # only then, so the run id of a run without a cascade does not mention it
        payload["cascade"] = {"margin": config.cascade_margin, "first": config.cascade_first}
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


def _check_out(config: LabelConfig, run_id: str | None) -> None:
    """Refuse an OUT written by the old layout or with other settings, before any work."""
    previous = read_json(config.out, RUN_FILE)
    if previous is None:
        stray = [f for f in part_files(config.out) if shard_of(f) is None]
        if stray:
            raise ConfigError(f"{config.out} holds part files of an older bifta layout (e.g. {os.path.basename(stray[0])}); "
                              "label into a new --out")
        return
    if previous.get("layout") != LAYOUT_VERSION:
        raise ConfigError(f"{config.out} was written by an older bifta (output layout {previous.get('layout', 1)}, "
                          f"this version writes layout {LAYOUT_VERSION}); label into a new --out")
    if run_id is not None and previous.get("run_id") != run_id:
        raise ConfigError(
            f"{config.out} already holds results of different settings (run {previous.get('run_id')}, "
            f"method {previous.get('config', {}).get('method')}); resume needs the same settings — use a new --out"
        )


def _check_listing(listing: Listing | None, config: LabelConfig) -> None:
    """A saved listing fixes the image set: the same INPUT and --limit, or a new --out."""
    if listing is None:
        return
    spec = normalise_spec(config.input)
    if listing.input != spec:
        raise ConfigError(f"{config.out} holds the listing of {listing.input}, not of {spec}; use a new --out")
    if listing.limit != config.limit:
        raise ConfigError(f"{config.out} was listed with --limit {listing.limit}, this run asks for {config.limit}; "
                          "use the same --limit or a new --out")


def run_label_job(config: LabelConfig, *, on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Label every input of ``config``; returns the summary also written to ``OUT/_bifta_summary.json``."""
    config.validate()
    started = time.time()
    # S3 flags become the standard variables here, and reach every Ray task/actor via runtime_env.
    env = storage.s3_env(config.s3_endpoint_url, config.s3_region, config.s3_anon)
    os.environ.update(env)
    storage.check_writable(config.out)
    loaded = load_label_sets(config)  # a bad label set is a one-line error before Ray starts
    _check_out(config, None)  # an old layout fails before Ray starts
    listing = read_listing(config.out)
    _check_listing(listing, config)
    sources = plan_sources(config.input) if listing is None else None  # a missing INPUT fails before Ray
    check_hub_text_files(config.model.model)  # a hub tokenizer that cannot be had, too
    ensure_ray()
    try:
        # A fresh OUT (no run file) has no settings to clash with: its listing runs on the workers
        # while the model is inspected and the label sets are encoded.
        if listing is None and read_json(config.out, RUN_FILE) is None:
            listing = _Background(_build_listing, config, env, sources)
        res = plan_resources(config, ray.cluster_resources(), embedded=is_embedded())
        facts = cached_model_facts(config, res.use_gpu, env)
        if config.pgs_keep is not None and not facts["is_vit"]:
            raise ConfigError(f"--pgs-keep needs a ViT image tower; {config.model.model} is not supported by CLIP-PGS")
        plan = plan_label_sets(config, loaded, identity=facts["label_set_identity"])
        run_id = run_id_for(config, plan.hashes, facts["provenance"])
        _check_out(config, run_id)  # other settings fail before any listing or text encoding
        return _run(config, started, on_progress, plan, run_id, listing, sources, res, facts, env)
    except Exception as exc:  # user errors raised on workers surface as themselves
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise


class _Background:
    """``fn(*args)`` on a daemon thread (a failure elsewhere does not wait for it); ``result()``
    joins it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._target, args=(fn, *args), name="bifta-listing", daemon=True)
        self._thread.start()

    def _target(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # re-raised by result() in the caller's thread
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _build_listing(config: LabelConfig, env: dict[str, str], sources) -> Listing:
    return build_listing(config.input, config.out, ListingOptions(shard_size=config.shard_size),
                         limit=config.limit, remote=env_args(env, gpu=False), sources=sources)


def _run(config: LabelConfig, started: float, on_progress, plan, run_id: str,
         listing: Listing | _Background | None, sources, res: Resources, facts: dict[str, Any],
         env: dict[str, str]) -> dict[str, Any]:
    mcfg = model_config(config)
    label_sets = prepare_label_sets(config, mcfg, num_gpus=1 if res.use_gpu else 0, plan=plan,
                                    remote=env_args(env, gpu=res.use_gpu), show_progress=on_progress is not None)
    if isinstance(listing, _Background):  # joined before the run file: a bad INPUT leaves no run behind
        listing = listing.result()
    write_json(config.out, RUN_FILE, {"run_id": run_id, "layout": LAYOUT_VERSION, "config": config.to_dict(),
                                      "model": facts["provenance"], **preset_record(config)})
    if listing is None:
        listing = _build_listing(config, env, sources)
    sizes = dict(listing.shards)
    done = finished_shards(config.out) & set(sizes)
    keep = kept_embeddings_settings(config, facts, run_id) if config.save_embeddings else None
    if keep is not None:  # a shard whose embeddings are missing (saved since, or lost) is redone whole
        done &= finished_shards(storage.join(config.out, SAVED_DIR))
    redo = (shards_with_errors(config.out) & done) if config.retry_errors else set()
    todo = [(s, n) for s, n in listing.shards if s not in done or s in redo]
    skipped = sum(sizes[s] for s in done - redo)
    if done:
        logger.info("resuming: %d of %d images already written (%d of %d shards), %d to go%s", skipped,
                    listing.images, len(done - redo), len(listing.shards), listing.images - skipped,
                    f"; {len(redo)} shard(s) with error rows redone" if redo else "")
    schema = output_schema(listing.has_truth)
    encode_started = time.time()
    stages = label_stages(config, res, label_sets, run_id, schema, listing.has_truth, facts["preprocess"])
    totals = run_shards(config.out, todo, stages, writers=res.writers, schema=schema, env=env,
                        file_metadata={"bifta.run_id": run_id}, on_progress=on_progress,
                        total=listing.images - skipped, rows_per_input=len(label_sets), embeddings=keep)
    summary = run_summary(config, run_id, totals, label_sets, started=started, encode_started=encode_started,
                          inputs=listing.images, shards=len(listing.shards), skipped=skipped)
    summary.update(embeddings=storage.join(config.out, SAVED_DIR) if keep else None,
                   gpus=res.encoders if res.use_gpu else 0,
                   plan={"use_gpu": res.use_gpu, "encoders": res.encoders, "decoders": res.decoders,
                         "writers": res.writers})
    write_json(config.out, SUMMARY_FILE, summary)
    return summary


def run_summary(config: LabelConfig, run_id: str, totals, label_sets, *, started: float, encode_started: float,
                inputs: int, shards: int, skipped: int) -> dict[str, Any]:
    """The summary ``label`` and ``relabel`` share (``OUT/_bifta_summary.json``), from the writers'
    shard statistics (:class:`pipelines.plan.ShardTotals`) and the run's settings."""
    finished = time.time()
    elapsed = finished - encode_started
    return {
        "run_id": run_id,
        "out": config.out,
        "layout": LAYOUT_VERSION,
        "inputs": inputs,
        "shards": shards,
        "skipped_already_done": skipped,
        "processed": totals.images,
        "ok": totals.ok,
        "errors": totals.errors,
        "error_reasons": dict(totals.reasons.most_common(10)),
        "label_sets": {ls.name: {"classes": ls.num_classes, "id": ls.content_hash[:16]} for ls in label_sets},
        "method": config.method,
        "cascade": {"margin": config.cascade_margin, "first": config.cascade_first} if config.cascade else None,
        "views_encoded": totals.views_encoded,
        "views_per_image": round(totals.views_encoded / totals.ok, 3) if totals.ok else 0.0,
        "share_with_views": round(totals.images_with_views / totals.ok, 4) if totals.ok else 0.0,
        "model": config.model.model,
        "pretrained": config.model.pretrained,
        "random_weights": config.model.pretrained == "random",
        "files_written": totals.files,
        "rows_written": totals.rows,
        "encode_seconds": round(elapsed, 3),
        "total_seconds": round(finished - started, 3),
        "images_per_second": round(totals.images / elapsed, 3) if totals.images and elapsed > 0 else 0.0,
        "steady_images_per_second": round(totals.steady_rate(finished), 3),
    }


def label_stages(config: LabelConfig, res: Resources, label_sets, run_id: str, schema: pa.Schema,
                 has_truth: bool, preprocess: dict[str, Any] | None = None) -> list[Stage]:
    """The labelling plan: shard inputs → read → decode + views → encode + score (then the writers)."""
    preprocess = preprocess or model_preprocess(config.model.model, config.model.pretrained)
    preset = dataclasses.asdict(config.view_preset()) if config.uses_views else None
    specs = bank_specs(config)
    return [
        shards_stage(config.out, has_truth),
        read_stage(config.batch_size),
        views_stage(batch_size=config.batch_size, max_tasks=res.decoders, use_gpu=res.use_gpu, image_size=preprocess["size"],
                    preset=preset, seed=config.seed, max_pixels=config.max_pixels,
                    resize_mode=preprocess["resize_mode"],
                    # the first stage and kept embeddings see the whole image as a whole-image method does
                    global_whole=config.cascade or config.save_embeddings, precut=not config.cascade),
        encode_stage(config, res, dict(
            model_cfg=model_config(config), label_set_refs=[ray.put(ls) for ls in label_sets], method=config.method,
            bank_key=specs[0].key if specs else None,
            score_params=dict(image_scale=config.image_scale, text_scale=config.text_scale,
                              aggregation=config.aggregation),
            top_k=config.top_k, view_batch_size=config.view_batch_size, seed=config.seed,
            pgs_keep=config.pgs_keep, pgs_whole_image=config.pgs_whole_image, explain=config.explain,
            run_id=run_id, schema=schema, cascade=cascade_args(config),
            keep={"views": config.save_view_embeddings} if config.save_embeddings else None,
            explain_views=config.explain_views)),
    ]


def kept_embeddings_settings(config: LabelConfig, facts: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What the writers need to keep a shard's embeddings (:mod:`bifta_core.io.saved_embeddings`),
    with the metadata ``bifta relabel`` checks its model against."""
    m = config.model
    meta = {"format": SAVED_FORMAT, "model": facts["provenance"], "dim": facts["embed_dim"],
            "dtype": config.embeddings_dtype, "views": config.save_view_embeddings,
            "model_config": {"model": m.model, "pretrained": m.pretrained, "quick_gelu": m.quick_gelu,
                             "precision": m.precision},
            "label_set_identity": facts["label_set_identity"], "method": config.method, "seed": config.seed,
            "view_preset": view_identity(config.view_preset()) if config.uses_views else None,
            "pgs_keep": config.pgs_keep, "pgs_whole_image": config.pgs_whole_image,
            "image_scale": config.image_scale, "run_id": run_id, "input": normalise_spec(config.input)}
    return {"dim": int(facts["embed_dim"]), "dtype": config.embeddings_dtype, "views": config.save_view_embeddings,
            "meta": meta}


def cascade_args(config: LabelConfig) -> dict[str, Any] | None:
    """The encode stage's cascade settings: ``T``, the first stage and its text bank (None: no cascade)."""
    if not config.cascade:
        return None
    first = first_stage_spec(config)
    return {"margin": float(config.cascade_margin), "first": config.cascade_first,
            "bank_key": first.key if first is not None else None}


def encode_stage(config: LabelConfig, res: Resources, constructor_kwargs: dict[str, Any], cls: type = EncodeStage,
                 name: str = "encode+score") -> Stage:
    """Encode actors: one GPU each on a GPU plan (a fixed pool: the model loads once per actor), else
    CPU actors sharing the machine's cores through ``torch_threads``."""
    return Stage(name, cls, batch_size=config.batch_size, num_cpus=1.0, num_gpus=1.0 if res.use_gpu else 0.0,
                 actors=(res.encoders, res.encoders), gpu_visible=res.use_gpu, start_gate="open",
                 constructor_kwargs=dict(constructor_kwargs, torch_threads=res.torch_threads))
