"""Stage 3 — decode + views (CPU tasks).

Per image: decode at working resolution, encode-ready whole image (open_clip eval preprocessing,
uint8), and for WCA/BiFTA the view boxes — sampled (WCA localized visual prompting), refined by IoU
(BiFTA view refinement), seeded from (global seed, image id) — mapped onto the working image.
Crops are cut by the encoder (``bifta_core.method.views.crop_resize_tensor``), on the GPU when there
is one, so only the working-resolution image and a few boxes travel through the object store —
unless the crops are smaller than the working image: then they are cut here and shipped instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from bifta_core.io.images import boxes_to_working, working_min_side
from bifta_core.method.seeding import generator_for
from bifta_core.method.views import ViewPreset, crop_resize_tensor, generate_boxes, refine_boxes
from pipelines.columns import to_table
from pipelines.decode import decode_or_error

if TYPE_CHECKING:
    from pipelines.plan import Stage

_EMPTY = b""


def cut_crops(pixels: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Views of an HWC uint8 image at model resolution as uint8 ``[n,3,S,S]`` (any device).

    The one crop path for both places crops are cut (here on CPU, or in the encoder on its device),
    rounded to 8 bits so both give identical pixels.
    """
    image = torch.as_tensor(pixels).permute(2, 0, 1)
    if isinstance(boxes, np.ndarray):  # often a read-only view of Arrow bytes: copy, never alias
        boxes = torch.from_numpy(np.array(boxes, dtype=np.int64))
    b = boxes.to(image.device, torch.int64).reshape(-1, 4)
    return crop_resize_tensor(image, b, size).round_().clamp_(0, 255).to(torch.uint8)


class ViewStage:
    """Decode + views of a batch; construction is cheap (no model), so :func:`decode_views` builds
    one per batch.

    By default ``boxes`` holds the views kept by refinement. With ``all_views=True`` (evaluation,
    which scores refined and unrefined views from one encoding pass) ``boxes`` holds every sampled
    view and an extra ``view_kept`` column holds one byte per box: 1 where refinement keeps it.
    """

    def __init__(self, *, image_size: int, preset: dict | None, seed: int, max_pixels: int,
                 all_views: bool = False, resize_mode: str = "shortest", global_whole: bool = False,
                 precut: bool = True) -> None:
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.preset = ViewPreset(**{**preset, "scale": tuple(preset["scale"])}) if preset else None
        self.seed = seed
        self.max_pixels = max_pixels
        self.all_views = all_views
        self.min_side = working_min_side(image_size, self.preset.scale[0] if self.preset else None)
        # ``global_whole``: ``whole`` is the image as a whole-image method decodes it (a cascade's first
        # stage, saved embeddings), ``view_whole`` the working decode's where it differs. Without
        # ``precut`` the encoder cuts every view (a cascade cuts views only for unsure images).
        self.global_whole = global_whole and self.preset is not None
        self.precut = precut

    def _views(self, image_id: str, decoded) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """→ (boxes on the working image, number sampled, kept mask aligned with the boxes, the same
        boxes in original pixels)."""
        p = self.preset
        boxes = generate_boxes(p, decoded.width, decoded.height, generator_for(self.seed, image_id))
        kept_idx = refine_boxes(boxes, p.iou_threshold, p.max_views)
        if self.all_views:
            mask = np.zeros(int(boxes.shape[0]), dtype=np.uint8)
            mask[kept_idx.numpy()] = 1
            chosen = boxes
        else:
            chosen = boxes[kept_idx]
            mask = np.ones(int(kept_idx.shape[0]), dtype=np.uint8)
        return (boxes_to_working(chosen, decoded).numpy().astype(np.int32), int(boxes.shape[0]), mask,
                chosen.numpy().astype(np.int32))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        status = list(batch["status"])
        error = list(batch["error"])
        whole, work, work_hw, boxes = [_EMPTY] * n, [_EMPTY] * n, [[0, 0]] * n, [_EMPTY] * n
        generated, kept = [0] * n, [0] * n
        kept_masks = [_EMPTY] * n
        crops = [_EMPTY] * n
        view_whole = [_EMPTY] * n  # global_whole: the working decode's whole image where it differs from ``whole``
        boxes_original = [_EMPTY] * n
        for i in range(n):
            if status[i] != "ok":
                continue
            decoded, reason = decode_or_error(batch["data"][i], max_pixels=self.max_pixels, min_side=self.min_side,
                                              whole_size=self.image_size, resize_mode=self.resize_mode,
                                              global_min_side=self.image_size if self.global_whole else None)
            if decoded is None:
                status[i], error[i] = "error", reason
                continue
            whole[i] = decoded.whole.numpy().tobytes()
            if decoded.global_whole is not None:
                whole[i], view_whole[i] = decoded.global_whole.numpy().tobytes(), whole[i]
            if self.preset is not None:
                b, generated[i], mask, original = self._views(str(batch["image_id"][i]), decoded)
                kept[i] = int(mask.sum())
                kept_masks[i] = mask.tobytes()
                boxes[i] = b.tobytes()
                boxes_original[i] = original.tobytes()
                s = self.image_size
                if self.precut and b.shape[0] * 3 * s * s < decoded.pixels.size:
                    # The crops are smaller than the decoded image: ship those (bounded by views × S²).
                    crops[i] = cut_crops(decoded.pixels, b, s).numpy().tobytes()
                else:
                    work[i] = decoded.pixels.tobytes()
                    work_hw[i] = list(decoded.pixels.shape[:2])
        out = {k: v for k, v in batch.items() if k != "data"}
        out.update(
            status=np.array(status, dtype=object),
            error=np.array(error, dtype=object),
            whole=np.array(whole, dtype=object),
            work=np.array(work, dtype=object),
            work_hw=np.array(work_hw, dtype=np.int32).reshape(n, 2),
            boxes=np.array(boxes, dtype=object),
            boxes_original=np.array(boxes_original, dtype=object),
            crops=np.array(crops, dtype=object),
            views_generated=np.array(generated, dtype=np.int32),
            views_kept=np.array(kept, dtype=np.int32),
        )
        if self.all_views:
            out["view_kept"] = np.array(kept_masks, dtype=object)
        if self.global_whole:
            out["view_whole"] = np.array(view_whole, dtype=object)
        return to_table(out)


def decode_views(batch: dict[str, np.ndarray], stage_class: type = ViewStage, **settings) -> pa.Table:
    """The decode+views stage's task: ``stage_class(**settings)`` applied to one batch."""
    return stage_class(**settings)(batch)


def views_stage(*, batch_size: int, max_tasks: int, use_gpu: bool, stage_class: type = ViewStage,
                **settings) -> Stage:
    """Decode + views as Ray tasks, at most ``max_tasks`` at once. Tasks, not an actor pool: the stage
    holds no model, and tasks run in Ray's pooled worker processes, which keep their imports (torch)
    for the next run of the same driver, where an actor pool started new processes every run
    (~4 CPU-s a run on the 2-core test machine). On a GPU plan each task takes a full core (a
    single-threaded decode that shares a core only slows down); on a CPU plan the encoder's threads
    use every core anyway, so a task takes half a core and leaves room for it. Its resources differ
    from the encoder's, so Ray Data never fuses decoding into the encode actors."""
    from pipelines.plan import Stage

    return Stage("decode+views", decode_views, batch_size=batch_size, num_cpus=1.0 if use_gpu else 0.5,
                 concurrency=max_tasks, fn_kwargs=dict(settings, stage_class=stage_class))
