"""Stage 4 — encode + score (actor pool: one GPU per actor, CPU actors when there is no GPU).

A thin Ray adapter: the model is loaded once per actor, :class:`bifta_core.method.encoding.ViewEncoder`
encodes each batch, :class:`bifta_core.method.prediction.Scorer` scores it against every label set
(the cascade decides here which images need views) and :mod:`bifta_core.io.rows` builds the rows,
so embeddings never leave the device they were computed on.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from bifta_core.io.models import ClipModel, actor_device, check_gpu_assignment, load_model
from bifta_core.io.rows import ROW_COLUMNS, RowContext, build_rows, merge_cascade
from bifta_core.io.saved_embeddings import flat_columns
from bifta_core.method.cascade import needs_views
from bifta_core.method.encoding import Encoded, ViewEncoder
from bifta_core.method.prediction import Scorer, ScoreParams, top_views
from bifta_core.method.registry import METHODS
from bifta_core.method.text_banks import LabelSetEmbeddings


class EncodeStage:
    """Callable class for ``Dataset.map_batches`` with an actor pool; ``__init__`` is the one-time setup."""

    def __init__(
        self,
        *,
        model_cfg: dict,
        label_set_refs: list,
        method: str,
        bank_key: str | None,
        score_params: dict,
        top_k: int,
        view_batch_size: int,
        seed: int,
        pgs_keep: float | None,
        pgs_whole_image: bool,
        explain: bool,
        run_id: str,
        schema: pa.Schema,
        torch_threads: int | None = None,
        start_gate: Any = None,
        cascade: dict | None = None,
        keep: dict | None = None,
        explain_views: int = 5,
    ) -> None:
        import ray

        from pipelines.plan import open_start_gate

        self.schema = schema
        if torch_threads:
            torch.set_num_threads(torch_threads)
        # get_gpu_ids() would start a Ray instance when called outside one (a plain in-process use).
        self.model = load_gpu_checked_model(model_cfg, ray.get_gpu_ids() if ray.is_initialized() else [])
        label_sets: list[LabelSetEmbeddings] = [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in label_set_refs]
        self.label_sets = label_sets
        self.encoder = ViewEncoder(self.model, view_batch_size=view_batch_size, seed=seed, pgs_keep=pgs_keep,
                                   pgs_whole_image=pgs_whole_image)
        self.method = method
        self.uses_views = METHODS[method].uses_views
        params = self.score_params = ScoreParams(**score_params)
        self.explain_views = explain_views  # top_views: the K highest-weighted views of each image
        self.keep = keep  # ``{"views": bool}``: emit the embeddings (bifta_core.io.saved_embeddings) with the rows
        self.scorer = Scorer(label_sets, method=method, bank_key=bank_key, params=params,
                             k=top_k, with_explanations=explain, device=self.model.device)
        # A cascade (bifta_core.method.cascade): ``{"margin": T, "first": method, "bank_key": its bank}``.
        self.cascade = cascade
        self.first_scorer = None if cascade is None else Scorer(
            label_sets, method=cascade["first"], bank_key=cascade["bank_key"], params=params, k=top_k,
            with_explanations=explain, device=self.model.device)
        self.ctx = RowContext(method=method, model=self.model.model_name, pretrained=self.model.pretrained,
                              run_id=run_id, random_weights=self.model.is_random)
        open_start_gate(start_gate)  # the model is loaded: the plan's first stage may start reading

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        predictions: list[dict[str, list]] = []
        encoded = None
        if ok:
            ids = [str(batch["image_id"][i]) for i in ok]
            image_emb = self.encoder.encode_whole([batch["whole"][i] for i in ok], ids)
            if self.cascade is not None:
                predictions, encoded = self._cascade(batch, ok, ids, image_emb)
            else:
                encoded = Encoded(image_emb)
                if self.uses_views:
                    encoded = self._encode_views(batch, ok, ids, image_emb, np.arange(len(ok)))
                predictions = self.scorer.predict(encoded.view_image if encoded.has_views else image_emb,
                                                  encoded.view_emb, encoded.view_mask)
                views = encoded.views_per_image(len(ok)).tolist()
                shown = self._top_views(encoded, batch, ok)
                for cols in predictions:
                    cols.update(decided_by=[self.method] * len(ok), views_encoded=views, top_views=shown)
        meta = {k: list(batch[k]) for k in ("image_id", "uri", "status", "error", "views_generated", "views_kept")}
        if "true_label" in batch:
            meta["true_label"] = list(batch["true_label"])
        # An explicit schema keeps every block identical, even one made only of error rows.
        table = pa.table(build_rows(meta, ok, predictions, self.label_sets, self.ctx), schema=self.schema)
        if self.keep is not None:  # the embeddings ride on the first label set's rows, to the shard's writer
            for name, column in flat_columns(encoded, batch, ok, n, len(self.label_sets), self.keep,
                                             self.score_params.image_scale).items():
                table = table.append_column(name, column)
        if "shard" in batch:  # the output shard travels with its rows (one row per image and label set)
            shard = pa.array([str(s) for s in batch["shard"]] * len(self.label_sets), pa.string())
            table = table.append_column("shard", shard)
        return table

    def _top_views(self, encoded: "Encoded", batch: dict[str, np.ndarray], ok: list[int]) -> list:
        """``top_views`` of the images ``encoded`` has views of (None each without views or when
        ``--explain-views 0``; boxes in original pixels)."""
        if not encoded.has_views:
            return [None] * len(encoded.image_emb)
        if self.explain_views <= 0:
            return [None] * len(encoded.sub)
        boxes = [np.frombuffer(batch["boxes_original"][ok[j]], dtype=np.int32).reshape(-1, 4) for j in encoded.sub]
        return top_views(encoded.weights(self.score_params.image_scale), encoded.view_mask, boxes, self.explain_views)

    def _encode_views(self, batch: dict[str, np.ndarray], ok: list[int], ids: list[str], image_emb: torch.Tensor,
                      sub: np.ndarray) -> "Encoded":
        """Views of the ok images ``sub`` (positions in ``ok``) cut and encoded, with the whole image
        their weights compare them to: the working decode's where it differs from ``image_emb``'s
        (a JPEG decoded at another DCT scale), else the same embedding."""
        rows, sub_ids = [ok[j] for j in sub], [ids[j] for j in sub]
        alternative = [batch["view_whole"][i] for i in rows] if "view_whole" in batch else []
        if any(alternative):
            view_image = self.encoder.encode_whole([alt or batch["whole"][i] for alt, i in zip(alternative, rows)],
                                                   sub_ids)
        else:
            view_image = image_emb[torch.from_numpy(sub).to(image_emb.device)]
        view_emb, view_mask = self.encoder.encode_views(
            [batch["work"][i] for i in rows], [tuple(batch["work_hw"][i]) for i in rows],
            [batch["boxes"][i] for i in rows], sub_ids, [batch["crops"][i] for i in rows],
        )
        return Encoded(image_emb, sub=sub, view_image=view_image, view_emb=view_emb, view_mask=view_mask)

    def _cascade(self, batch: dict[str, np.ndarray], ok: list[int], ids: list[str],
                 image_emb: torch.Tensor) -> tuple[list[dict[str, list]], "Encoded"]:
        """First stage on the whole image; views, and the method, only for the images some label
        set is unsure of (margin < T, :func:`bifta_core.method.cascade.needs_views`)."""
        first = self.first_scorer.predict(image_emb, None, None)
        unsure_by_set = [needs_views(cols["margin"], self.cascade["margin"]) for cols in first]
        sub = np.flatnonzero(np.logical_or.reduce(unsure_by_set))
        encoded, final = Encoded(image_emb), None
        if sub.size:
            encoded = self._encode_views(batch, ok, ids, image_emb, sub)
            final = self.scorer.predict(encoded.view_image, encoded.view_emb, encoded.view_mask)
            shown = self._top_views(encoded, batch, ok)
            for cols in final:
                cols["top_views"] = shown
        views = encoded.views_per_image(len(ok))
        return merge_cascade(first, final, unsure_by_set, sub, views, (self.cascade["first"], self.method)), encoded


def load_gpu_checked_model(model_cfg: dict, gpu_ids: list) -> ClipModel:
    """Load the model in a (Ray) worker that was assigned ``gpu_ids``.

    A worker holding a GPU must run on it: unusable CUDA (driver too old for the torch build, no
    kernels for the GPU) or ``--device cpu`` is one :class:`~bifta_core.errors.ConfigError` line,
    never a silent CPU fallback; ``--device cuda:N`` maps onto the worker's own GPU.
    """
    from pipelines.plan import quiet_worker

    quiet_worker()
    cfg = dict(model_cfg)
    if gpu_ids:
        check_gpu_assignment(gpu_ids, cfg.get("device", "auto"))
        cfg["device"] = actor_device(cfg.get("device", "auto"), gpu_ids)
        cfg["require_cuda"] = True
    return load_model(**cfg)


def default_torch_threads() -> int:
    """CPU encoders use every core: the encoder is the pipeline's bottleneck on a CPU-only machine."""
    return max(1, os.cpu_count() or 1)


__all__ = ["EncodeStage", "ROW_COLUMNS", "default_torch_threads", "load_gpu_checked_model"]
