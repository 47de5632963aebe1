"""Scorers in bifta_core.method.scoring checked against loop-based float64 reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bifta_core.errors import ConfigError
from bifta_core.method.scoring import (
    class_text_vectors,
    clip_scores,
    description_weights,
    mean_scores,
    protocol_accuracy,
    sample_view_subsets,
    topk_accuracy,
    view_weights,
    wca_scores,
    wca_scores_protocol,
)

ATOL = 2e-5  # the library computes in float32, the references in float64


# ----------------------------------------------------------------------------- references


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(float(np.dot(v, v)))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(_unit(a), _unit(b)))


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def ref_view_weights(views, mask, images, image_scale):
    """Per image: softmax of e^scale * cos(view, image) over the valid views; 0 elsewhere."""
    b_count, v_count = mask.shape
    out = np.zeros((b_count, v_count))
    for b in range(b_count):
        valid = [i for i in range(v_count) if mask[b, i]]
        logits = [math.exp(image_scale) * _cos(views[b, i], images[b]) for i in valid]
        for i, w in zip(valid, _softmax(logits)):
            out[b, i] = w
    return out


def ref_desc_weights(descs, desc_class, classes, text_scale):
    """Per class: softmax of e^scale * cos(desc, class prompt) over that class's descriptions."""
    out = np.zeros(len(desc_class))
    for c in range(classes.shape[0]):
        members = [j for j in range(len(desc_class)) if desc_class[j] == c]
        logits = [math.exp(text_scale) * _cos(descs[j], classes[c]) for j in members]
        for j, w in zip(members, _softmax(logits)):
            out[j] = w
    return out


def ref_wca(views, mask, images, descs, desc_class, classes, image_scale, text_scale, aggregation):
    """WCA score with explicit loops over images, classes, views and descriptions."""
    w = ref_view_weights(views, mask, images, image_scale)
    v = ref_desc_weights(descs, desc_class, classes, text_scale)
    b_count, v_count = mask.shape
    out = np.zeros((b_count, classes.shape[0]))
    for b in range(b_count):
        for c in range(classes.shape[0]):
            members = [j for j in range(len(desc_class)) if desc_class[j] == c]
            valid = [i for i in range(v_count) if mask[b, i]]
            if aggregation == "sum":
                total = 0.0
                for i in valid:
                    for j in members:
                        total += w[b, i] * v[j] * _cos(views[b, i], descs[j])
                out[b, c] = total
            else:
                img_vec = sum(w[b, i] * _unit(views[b, i]) for i in valid)
                txt_vec = sum(v[j] * _unit(descs[j]) for j in members)
                out[b, c] = _cos(img_vec, txt_vec)
    return out


def ref_mean(images, descs, desc_class, num_classes):
    """Cosine of each image to the mean of its class's normalised text embeddings."""
    out = np.zeros((images.shape[0], num_classes))
    for c in range(num_classes):
        members = [_unit(descs[j]) for j in range(len(desc_class)) if desc_class[j] == c]
        mean = sum(members) / len(members)
        for b in range(images.shape[0]):
            out[b, c] = _cos(images[b], mean)
    return out


# ----------------------------------------------------------------------------- fixtures


def make_problem(seed, b=3, v=6, d=8, counts=(3, 1, 4, 2), ragged=True, scale_spread=True):
    """Random unnormalised embeddings with ragged views per image and descriptions per class."""
    rng = np.random.default_rng(seed)
    views = rng.normal(size=(b, v, d))
    images = rng.normal(size=(b, d))
    classes = rng.normal(size=(len(counts), d))
    desc_class = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    rng.shuffle(desc_class)  # descriptions of a class need not be contiguous
    descs = rng.normal(size=(len(desc_class), d))
    if scale_spread:  # unnormalised inputs with very different norms
        views *= rng.uniform(0.1, 10.0, size=(b, v, 1))
        images *= rng.uniform(0.1, 10.0, size=(b, 1))
        descs *= rng.uniform(0.1, 10.0, size=(len(desc_class), 1))
        classes *= rng.uniform(0.1, 10.0, size=(len(counts), 1))
    mask = np.ones((b, v), dtype=bool)
    if ragged:
        for i in range(b):
            mask[i, 1 + (i * 2) % v :] = False  # 1, 3, 5, ... valid views
    return views, mask, images, descs, desc_class, classes


def as_t(*arrays):
    out = []
    for a in arrays:
        t = torch.from_numpy(np.asarray(a))
        out.append(t.to(torch.float32) if t.is_floating_point() else t)
    return out


# ----------------------------------------------------------------------------- WCA


@pytest.mark.parametrize("aggregation", ["normalized", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wca_scores_match_loop_reference_ragged_unnormalised(aggregation, seed):
    views, mask, images, descs, desc_class, classes = make_problem(seed)
    t = as_t(views, mask, images, descs, desc_class, classes)
    got = wca_scores(*t, aggregation=aggregation)
    want = ref_wca(views, mask, images, descs, desc_class, classes, 4.0, 2.0, aggregation)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("aggregation", ["normalized", "sum"])
def test_wca_scores_custom_scales(aggregation):
    views, mask, images, descs, desc_class, classes = make_problem(5)
    got = wca_scores(
        *as_t(views, mask, images, descs, desc_class, classes),
        image_scale=1.5,
        text_scale=0.0,
        aggregation=aggregation,
    )
    want = ref_wca(views, mask, images, descs, desc_class, classes, 1.5, 0.0, aggregation)
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("aggregation", ["normalized", "sum"])
def test_wca_one_view_one_description_per_class_is_plain_cosine(aggregation):
    views, mask, images, descs, desc_class, classes = make_problem(
        3, v=1, counts=(1, 1, 1), ragged=False
    )
    t = as_t(views, mask, images, descs, desc_class, classes)
    got = wca_scores(*t, aggregation=aggregation)
    by_class = np.argsort(desc_class)  # description index of class 0, 1, 2
    want = np.array([[_cos(views[b, 0], descs[j]) for j in by_class] for b in range(3)])
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


def test_wca_one_valid_view_among_padding_ignores_padding_even_if_nan():
    views, mask, images, descs, desc_class, classes = make_problem(4)
    mask[:] = False
    mask[:, 2] = True
    padded = views.copy()
    padded[~mask] = np.nan  # garbage in padded slots must not leak into the scores
    got = wca_scores(*as_t(padded, mask, images, descs, desc_class, classes))
    want = ref_wca(views, mask, images, descs, desc_class, classes, 4.0, 2.0, "normalized")
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


def test_wca_ties_identical_views_and_descriptions_get_equal_weights():
    views, mask, images, descs, desc_class, classes = make_problem(6, ragged=False)
    views[:, :] = views[:, :1]  # all views identical -> uniform view weights
    descs[:] = descs[:1]  # all descriptions identical
    w = view_weights(*as_t(views, mask, images), image_scale=4.0)
    np.testing.assert_allclose(w.numpy(), np.full(mask.shape, 1.0 / mask.shape[1]), atol=1e-6)
    v = description_weights(*as_t(descs, desc_class, classes), text_scale=2.0)
    for c in range(classes.shape[0]):
        members = desc_class == c
        np.testing.assert_allclose(v.numpy()[members], 1.0 / members.sum(), atol=1e-6)
    got = wca_scores(*as_t(views, mask, images, descs, desc_class, classes), aggregation="sum")
    want = ref_wca(views, mask, images, descs, desc_class, classes, 4.0, 2.0, "sum")
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


def test_wca_sum_equals_dot_of_weighted_sums_and_normalized_is_its_cosine():
    views, mask, images, descs, desc_class, classes = make_problem(7)
    t = as_t(views, mask, images, descs, desc_class, classes)
    w = view_weights(t[0], t[1], t[2], 4.0)
    v = description_weights(t[3], t[4], t[5], 2.0)
    img_vec = torch.einsum("bv,bvd->bd", w, torch.nn.functional.normalize(t[0], dim=-1))
    txt_vec = class_text_vectors(t[3], t[4], v, 4)
    torch.testing.assert_close(wca_scores(*t, aggregation="sum"), img_vec @ txt_vec.T)
    unit = torch.nn.functional.normalize
    cos = unit(img_vec, dim=-1) @ unit(txt_vec, dim=-1).T
    torch.testing.assert_close(wca_scores(*t, aggregation="normalized"), cos)


def test_wca_float64_and_float16_inputs_are_scored_in_float32():
    views, mask, images, descs, desc_class, classes = make_problem(8)
    t64 = [torch.from_numpy(a) for a in (views, mask, images, descs, desc_class, classes)]
    got = wca_scores(*t64)
    assert got.dtype == torch.float32
    want = ref_wca(views, mask, images, descs, desc_class, classes, 4.0, 2.0, "normalized")
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)
    t16 = [x.half() if x.is_floating_point() else x for x in t64]
    assert wca_scores(*t16).dtype == torch.float32


def test_view_and_description_weights_match_reference_and_sum_to_one():
    views, mask, images, descs, desc_class, classes = make_problem(9)
    w = view_weights(*as_t(views, mask, images), image_scale=4.0)
    np.testing.assert_allclose(w.numpy(), ref_view_weights(views, mask, images, 4.0), atol=1e-6)
    assert (w.numpy()[~mask] == 0).all()
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-6)
    v = description_weights(*as_t(descs, desc_class, classes), text_scale=2.0)
    want_v = ref_desc_weights(descs, desc_class, classes, 2.0)
    np.testing.assert_allclose(v.numpy(), want_v, atol=1e-6)
    sums = np.bincount(desc_class, weights=v.numpy().astype(np.float64))
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_class_without_description_raises_config_error_naming_it():
    views, mask, images, descs, desc_class, classes = make_problem(10, counts=(2, 2, 2))
    classes = np.concatenate([classes, np.ones((2, classes.shape[1]))])  # classes 3, 4 empty
    with pytest.raises(ConfigError, match=r"3, 4"):
        wca_scores(*as_t(views, mask, images, descs, desc_class, classes))
    with pytest.raises(ConfigError, match=r"\b3\b"):
        mean_scores(*as_t(images, descs, desc_class), num_classes=4)


def test_image_without_valid_view_raises_config_error():
    views, mask, images, descs, desc_class, classes = make_problem(11)
    mask[1] = False
    with pytest.raises(ConfigError, match="valid view"):
        wca_scores(*as_t(views, mask, images, descs, desc_class, classes))


def test_bad_aggregation_and_out_of_range_class_raise_config_error():
    views, mask, images, descs, desc_class, classes = make_problem(12)
    t = as_t(views, mask, images, descs, desc_class, classes)
    with pytest.raises(ConfigError, match="aggregation"):
        wca_scores(*t, aggregation="mean")
    bad = t[4].clone()
    bad[0] = 99
    with pytest.raises(ConfigError, match="desc_class"):
        wca_scores(t[0], t[1], t[2], t[3], bad, t[5])


# ----------------------------------------------------------------------------- mean / CLIP


def test_mean_scores_match_loop_reference_ragged():
    _, _, images, descs, desc_class, _ = make_problem(13, counts=(4, 1, 3, 2, 5))
    got = mean_scores(*as_t(images, descs, desc_class), num_classes=5)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), ref_mean(images, descs, desc_class, 5), atol=ATOL)


def test_clip_scores_are_cosines():
    rng = np.random.default_rng(14)
    images, classes = rng.normal(size=(4, 8)) * 3.0, rng.normal(size=(5, 8)) * 0.2
    got = clip_scores(*as_t(images, classes))
    want = np.array([[_cos(images[b], classes[c]) for c in range(5)] for b in range(4)])
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL, rtol=0)


def test_clip_e_with_one_template_equals_clip_scores():
    rng = np.random.default_rng(15)
    images, classes = rng.normal(size=(4, 8)), rng.normal(size=(5, 8)) * 7.0
    one_template = as_t(images, classes, np.arange(5))
    got = mean_scores(one_template[0], one_template[1], one_template[2], num_classes=5)
    torch.testing.assert_close(got, clip_scores(one_template[0], one_template[1]))


# ----------------------------------------------------------------------------- protocol


def test_sample_view_subsets_only_valid_views_with_replacement_and_deterministic():
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, :1] = True
    mask[1, [1, 4, 6]] = True
    mask[2, :] = True
    idx = sample_view_subsets(mask, patch_n=20, n_run=4, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (4, 3, 20) and idx.dtype == torch.long
    for b in range(3):
        assert mask[b, idx[:, b]].all()
    assert (idx[:, 0] == 0).all()
    assert set(idx[:, 1].flatten().tolist()) == {1, 4, 6}  # 80 draws from 3 views
    assert len(set(idx[0, 1].tolist())) < 20  # with replacement: repeats must occur
    again = sample_view_subsets(mask, 20, 4, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_wca_scores_protocol_scores_each_gathered_subset():
    views, mask, images, descs, desc_class, classes = make_problem(16)
    t = as_t(views, mask, images, descs, desc_class, classes)
    gen = torch.Generator().manual_seed(1)
    got = wca_scores_protocol(*t, patch_n=5, n_run=3, generator=gen, aggregation="sum")
    idx = sample_view_subsets(t[1], 5, 3, torch.Generator().manual_seed(1)).numpy()
    assert got.shape == (3, 3, 4)
    for r in range(3):
        sub_views = np.stack([views[b, idx[r, b]] for b in range(3)])  # duplicates kept
        sub_mask = np.ones(sub_views.shape[:2], dtype=bool)
        want = ref_wca(sub_views, sub_mask, images, descs, desc_class, classes, 4.0, 2.0, "sum")
        np.testing.assert_allclose(got[r].numpy(), want, atol=ATOL, rtol=0)


def test_topk_and_protocol_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.4, 0.35, 0.25]])
    labels = torch.tensor([0, 1, 1, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(0.5)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(0.75)
    assert topk_accuracy(scores, labels, 3) == pytest.approx(1.0)
    runs = torch.stack([scores, scores[[1, 0, 3, 2]], scores])  # 2nd run: every top-1 wrong
    per_run = topk_accuracy(runs, labels, 1)
    assert isinstance(per_run, torch.Tensor) and per_run.shape == (3,)
    np.testing.assert_allclose(per_run.numpy(), [0.5, 0.0, 0.5])
    mean, std = protocol_accuracy(runs, labels, k=1)
    assert mean == pytest.approx(np.mean([0.5, 0.0, 0.5]))
    assert std == pytest.approx(np.std([0.5, 0.0, 0.5]))
    with pytest.raises(ConfigError):
        topk_accuracy(scores, labels, 4)
