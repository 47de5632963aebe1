"""Stage 4 — encode (actor pool: one GPU per actor, CPU actors when there is no GPU).

The model is loaded once per actor. Views of all images in a batch are cut from the working
images (on the actor's device), flattened into one list and encoded in chunks of
``view_batch_size``, then regrouped per image with a mask for WCA scoring. Scoring against every
label set happens here too (``pipelines.score``), so embeddings never leave the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from bifta_core.models import ClipModel, actor_device, check_gpu_assignment, load_model
from bifta_core.predict import ScoreParams, top_views
from bifta_core.seeding import generator_for
from bifta_core.text_banks import LabelSetEmbeddings
from pipelines.score import ROW_COLUMNS, RowContext, Scorer, build_rows, merge_cascade
from bifta_core.cascade import needs_views
from bifta_core.methods import METHODS
from bifta_core.views import cut_planned, pinned_empty, plan_views, to_device


def _host_batch(blobs: list[bytes], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """All ``blobs`` in one host uint8 buffer (pinned when bound for CUDA) → (buffer on ``device``,
    offsets): a batch's pixels cross to the device in one copy that overlaps queued work."""
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    host = pinned_empty(int(offsets[-1]), torch.uint8, device)
    flat = host.numpy()
    for blob, start in zip(blobs, offsets):
        flat[start : start + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    return to_device(host, device), offsets


class ViewEncoder:
    """Turns decoded batches into whole-image and per-view embeddings (pure torch, no Ray).

    Per batch, host-device traffic is a constant number of copies whatever the number of images
    and views: one pinned upload of all pixels, one of the CLIP-PGS noise (when on), one gather
    index that regroups embeddings per image. Views stay uint8 until their ``view_batch_size``
    chunk is cut, normalised and encoded, so float memory is bounded by the chunk, not by
    images × views (see docs/scaling.md, "GPU memory").
    """

    def __init__(self, model: ClipModel, *, view_batch_size: int, seed: int, pgs_keep: float | None,
                 pgs_whole_image: bool) -> None:
        self.model = model
        self.view_batch_size = view_batch_size
        self.seed = seed
        self.pgs_keep = pgs_keep if pgs_keep is not None and pgs_keep < 1.0 else None
        self.pgs_whole_image = pgs_whole_image
        if self.pgs_keep is not None:
            from bifta_core.pgs import PgsConfig, grid_size_of, patch_size_of, supports_pgs
            from bifta_core.errors import ConfigError

            if not supports_pgs(model.model):
                raise ConfigError(f"--pgs-keep needs a ViT image tower; {model.model_name} is not supported")
            self._pgs_config = PgsConfig(keep_ratio=self.pgs_keep)
            self._patch = patch_size_of(model.model)
            gh, gw = grid_size_of(model.model)
            self._num_patches = int(gh * gw)

    def _pgs_noise(self, image_ids: list[str], counts: list[int], order: np.ndarray | None = None
                   ) -> torch.Tensor | None:
        """CLIP-PGS selection noise of every view, seeded from (seed, image id) so batching never
        changes it; drawn on the host, reordered like the views, uploaded once."""
        if self.pgs_keep is None:
            return None
        from bifta_core.pgs import selection_noise

        parts = [selection_noise(n, self._num_patches, generator_for(self.seed, f"{image_id}:pgs"))
                 for image_id, n in zip(image_ids, counts) if n]
        noise = torch.cat(parts, dim=1) if parts else torch.empty(2, 0, self._num_patches)
        if order is not None:
            noise = noise[:, torch.from_numpy(order)]
        return to_device(noise.contiguous(), self.model.device)

    def _encode_chunks(self, chunk: Callable[[int, int], torch.Tensor], total: int,
                       noise: torch.Tensor | None) -> torch.Tensor:
        """Encode ``chunk(a, b)`` (uint8 ``[b-a,3,S,S]`` on the device) for every chunk of ``total``."""
        out = []
        for a in range(0, total, self.view_batch_size):
            b = min(total, a + self.view_batch_size)
            x = self.model.normalize_pixels(chunk(a, b))  # float only for this chunk
            keep = None
            if noise is not None:
                from bifta_core.pgs import select_patches

                keep = select_patches(x, self.model.mean, self.model.std, self._patch, self._pgs_config,
                                      noise=noise[:, a:b])
            out.append(self.model.encode_images(x, keep, check_keep=False))
        return torch.cat(out) if out else torch.empty(0, self.model.embed_dim, device=self.model.device)

    def encode_whole(self, whole: list[bytes], image_ids: list[str]) -> torch.Tensor:
        s = self.model.image_size
        buf, _ = _host_batch(whole, self.model.device)
        pix = buf.view(len(whole), 3, s, s)
        noise = self._pgs_noise(image_ids, [1] * len(whole)) if self.pgs_whole_image else None
        return self._encode_chunks(lambda a, b: pix[a:b], len(whole), noise)

    def encode_views(
        self, work: list[bytes], work_hw: list[tuple[int, int]], boxes: list[bytes], image_ids: list[str],
        crops: list[bytes] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ``view_emb [B,Vmax,D]`` and ``view_mask [B,Vmax]`` (ragged views per image).

        Each image arrives either as its working image plus boxes (crops cut here, on the encoder's
        device) or, when that is smaller, as crops already cut by the views stage. Views are cut and
        encoded in side-sorted order (:func:`bifta_core.views.plan_views`), chunk by chunk, and one
        gather puts the embeddings back per image.
        """
        size = self.model.image_size
        crops = crops or [b""] * len(work)
        box_arrays = [np.frombuffer(b, dtype=np.int32).reshape(-1, 4) for b in boxes]
        blobs = [cut if cut else blob for blob, cut in zip(work, crops)]
        buf, offsets = _host_batch(blobs, self.model.device)
        sources, ready = [], []
        for k, ((h, w), b, cut) in enumerate(zip(work_hw, box_arrays, crops)):
            part = buf[offsets[k] : offsets[k + 1]]
            if cut:
                sources.append(part.view(b.shape[0], 3, size, size))
                ready.append(int(b.shape[0]))
            else:
                sources.append(part.view(int(h), int(w), 3).permute(2, 0, 1))
                ready.append(0)
        plan = plan_views(box_arrays, [tuple(src.shape) for src in sources], ready)
        noise = self._pgs_noise(image_ids, list(plan.counts), plan.order)
        emb = self._encode_chunks(lambda a, b: cut_planned(sources, plan, a, b, size), plan.total, noise)
        pad = to_device(torch.from_numpy(plan.pad_index()), emb.device)
        mask = pad >= 0
        view_emb = torch.where(mask[..., None], emb[pad.clamp(min=0)], 0.0)
        return view_emb, mask


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
        self.keep = keep  # ``{"views": bool}``: emit the embeddings (bifta_core.saved_embeddings) with the rows
        self.scorer = Scorer(label_sets, method=method, bank_key=bank_key, params=params,
                             k=top_k, with_explanations=explain, device=self.model.device)
        # A cascade (bifta_core.cascade): ``{"margin": T, "first": method, "bank_key": its bank}``.
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
            for name, column in kept_columns(encoded, batch, ok, n, len(self.label_sets), self.keep,
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
        set is unsure of (margin < T, :func:`bifta_core.cascade.needs_views`)."""
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


@dataclass
class Encoded:
    """A batch's embeddings: every ok image's whole image, and the views of the ok images ``sub``
    (positions among the ok images) with the whole image their weights compare them to."""

    image_emb: torch.Tensor  # [n_ok, D]
    sub: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    view_image: torch.Tensor | None = None  # [len(sub), D]
    view_emb: torch.Tensor | None = None  # [len(sub), V, D]
    view_mask: torch.Tensor | None = None  # [len(sub), V]

    @property
    def has_views(self) -> bool:
        return self.view_mask is not None

    def weights(self, image_scale: float) -> torch.Tensor:
        """WCA view weights ``[len(sub), V]`` (WCA §3.2), computed once."""
        if getattr(self, "_weights", None) is None:
            from bifta_core.scoring import view_weights

            self._weights = view_weights(self.view_emb, self.view_mask, self.view_image, image_scale)
        return self._weights

    def views_per_image(self, n_ok: int) -> np.ndarray:
        """Views encoded per ok image (0 outside ``sub``)."""
        views = np.zeros(n_ok, dtype=np.int64)
        if self.view_mask is not None:
            views[self.sub] = self.view_mask.sum(dim=1).cpu().numpy()
        return views


def kept_columns(encoded: Encoded | None, batch: dict[str, np.ndarray], ok: list[int], n: int, label_sets: int,
                 keep: dict, image_scale: float) -> dict[str, pa.Array]:
    """The :data:`bifta_core.saved_embeddings.FLAT_FIELDS` columns of a batch's rows: values on the
    first label set's rows (one per input, null on error rows), null on the others."""
    from bifta_core.saved_embeddings import FLAT_FIELDS

    total = n * label_sets
    values: dict[str, list] = {f.name: [None] * total for f in FLAT_FIELDS}
    values["emb_row"] = [i < n for i in range(total)]
    if encoded is not None:
        image = encoded.image_emb.float().cpu().numpy()
        for j, i in enumerate(ok):
            values["emb_image"][i] = image[j]
        if keep.get("views") and encoded.has_views:
            weights = encoded.weights(image_scale).cpu().numpy()
            view_image = encoded.view_image.float().cpu().numpy()
            view_emb = encoded.view_emb.float().cpu().numpy()
            counts = encoded.view_mask.sum(dim=1).cpu().numpy()
            for k, j in enumerate(encoded.sub.tolist()):
                i, c = ok[j], int(counts[k])
                values["emb_view_image"][i] = view_image[k]
                values["emb_views"][i] = view_emb[k, :c].reshape(-1)
                values["emb_view_boxes"][i] = np.frombuffer(batch["boxes_original"][i], dtype=np.int32)[: 4 * c]
                values["emb_view_weights"][i] = weights[k, :c]
    return {f.name: pa.array(values[f.name], f.type) for f in FLAT_FIELDS}


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


__all__ = ["EncodeStage", "ViewEncoder", "ROW_COLUMNS", "default_torch_threads", "load_gpu_checked_model"]
