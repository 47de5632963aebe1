"""Image decoding (EXIF, modes, bad data, bombs, draft mode) and whole-image preprocessing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bifta_core.io.images import (
    DecodedImage,
    ImageDecodeError,
    boxes_to_working,
    decode_image,
    whole_image_pixels,
    working_min_side,
)

MAX = 100_000_000
PROPS = settings(max_examples=40, deadline=None)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, resamples non-trivially."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / max(width, 1) * 6.0)
    g = 127 + 120 * np.cos(y / max(height, 1) * 5.0)
    b = (x + y) / (width + height) * 255
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but whose data is a few bytes (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _open_clip_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """open_clip's eval transform without Normalize, back to 0..255 integers."""
    import open_clip
    import torchvision.transforms as T

    tf = open_clip.image_transform(size, is_train=False)
    steps = [t for t in tf.transforms if not isinstance(t, T.Normalize)]
    assert len(steps) == len(tf.transforms) - 1
    return (T.Compose(steps)(img) * 255).round().to(torch.int32)


# ------------------------------------------------------------------------------ decoding


def test_decode_rgb_png_is_exact():
    raw = _photo_like(37, 23)
    out = decode_image(_encode(Image.fromarray(raw), "PNG"), max_pixels=MAX)
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (37, 23)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (23, 37, 3)
    np.testing.assert_array_equal(out.pixels, raw)
    assert out.scale_x == out.scale_y == 1.0


def test_exif_orientation_6_rotates_and_swaps_size():
    raw = np.zeros((40, 80, 3), np.uint8)  # 80 wide, 40 tall
    raw[:, :40] = (255, 0, 0)
    raw[:, 40:] = (0, 0, 255)
    raw[:16, :16] = (0, 255, 0)  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(Image.fromarray(raw), "JPEG", exif=exif.tobytes(), quality=95)

    out = decode_image(data, max_pixels=MAX)
    assert (out.width, out.height) == (40, 80)
    assert out.pixels.shape == (80, 40, 3)
    expected = np.asarray(Image.fromarray(raw).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(out.pixels.astype(int) - expected.astype(int)).mean() < 4
    # the stored top-left corner is now top-right; the red (stored left) half is on top
    assert out.pixels[4, 36, 1] > 200 and out.pixels[4, 36, 0] < 60
    assert out.pixels[30, 10, 0] > 200 and out.pixels[30, 10, 2] < 60
    assert out.pixels[70, 20, 2] > 200 and out.pixels[70, 20, 0] < 60


def test_exif_orientation_with_working_resolution():
    raw = _photo_like(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_encode(Image.fromarray(raw), "JPEG", exif=exif.tobytes()), max_pixels=MAX, min_side=50)
    assert (out.width, out.height) == (200, 400)
    assert out.pixels.shape[:2] == (100, 50)
    assert out.scale_x == pytest.approx(0.25) and out.scale_y == pytest.approx(0.25)


def test_exif_orientation_1_is_unchanged():
    raw = _photo_like(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 1
    out = decode_image(_encode(Image.fromarray(raw), "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MAX)
    assert (out.width, out.height) == (30, 20) and out.pixels.shape == (20, 30, 3)


def test_rgba_composites_on_white():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (200, 10, 10, 255)  # opaque red
    rgba[:, 10:] = (10, 200, 10, 0)  # fully transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=MAX)
    assert out.pixels.shape == (10, 20, 3)
    np.testing.assert_array_equal(out.pixels[:, :10], np.broadcast_to([200, 10, 10], (10, 10, 3)))
    np.testing.assert_array_equal(out.pixels[:, 10:], np.full((10, 10, 3), 255))


def test_palette_png():
    img = Image.new("P", (8, 6))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    idx = np.zeros((6, 8), np.uint8)
    idx[:, 4:] = 2
    img.putdata(idx.ravel().tolist())
    out = decode_image(_encode(img, "PNG"), max_pixels=MAX)
    assert out.pixels.shape == (6, 8, 3)
    np.testing.assert_array_equal(out.pixels[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out.pixels[0, 7], [0, 0, 255])


def test_palette_png_with_transparency_composites_on_white():
    img = Image.new("P", (4, 4))
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    img.putdata([0, 1] * 8)
    data = _encode(img, "PNG", transparency=0)
    out = decode_image(data, max_pixels=MAX)
    np.testing.assert_array_equal(out.pixels[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out.pixels[0, 1], [10, 20, 30])


def test_greyscale_png():
    grey = (np.arange(60, dtype=np.uint8) * 4).reshape(6, 10)
    out = decode_image(_encode(Image.fromarray(grey, "L"), "PNG"), max_pixels=MAX)
    assert out.pixels.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out.pixels[..., c], grey)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_to_rgb(fmt):
    img = Image.new("CMYK", (12, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_encode(img, fmt), max_pixels=MAX)
    assert out.pixels.shape == (8, 12, 3)
    r, g, b = out.pixels.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_truncated_jpeg():
    data = _encode(Image.fromarray(_photo_like(300, 200)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data[: len(data) // 2], max_pixels=MAX)


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", max_pixels=MAX)


def test_text_bytes_are_not_an_image():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"id,label\n1,cat\n2,dog\n", max_pixels=MAX)


def test_max_pixels_refuses_before_decoding():
    data = _encode(Image.fromarray(_photo_like(300, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large") as info:
        decode_image(data, max_pixels=300 * 200 - 1)
    assert "300x200" in str(info.value)
    assert decode_image(data, max_pixels=300 * 200).pixels.shape == (200, 300, 3)


@pytest.mark.parametrize("max_pixels", [MAX, 10**12])
def test_decompression_bomb_header(max_pixels):
    """A PNG claiming 100000x100000 pixels is refused from its header, without decompressing."""
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_header_only(100_000, 100_000), max_pixels=max_pixels)


def test_max_pixels_above_pillow_warning_limit_is_honoured():
    """Between Pillow's warning limit (~89 MP) and ``max_pixels`` the image is decoded, not refused.

    The header claims 9500x9500 (90.25 MP, like a 100 MP camera's photo) with ``max_pixels`` 120 MP
    (the config default): the only error may come from the bogus pixel data, never "too large".
    Greyscale keeps the attempted allocation at 90 MB.
    """
    assert Image.MAX_IMAGE_PIXELS is not None and 9500 * 9500 > Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_png_header_only(9500, 9500, colour_type=0), max_pixels=120_000_000)
    assert "too large" not in str(info.value)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_header_only(9500, 9500), max_pixels=90_000_000)


def test_large_jpeg_uses_draft_mode(monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args, **kwargs):
        result = original(self, mode, size, *args, **kwargs)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    raw = _photo_like(2400, 1600)
    data = _encode(Image.fromarray(raw), "JPEG", quality=90)
    out = decode_image(data, max_pixels=MAX, min_side=150)
    assert calls, "draft() was not used for a large JPEG"
    requested, drafted = calls[0]
    assert min(drafted) >= 150 and drafted[0] < 2400  # DCT-domain downscale happened
    assert (out.width, out.height) == (2400, 1600)
    h, w = out.pixels.shape[:2]
    assert min(h, w) >= 150 and min(h, w) <= 151
    assert w / h == pytest.approx(1.5, abs=0.02)
    # the downscaled result still looks like the image
    small = np.asarray(Image.fromarray(raw).resize((w, h), Image.BICUBIC), dtype=np.float64)
    assert np.abs(out.pixels.astype(np.float64) - small).mean() < 12


@pytest.mark.parametrize("size, min_side", [((1000, 700), 224), ((640, 480), 320), ((3000, 2000), 449)])
def test_working_resolution_is_close_to_min_side(size, min_side):
    w, h = size
    out = decode_image(_encode(Image.fromarray(_photo_like(w, h)), "JPEG"), max_pixels=MAX, min_side=min_side)
    ph, pw = out.pixels.shape[:2]
    assert min_side <= min(ph, pw) <= min_side + 1
    assert pw / ph == pytest.approx(w / h, rel=0.02)
    assert (out.width, out.height) == (w, h)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_small_images_are_not_upscaled(fmt):
    out = decode_image(_encode(Image.fromarray(_photo_like(120, 90)), fmt), max_pixels=MAX, min_side=224)
    assert out.pixels.shape == (90, 120, 3)


def test_png_is_downscaled_to_working_size():
    out = decode_image(_encode(Image.fromarray(_photo_like(600, 400)), "PNG"), max_pixels=MAX, min_side=100)
    assert out.pixels.shape == (100, 150, 3)


def test_working_min_side():
    assert working_min_side(224, None) == 224
    assert working_min_side(224, 0.5) == 448
    assert working_min_side(224, 0.1) == 2240
    assert working_min_side(224, 0.3) == 747


# ------------------------------------------------------------------------------ whole-image pixels


@pytest.mark.parametrize("size", [224, 64])
@pytest.mark.parametrize(
    "shape", [(300, 200), (200, 300), (224, 224), (500, 499), (64, 1000), (100, 100), (50, 80)]
)
def test_whole_image_pixels_matches_open_clip_generated(shape, size):
    w, h = shape
    raw = _photo_like(w, h, seed=w * 7 + h)
    ours = whole_image_pixels(raw, size)
    assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
    ref = _open_clip_pixels(Image.fromarray(raw), size)
    assert (ours.to(torch.int32) - ref).abs().max().item() <= 1


def test_whole_image_pixels_matches_open_clip_on_real_photos(imagenet_sample):
    paths = sorted((imagenet_sample / "images").iterdir())[::10]
    assert paths, "no images in imagenet-sample"
    for path in paths:
        data = path.read_bytes()
        decoded = decode_image(data, max_pixels=MAX)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert decoded.pixels.shape[:2] == (img.height, img.width)
            for size in (224, 64):
                ours = whole_image_pixels(decoded.pixels, size).to(torch.int32)
                ref = _open_clip_pixels(img, size)
                diff = (ours - ref).abs().max().item()
                assert diff <= 1, f"{path.name} at {size}: max difference {diff} grey levels"


def test_whole_image_pixels_normalised_matches_open_clip(tiny_vit_model):
    """Through ClipModel.normalize_pixels the result equals open_clip's full eval transform."""
    import open_clip

    model = tiny_vit_model
    raw = _photo_like(90, 70, seed=3)
    ours = model.normalize_pixels(whole_image_pixels(raw, model.image_size).unsqueeze(0))[0]
    tf = open_clip.image_transform(model.image_size, is_train=False, mean=model.mean, std=model.std)
    ref = tf(Image.fromarray(raw))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1.5 / 255 / min(model.std)


# ------------------------------------------------------------------------------ boxes


def test_boxes_to_working_identity_at_full_resolution():
    img = DecodedImage(pixels=np.zeros((50, 80, 3), np.uint8), width=80, height=50)
    boxes = torch.tensor([[0, 0, 80, 50], [10, 5, 30, 25]])
    assert torch.equal(boxes_to_working(boxes, img), boxes)
    empty = torch.zeros((0, 4), dtype=torch.int64)
    assert boxes_to_working(empty, img).shape == (0, 4)


@PROPS
@given(
    width=st.integers(16, 4000),
    height=st.integers(16, 4000),
    min_side=st.integers(8, 400),
    data=st.data(),
)
def test_boxes_to_working_stay_inside_and_cover(width, height, min_side, data):
    factor = max(1.0, min(width, height) / min_side)
    ww, wh = max(1, round(width / factor)), max(1, round(height / factor))
    img = DecodedImage(pixels=np.zeros((wh, ww, 3), np.uint8), width=width, height=height)
    rows = []
    for _ in range(data.draw(st.integers(1, 6))):
        x0 = data.draw(st.integers(0, width - 1))
        y0 = data.draw(st.integers(0, height - 1))
        x1 = data.draw(st.integers(x0 + 1, width))
        y1 = data.draw(st.integers(y0 + 1, height))
        rows.append([x0, y0, x1, y1])
    boxes = torch.tensor(rows, dtype=torch.int64)
    out = boxes_to_working(boxes, img)
    assert out.dtype == torch.int64 and out.shape == boxes.shape
    assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
    assert (out[:, 2] <= ww).all() and (out[:, 3] <= wh).all()
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    # outward rounding: the mapped box covers the exact scaled box (within the image); the exact box
    # in float64 (int64 * float is float32 in torch: 45 * 0.6 would be 27.000002)
    sx, sy = img.scale_x, img.scale_y
    exact = boxes.double()
    eps = 1e-9
    assert (out[:, 0] <= exact[:, 0] * sx + eps).all() and (out[:, 1] <= exact[:, 1] * sy + eps).all()
    assert (out[:, 2] >= torch.clamp(exact[:, 2] * sx, max=ww) - eps).all()
    assert (out[:, 3] >= torch.clamp(exact[:, 3] * sy, max=wh) - eps).all()


def test_boxes_to_working_on_decoded_image():
    out = decode_image(_encode(Image.fromarray(_photo_like(800, 600)), "PNG"), max_pixels=MAX, min_side=60)
    assert out.pixels.shape == (60, 80, 3)
    boxes = torch.tensor([[0, 0, 800, 600], [400, 300, 410, 301], [795, 595, 800, 600]])
    mapped = boxes_to_working(boxes, out)
    assert mapped.tolist()[0] == [0, 0, 80, 60]
    assert mapped.tolist()[1] == [40, 30, 41, 31]
    assert mapped.tolist()[2] == [79, 59, 80, 60]
