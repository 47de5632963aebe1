"""The view encoder: decoded batches → whole-image and per-view embeddings (pure torch, no Ray).

``pipelines.encode.EncodeStage`` is a thin Ray adapter over :class:`ViewEncoder`: per batch, one
pinned upload of all pixels, views cut on the encoder's device in side-sorted chunks of
``view_batch_size`` and regrouped per image (see docs/scaling.md, "GPU memory"). :class:`Encoded`
holds what a batch produced, with the WCA view weights computed once for scoring and reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bifta_core.io.models import ClipModel
from bifta_core.method.seeding import generator_for
from bifta_core.method.views import cut_planned, pinned_empty, plan_views, to_device


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
            from bifta_core.method.pgs import PgsConfig, grid_size_of, patch_size_of, supports_pgs
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
        from bifta_core.method.pgs import selection_noise

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
                from bifta_core.method.pgs import select_patches

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
        encoded in side-sorted order (:func:`bifta_core.method.views.plan_views`), chunk by chunk, and one
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
            from bifta_core.method.scoring import view_weights

            self._weights = view_weights(self.view_emb, self.view_mask, self.view_image, image_scale)
        return self._weights

    def views_per_image(self, n_ok: int) -> np.ndarray:
        """Views encoded per ok image (0 outside ``sub``)."""
        views = np.zeros(n_ok, dtype=np.int64)
        if self.view_mask is not None:
            views[self.sub] = self.view_mask.sum(dim=1).cpu().numpy()
        return views
