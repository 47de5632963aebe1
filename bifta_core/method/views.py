"""Random square views of an image, their refinement, and their materialisation as model inputs.

WCA (Li et al., ICML 2024, Sec. 3 "localized visual prompting") represents an image by many
random square crops ("views") whose side is a uniform fraction ``s ~ U(alpha, beta)`` of the
image's shorter side; each crop is resized to the vision encoder's input size. BiFTA's view
refinement samples views from a narrower scale range and discards views that overlap an earlier
kept view too much (IoU above a threshold), so the kept views are less redundant.

Boxes are integer pixel rectangles ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive, i.e. the
same convention as ``PIL.Image.crop``; the area of a box is ``(x1 - x0) * (y1 - y0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bifta_core.errors import ConfigError
from bifta_core.method.registry import VIEW_PRESETS, ViewPreset  # noqa: F401 - re-exported: views are made from presets


def _check_scale(scale: tuple[float, float]) -> tuple[float, float]:
    try:
        alpha, beta = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale must be a pair (alpha, beta) of numbers, got {scale!r}") from None
    if not (0.0 < alpha <= beta <= 1.0):
        raise ConfigError(f"scale must satisfy 0 < alpha <= beta <= 1, got ({alpha}, {beta})")
    return alpha, beta


def sample_boxes(
    width: int,
    height: int,
    n: int,
    scale: tuple[float, float] = (0.1, 0.9),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``n`` random square boxes inside a ``width`` x ``height`` image (WCA Sec. 3).

    Each box has side ``floor(s * m)`` with ``s ~ U(alpha, beta)`` and ``m = min(width, height)``,
    clamped to ``[1, m]``; its top-left corner is uniform over the integer positions that keep the
    box inside the image (``x0 in [0, W - side]``, ``y0 in [0, H - side]``).

    Random numbers are drawn from ``generator`` (CPU) in a fixed order: ``n`` scales, then ``n``
    x-offsets, then ``n`` y-offsets, so a generator from :func:`bifta_core.method.seeding.generator_for`
    gives the same boxes everywhere.

    Returns:
        ``torch.long`` tensor ``[n, 4]`` of ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.
    """
    alpha, beta = _check_scale(scale)
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ConfigError(f"image size must be positive integers, got {width}x{height}")
    if int(n) != n or n < 0:
        raise ConfigError(f"number of views must be a non-negative integer, got {n}")
    width, height, n = int(width), int(height), int(n)
    m = min(width, height)
    # float64 so floor(s * m) matches the analytic bounds floor(alpha*m)..floor(beta*m) exactly.
    r = torch.rand(3, n, generator=generator, dtype=torch.float64)
    s = (alpha + (beta - alpha) * r[0]).clamp(alpha, beta)
    side = torch.floor(s * m).clamp(1, m)
    # floor(u * count) is uniform over 0..count-1; the clamp only guards float rounding.
    x0 = torch.minimum(torch.floor(r[1] * (width - side + 1)), width - side)
    y0 = torch.minimum(torch.floor(r[2] * (height - side + 1)), height - side)
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1).to(torch.long)


def grid_boxes(width: int, height: int, grid: int) -> torch.Tensor:
    """BiFTA's grid views (``--crop_strategy grid``): ``grid × grid`` non-overlapping square tiles
    of side ``min(W // g, H // g)`` laid from the top-left corner, row by row (on a non-square
    image the far end of the longer side is not covered, as in the release).

    Returns:
        ``torch.long`` tensor ``[g², 4]`` of ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.
    """
    if int(grid) != grid or grid < 1:
        raise ConfigError(f"grid size must be a positive integer, got {grid}")
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ConfigError(f"image size must be positive integers, got {width}x{height}")
    g = int(grid)
    side = max(1, min(int(width) // g, int(height) // g))  # a tile of at least one pixel on tiny images
    steps = torch.arange(g, dtype=torch.long) * side
    y0, x0 = torch.meshgrid(steps, steps, indexing="ij")
    x0, y0 = x0.reshape(-1).clamp(max=int(width) - side), y0.reshape(-1).clamp(max=int(height) - side)
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def generate_boxes(preset: ViewPreset, width: int, height: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The boxes ``preset`` generates for a ``width`` x ``height`` image, before refinement."""
    if preset.generator == "grid":
        return grid_boxes(width, height, preset.grid)
    if preset.generator != "random":
        raise ConfigError(f"unknown view generator {preset.generator!r}; choose random or grid")
    return sample_boxes(width, height, preset.num_views, preset.scale, generator)


def _check_boxes(boxes: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ConfigError(f"{what} must be a tensor of shape [N, 4], got {shape}")
    return boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection-over-union of two sets of ``(x0, y0, x1, y1)`` boxes.

    Areas are pixel counts ``(x1 - x0) * (y1 - y0)`` (exclusive corners). Integer boxes are
    compared in float64, where these integer areas and their ratios are exact enough that a
    threshold test agrees with exact arithmetic; floating boxes keep their dtype.

    Returns:
        ``[N, M]`` tensor of IoU values in ``[0, 1]`` (0 where the union is empty).
    """
    a = _check_boxes(a, "boxes a")
    b = _check_boxes(b, "boxes b")
    dtype = a.dtype if a.is_floating_point() else torch.float64
    a = a.to(dtype)
    b = b.to(dtype=dtype, device=a.device)
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (hi - lo).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(dtype).tiny), 0.0)


def refine_boxes(
    boxes: torch.Tensor, iou_threshold: float | None, max_views: int | None
) -> torch.Tensor:
    """BiFTA view refinement: greedily drop views that overlap an earlier kept view too much.

    Boxes are visited in generation order. The first box is kept; a later box is kept only if
    its IoU with every kept box is ``<= iou_threshold``. Visiting stops once ``max_views`` boxes
    are kept. ``iou_threshold=None`` disables the IoU test (only the cap applies, i.e. WCA);
    ``max_views=None`` means no cap.

    Returns:
        ``torch.long`` indices of the kept boxes, increasing.
    """
    boxes = _check_boxes(boxes, "boxes")
    if iou_threshold is not None and not (0.0 <= float(iou_threshold) <= 1.0):
        raise ConfigError(f"iou_threshold must be in [0, 1] or None, got {iou_threshold}")
    if max_views is not None and (int(max_views) != max_views or max_views < 1):
        raise ConfigError(f"max_views must be a positive integer or None, got {max_views}")
    n = boxes.shape[0]
    cap = n if max_views is None else min(n, int(max_views))
    if iou_threshold is None:
        return torch.arange(cap, dtype=torch.long)
    iou = box_iou(boxes, boxes).cpu()
    # too_close[i, j]: box j may not be kept if box i is kept.
    too_close = (iou > float(iou_threshold)).numpy()
    kept: list[int] = []
    blocked = np.zeros(n, dtype=bool)
    for i in range(n):
        if len(kept) >= cap:
            break
        if blocked[i]:
            continue
        kept.append(i)
        blocked |= too_close[i]
    return torch.tensor(kept, dtype=torch.long)


def _box_list(boxes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int, int, int]]:
    t = torch.as_tensor(boxes)
    if t.numel() == 0:
        return []
    t = _check_boxes(t, "boxes")
    return [tuple(int(v) for v in row) for row in t.tolist()]  # type: ignore[misc]


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ConfigError(f"view size must be a positive integer, got {size}")
    return int(size)


def crop_resize_pil(
    image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[int]], size: int
) -> torch.Tensor:
    """Reference view materialisation: ``image.crop(box).resize((size, size), BICUBIC)``.

    This is WCA's localized visual prompting done exactly as PIL-based preprocessing does it.

    Returns:
        ``torch.uint8`` tensor ``[n, 3, size, size]`` (RGB).
    """
    size = _check_size(size)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = torch.empty((len(_box_list(boxes)), 3, size, size), dtype=torch.uint8)
    for k, box in enumerate(_box_list(boxes)):
        view = rgb.crop(box).resize((size, size), Image.BICUBIC)
        out[k] = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


class TransferCounter:
    """Counts host-to-device copies made through :func:`to_device` (tests and benchmarks read it).

    Every copy of this module's crop path goes through :func:`to_device`, so the count is the
    number of host-device transfers a batch costs (issue 11: it must not grow with images or boxes).
    """

    def __init__(self) -> None:
        self.count = 0


transfer_counter = TransferCounter()


def pinned_empty(shape: tuple[int, ...] | int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An empty host tensor, page-locked when it is bound for a CUDA device.

    A ``non_blocking`` copy from pageable memory is synchronous; from pinned memory it overlaps
    with host work and with kernels already queued. Pinning needs CUDA, so CPU runs get plain memory.
    """
    pin = torch.device(device).type == "cuda"
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move ``tensor`` to ``device`` (``non_blocking``, pinned first when it is a pageable host tensor).

    The one transfer point of the crop and encode paths; counted in :data:`transfer_counter`.
    """
    device = torch.device(device)
    if tensor.device == device or (device.type == tensor.device.type and device.index is None):
        return tensor
    transfer_counter.count += 1
    if tensor.device.type == "cpu" and device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _box_array(boxes: torch.Tensor | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Boxes as a host ``int64 [n, 4]`` array: grouping and bounds checks never wait on a device."""
    if isinstance(boxes, torch.Tensor):
        arr = boxes.detach().to("cpu", torch.int64).numpy()  # callers should pass host boxes
    else:
        arr = np.asarray(boxes, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ConfigError(f"boxes must be a tensor of shape [N, 4], got {tuple(arr.shape)}")
    return arr


def _check_image(image: object) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ConfigError(f"image must be a [3, H, W] tensor, got {shape}")
    return image


def _resize_like_pil(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Square float crops ``[k, 3, L, L]`` → ``[k, 3, size, size]`` as PIL's two-pass BICUBIC does."""
    side = crops.shape[2]
    # A pass whose length is unchanged is an identity for this kernel, as PIL skips it.
    horiz = F.interpolate(crops, size=(side, size), mode="bicubic", antialias=True, align_corners=False)
    horiz = torch.floor(horiz + 0.5).clamp_(0.0, 255.0)  # PIL stores pass 1 as uint8
    resized = F.interpolate(horiz, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 255.0)


READY = -1  # group key of a view that arrives already cut (no resize)


@dataclass(frozen=True)
class ViewPlan:
    """Host-side plan to cut a batch's views in side-sorted order (built by :func:`plan_views`).

    Views are numbered image-major ("flat" order). Cutting runs in *sorted* order — views grouped
    by box side, so a contiguous range of sorted positions is a few same-side groups — and one
    gather (:meth:`pad_index`/:meth:`inverse`, uploaded once) restores image order afterwards.
    Everything here is numpy: planning never waits on a device.
    """

    counts: tuple[int, ...]  # views per image
    src: np.ndarray  # per flat view: which source tensor it comes from
    boxes: np.ndarray  # per flat view: (x0, y0, x1, y1) in its source, or (k, 0, 0, 0) for READY
    key: np.ndarray  # per flat view: group key (box width/height code, READY for ready-made views)
    order: np.ndarray  # sorted position -> flat view index

    @property
    def total(self) -> int:
        return int(self.order.shape[0])

    def inverse(self) -> np.ndarray:
        """flat view index -> sorted position."""
        inv = np.empty(self.total, dtype=np.int64)
        inv[self.order] = np.arange(self.total)
        return inv

    def pad_index(self) -> np.ndarray:
        """``[B, Vmax]`` sorted position of image ``b``'s ``j``-th view; ``-1`` pads ragged rows."""
        vmax = max(self.counts, default=0)
        out = np.full((len(self.counts), vmax), -1, dtype=np.int64)
        inv, start = self.inverse(), 0
        for b, n in enumerate(self.counts):
            out[b, :n] = inv[start : start + n]
            start += n
        return out


def plan_views(
    boxes: Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[int]] | None],
    shapes: Sequence[tuple[int, ...]],
    ready: Sequence[int] | None = None,
) -> ViewPlan:
    """Plan the views of a batch: per source, ``boxes[i]`` to cut from a ``shapes[i]`` image.

    ``shapes[i]`` is the source tensor's shape (``[3, H, W]``); boxes are checked against it here,
    on the host. ``ready[i] > 0`` says source ``i`` is instead ``ready[i]`` views already cut at the
    output size (``[n, 3, S, S]``); its ``boxes[i]`` is ignored. Ready views sort first.
    """
    ready = list(ready) if ready is not None else [0] * len(shapes)
    if not (len(boxes) == len(shapes) == len(ready)):
        raise ConfigError(f"{len(shapes)} images but {len(boxes)} box sets")
    arrays, keys, counts = [], [], []
    for b, shape, n_ready in zip(boxes, shapes, ready):
        if n_ready:
            arr = np.zeros((int(n_ready), 4), dtype=np.int64)
            arr[:, 0] = np.arange(int(n_ready))
            arrays.append(arr)
            keys.append(np.full(int(n_ready), READY, dtype=np.int64))
            counts.append(int(n_ready))
            continue
        if len(shape) != 3 or shape[0] != 3:
            raise ConfigError(f"image must be a [3, H, W] tensor, got {tuple(shape)}")
        arr = _box_array(b)
        h, w = int(shape[1]), int(shape[2])
        bad = ~((arr[:, 0] >= 0) & (arr[:, 0] < arr[:, 2]) & (arr[:, 2] <= w)
                & (arr[:, 1] >= 0) & (arr[:, 1] < arr[:, 3]) & (arr[:, 3] <= h))
        if bad.any():
            x0, y0, x1, y1 = (int(v) for v in arr[np.argmax(bad)])
            raise ConfigError(f"box {(x0, y0, x1, y1)} is empty or outside the {w}x{h} image")
        arrays.append(arr)
        # (width, height) packed into one sortable key; views are square, so this is the side.
        keys.append((arr[:, 2] - arr[:, 0]) * (1 << 31) + (arr[:, 3] - arr[:, 1]))
        counts.append(int(arr.shape[0]))
    allb = np.concatenate(arrays) if arrays else np.zeros((0, 4), dtype=np.int64)
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    src = np.repeat(np.arange(len(counts)), counts)
    return ViewPlan(tuple(counts), src, allb, key, np.argsort(key, kind="stable"))


def cut_planned(
    sources: Sequence[torch.Tensor], plan: ViewPlan, start: int, stop: int, size: int, *, as_uint8: bool = True
) -> torch.Tensor:
    """Views at sorted positions ``[start, stop)`` of ``plan`` → ``[stop - start, 3, size, size]``.

    One stack and two resizes per distinct side in the range, written to contiguous slices: no
    index is uploaded and nothing is read back, so the device never waits for the host. Peak
    float memory is that of the range (the encoder passes one ``--view-batch-size`` chunk).
    """
    size = _check_size(size)
    device = sources[0].device if sources else torch.device("cpu")
    out = torch.empty((max(stop - start, 0), 3, size, size), dtype=torch.float32, device=device)
    if stop <= start:
        return out.to(torch.uint8) if as_uint8 else out
    idx = plan.order[start:stop]
    keys = plan.key[idx]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(idx)].tolist()):
        group = idx[lo:hi].tolist()
        if keys[lo] == READY:
            out[lo:hi] = torch.stack([sources[plan.src[k]][plan.boxes[k, 0]] for k in group])
            continue
        crops = torch.stack([
            sources[plan.src[k]][:, plan.boxes[k, 1]:plan.boxes[k, 3], plan.boxes[k, 0]:plan.boxes[k, 2]]
            for k in group
        ]).to(torch.float32)
        out[lo:hi] = _resize_like_pil(crops, size)
    # One rounding for the whole range (not one per side group): fewer kernel launches.
    return out.round_().clamp_(0, 255).to(torch.uint8) if as_uint8 else out


def crop_resize_batch(
    images: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor | np.ndarray | Sequence[Sequence[int]]],
    size: int,
    *,
    as_uint8: bool = True,
) -> torch.Tensor:
    """Every view of a batch of images in one pass: ``[sum n_i, 3, size, size]``, image-major.

    Same pixels as :func:`crop_resize_tensor` on each image (bit-identical: the same interpolation
    runs on the same crops; only which crops share a call changes, and every crop is resized
    independently). Built so the device never waits on the host:

    * boxes stay on the host (numpy); grouping, bounds checks and the output order are computed
      there (:func:`plan_views`), so nothing is read back from the device;
    * boxes of *all* images are grouped by side, so each distinct side is one stack + two resizes
      (the number of groups is bounded by the distinct crop sides of the batch, not images × boxes),
      each written to a contiguous slice of a side-sorted buffer (:func:`cut_planned`);
    * one permutation gather restores image-major order — its index is the only host-to-device
      copy (none when the sorted order already is image order).

    Args:
        images: ``[3, H_i, W_i]`` uint8 or float (0..255) tensors, all on one device.
        boxes: per image, ``[n_i, 4]`` integer ``(x0, y0, x1, y1)`` boxes inside it (host
            arrays/tensors; device tensors work but cost a read-back each).
        size: output side.
        as_uint8: round to uint8 (what the encoder consumes), else float32 in 0..255.
    """
    size = _check_size(size)
    for image in images:
        _check_image(image)
    if len({im.device for im in images}) > 1:
        raise ConfigError("all images of a batch must be on one device")
    plan = plan_views(boxes, [tuple(im.shape) for im in images])
    out = cut_planned(images, plan, 0, plan.total, size, as_uint8=as_uint8)
    if np.array_equal(plan.order, np.arange(plan.total)):
        return out
    return out[to_device(torch.from_numpy(plan.inverse()), out.device)]


def crop_resize_tensor(
    image: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[int]], size: int
) -> torch.Tensor:
    """Tensor (GPU-capable) view materialisation matching :func:`crop_resize_pil`.

    Each box is sliced out of ``image`` and resized with antialiased bicubic interpolation
    (``align_corners=False``), which uses the same Keys kernel (a = -0.5) and footprint as PIL's
    BICUBIC filter. Like PIL, the resize is done as a horizontal pass followed by a vertical pass,
    and the intermediate result is rounded and clipped to 0..255 as PIL does in uint8; without
    that step sharp edges differ by up to ~27 grey levels because PIL clips the first pass's
    overshoot (a consequence: float inputs are treated as 8-bit images). Boxes of equal width
    and height are resized in one batched call (see :func:`crop_resize_batch`, which this is for
    one image). Boxes must lie inside the image.

    Measured agreement with :func:`crop_resize_pil` (absolute difference in 0..255 units, scales
    (0.1, 0.9) and (0.5, 0.9), up- and down-scaling): on 40 ImageNet photos resized to 224, mean
    0.11-0.25 per image and max 1.44; on synthetic gradient images with a hard wrap-around edge,
    mean 0.15-0.17 and max 0.65. Rounded to uint8 the outputs are within 1 grey level of PIL's.
    The tests assert mean < 0.5 and max < 2.

    Args:
        image: ``[3, H, W]`` uint8 or float tensor with values in 0..255, on any device.
        boxes: ``[n, 4]`` integer ``(x0, y0, x1, y1)`` boxes, exclusive corners (host memory).

    Returns:
        float32 tensor ``[n, 3, size, size]`` in 0..255 on ``image``'s device.
    """
    size = _check_size(size)
    image = _check_image(image)
    return crop_resize_batch([image], [boxes], size, as_uint8=False)


def normalize(
    views: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Apply the vision model's input normalisation: ``(views / 255 - mean) / std`` per channel.

    ``mean``/``std`` are the per-channel values of the model's preprocess config (open_clip).

    Args:
        views: float tensor ``[n, 3, S, S]`` in 0..255 (e.g. from :func:`crop_resize_tensor`).

    Returns:
        float32 tensor of the same shape.
    """
    if not isinstance(views, torch.Tensor) or views.ndim != 4 or views.shape[1] != 3:
        shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ConfigError(f"views must be a [n, 3, S, S] tensor, got {shape}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=views.device).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32, device=views.device).reshape(-1)
    if m.numel() != 3 or s.numel() != 3:
        raise ConfigError(f"mean and std must have 3 values, got {m.numel()} and {s.numel()}")
    if bool((s <= 0).any()):
        raise ConfigError(f"std values must be positive, got {s.tolist()}")
    return (views.to(torch.float32) / 255.0 - m[:, None, None]) / s[:, None, None]
