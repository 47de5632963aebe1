"""Evaluation encoding: inputs with ground truth → whole-image and all-view embeddings, once.

The evaluation pipeline reuses the labelling stages — ``read_batch`` → ``ViewStage`` (with
``all_views=True``: every sampled box plus a mask of those IoU refinement keeps) — and ends in
:class:`EmbedStage`, an actor that encodes each image's whole view and all its views with
:class:`pipelines.encode.ViewEncoder` and returns the embeddings (no scoring). The driver then
scores every method from them (``bifta_core.evaluation``), so all methods see the same crops.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bifta_core import storage
from bifta_core.config import LabelConfig
from bifta_core.errors import InputError, LabelSetError
from bifta_core.eval_embeddings import FLAT_SCHEMA
from bifta_core.labelset_artifact import load_artifact, save_artifact
from bifta_core.labelsets import LabelSet, load_label_set
from bifta_core.models import load_model, model_identity, model_input_size
from bifta_core.text_banks import BankSpec, LabelSetEmbeddings, content_hash
from pipelines.encode import ViewEncoder
from pipelines.inputs import _read_manifest, list_inputs, MANIFEST_EXTENSIONS
from pipelines.read import read_batch
from pipelines.views import ViewStage

logger = logging.getLogger("bifta.evaluate")


# ------------------------------------------------------------------------------------ inputs


def list_eval_inputs(spec: str, label_column: str = "label", limit: int | None = None) -> pa.Table:
    """List a labelled dataset → ``image_id, uri, true_label``.

    ``spec`` is a manifest (``.csv``/``.parquet`` with ``uri`` or ``path`` and ``label_column``)
    or a folder with one sub-folder per class (the class is the first path component below it).
    Raises :class:`InputError` when no ground truth can be found.
    """
    is_manifest = spec.lower().endswith(MANIFEST_EXTENSIONS)
    table = list_inputs(spec, None)
    if is_manifest:
        local = spec if storage.is_remote(spec) else os.path.abspath(os.path.expanduser(spec))
        manifest = _read_manifest(local)
        if label_column not in manifest.column_names:
            raise InputError(
                f"manifest {spec} has no '{label_column}' column for the ground truth "
                f"(columns: {', '.join(manifest.column_names)}); pick one with --label-column"
            )
        labels = [None if v is None else str(v) for v in manifest.column(label_column).to_pylist()]
        table = table.drop_columns([c for c in ("true_label",) if c in table.column_names])
        table = table.append_column("true_label", pa.array(labels, pa.string()))
    else:
        ids = table.column("image_id").to_pylist()
        flat = [i for i in ids if "/" not in i.strip("/")]
        if flat:
            raise InputError(
                f"{spec}: evaluation needs one sub-folder per class (or a manifest with a label column); "
                f"{len(flat)} images lie directly in it, e.g. {flat[:3]}"
            )
        labels = [i.strip("/").split("/", 1)[0] for i in ids]
        table = table.append_column("true_label", pa.array(labels, pa.string()))
    if limit is not None:
        table = table.slice(0, limit)
    return table


# --------------------------------------------------------------------------------- label set


def _cache_file(config: LabelConfig, digest: str) -> str | None:
    from pipelines.label_set import default_cache_dir

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
    config: LabelConfig, label_set: LabelSet, specs: list[BankSpec], model_cfg: dict
) -> tuple[LabelSetEmbeddings, bool]:
    """Text embeddings of ``label_set`` for ``specs`` → (embeddings, cache hit).

    Uses the labelling pipeline's content-hash cache; a miss is encoded in one Ray task (on a GPU
    when the cluster has one), and Ray is started only then.
    """
    from pipelines.label_set import _encode_label_sets
    from pipelines.pipeline import ensure_ray

    identity = model_identity(config.model.model, config.model.pretrained, config.model.cache_dir)
    digest = content_hash(label_set, identity, specs, config.text_scale)
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
    ensure_ray()
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = _encode_label_sets.options(num_gpus=gpus)
    emb = ray.get(task.remote([label_set], model_cfg, specs, config.text_scale))[0]
    if cache:
        save_artifact(emb, cache)
    return emb, False


# ------------------------------------------------------------------------------ encode actor


class EmbedStage:
    """Callable class for ``Dataset.map_batches`` (actor pool): decoded rows → embeddings.

    Output rows follow :data:`bifta_core.eval_embeddings.FLAT_SCHEMA`: ``image_emb`` and the
    concatenated ``view_emb`` as ``list<float32>``, ``n_views`` and the per-view ``view_kept``
    flags; error rows keep their reason and null embeddings.
    """

    def __init__(
        self,
        *,
        model_cfg: dict,
        with_views: bool,
        view_batch_size: int,
        seed: int,
        pgs_keep: float | None,
        pgs_whole_image: bool,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = load_model(**model_cfg)
        self.with_views = with_views
        self.encoder = ViewEncoder(self.model, view_batch_size=view_batch_size, seed=seed, pgs_keep=pgs_keep,
                                   pgs_whole_image=pgs_whole_image)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        image_emb: list[Any] = [None] * n
        view_emb: list[Any] = [None] * n
        view_kept: list[Any] = [None] * n
        n_views = [0] * n
        if ok:
            ids = [str(batch["image_id"][i]) for i in ok]
            whole = self.encoder.encode_whole([batch["whole"][i] for i in ok], ids).float().cpu()
            for j, i in enumerate(ok):
                image_emb[i] = whole[j].numpy()
            if self.with_views:
                emb, mask = self.encoder.encode_views(
                    [batch["work"][i] for i in ok], [tuple(batch["work_hw"][i]) for i in ok],
                    [batch["boxes"][i] for i in ok], ids,
                )
                emb, mask = emb.float().cpu(), mask.cpu()
                for j, i in enumerate(ok):
                    c = int(mask[j].sum())
                    n_views[i] = c
                    view_emb[i] = emb[j, :c].reshape(-1).numpy()
                    kept = np.frombuffer(batch["view_kept"][i], dtype=np.uint8) if "view_kept" in batch else None
                    view_kept[i] = (kept[:c] > 0).tolist() if kept is not None else [True] * c
            else:
                for i in ok:
                    view_emb[i] = np.zeros(0, dtype=np.float32)
                    view_kept[i] = []
        labels = list(batch["true_label"]) if "true_label" in batch else [None] * n
        ok_set = set(ok)
        columns = {
            "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
            "uri": pa.array([str(x) for x in batch["uri"]], pa.string()),
            "true_label": pa.array([None if x is None else str(x) for x in labels], pa.string()),
            "status": pa.array(["ok" if i in ok_set else "error" for i in range(n)], pa.string()),
            "error": pa.array([None if i in ok_set else str(batch["error"][i] or "unknown error") for i in range(n)],
                              pa.string()),
            "image_emb": _float_lists(image_emb),
            "n_views": pa.array(n_views, pa.int32()),
            "view_emb": _float_lists(view_emb),
            "view_kept": pa.array(view_kept, pa.list_(pa.bool_())),
        }
        return pa.table(columns, schema=FLAT_SCHEMA)


def _float_lists(rows: list[np.ndarray | None]) -> pa.ListArray:
    """``list<float32>`` array from per-row float vectors (``None`` → null), without Python floats."""
    lengths = [0 if r is None else int(r.size) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    parts = [np.asarray(r, dtype=np.float32).reshape(-1) for r in rows if r is not None]
    values = pa.array(np.concatenate(parts) if parts else np.zeros(0, np.float32), pa.float32())
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float32()), mask=mask)


def embed_dataset(config: LabelConfig, todo: pa.Table, *, with_views: bool, model_cfg: dict) -> Any:
    """Ray Data plan: read → decode + all views → :class:`EmbedStage` (same sizing as ``bifta label``)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    n = todo.num_rows
    chunk = max(config.batch_size * 2, math.ceil(n / 5000))
    ds = ray.data.from_arrow([todo.slice(i, chunk) for i in range(0, n, chunk)])
    image_size = model_input_size(config.model.model)
    preset = dataclasses.asdict(config.view_preset()) if with_views else None
    encoders = (config.num_encoders or max(1, gpus)) if gpus else (config.num_encoders or 1)
    enc_resources: dict[str, Any] = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=1)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // encoders)
    view_workers = max(1, cpus - encoders)
    ds = ds.map_batches(read_batch, batch_size=config.batch_size, batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(
        ViewStage,
        fn_constructor_kwargs=dict(image_size=image_size, preset=preset, seed=config.seed,
                                   max_pixels=config.max_pixels, all_views=True),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=view_workers),
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs=dict(
            model_cfg=model_cfg, with_views=with_views, view_batch_size=config.view_batch_size, seed=config.seed,
            pgs_keep=config.pgs_keep, pgs_whole_image=config.pgs_whole_image, torch_threads=threads,
        ),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=encoders),
        **enc_resources,
    )
    return ds


def embeddings_meta(config: LabelConfig, *, with_views: bool, embed_dim: int | None = None) -> dict[str, Any]:
    """What an evaluation's image embeddings depend on (stored with ``--save-embeddings``)."""
    from bifta_core.eval_embeddings import EMBEDDINGS_FORMAT

    m = config.model
    return {
        "format": EMBEDDINGS_FORMAT,
        "model": m.model.replace("/", "-"),
        "pretrained": m.pretrained,
        "model_identity": model_identity(m.model, m.pretrained, m.cache_dir),
        "embed_dim": embed_dim,
        "views": dataclasses.asdict(config.view_preset()) if with_views else None,
        "seed": config.seed,
        "pgs_keep": config.pgs_keep,
        "pgs_whole_image": config.pgs_whole_image,
        "image_size": model_input_size(m.model),
    }
