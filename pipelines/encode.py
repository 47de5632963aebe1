"""Stage 4 — encode (actor pool: one GPU per actor, CPU actors when there is no GPU).

The model is loaded once per actor. Views of all images in a batch are cut from the working
images (on the actor's device), flattened into one list and encoded in chunks of
``view_batch_size``, then regrouped per image with a mask for WCA scoring. Scoring against every
label set happens here too (``pipelines.score``), so embeddings never leave the device.
"""

from __future__ import annotations

import os
import numpy as np
import pyarrow as pa
import torch

from bifta_core.models import ClipModel, load_model
from bifta_core.predict import ScoreParams
from bifta_core.seeding import generator_for
from bifta_core.text_banks import LabelSetEmbeddings
from pipelines.score import ROW_COLUMNS, RowContext, Scorer, build_rows
from pipelines.views import cut_crops


def _pixels(blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).reshape(shape).copy())


class ViewEncoder:
    """Turns decoded batches into whole-image and per-view embeddings (pure torch, no Ray)."""

    def __init__(self, model: ClipModel, *, view_batch_size: int, seed: int, pgs_keep: float | None,
                 pgs_whole_image: bool) -> None:
        self.model = model
        self.view_batch_size = view_batch_size
        self.seed = seed
        self.pgs_keep = pgs_keep if pgs_keep is not None and pgs_keep < 1.0 else None
        self.pgs_whole_image = pgs_whole_image
        if self.pgs_keep is not None:
            from bifta_core.pgs import PgsConfig, patch_size_of, supports_pgs
            from bifta_core.errors import ConfigError

            if not supports_pgs(model.model):
                raise ConfigError(f"--pgs-keep needs a ViT image tower; {model.model_name} is not supported")
            self._pgs_config = PgsConfig(keep_ratio=self.pgs_keep)
            self._patch = patch_size_of(model.model)

    def _keep_idx(self, pixels: torch.Tensor, image_ids: list[str], counts: list[int]) -> torch.Tensor | None:
        """CLIP-PGS token selection per image, seeded from (seed, image id) so batching never changes it."""
        if self.pgs_keep is None:
            return None
        from bifta_core.pgs import select_patches

        parts, start = [], 0
        for image_id, n in zip(image_ids, counts):
            chunk = pixels[start : start + n]
            start += n
            if n:
                g = generator_for(self.seed, f"{image_id}:pgs")
                parts.append(select_patches(chunk, self.model.mean, self.model.std, self._patch,
                                            self._pgs_config, g))
        return torch.cat(parts)

    def _encode_chunks(self, pixels: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        out = []
        for s in range(0, pixels.shape[0], self.view_batch_size):
            k = None if keep is None else keep[s : s + self.view_batch_size]
            out.append(self.model.encode_images(pixels[s : s + self.view_batch_size], k))
        return torch.cat(out) if out else torch.empty(0, self.model.embed_dim, device=self.model.device)

    def encode_whole(self, whole: list[bytes], image_ids: list[str]) -> torch.Tensor:
        s = self.model.image_size
        pix = torch.stack([_pixels(b, (3, s, s)) for b in whole])
        pix = self.model.normalize_pixels(pix)
        keep = self._keep_idx(pix, image_ids, [1] * len(whole)) if self.pgs_whole_image else None
        return self._encode_chunks(pix, keep)

    def encode_views(
        self, work: list[bytes], work_hw: list[tuple[int, int]], boxes: list[bytes], image_ids: list[str],
        crops: list[bytes] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ``view_emb [B,Vmax,D]`` and ``view_mask [B,Vmax]`` (ragged views per image).

        Each image arrives either as its working image plus boxes (crops cut here, on the encoder's
        device) or, when that is smaller, as crops already cut by the views stage.
        """
        size = self.model.image_size
        crops = crops or [b""] * len(work)
        views, counts = [], []
        for blob, (h, w), box_blob, cut in zip(work, work_hw, boxes, crops):
            b = np.frombuffer(box_blob, dtype=np.int32).reshape(-1, 4)
            if cut:
                views.append(_pixels(cut, (b.shape[0], 3, size, size)).to(self.model.device))
            else:
                image = _pixels(blob, (int(h), int(w), 3)).to(self.model.device)
                views.append(cut_crops(image, b, size))
            counts.append(int(b.shape[0]))
        flat = self.model.normalize_pixels(torch.cat(views))
        emb = self._encode_chunks(flat, self._keep_idx(flat, image_ids, counts))
        vmax = max(counts)
        view_emb = torch.zeros(len(counts), vmax, emb.shape[1], device=emb.device)
        mask = torch.zeros(len(counts), vmax, dtype=torch.bool, device=emb.device)
        start = 0
        for i, n in enumerate(counts):
            view_emb[i, :n] = emb[start : start + n]
            mask[i, :n] = True
            start += n
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
    ) -> None:
        import ray

        self.schema = schema
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = load_model(**model_cfg)
        label_sets: list[LabelSetEmbeddings] = [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in label_set_refs]
        self.label_sets = label_sets
        self.encoder = ViewEncoder(self.model, view_batch_size=view_batch_size, seed=seed, pgs_keep=pgs_keep,
                                   pgs_whole_image=pgs_whole_image)
        self.uses_views = method in ("wca", "bifta")
        self.scorer = Scorer(label_sets, method=method, bank_key=bank_key, params=ScoreParams(**score_params),
                             k=top_k, with_explanations=explain, device=self.model.device)
        self.ctx = RowContext(method=method, model=self.model.model_name, pretrained=self.model.pretrained,
                              run_id=run_id, random_weights=self.model.is_random)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        predictions: list[dict[str, list]] = []
        if ok:
            ids = [str(batch["image_id"][i]) for i in ok]
            image_emb = self.encoder.encode_whole([batch["whole"][i] for i in ok], ids)
            view_emb = view_mask = None
            if self.uses_views:
                view_emb, view_mask = self.encoder.encode_views(
                    [batch["work"][i] for i in ok], [tuple(batch["work_hw"][i]) for i in ok],
                    [batch["boxes"][i] for i in ok], ids, [batch["crops"][i] for i in ok],
                )
            predictions = self.scorer.predict(image_emb, view_emb, view_mask)
        meta = {k: list(batch[k]) for k in ("image_id", "uri", "status", "error", "views_generated", "views_kept")}
        if "true_label" in batch:
            meta["true_label"] = list(batch["true_label"])
        # An explicit schema keeps every block identical, even one made only of error rows.
        return pa.table(build_rows(meta, ok, predictions, self.label_sets, self.ctx), schema=self.schema)


def default_torch_threads() -> int:
    """CPU encoders use every core: the encoder is the pipeline's bottleneck on a CPU-only machine."""
    return max(1, os.cpu_count() or 1)


__all__ = ["EncodeStage", "ViewEncoder", "ROW_COLUMNS", "default_torch_threads"]
