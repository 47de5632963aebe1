"""Image decoding and whole-image preprocessing.

Decoding happens once per image and keeps only a *working resolution*: the smallest size at which
the smallest crop still covers the model input with real pixels (``min side = input / alpha``).
JPEGs are decoded with PIL's draft mode (DCT-domain downscaling) straight to that size, so large
photos are never fully decompressed, and full-resolution pixels never leave the decoding process.
View boxes are sampled in the original, EXIF-oriented pixel frame and mapped to the working frame.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

#: EXIF orientations that swap width and height (90° rotations, transposes).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(Exception):
    """One image cannot be decoded; becomes an ``error`` row, never stops the job."""


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels at working resolution plus the geometry of the original (oriented) image."""

    pixels: np.ndarray  # uint8 [h, w, 3]
    width: int  # original width after EXIF orientation
    height: int  # original height after EXIF orientation
    whole: torch.Tensor | None = None  # uint8 [3, S, S] model input, when decode_image was asked for it
    # The model input as a whole-image method decodes it (``global_min_side``), only where that differs
    # from ``whole``: a JPEG the working resolution had decoded at another DCT scale.
    global_whole: torch.Tensor | None = None

    @property
    def scale_x(self) -> float:
        return self.pixels.shape[1] / self.width

    @property
    def scale_y(self) -> float:
        return self.pixels.shape[0] / self.height


def working_min_side(input_size: int, min_crop_scale: float | None) -> int:
    """Smallest image side at which a crop of ``min_crop_scale``·side still has ≥ input_size pixels."""
    if not min_crop_scale:
        return input_size
    return int(math.ceil(input_size / min_crop_scale))


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int | None = None,
    whole_size: int | None = None,
    resize_mode: str = "shortest",
    global_min_side: int | None = None,
) -> DecodedImage:
    """Decode bytes → RGB at working resolution (shorter side ``min_side`` unless already smaller).

    With ``whole_size``, also the model's whole-image input (:func:`whole_image_pixels`), taken from
    the decoded image *before* the working-resolution resize so it is resampled only once.

    Applies the EXIF orientation, converts any mode (palette, CMYK, L, RGBA…) to RGB, refuses images
    above ``max_pixels`` before decompressing them (decompression-bomb guard; Pillow's own hard limit,
    about 179 MP, stays in force above that as a process-wide safety net), and raises
    :class:`ImageDecodeError` with a short reason for empty, truncated or non-image data.

    With ``global_min_side`` (and ``whole_size``), ``global_whole`` is the model input exactly as a
    decode at that working resolution gives it — a whole-image method's — where it differs from
    ``whole`` (the cascade's first stage then scores what ``--method`` of that stage would).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # max_pixels is enforced just below, from the header, before anything is decompressed;
            # escalating Pillow's warning (~89 MP) would refuse images that max_pixels allows.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            raw_w, raw_h = img.size
            if raw_w * raw_h > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {raw_w}x{raw_h} = {raw_w * raw_h} pixels exceeds max_pixels={max_pixels}"
                )
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            width, height = (raw_h, raw_w) if orientation in _SWAPPING_ORIENTATIONS else (raw_w, raw_h)
            drafted = _draft(img, min_side)
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode image: {_short(exc)}") from None
    whole = None if whole_size is None else _whole_from_pil(img, whole_size, resize_mode)
    global_whole = None
    if whole_size is not None and global_min_side is not None and _drafted_size(data, global_min_side) != drafted:
        global_whole = decode_image(data, max_pixels=max_pixels, min_side=global_min_side, whole_size=whole_size,
                                    resize_mode=resize_mode).whole
    if min_side is not None and min(img.size) > min_side:
        factor = min(img.size) / min_side
        target = (max(1, round(img.size[0] / factor)), max(1, round(img.size[1] / factor)))
        img = img.resize(target, Image.BICUBIC, reducing_gap=3.0)
    return DecodedImage(pixels=np.asarray(img, dtype=np.uint8).copy(), width=width, height=height, whole=whole,
                        global_whole=global_whole)


def _drafted_size(data: bytes, min_side: int | None) -> tuple[int, int]:
    """The size :func:`decode_image` decodes ``data`` at for ``min_side`` (a JPEG's DCT scale), from
    the header alone: no pixel is decompressed."""
    with warnings.catch_warnings():  # the pixel limit was enforced when this image was first opened
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            return _draft(img, min_side)


def _draft(img: Image.Image, min_side: int | None) -> tuple[int, int]:
    """Ask a JPEG's decoder for the smallest DCT scale still ``>= min_side`` on the short side
    (``draft()`` picks among 1/2, 1/4, 1/8); → the size it will decode at."""
    raw_w, raw_h = img.size
    if min_side is not None and img.format == "JPEG" and min(raw_w, raw_h) > min_side:
        factor = min(raw_w, raw_h) / min_side
        img.draft("RGB", (max(1, int(raw_w / factor)), max(1, int(raw_h / factor))))
    return img.size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white: what a viewer shows, and what photos of objects resemble.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


RESIZE_MODES = ("shortest", "squash", "longest")


def whole_image_pixels(pixels: np.ndarray, size: int, resize_mode: str = "shortest") -> torch.Tensor:
    """open_clip's eval preprocessing up to normalisation → uint8 ``[3, size, size]``.

    ``shortest`` (CLIP): resize the shorter side to ``size`` (bicubic, torchvision's rounding), then
    centre-crop; ``squash``: resize to ``size``×``size`` ignoring aspect; ``longest``: resize the
    longer side to ``size`` and centre-pad with black — as ``open_clip.image_transform(is_train=False)``.
    """
    return _whole_from_pil(Image.fromarray(pixels), size, resize_mode)


def _whole_from_pil(img: Image.Image, size: int, resize_mode: str) -> torch.Tensor:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unsupported resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    w, h = img.size
    if resize_mode == "squash":
        img = img.resize((size, size), Image.BICUBIC) if (w, h) != (size, size) else img
    elif resize_mode == "longest":
        scale = size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((new_w, new_h), Image.BICUBIC) if (new_w, new_h) != (w, h) else img
        img = Image.new("RGB", (size, size), (0, 0, 0))
        img.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    else:
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def boxes_to_working(boxes: torch.Tensor, image: DecodedImage) -> torch.Tensor:
    """Map original-frame integer boxes ``[n,4]`` to the working frame (outward rounding, clamped)."""
    if boxes.numel() == 0:
        return boxes.clone()
    sx, sy = image.scale_x, image.scale_y
    h, w = image.pixels.shape[:2]
    b = boxes.to(torch.float64)
    x0 = torch.floor(b[:, 0] * sx).clamp(0, w - 1)
    y0 = torch.floor(b[:, 1] * sy).clamp(0, h - 1)
    x1 = torch.maximum(torch.ceil(b[:, 2] * sx).clamp(1, w), x0 + 1)
    y1 = torch.maximum(torch.ceil(b[:, 3] * sy).clamp(1, h), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)
