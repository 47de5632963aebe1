"""The views stage ships an image as its working pixels + boxes, or as crops when those are smaller;
both forms must give the encoder identical views, so a run never depends on which form was used."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bifta_core.io.images import decode_image, working_min_side
from bifta_core.method.views import VIEW_PRESETS
from bifta_core.method.encoding import ViewEncoder
from pipelines.views import ViewStage


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    noise = rng.integers(0, 40, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _batch(data: bytes, image_id: str = "img-1") -> dict:
    return {
        "image_id": np.array([image_id], dtype=object),
        "uri": np.array([f"/x/{image_id}.jpg"], dtype=object),
        "status": np.array(["ok"], dtype=object),
        "error": np.array([None], dtype=object),
        "data": np.array([data], dtype=object),
    }


def _stage(model, num_views: int) -> ViewStage:
    preset = dict(vars(VIEW_PRESETS["bifta"]))
    preset.update(num_views=num_views, max_views=num_views)
    return ViewStage(image_size=model.image_size, preset=preset, seed=0, max_pixels=10**8)


@pytest.mark.parametrize("num_views, expect_crops", [(2, True), (100, False)])
def test_stage_ships_the_smaller_form(tiny_vit_model, num_views, expect_crops):
    out = _stage(tiny_vit_model, num_views)(_batch(_jpeg(640, 480))).to_pydict()
    kept = int(out["views_kept"][0])
    s = tiny_vit_model.image_size
    if expect_crops:
        assert len(out["crops"][0]) == kept * 3 * s * s and out["work"][0] == b""
    else:
        h, w = out["work_hw"][0]
        assert out["crops"][0] == b"" and len(out["work"][0]) == h * w * 3
        assert h * w * 3 <= kept * 3 * s * s


def test_both_forms_give_identical_view_embeddings(tiny_vit_model):
    data = _jpeg(640, 480)
    out = _stage(tiny_vit_model, 2)(_batch(data)).to_pydict()
    assert out["crops"][0], "this setting must ship crops"
    encoder = ViewEncoder(tiny_vit_model, view_batch_size=8, seed=0, pgs_keep=None, pgs_whole_image=False)
    shipped, mask_a = encoder.encode_views([b""], [(0, 0)], [out["boxes"][0]], ["img-1"], [out["crops"][0]])
    # The same boxes cut by the encoder from the working image.
    preset = VIEW_PRESETS["bifta"]
    work = decode_image(data, max_pixels=10**8, min_side=working_min_side(tiny_vit_model.image_size, preset.scale[0]))
    cut, mask_b = encoder.encode_views([work.pixels.tobytes()], [work.pixels.shape[:2]], [out["boxes"][0]], ["img-1"])
    assert mask_a.tolist() == mask_b.tolist()
    assert (shipped - cut).abs().max().item() == 0.0
