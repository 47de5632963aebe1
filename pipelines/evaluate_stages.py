"""Evaluation encoding: inputs with ground truth → whole-image and all-view embeddings, once.

The evaluation plan (:func:`eval_stages`, built and run like labelling's by ``pipelines.plan``,
its rows written per shard by the same writers) reuses the labelling stages — read → :class:`EvalViewStage`
(the labelling ``ViewStage`` once without views and once per view preset, with ``all_views=True``:
every sampled box plus a mask of those refinement keeps) — and ends in :class:`EmbedStage`, an
actor that encodes each image's whole view and every preset's views with
:class:`bifta_core.method.encoding.ViewEncoder` and returns the embeddings (no scoring), which the writers
publish as ``OUT/embeddings/part-<shard>.parquet``. The driver then reads them back and scores every
method from them (``bifta_core.evaluation.metrics``): WCA rows on WCA's views, BiFTA rows on
BiFTA's, each exactly as ``bifta label --method wca|bifta`` samples and encodes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from bifta_core.config import LabelConfig
from bifta_core.errors import LabelSetError
from bifta_core.evaluation.embeddings import FLAT_SCHEMA
from bifta_core.evaluation.metrics import VIEW_PRESET_NAMES
from bifta_core.io.label_set_artifacts import load_artifact, save_artifact
from bifta_core.io.label_sets import LabelSet, load_label_set
from bifta_core.io.models import model_identity, model_input_size, model_preprocess
from bifta_core.method.text_banks import BankSpec, LabelSetEmbeddings, content_hash
from bifta_core.method.views import ViewPreset
from pipelines.columns import COLUMN_TYPES
from bifta_core.method.encoding import ViewEncoder
from pipelines.views import ViewStage

logger = logging.getLogger("bifta.evaluate")


# ------------------------------------------------------------------------------------ inputs


# --------------------------------------------------------------------------------- label set


def _cache_file(config: LabelConfig, digest: str) -> str | None:
    from pipelines.label_sets import default_cache_dir

    if config.labelset_cache == "":
        return None
    return os.path.join(config.labelset_cache or default_cache_dir(), f"{digest}.parquet")


def load_eval_label_set(config: LabelConfig) -> LabelSet:
    """The one label set an evaluation scores against (``config.labels[0]``), validated."""
    entries = config.label_specs()
    if len(entries) != 1:
        raise LabelSetError(f"evaluate takes exactly one label set (--labels), got {len(entries)}")
    name, path = entries[0]
    return load_label_set(path, name, merge_duplicates=config.merge_duplicate_classes)


def prepare_eval_label_set(
    config: LabelConfig, label_set: LabelSet, specs: list[BankSpec], model_cfg: dict, *, num_gpus: float = 0,
    remote: dict | None = None, show_progress: bool = True,
) -> tuple[LabelSetEmbeddings, bool]:
    """Text embeddings of ``label_set`` for ``specs`` → (embeddings, cache hit); a progress line while
    encoding unless ``show_progress`` is False.

    Uses the labelling pipeline's content-hash cache and key (:func:`pipelines.label_sets.label_set_identity`);
    a miss is encoded in the labelling pipeline's Ray task, with the same resources and runtime environment.
    """
    from pipelines.label_sets import _encode_label_sets, label_set_identity, text_encode_options

    digest = content_hash(label_set, label_set_identity(config), specs, config.text_scale)
    cache = _cache_file(config, digest)
    if cache and os.path.exists(cache):
        try:
            emb = load_artifact(cache)
            emb.name = label_set.name
            logger.info("label set '%s': %d classes from cache %s (no text encoded)",
                        label_set.name, label_set.num_classes, cache)
            return emb, True
        except LabelSetError as exc:
            logger.warning("ignoring unreadable label-set cache %s: %s", cache, exc)
    logger.info("label set '%s': %d classes, refining and encoding descriptions for %d banks",
                label_set.name, label_set.num_classes, len(specs))
    import ray

    from pipelines.pipeline import ensure_ray

    ensure_ray()
    resources = text_encode_options(num_gpus)
    threads = resources.pop("threads")
    task = _encode_label_sets.options(**resources, **(remote or {}))
    text_cfg = {**model_cfg, "quick_gelu": config.model.quick_gelu}
    emb = ray.get(task.remote([label_set], text_cfg, specs, config.text_scale, threads, show_progress))[0]
    emb.content_hash = digest
    if cache:
        save_artifact(emb, cache)
    return emb, False


# ------------------------------------------------------------------------------------- views


def view_presets(config: LabelConfig, names: Sequence[str]) -> dict[str, ViewPreset]:
    """The resolved view settings of each preset in ``names``: exactly what
    ``bifta label --method NAME`` with the same view flags (``--num-views``, ``--scale``…) samples."""
    return {name: config.view_preset(name) for name in names}


class EvalViewStage:
    """Decode + views for every preset at once (the evaluation's ``stage_class`` of
    :func:`pipelines.views.views_stage`).

    Runs the labelling pipeline's :class:`pipelines.views.ViewStage` once for the view-less methods
    (whole image decoded at the model's input size) and once per view preset (decoded at that
    preset's working resolution, every sampled box plus the ``view_kept`` mask), so each method
    sees the pixels and boxes ``bifta label --method M`` gives it. Output columns: the input's
    metadata, ``whole``, and per preset ``P``: ``P_whole``, ``P_work``, ``P_work_hw``, ``P_boxes``,
    ``P_crops`` (views already cut, when that is smaller than the working image) and
    ``P_view_kept``. An image any decode fails on is an error row.
    """

    def __init__(self, *, image_size: int, presets: dict[str, dict], seed: int, max_pixels: int,
                 resize_mode: str = "shortest") -> None:
        common = dict(image_size=image_size, seed=seed, max_pixels=max_pixels, resize_mode=resize_mode)
        self.whole = ViewStage(preset=None, **common)
        self.stages = {name: ViewStage(preset=preset, all_views=True, **common) for name, preset in presets.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        whole = self.whole(batch)  # typed Arrow tables (pipelines.columns), one per decode
        status = whole.column("status").to_pylist()
        error = whole.column("error").to_pylist()
        dropped = {"work", "work_hw", "boxes", "crops", "views_generated", "views_kept", "view_kept", "status", "error"}
        out = whole.select([c for c in whole.column_names if c not in dropped])
        for name, stage in self.stages.items():
            part = stage(batch)
            for i, (st, err) in enumerate(zip(part.column("status").to_pylist(), part.column("error").to_pylist())):
                if st != "ok" and status[i] == "ok":
                    status[i], error[i] = st, err
            for col in ("whole", "work", "work_hw", "boxes", "crops", "view_kept"):
                out = out.append_column(f"{name}_{col}", part.column(col))
        out = out.append_column("status", pa.array(status, COLUMN_TYPES["status"]))
        return out.append_column("error", pa.array(error, COLUMN_TYPES["error"]))


# ------------------------------------------------------------------------------ encode actor


class EmbedStage:
    """Callable class for ``Dataset.map_batches`` (actor pool): decoded rows → embeddings.

    Output rows follow :data:`bifta_core.evaluation.embeddings.FLAT_SCHEMA`: ``image_emb`` and, per view
    preset, the preset's whole-image embedding, the concatenated ``view_emb`` of every sampled view
    (in sampling order), ``n_views`` and the per-view ``view_kept`` flags; error rows keep their
    reason and null embeddings.

    The views a preset's refinement keeps are encoded together, as one ``encode_views`` call over
    the batch — the very call the labelling pipeline makes — and the dropped ones in a second call,
    so the kept views' embeddings are bit for bit those of ``bifta label``.
    """

    def __init__(
        self,
        *,
        model_cfg: dict,
        presets: Sequence[str],
        view_batch_size: int,
        seed: int,
        pgs_keep: float | None,
        pgs_whole_image: bool,
        torch_threads: int | None = None,
        start_gate: Any = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        import ray

        from pipelines.encode import load_gpu_checked_model
        from pipelines.plan import open_start_gate

        self.model = load_gpu_checked_model(model_cfg, ray.get_gpu_ids() if ray.is_initialized() else [])
        self.presets = list(presets)
        self.encoder = ViewEncoder(self.model, view_batch_size=view_batch_size, seed=seed, pgs_keep=pgs_keep,
                                   pgs_whole_image=pgs_whole_image)
        open_start_gate(start_gate)  # the model is loaded: the plan's first stage may start reading

    def _views(self, batch: dict[str, np.ndarray], preset: str, ok: list[int], ids: list[str]) -> list[tuple]:
        """→ per ok image ``(view embeddings [n, D] in sampling order, kept flags)``."""
        size = self.model.image_size
        boxes, kept, cut = [], [], []
        for i in ok:
            b = np.frombuffer(batch[f"{preset}_boxes"][i], dtype=np.int32).reshape(-1, 4)
            k = np.frombuffer(batch[f"{preset}_view_kept"][i], dtype=np.uint8)[: b.shape[0]] > 0
            c = batch[f"{preset}_crops"][i] if f"{preset}_crops" in batch else b""
            boxes.append(b)
            kept.append(k)
            cut.append(np.frombuffer(c, dtype=np.uint8).reshape(b.shape[0], 3, size, size) if c else None)
        work = [batch[f"{preset}_work"][i] for i in ok]
        hw = [tuple(batch[f"{preset}_work_hw"][i]) for i in ok]
        parts = []
        for select in (True, False):
            if not any(int((k == select).sum()) for k in kept):
                parts.append(None)
                continue
            chosen = [np.ascontiguousarray(b[k == select]).tobytes() for b, k in zip(boxes, kept)]
            # An image whose views came cut and that has none on this side yields no crop (an empty
            # block cut from its empty working image).
            crops = [b"" if c is None else np.ascontiguousarray(c[k == select]).tobytes() for c, k in zip(cut, kept)]
            emb, mask = self.encoder.encode_views(work, hw, chosen, ids, crops)
            parts.append(emb.float().cpu())
        out = []
        for j, (b, k) in enumerate(zip(boxes, kept)):
            views = torch.zeros(b.shape[0], self.model.embed_dim, dtype=torch.float32)
            for select, emb in zip((True, False), parts):
                idx = np.flatnonzero(k == select)
                if emb is not None and idx.size:
                    views[torch.from_numpy(idx)] = emb[j, : idx.size]
            out.append((views.numpy(), k.tolist()))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        image_emb: list[Any] = [None] * n
        per_preset: dict[str, dict[str, list[Any]]] = {
            p: {"image": [None] * n, "views": [None] * n, "kept": [None] * n, "n": [0] * n} for p in self.presets
        }
        if ok:
            ids = [str(batch["image_id"][i]) for i in ok]
            whole = self.encoder.encode_whole([batch["whole"][i] for i in ok], ids).float().cpu()
            for j, i in enumerate(ok):
                image_emb[i] = whole[j].numpy()
            for p in self.presets:
                cols = per_preset[p]
                p_whole = self.encoder.encode_whole([batch[f"{p}_whole"][i] for i in ok], ids).float().cpu()
                for j, (i, (views, kept)) in enumerate(zip(ok, self._views(batch, p, ok, ids))):
                    cols["image"][i] = p_whole[j].numpy()
                    cols["views"][i] = views.reshape(-1)
                    cols["kept"][i] = kept
                    cols["n"][i] = len(kept)
        labels = list(batch["true_label"]) if "true_label" in batch else [None] * n
        ok_set = set(ok)
        columns: dict[str, pa.Array] = {
            "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
            "uri": pa.array([str(x) for x in batch["uri"]], pa.string()),
            "true_label": pa.array([None if x is None else str(x) for x in labels], pa.string()),
            "status": pa.array(["ok" if i in ok_set else "error" for i in range(n)], pa.string()),
            "error": pa.array([None if i in ok_set else str(batch["error"][i] or "unknown error") for i in range(n)],
                              pa.string()),
            "image_emb": _float_lists(image_emb),
        }
        for p in VIEW_PRESET_NAMES:
            cols = per_preset.get(p) or {"image": [None] * n, "views": [None] * n, "kept": [None] * n, "n": [0] * n}
            columns[f"{p}_image_emb"] = _float_lists(cols["image"])
            columns[f"{p}_n_views"] = pa.array(cols["n"], pa.int32())
            columns[f"{p}_view_emb"] = _float_lists(cols["views"])
            columns[f"{p}_view_kept"] = pa.array(cols["kept"], pa.list_(pa.bool_()))
        table = pa.table(columns, schema=FLAT_SCHEMA)
        if "shard" in batch:  # the output shard travels with its rows
            table = table.append_column("shard", pa.array([str(x) for x in batch["shard"]], pa.string()))
        return table


def _float_lists(rows: list[np.ndarray | None]) -> pa.ListArray:
    """``list<float32>`` array from per-row float vectors (``None`` → null), without Python floats."""
    lengths = [0 if r is None else int(r.size) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    parts = [np.asarray(r, dtype=np.float32).reshape(-1) for r in rows if r is not None]
    values = pa.array(np.concatenate(parts) if parts else np.zeros(0, np.float32), pa.float32())
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float32()), mask=mask)


def eval_stages(config: LabelConfig, res, *, presets: dict[str, ViewPreset], model_cfg: dict, out: str) -> list:
    """The evaluation plan: the labelling plan's stages with :class:`EvalViewStage` and :class:`EmbedStage`
    in place of the views and encode stages (the same builder, resources and writers)."""
    from pipelines.inputs import shards_stage
    from pipelines.pipeline import encode_stage
    from pipelines.read import read_stage
    from pipelines.views import views_stage

    preprocess = model_preprocess(config.model.model, config.model.pretrained)
    return [
        shards_stage(out, True),
        read_stage(config.batch_size),
        views_stage(batch_size=config.batch_size, max_tasks=res.decoders, use_gpu=res.use_gpu,
                    stage_class=EvalViewStage, image_size=preprocess["size"], seed=config.seed,
                    max_pixels=config.max_pixels, presets={k: dataclasses.asdict(v) for k, v in presets.items()},
                    resize_mode=preprocess["resize_mode"]),
        encode_stage(config, res, dict(model_cfg=model_cfg, presets=list(presets),
                                       view_batch_size=config.view_batch_size, seed=config.seed,
                                       pgs_keep=config.pgs_keep, pgs_whole_image=config.pgs_whole_image),
                     cls=EmbedStage, name="embed"),
    ]


def model_embed_dim(model_name: str) -> int | None:
    """The joint embedding width of an architecture from its open_clip config (no weights built)."""
    import open_clip

    from bifta_core.io.models import register_bundled_configs

    register_bundled_configs()
    return (open_clip.get_model_config(model_name.replace("/", "-")) or {}).get("embed_dim")


def embeddings_meta(config: LabelConfig, presets: dict[str, ViewPreset], embed_dim: int | None = None) -> dict[str, Any]:
    """What an evaluation's image embeddings depend on (stored with ``--save-embeddings``)."""
    from bifta_core.evaluation.embeddings import EMBEDDINGS_FORMAT

    m = config.model
    return {
        "format": EMBEDDINGS_FORMAT,
        "model": m.model.replace("/", "-"),
        "pretrained": m.pretrained,
        "model_identity": model_identity(m.model, m.pretrained, m.cache_dir, quick_gelu=m.quick_gelu),
        "embed_dim": embed_dim,
        "views": {name: dataclasses.asdict(p) for name, p in presets.items()},
        "seed": config.seed,
        "pgs_keep": config.pgs_keep,
        "pgs_whole_image": config.pgs_whole_image,
        "image_size": model_input_size(m.model),
    }
