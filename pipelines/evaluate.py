"""The evaluation workflow behind ``bifta evaluate``: encode once, score every method, report.

``run_evaluation(config, options)`` lists a labelled dataset, prepares the label set's text banks
for every method (cached like ``bifta label``), encodes each image's whole view and the views of
every preset the rows need (WCA's and BiFTA's, each sampled as ``bifta label --method wca|bifta``
samples them with the same view flags) in one Ray Data pass (:mod:`pipelines.embed`) — or reads
them back from a saved ``embeddings.parquet`` — and streams the embeddings through
:class:`bifta_core.evaluation.EvaluationAccumulator` on the driver. Outputs under ``options.out``:
``metrics.parquet``, ``per_class.parquet``, ``predictions.parquet`` (each with ``model``,
``pretrained`` and ``random_weights`` columns), ``report.md`` with PNG plots,
``evaluate_summary.json`` and, with ``save_embeddings``, ``embeddings.parquet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from bifta_core import storage
from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError, InputError
from bifta_core.eval_embeddings import (
    EMBEDDINGS_FILE,
    embeddings_schema,
    embeddings_to_batch,
    flat_to_batch,
    flat_to_embeddings,
    meta_presets,
    read_meta,
)
from bifta_core.eval_report import render_report
from bifta_core.evaluation import (
    DEFAULT_LOGIT_SCALE,
    EvaluationAccumulator,
    ImageBatch,
    Protocol,
    bank_specs_for,
    chunks,
    map_labels,
    presets_for,
    select_methods,
    usable_methods,
)
from bifta_core.predict import ScoreParams

logger = logging.getLogger("bifta.evaluate")

SUMMARY_FILE = "evaluate_summary.json"


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
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise ConfigError(f"--bins must be a positive integer, got {self.bins!r}")
        if isinstance(self.score_chunk, bool) or not isinstance(self.score_chunk, int) or self.score_chunk < 1:
            raise ConfigError(f"score_chunk must be a positive integer, got {self.score_chunk!r}")
        select_methods(self.methods)  # unknown row names are an error naming the valid ones
        return self


def embeddings_path(location: str) -> str:
    """``DIR`` (an earlier ``--out`` with ``--save-embeddings``) or the file itself → the file."""
    if location.lower().endswith(".parquet"):
        return location
    return storage.join(location, EMBEDDINGS_FILE)


def read_embeddings_meta(location: str) -> dict[str, Any]:
    """The metadata stored with saved embeddings (model, weights, views); :class:`InputError` if absent."""
    path = embeddings_path(location)
    if not storage.exists(path):
        raise InputError(f"no embeddings at {path} (write them with bifta evaluate --save-embeddings)")
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
    from bifta_core.models import is_vit_architecture
    from pipelines.embed import load_eval_label_set, prepare_eval_label_set
    from pipelines.pipeline import model_config

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

    storage.check_writable(options.out)
    specs = bank_specs_for(methods, config.desc_threshold, config.desc_top_k)
    mcfg = model_config(config)
    ls_started = time.time()
    emb, cache_hit = prepare_eval_label_set(config, label_set, specs, mcfg)
    label_set_seconds = time.time() - ls_started
    params = ScoreParams(image_scale=config.image_scale, text_scale=config.text_scale, aggregation=config.aggregation)
    acc = EvaluationAccumulator(methods, emb.classes, params=params, protocol=protocol, logit_scale=options.logit_scale)

    errors: dict[str, int] = {}
    inputs_n = 0
    encode_started = time.time()
    if options.from_embeddings:
        source = embeddings_path(options.from_embeddings)
        views_used = {p: stored_meta["views"][p] for p in preset_names}
        for batch, n in _stored_batches(source, label_set, preset_names):
            inputs_n += n
            _feed(acc, batch, emb, options.score_chunk)
    else:
        from pipelines.embed import embeddings_meta, list_eval_inputs, view_presets

        source = "encoded in this run"
        presets = view_presets(config, preset_names)
        views_used = {p: dataclasses.asdict(v) for p, v in presets.items()}
        inputs = list_eval_inputs(config.input, options.label_column, config.limit)
        inputs_n = inputs.num_rows
        truth = dict(zip(inputs.column("image_id").to_pylist(),
                         map_labels(inputs.column("true_label").to_pylist(), label_set.classes,
                                    label_set.synonyms, label_set.name)))
        save_meta = embeddings_meta(config, presets) if options.save_embeddings else None
        with _EmbeddingSink(options.out if options.save_embeddings else None, save_meta, preset_names) as sink:
            for table in _encoded_tables(config, inputs, presets, mcfg):
                ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
                for reason in table.filter(pa.compute.equal(table.column("status"), "error")).column("error").to_pylist():
                    key = str(reason or "unknown error").split(":")[0]
                    errors[key] = errors.get(key, 0) + 1
                if ok.num_rows:
                    dim = len(ok.column("image_emb")[0])
                    ids = [str(i) for i in ok.column("image_id").to_pylist()]
                    _feed(acc, flat_to_batch(ok, [truth[i] for i in ids], dim, preset_names), emb,
                          options.score_chunk)
                    sink.add(ok, dim)
                if on_progress:
                    on_progress({"done": acc.num_images + sum(errors.values()), "total": inputs_n,
                                 "errors": sum(errors.values()), "elapsed_s": time.time() - encode_started})
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
    }
    out = options.out
    storage.write_bytes_atomic(storage.join(out, "metrics.parquet"), _parquet_bytes(metrics))
    storage.write_bytes_atomic(storage.join(out, "per_class.parquet"), _parquet_bytes(per_class))
    storage.write_bytes_atomic(storage.join(out, "predictions.parquet"), _parquet_bytes(predictions))
    for name, data in render_report(metrics, per_class, predictions, context, options.bins).items():
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
        "score_params": dataclasses.asdict(params),
        "from_embeddings": options.from_embeddings,
        "embeddings_saved": storage.join(out, EMBEDDINGS_FILE) if options.save_embeddings else None,
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
        parts.append(f"{name}: {v.get('num_views')} sampled per image, scale {tuple(v.get('scale', ()))}{refine}")
    return "; ".join(parts)


def _encoded_tables(config: LabelConfig, inputs: pa.Table, presets: dict, mcfg: dict) -> Iterator[pa.Table]:
    """Run the Ray Data encoding pass; yields the encode actors' output blocks on the driver."""
    from pipelines.embed import embed_dataset
    from pipelines.pipeline import _unwrap, ensure_ray

    ensure_ray()
    ds = embed_dataset(config, inputs, presets=presets, model_cfg=mcfg)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch
    except Exception as exc:  # a user error raised in an actor comes back wrapped by Ray
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise


def _stored_batches(path: str, label_set, presets: list[str]) -> Iterator[tuple[ImageBatch, int]]:
    """Read saved embeddings in row groups → (batch, rows) with labels mapped to ``label_set``.

    Only the columns of ``presets`` (those the scored rows need) are read."""
    with storage.open_input(path) as fh:
        pf = pq.ParquetFile(fh)
        read_meta(pf.schema_arrow, path)
        columns = ["image_id", "true_label", "image_emb"]
        columns += [f"{p}_{c}" for p in presets for c in ("image_emb", "view_emb", "view_kept")]
        for rb in pf.iter_batches(batch_size=256, columns=columns):
            labels = rb.column("true_label").to_pylist()
            idx = map_labels(labels, label_set.classes, label_set.synonyms, label_set.name)
            yield embeddings_to_batch(rb, idx, presets), rb.num_rows


class _EmbeddingSink:
    """Streams ``embeddings.parquet`` while the encoding pass runs (no-op when ``out`` is None)."""

    def __init__(self, out: str | None, meta: dict[str, Any] | None, presets: list[str]) -> None:
        self.out = out
        self.meta = meta
        self.presets = presets
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "_EmbeddingSink":
        return self

    def add(self, ok_rows: pa.Table, dim: int) -> None:
        if self.out is None:
            return
        table = flat_to_embeddings(ok_rows, dim, self.presets)
        if self._writer is None:
            meta = dict(self.meta or {}, embed_dim=dim)
            fh = self._stack.enter_context(storage.open_output(storage.join(self.out, EMBEDDINGS_FILE)))
            self._writer = pq.ParquetWriter(fh, embeddings_schema(dim, self.presets, meta), compression="zstd")
        self._writer.write_table(table.cast(self._writer.schema))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._stack.__exit__(exc_type, exc, tb)
