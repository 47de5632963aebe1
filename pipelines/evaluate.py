"""The evaluation workflow behind ``bifta evaluate``: encode once, score every method, report.

``run_evaluation(config, options)`` lists a labelled dataset, prepares the label set's text banks
for every method (cached like ``bifta label``), encodes each image's whole view and all its views
in one Ray Data pass (:mod:`pipelines.embed`) — or reads them back from a saved
``embeddings.parquet`` — and streams the embeddings through
:class:`bifta_core.evaluation.EvaluationAccumulator` on the driver. Outputs under ``options.out``:
``metrics.parquet``, ``per_class.parquet``, ``predictions.parquet``, ``report.md`` with PNG plots,
``evaluate_summary.json`` and, with ``save_embeddings``, ``embeddings.parquet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
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
        if not self.logit_scale > 0:
            raise ConfigError(f"--logit-scale must be positive, got {self.logit_scale}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise ConfigError(f"--bins must be a positive integer, got {self.bins!r}")
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
        schema = pq.read_schema(fh)
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
    from pipelines.embed import load_eval_label_set, prepare_eval_label_set
    from pipelines.pipeline import model_config

    options.validate()
    config.validate()
    started = time.time()
    protocol = options.protocol(config.seed)
    label_set = load_eval_label_set(config)
    stored_meta = read_embeddings_meta(options.from_embeddings) if options.from_embeddings else None
    has_views = stored_meta is None or stored_meta.get("views") is not None

    selected = select_methods(options.methods)
    methods, skipped = usable_methods(label_set, selected)
    if not has_views:
        for m in [m for m in methods if m.uses_views]:
            skipped[m.name] = "the saved embeddings hold no views"
        methods = [m for m in methods if not m.uses_views]
    for reason, names in _group_by_reason(skipped).items():
        logger.info("skipping %s: %s", ", ".join(names), reason)
    if not methods:
        raise ConfigError("no method can be evaluated with this label set: " + "; ".join(skipped.values()))
    with_views = any(m.uses_views for m in methods)

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
        for batch, n in _stored_batches(source, label_set):
            inputs_n += n
            _feed(acc, batch, emb, options.score_chunk)
    else:
        from pipelines.embed import list_eval_inputs

        source = "encoded in this run"
        inputs = list_eval_inputs(config.input, options.label_column, config.limit)
        inputs_n = inputs.num_rows
        truth = dict(zip(inputs.column("image_id").to_pylist(),
                         map_labels(inputs.column("true_label").to_pylist(), label_set.classes,
                                    label_set.synonyms, label_set.name)))
        save_meta = None
        if options.save_embeddings:
            from pipelines.embed import embeddings_meta

            save_meta = embeddings_meta(config, with_views=with_views)
        with _EmbeddingSink(options.out if options.save_embeddings else None, save_meta) as sink:
            for table in _encoded_tables(config, inputs, with_views, mcfg):
                ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
                for reason in table.filter(pa.compute.equal(table.column("status"), "error")).column("error").to_pylist():
                    key = str(reason or "unknown error").split(":")[0]
                    errors[key] = errors.get(key, 0) + 1
                if ok.num_rows:
                    dim = len(ok.column("image_emb")[0])
                    ids = [str(i) for i in ok.column("image_id").to_pylist()]
                    _feed(acc, flat_to_batch(ok, [truth[i] for i in ids], dim), emb, options.score_chunk)
                    sink.add(ok, dim)
                if on_progress:
                    on_progress({"done": acc.num_images + sum(errors.values()), "total": inputs_n,
                                 "errors": sum(errors.values()), "elapsed_s": time.time() - encode_started})
    encode_seconds = time.time() - encode_started
    if acc.num_images == 0:
        raise InputError(f"no image could be evaluated ({sum(errors.values())} errors: {errors})")

    metrics = acc.metrics(options.bins)
    per_class = acc.per_class()
    predictions = acc.predictions()
    model_name = stored_meta["model"] if stored_meta else config.model.model
    pretrained = stored_meta["pretrained"] if stored_meta else config.model.pretrained
    context = {
        "model": model_name,
        "pretrained": pretrained,
        "label_set": label_set.name,
        "classes": label_set.num_classes,
        "images": acc.num_images,
        "errors": sum(errors.values()),
        "views": _views_text(stored_meta["views"] if stored_meta else
                             (dataclasses.asdict(config.view_preset()) if with_views else None)),
        "skipped": skipped,
        "protocol": dataclasses.asdict(protocol) if protocol else None,
        "random_weights": pretrained == "random",
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
        "random_weights": pretrained == "random",
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


def _views_text(views: dict | None) -> str | None:
    if not views:
        return None
    iou = views.get("iou_threshold")
    refine = f", IoU refinement > {iou} dropped (max {views.get('max_views')})" if iou is not None else ""
    return f"{views.get('num_views')} sampled per image, scale {tuple(views.get('scale', ()))}{refine}"


def _encoded_tables(config: LabelConfig, inputs: pa.Table, with_views: bool, mcfg: dict) -> Iterator[pa.Table]:
    """Run the Ray Data encoding pass; yields the encode actors' output blocks on the driver."""
    from pipelines.embed import embed_dataset
    from pipelines.pipeline import _unwrap, ensure_ray

    ensure_ray()
    ds = embed_dataset(config, inputs, with_views=with_views, model_cfg=mcfg)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch
    except Exception as exc:  # a user error raised in an actor comes back wrapped by Ray
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise


def _stored_batches(path: str, label_set) -> Iterator[tuple[ImageBatch, int]]:
    """Read saved embeddings in row groups → (batch, rows) with labels mapped to ``label_set``."""
    with storage.open_input(path) as fh:
        pf = pq.ParquetFile(fh)
        read_meta(pf.schema_arrow, path)
        for rb in pf.iter_batches(batch_size=256):
            labels = rb.column("true_label").to_pylist()
            idx = map_labels(labels, label_set.classes, label_set.synonyms, label_set.name)
            yield embeddings_to_batch(rb, idx), rb.num_rows


class _EmbeddingSink:
    """Streams ``embeddings.parquet`` while the encoding pass runs (no-op when ``out`` is None)."""

    def __init__(self, out: str | None, meta: dict[str, Any] | None) -> None:
        self.out = out
        self.meta = meta
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "_EmbeddingSink":
        return self

    def add(self, ok_rows: pa.Table, dim: int) -> None:
        if self.out is None:
            return
        table = flat_to_embeddings(ok_rows, dim)
        if self._writer is None:
            meta = dict(self.meta or {}, embed_dim=dim)
            fh = self._stack.enter_context(storage.open_output(storage.join(self.out, EMBEDDINGS_FILE)))
            self._writer = pq.ParquetWriter(fh, embeddings_schema(dim, meta), compression="zstd")
        self._writer.write_table(table.cast(self._writer.schema))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._stack.__exit__(exc_type, exc, tb)
