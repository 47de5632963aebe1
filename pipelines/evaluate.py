"""The evaluation workflow behind ``bifta evaluate``: encode once, score every method, report.

``run_evaluation(config, options)`` lists a labelled dataset, prepares the label set's text banks
for every method (cached like ``bifta label``), encodes each image's whole view and the views of
every preset the rows need (WCA's and BiFTA's, each sampled as ``bifta label --method wca|bifta``
samples them with the same view flags) in one Ray Data pass (:mod:`pipelines.evaluate_stages`) — or reads
them back from a saved ``embeddings.parquet`` — and streams the embeddings through
:class:`bifta_core.evaluation.metrics.EvaluationAccumulator` on the driver. Outputs under ``options.out``:
``metrics.parquet``, ``per_class.parquet``, ``predictions.parquet`` (each with ``model``,
``pretrained`` and ``random_weights`` columns), ``cascade.parquet`` (the accuracy-for-views curve
of :mod:`bifta_core.method.cascade`, when its two rows were scored), ``report.md`` with PNG plots,
``evaluate_summary.json`` and, with ``save_embeddings``, ``embeddings.parquet``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from bifta_core.io import storage
from bifta_core.method.cascade import DEFAULT_FIRST_STAGE, CascadeSpec, cascade_curve, recommended_thresholds
from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError, InputError
from bifta_core.validation import integer
from bifta_core.evaluation.embeddings import (
    EMBEDDINGS_FILE,
    FLAT_SCHEMA,
    META_KEY,
    flat_to_embeddings,
    embeddings_to_batch,
    meta_presets,
    read_meta,
)
from bifta_core.evaluation.report import render_report
from bifta_core.evaluation.metrics import (
    DEFAULT_LOGIT_SCALE,
    EvaluationAccumulator,
    ImageBatch,
    Protocol,
    bank_specs_for,
    chunks,
    map_labels,
    presets_for,
    select_methods,
    standard_methods,
    usable_methods,
)
from bifta_core.method.prediction import ScoreParams
from pipelines.inputs import ListingOptions, build_listing, distinct_true_labels
from pipelines.plan import env_args, is_embedded, plan_resources, run_shards
from pipelines.write import part_files, read_shard_stats

logger = logging.getLogger("bifta.evaluate")

SUMMARY_FILE = "evaluate_summary.json"
CASCADE_FILE = "cascade.parquet"
#: The embeddings' shard files under an evaluation's ``--out`` (kept with ``--save-embeddings``).
EMBEDDINGS_DIR = "embeddings"


@dataclass
class EvaluateOptions:
    """Evaluation settings beyond the shared model/view/description ones in :class:`LabelConfig`."""

    out: str
    label_column: str = "label"
    methods: list[str] | None = None
    protocol_runs: int | None = None
    protocol_views: int | None = None
    save_embeddings: bool = False
    from_embeddings: str | None = None
    logit_scale: float = DEFAULT_LOGIT_SCALE
    bins: int = 10
    score_chunk: int = 256
    cascade_first: str | None = None  # the cascade curve's first stage row (None: cupl, when scored)
    cascade_method: str | None = None  # its final row (None: bifta, when scored)

    def cascade(self, scored: list[str]) -> CascadeSpec | None:
        """The cascade the curve is computed for, among the ``scored`` rows: the rows given by flag
        (a :class:`ConfigError` when one was not scored), else cupl → bifta when both were; else None."""
        spec = CascadeSpec(first=self.cascade_first or DEFAULT_FIRST_STAGE, final=self.cascade_method or "bifta")
        for flag, name in (("--cascade-first", self.cascade_first), ("--cascade-method", self.cascade_method)):
            if name is not None and name not in scored:
                raise ConfigError(f"{flag} {name}: that row was not scored (skipped, or not among --method)")
        return spec if spec.first in scored and spec.final in scored else None

    def protocol(self, seed: int) -> Protocol | None:
        """The repeated-run protocol, or None; both flags or neither."""
        if self.protocol_runs is None and self.protocol_views is None:
            return None
        if self.protocol_runs is None or self.protocol_views is None:
            raise ConfigError("the evaluation protocol needs both --protocol-runs N and --protocol-views K")
        return Protocol(runs=self.protocol_runs, views=self.protocol_views, seed=seed)

    def validate(self) -> "EvaluateOptions":
        if not self.out:
            raise ConfigError("no output location given: pass --out PATH")
        if self.save_embeddings and self.from_embeddings:
            raise ConfigError("--save-embeddings and --from-embeddings exclude each other (the embeddings exist)")
        if not self.label_column or not str(self.label_column).strip():
            raise ConfigError("--label-column must name a column, got an empty name")
        if not (self.logit_scale > 0 and math.isfinite(self.logit_scale)):
            raise ConfigError(f"--logit-scale must be a positive number, got {self.logit_scale}")
        integer("--bins", self.bins)
        integer("score_chunk", self.score_chunk)
        select_methods(self.methods)  # unknown row names are an error naming the valid ones
        rows = {m.name: m for m in standard_methods()}
        if self.cascade_first is not None and (self.cascade_first not in rows or rows[self.cascade_first].uses_views):
            raise ConfigError(f"--cascade-first must be a whole-image row "
                              f"({', '.join(n for n, m in rows.items() if not m.uses_views)}), got '{self.cascade_first}'")
        if self.cascade_method is not None and (self.cascade_method not in rows
                                                or not rows[self.cascade_method].uses_views):
            raise ConfigError(f"--cascade-method must be a row scored on views (e.g. bifta, wca, bifta-grid), "
                              f"got '{self.cascade_method}'")
        return self


def embeddings_path(location: str) -> str:
    """Where saved embeddings are: ``DIR/embeddings/`` of an earlier ``--out`` with ``--save-embeddings``,
    that folder itself, or a single ``embeddings.parquet`` (file or ``DIR/embeddings.parquet``) of an
    older bifta."""
    if location.lower().endswith(".parquet"):
        return location
    for candidate in (storage.join(location, EMBEDDINGS_DIR), location):
        if storage.isdir(candidate) and part_files(candidate):
            return candidate
    return storage.join(location, EMBEDDINGS_FILE)


def read_embeddings_meta(location: str) -> dict[str, Any]:
    """The metadata stored with saved embeddings (model, weights, views); :class:`InputError` if absent."""
    path = embeddings_path(location)
    if not path.lower().endswith(".parquet"):
        path = sorted(part_files(path))[0]
    elif not storage.exists(path):
        raise InputError(f"no embeddings at {location} (write them with bifta evaluate --save-embeddings)")
    with storage.open_input(path) as fh:
        try:
            schema = pq.read_schema(fh)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc}); "
                             "pass a folder or file written by bifta evaluate --save-embeddings") from None
    return read_meta(schema, path)


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    return buf.getvalue()


def _feed(acc: EvaluationAccumulator, batch: ImageBatch, emb, chunk: int) -> None:
    for piece in chunks(batch, chunk):
        acc.add(piece, emb)


def run_evaluation(
    config: LabelConfig, options: EvaluateOptions, *, on_progress: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Evaluate every method on the labelled inputs of ``config``; returns the written summary."""
    import ray

    from bifta_core.io.models import is_vit_architecture
    from pipelines.evaluate_stages import load_eval_label_set, model_embed_dim, prepare_eval_label_set
    from pipelines.pipeline import ensure_ray, model_config, preset_record

    options.validate()
    config.validate()
    started = time.time()
    protocol = options.protocol(config.seed)
    stored_meta = read_embeddings_meta(options.from_embeddings) if options.from_embeddings else None
    if stored_meta is None and config.pgs_keep is not None and config.pgs_keep < 1.0 \
            and not is_vit_architecture(config.model.model):
        raise ConfigError(f"--pgs-keep needs a ViT image tower; {config.model.model} is not supported by CLIP-PGS")
    label_set = load_eval_label_set(config)
    stored_presets = meta_presets(stored_meta) if stored_meta is not None else None

    selected = select_methods(options.methods)
    methods, skipped = usable_methods(label_set, selected)
    if stored_presets is not None:
        for m in [m for m in methods if m.uses_views and m.preset not in stored_presets]:
            skipped[m.name] = f"the saved embeddings hold no {m.preset} views"
        methods = [m for m in methods if m.name not in skipped]
    for reason, names in _group_by_reason(skipped).items():
        logger.info("skipping %s: %s", ", ".join(names), reason)
    if not methods:
        raise ConfigError("no method can be evaluated with this label set: " + "; ".join(dict.fromkeys(skipped.values())))
    preset_names = presets_for(methods)
    spec = options.cascade([m.name for m in methods])  # a cascade row that is not scored fails before any work

    storage.check_writable(options.out)
    specs = bank_specs_for(methods, config.desc_threshold, config.desc_top_k, waffle_seed=config.seed,
                           waffle_words=config.waffle_words)
    mcfg = model_config(config)
    res = None
    if stored_meta is None:  # re-scoring saved embeddings starts Ray only to encode uncached text
        ensure_ray()
        res = plan_resources(config, ray.cluster_resources(), embedded=is_embedded())
    env = storage.s3_env(config.s3_endpoint_url, config.s3_region, config.s3_anon)
    listing = None
    if not options.from_embeddings:
        emb_dir = storage.join(options.out, EMBEDDINGS_DIR)
        storage.remove(emb_dir, recursive=True)  # an evaluation is encoded whole, never resumed
        listing = build_listing(config.input, emb_dir, ListingOptions(
            shard_size=config.shard_size, label_column=options.label_column, require_labels=True),
            limit=config.limit, remote=env_args(env, gpu=False))
        # Unknown ground-truth labels are a user error: found before any text or image is encoded
        # (the label set's texts can take minutes to encode).
        sources = sorted({int(s.split("-")[0]) for s, _ in listing.shards})
        labels = ray.get(ray.remote(distinct_true_labels).options(**env_args(env, gpu=False)).remote(emb_dir, sources))
        map_labels(labels, label_set.classes, label_set.synonyms, label_set.name)
    ls_started = time.time()
    emb, cache_hit = prepare_eval_label_set(config, label_set, specs, mcfg, num_gpus=1 if res and res.use_gpu else 0,
                                            remote=env_args(env, gpu=bool(res and res.use_gpu)),
                                            show_progress=on_progress is not None)
    label_set_seconds = time.time() - ls_started
    params = ScoreParams(image_scale=config.image_scale, text_scale=config.text_scale, aggregation=config.aggregation)
    acc = EvaluationAccumulator(methods, emb.classes, params=params, protocol=protocol, logit_scale=options.logit_scale)

    errors: dict[str, int] = {}
    inputs_n = 0
    encode_started = time.time()
    if options.from_embeddings:
        source = embeddings_path(options.from_embeddings)
        views_used = {p: stored_meta["views"][p] for p in preset_names}
    else:
        from pipelines.evaluate_stages import embeddings_meta, eval_stages, view_presets

        source = "encoded in this run"
        presets = view_presets(config, preset_names)
        views_used = {p: dataclasses.asdict(v) for p, v in presets.items()}
        inputs_n = listing.images
        dim = model_embed_dim(config.model.model)
        meta = embeddings_meta(config, presets, dim)
        stages = eval_stages(config, res, presets=presets, model_cfg=mcfg, out=emb_dir)
        run_shards(emb_dir, listing.shards, stages, writers=res.writers, schema=FLAT_SCHEMA, env=env,
                   file_metadata={META_KEY.decode(): json.dumps(meta)}, on_progress=on_progress, total=inputs_n,
                   finalize=functools.partial(flat_to_embeddings, dim=dim, presets=preset_names))
        source_dir = emb_dir
    for batch, n, errs in _stored_batches(source if options.from_embeddings else source_dir, label_set, preset_names):
        if options.from_embeddings:
            inputs_n += n
        for key, count in errs.items():
            errors[key] = errors.get(key, 0) + count
        if batch is not None:
            _feed(acc, batch, emb, options.score_chunk)
    if not options.from_embeddings and not options.save_embeddings:
        storage.remove(source_dir, recursive=True)
    encode_seconds = time.time() - encode_started
    if acc.num_images == 0:
        raise InputError(f"no image could be evaluated ({sum(errors.values())} errors: {errors})")

    model_name = stored_meta["model"] if stored_meta else config.model.model
    pretrained = stored_meta["pretrained"] if stored_meta else config.model.pretrained
    random_weights = pretrained == "random"
    provenance = [pl.lit(str(model_name)).alias("model"), pl.lit(str(pretrained)).alias("pretrained"),
                  pl.lit(random_weights).alias("random_weights")]
    metrics = acc.metrics(options.bins).with_columns(provenance)
    per_class = acc.per_class().with_columns(provenance)
    predictions = acc.predictions().with_columns(provenance)
    curve = cascade_curve(predictions, spec) if spec is not None else None
    cascade = None if curve is None else {
        "first": spec.first, "final": spec.final,
        "recommended": {tol: {k: row[k] for k in ("threshold", "top1", "top5", "views_per_image", "share_with_views")}
                        for tol, row in recommended_thresholds(curve).items()}}
    context = {
        "model": model_name,
        "pretrained": pretrained,
        "label_set": label_set.name,
        "classes": label_set.num_classes,
        "images": acc.num_images,
        "errors": sum(errors.values()),
        "views": _views_text(views_used),
        "skipped": skipped,
        "protocol": dataclasses.asdict(protocol) if protocol else None,
        "random_weights": random_weights,
        "source": source,
        "cascade": cascade,
        **preset_record(config),
    }
    out = options.out
    storage.write_bytes_atomic(storage.join(out, "metrics.parquet"), _parquet_bytes(metrics))
    storage.write_bytes_atomic(storage.join(out, "per_class.parquet"), _parquet_bytes(per_class))
    storage.write_bytes_atomic(storage.join(out, "predictions.parquet"), _parquet_bytes(predictions))
    if curve is not None:
        storage.write_bytes_atomic(storage.join(out, CASCADE_FILE), _parquet_bytes(curve))
    for name, data in render_report(metrics, per_class, predictions, context, options.bins, curve).items():
        storage.write_bytes_atomic(storage.join(out, name), data)
    summary = {
        "out": out,
        "inputs": inputs_n,
        "images": acc.num_images,
        "errors": sum(errors.values()),
        "error_reasons": errors,
        "methods": [m.name for m in methods],
        "skipped": skipped,
        "label_set": {"name": label_set.name, "classes": label_set.num_classes, "id": emb.content_hash[:16],
                      "cache_hit": cache_hit, "seconds": round(label_set_seconds, 3)},
        "model": model_name,
        "pretrained": pretrained,
        "random_weights": random_weights,
        "views": views_used,
        "protocol": context["protocol"],
        "cascade": cascade,
        **preset_record(config),
        "score_params": dataclasses.asdict(params),
        "from_embeddings": options.from_embeddings,
        "embeddings_saved": storage.join(out, EMBEDDINGS_DIR) if options.save_embeddings else None,
        "encode_seconds": round(encode_seconds, 3),
        "total_seconds": round(time.time() - started, 3),
        "metrics": metrics.select("method", "top1", "top5", "n").to_dicts(),
    }
    storage.write_bytes_atomic(storage.join(out, SUMMARY_FILE),
                               json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return summary


def _group_by_reason(skipped: dict[str, str]) -> dict[str, list[str]]:
    """``{method: reason}`` → ``{reason: [methods]}`` (one log line per missing file)."""
    grouped: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def _views_text(views: dict[str, dict] | None) -> str | None:
    """``{preset: settings}`` → one line per preset, joined by ``; ``."""
    if not views:
        return None
    parts = []
    for name, v in views.items():
        iou = v.get("iou_threshold")
        refine = (f", IoU refinement > {iou} dropped (max {v.get('max_views')} kept)" if iou is not None
                  else f", no IoU refinement (max {v.get('max_views')} kept)")
        made = (f"{v.get('grid')} x {v.get('grid')} grid tiles" if v.get("generator") == "grid"
                else f"{v.get('num_views')} sampled per image, scale {tuple(v.get('scale', ()))}")
        parts.append(f"{name}: {made}{refine}")
    return "; ".join(parts)


def _stored_batches(location: str, label_set,
                    presets: list[str]) -> Iterator[tuple[ImageBatch | None, int, dict[str, int]]]:
    """Read saved embeddings → (ok images with labels mapped to ``label_set`` or None, rows, error reasons).

    ``location`` is a folder of shard files written by the evaluation's writers (ok rows, their error
    rows counted in each file's footer) or a single ``embeddings.parquet`` of an older bifta. Only the
    columns of ``presets`` (those the scored rows need) are read."""
    if location.lower().endswith(".parquet"):
        yield from _stored_file_batches(location, label_set, presets)
        return
    for path in sorted(part_files(location)):
        errors = read_shard_stats(path).get("error_reasons", {})
        first = True
        for batch, n, _ in _stored_file_batches(path, label_set, presets):
            # a shard's error rows are not stored, only counted in its footer
            yield batch, n + (sum(errors.values()) if first else 0), errors if first else {}
            first = False
        if first and errors:
            yield None, sum(errors.values()), errors


def _stored_file_batches(path: str, label_set, presets: list[str]) -> Iterator[tuple[ImageBatch, int, dict[str, int]]]:
    """Row groups of one stored embeddings file (a shard's, or an earlier bifta's ``embeddings.parquet``)."""
    with storage.open_input(path) as fh:
        pf = pq.ParquetFile(fh)
        read_meta(pf.schema_arrow, path)
        columns = ["image_id", "true_label", "image_emb"]
        columns += [f"{p}_{c}" for p in presets for c in ("image_emb", "view_emb", "view_kept")]
        for rb in pf.iter_batches(batch_size=256, columns=columns):
            labels = rb.column("true_label").to_pylist()
            idx = map_labels(labels, label_set.classes, label_set.synonyms, label_set.name)
            yield embeddings_to_batch(rb, idx, presets), rb.num_rows, {}
