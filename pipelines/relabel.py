"""``bifta relabel``: score embeddings kept by ``bifta label --save-embeddings`` against a new label
set — no image is read, decoded or encoded.

``run_relabel_job(config)`` reads ``config.input`` (a labelling OUT, or its ``_embeddings/``
folder), checks that the run's model is the embeddings' model (one ``error:`` line otherwise),
encodes the new label sets' texts once (the label-set stage and cache of ``bifta label``), and
runs one Ray Data plan over the saved shards: a reader task per shard file, scoring actors, and
the same shard writers as ``label`` — same output schema, same resume (published part files are
skipped by name), one part file per saved shard. Whole-image methods score ``image_emb``; WCA and
BiFTA the saved views (``--save-view-embeddings``), which must be the views the method samples;
an image whose views the method (or the cascade) needs but which has none saved is an error row
saying so. With the same settings the rows equal those ``bifta label --method X`` writes,
run id included.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from bifta_core.io import storage
from bifta_core.method.cascade import needs_views
from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError, InputError
from bifta_core.method.registry import METHODS
from bifta_core.method.prediction import ScoreParams, top_views
from bifta_core.method.scoring import view_weights
from bifta_core.io.saved_embeddings import SAVED_DIR, SavedBatch, read_meta, to_batch
from pipelines.plan import Stage, env_args, is_embedded, run_shards
from bifta_core.io.rows import RowContext, build_rows, merge_cascade
from bifta_core.method.prediction import Scorer
from pipelines.write import (
    LAYOUT_VERSION, RUN_FILE, SUMMARY_FILE, finished_shards, output_schema, part_name, read_shard_stats,
    write_json,
)

logger = logging.getLogger("bifta.relabel")

#: Images per scoring batch: scoring is a few matrix products, so batches are large.
SCORE_BATCH = 512
MISSING_VIEWS = "no saved view embeddings: this image's views were not kept (--save-view-embeddings)"


def saved_folder(location: str) -> str:
    """The ``_embeddings/`` folder of ``location`` (a labelling OUT, or that folder itself)."""
    for candidate in (storage.join(location, SAVED_DIR), location):
        if storage.isdir(candidate) and finished_shards(candidate):
            return candidate
    raise InputError(f"no saved embeddings in {location}: label with `bifta label --save-embeddings` first "
                     f"(they are kept under OUT/{SAVED_DIR}/)")


def saved_meta(folder: str) -> dict[str, Any]:
    """The metadata of the saved embeddings (from one file's footer)."""
    first = storage.join(folder, part_name(sorted(finished_shards(folder))[0]))
    with storage.open_input(first) as fh:
        return read_meta(pq.ParquetFile(fh).schema_arrow, first)


def adopt_saved_settings(config: LabelConfig, meta: dict[str, Any], given: set[str]) -> None:
    """Take the model and the view-fixing settings from the embeddings unless a flag gave them; a
    flag that contradicts them is a :class:`ConfigError` (one line)."""
    saved = meta["model_config"]
    m = config.model
    for key in ("model", "pretrained", "quick_gelu", "precision"):
        if key not in given:
            setattr(m, key, saved[key])
        elif getattr(m, key) != saved[key]:
            raise ConfigError(f"the embeddings were made with --{key.replace('_', '-')} {saved[key]}; this run asks "
                              f"for {getattr(m, key)} — relabel scores them with the model that made them")
    for key in ("seed", "pgs_keep", "pgs_whole_image"):
        if key not in given:
            setattr(config, key, meta[key])
        elif getattr(config, key) != meta[key]:
            raise ConfigError(f"the embeddings were encoded with --{key.replace('_', '-')} {meta[key]}; "
                              f"relabel cannot change it (got {getattr(config, key)})")
    view_flags = {"views", "grid", "num_views", "max_views", "iou_threshold", "scale", "preset"}
    saved_views = meta.get("view_preset")
    if saved_views and config.uses_views and not view_flags & given \
            and saved_views["name"] == config.view_preset().name:  # the views the embeddings hold
        if saved_views.get("generator") == "grid":
            config.views, config.grid = "grid", saved_views["grid"]
        else:
            config.num_views, config.max_views = saved_views["num_views"], saved_views["max_views"]
            config.scale = tuple(saved_views["scale"])
        config.iou_threshold = saved_views["iou_threshold"]


def check_saved_views(config: LabelConfig, meta: dict[str, Any]) -> None:
    """A method scored on views needs saved views that are its own views."""
    if not config.uses_views:
        return
    from pipelines.pipeline import view_identity

    if not meta.get("views"):
        raise ConfigError(f"--method {config.method} scores views, and these embeddings hold none: label with "
                          f"--method {config.method} --save-view-embeddings, or relabel with a whole-image method "
                          "(e.g. --method cupl)")
    wanted = json.loads(json.dumps(view_identity(config.view_preset())))  # as stored: lists, not tuples
    if meta.get("view_preset") != wanted:
        have = meta.get("view_preset") or {}
        raise ConfigError(f"the saved views are {have.get('name')}'s ({have.get('num_views')} views, scale "
                          f"{have.get('scale')}, IoU {have.get('iou_threshold')}); --method {config.method} with these "
                          f"flags samples {wanted['name']}'s: relabel with the labelling run's method and view flags")


def _check_model(meta: dict[str, Any], facts: dict[str, Any]) -> None:
    saved, now = meta["model"], facts["provenance"]
    for key in ("model", "weights", "activation"):
        if saved.get(key) != now.get(key):
            raise ConfigError(f"the embeddings were made by {saved.get('model')} ({saved.get('pretrained')}, "
                              f"{saved.get('activation')}, weights {saved.get('weights')}); this run's model is "
                              f"{now.get('model')} ({now.get('pretrained')}, {now.get('activation')}, weights "
                              f"{now.get('weights')}) — they must match")


def _shard_sizes(folder: str, threads: int = 32) -> list[tuple[str, int]]:
    """``[(shard, images)]`` of the saved files, from their footers' statistics."""
    shards = sorted(finished_shards(folder))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        stats = list(pool.map(lambda s: read_shard_stats(storage.join(folder, part_name(s))), shards))
    return [(s, int(st["images"])) for s, st in zip(shards, stats)]


def _unsaved_shards(location: str, folder: str, saved: set[str]) -> list[str]:
    """Shards of the labelling OUT that have a part file but no kept embeddings."""
    out = location if folder != location else os.path.dirname(folder.rstrip("/"))
    return sorted(finished_shards(out) - saved) if out and storage.exists(out) else []


def run_relabel_job(config: LabelConfig, *, given: set[str] = frozenset(),
                    on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Relabel the embeddings in ``config.input``; ``given``: LabelConfig field names set by flags
    (the others take the embeddings' settings). Returns the summary written to ``OUT/_bifta_summary.json``."""
    from pipelines.label_sets import load_label_sets, plan_label_sets, prepare_label_sets
    from pipelines.pipeline import (
        _check_out, _unwrap, cached_model_facts, cascade_args, ensure_ray, model_config, run_id_for, run_summary,
    )

    started = time.time()
    env = storage.s3_env(config.s3_endpoint_url, config.s3_region, config.s3_anon)
    os.environ.update(env)
    if not config.input:
        raise ConfigError("no EMBEDDINGS given: the --out of a `bifta label --save-embeddings` run")
    folder = saved_folder(config.input)
    meta = saved_meta(folder)
    adopt_saved_settings(config, meta, set(given))
    config.validate()
    check_saved_views(config, meta)
    storage.check_writable(config.out)
    loaded = load_label_sets(config)
    _check_out(config, None)
    ensure_ray()
    try:
        facts = cached_model_facts(config, False, env)
        _check_model(meta, facts)
        plan = plan_label_sets(config, loaded, identity=facts["label_set_identity"])
        run_id = run_id_for(config, plan.hashes, meta["model"])  # the embeddings' encoders, not this machine's
        _check_out(config, run_id)
        label_sets = prepare_label_sets(config, model_config(config), plan=plan, remote=env_args(env, gpu=False),
                                        show_progress=on_progress is not None)
        sizes = _shard_sizes(folder)
        unsaved = _unsaved_shards(config.input, folder, {s for s, _ in sizes})
        if unsaved:
            logger.warning("%d shard(s) of %s have predictions but no kept embeddings (labelled without "
                           "--save-embeddings, or still being labelled): relabel skips them; label them again with "
                           "--save-embeddings to include them", len(unsaved), config.input)
        write_json(config.out, RUN_FILE, {"run_id": run_id, "layout": LAYOUT_VERSION, "config": config.to_dict(),
                                          "model": meta["model"], "relabel": {"embeddings": folder,
                                                                              "source_run_id": meta.get("run_id")}})
        done = finished_shards(config.out)
        todo = [(s, n) for s, n in sizes if s not in done]
        skipped = sum(n for s, n in sizes if s in done)
        with storage.open_input(storage.join(folder, part_name(sizes[0][0]))) as fh:
            has_truth = "true_label" in pq.ParquetFile(fh).schema_arrow.names
        schema = output_schema(has_truth)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = config.num_encoders or max(1, cpus // 2 if is_embedded() else cpus)
        specs_first = cascade_args(config)
        from pipelines.label_sets import bank_specs

        specs = bank_specs(config)
        stages = [
            Stage("saved", read_saved_shards, batch_size=1, num_cpus=0.1, concurrency=max(1, min(2, len(todo))),
                  batch_format="numpy", fn_kwargs={"folder": folder}),
            Stage("relabel", RelabelStage, batch_size=SCORE_BATCH, num_cpus=1.0, actors=(1, actors),
                  batch_format="pyarrow", constructor_kwargs=dict(
                      label_set_refs=[ray.put(ls) for ls in label_sets], method=config.method,
                      bank_key=specs[0].key if specs and METHODS[config.method].has_bank else None,
                      score_params=dict(image_scale=config.image_scale, text_scale=config.text_scale,
                                        aggregation=config.aggregation),
                      top_k=config.top_k, explain=config.explain, explain_views=config.explain_views,
                      cascade=specs_first, schema=schema,
                      ctx=RowContext(method=config.method, model=config.model.model.replace("/", "-"),
                                     pretrained=config.model.pretrained, run_id=run_id,
                                     random_weights=config.model.pretrained == "random"),
                      torch_threads=max(1, cpus // actors))),
        ]
        encode_started = time.time()
        totals = run_shards(config.out, todo, stages, writers=max(1, min(4, len(todo))), schema=schema, env=env,
                            file_metadata={"bifta.run_id": run_id}, on_progress=on_progress,
                            total=sum(n for _, n in todo), rows_per_input=len(label_sets))
    except Exception as exc:
        real = _unwrap(exc)
        if real is not exc:
            raise real from None
        raise
    summary = run_summary(config, run_id, totals, label_sets, started=started, encode_started=encode_started,
                          inputs=sum(n for _, n in sizes), shards=len(sizes), skipped=skipped)
    summary.update(embeddings=folder, shards_without_embeddings=len(unsaved))
    write_json(config.out, SUMMARY_FILE, summary)
    return summary


def read_saved_shards(batch: dict[str, Any], folder: str) -> pa.Table:
    """The plan's first stage: shard names → their saved rows, each tagged with its ``shard``."""
    tables = []
    for shard in batch["shard"]:
        with storage.open_input(storage.join(folder, part_name(str(shard)))) as fh:
            table = pq.read_table(fh)
        tables.append(table.replace_schema_metadata(None)
                      .append_column("shard", pa.array([str(shard)] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


class RelabelStage:
    """Scores saved rows (``Dataset.map_batches`` actor): the ``EncodeStage`` without an encoder."""

    def __init__(self, *, label_set_refs: list, method: str, bank_key: str | None, score_params: dict, top_k: int,
                 explain: bool, cascade: dict | None, schema: pa.Schema, ctx: RowContext,
                 explain_views: int = 5, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.label_sets = [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in label_set_refs]
        params = self.params = ScoreParams(**score_params)
        self.explain_views = explain_views
        device = torch.device("cpu")
        self.method, self.uses_views = method, METHODS[method].uses_views
        self.scorer = Scorer(self.label_sets, method=method, bank_key=bank_key, params=params, k=top_k,
                             with_explanations=explain, device=device)
        self.cascade = cascade
        self.first_scorer = None if cascade is None else Scorer(
            self.label_sets, method=cascade["first"], bank_key=cascade["bank_key"], params=params, k=top_k,
            with_explanations=explain, device=device)
        self.schema, self.ctx = schema, ctx

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards = batch.column("shard").to_pylist()
        saved = to_batch(batch.drop_columns(["shard"]))
        meta = saved.columns
        if not self.uses_views:  # a whole-image method samples no view
            meta["views_generated"] = meta["views_kept"] = [0] * len(meta["image_id"])
        ok, predictions = self._predict(saved) if saved.ok else ([], [])
        table = pa.table(build_rows(meta, ok, predictions, self.label_sets, self.ctx), schema=self.schema)
        return table.append_column("shard", pa.array(shards * len(self.label_sets), pa.string()))

    def _predict(self, saved: SavedBatch) -> tuple[list[int], list[dict[str, list]]]:
        """→ (rows scored, their columns per label set); an image whose needed views were not saved
        becomes an error row instead."""
        n = len(saved.ok)
        if not self.uses_views:
            predictions = self.scorer.predict(saved.image_emb, None, None)
            for cols in predictions:
                cols.update(decided_by=[self.method] * n, views_encoded=[0] * n, top_views=[None] * n)
            return saved.ok, predictions
        first = self.first_scorer.predict(saved.image_emb, None, None) if self.cascade else None
        unsure = [needs_views(c["margin"], self.cascade["margin"]) for c in first] if first else None
        need = np.logical_or.reduce(unsure) if unsure else np.ones(n, dtype=bool)
        missing = need & ~saved.has_views
        if missing.any():  # error rows, then score the others
            keep = np.flatnonzero(~missing)
            for j in np.flatnonzero(missing):
                i = saved.ok[j]
                saved.columns["status"][i], saved.columns["error"][i] = "error", MISSING_VIEWS
            saved = _subset(saved, keep)
            return self._predict(saved) if saved.ok else ([], [])
        sub = np.flatnonzero(need)
        index = torch.from_numpy(sub)
        final = None
        if sub.size:
            view_image, view_emb, mask = saved.view_image_emb[index], saved.view_emb[index], saved.view_mask[index]
            final = self.scorer.predict(view_image, view_emb, mask)
            shown = [None] * len(sub)
            if self.explain_views > 0:
                weights = view_weights(view_emb, mask, view_image, self.params.image_scale)
                shown = top_views(weights, mask, [saved.view_boxes[j] for j in sub], self.explain_views)
            for cols in final:
                cols["top_views"] = shown
        views = np.zeros(n, dtype=np.int64)
        views[sub] = saved.view_mask[index].sum(dim=1).numpy()
        if first is None:
            for cols in final:
                cols.update(decided_by=[self.method] * n, views_encoded=views.tolist())
            return saved.ok, final
        return saved.ok, merge_cascade(first, final, unsure, sub, views, (self.cascade["first"], self.method))


def _subset(saved: SavedBatch, keep: np.ndarray) -> SavedBatch:
    """``saved`` with only the ok embeddings at positions ``keep`` (the others became error rows)."""
    index = torch.from_numpy(keep)
    return SavedBatch(columns=saved.columns, ok=[saved.ok[j] for j in keep], image_emb=saved.image_emb[index],
                      view_image_emb=saved.view_image_emb[index], view_emb=saved.view_emb[index],
                      view_mask=saved.view_mask[index], has_views=saved.has_views[keep],
                      view_boxes=[saved.view_boxes[j] for j in keep])
