"""Stage 3a — decode (CPU): bytes → RGB at working resolution, or an error reason.

Runs inside the views stage's process (see ``pipelines.views``) so that decoded pixels, even at
working resolution, go straight into crop geometry instead of through the object store twice.
"""

from __future__ import annotations

from bifta_core.io.images import DecodedImage, ImageDecodeError, decode_image


def decode_or_error(
    data: bytes, *, max_pixels: int, min_side: int | None, whole_size: int | None = None,
    resize_mode: str = "shortest", global_min_side: int | None = None,
) -> tuple[DecodedImage | None, str | None]:
    """Decode one image; a failure returns ``(None, reason)`` instead of raising."""
    try:
        return decode_image(data, max_pixels=max_pixels, min_side=min_side, whole_size=whole_size,
                            resize_mode=resize_mode, global_min_side=global_min_side), None
    except ImageDecodeError as exc:
        return None, str(exc)
    except MemoryError:
        return None, "out of memory while decoding"
