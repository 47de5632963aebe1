"""BiFTA description refinement: duplicates, relevance ranking, redundancy threshold, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bifta_core.method.refinement import normalize_text, refine_descriptions
from bifta_core.errors import ConfigError

PROPS = settings(max_examples=80, deadline=None)
EPS = 1e-9  # float64 rounding allowance at the threshold boundary


def _cosines(desc: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    c = cls / np.linalg.norm(cls)
    return d @ c, d @ d.T


@st.composite
def problems(draw):
    """Random descriptions, some near-copies of others so the threshold matters, plus texts."""
    t = draw(st.integers(0, 25))
    d = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(t, d)) * rng.uniform(0.2, 5.0, size=(t, 1))
    for i in range(1, t):
        if rng.random() < 0.4:  # near-duplicate of an earlier description
            desc[i] = desc[rng.integers(0, i)] * rng.uniform(0.5, 2.0) + rng.normal(size=d) * 0.05
    cls = rng.normal(size=d)
    # The function sees float32 inputs; round here too so both sides rank the same values.
    desc = desc.astype(np.float32).astype(np.float64)
    cls = cls.astype(np.float32).astype(np.float64)
    words = ["red beak", "Red  beak ", "long tail", "LONG TAIL", "spotted wings", "small"]
    picks = rng.integers(0, len(words), t)
    texts = [words[k] + ("" if rng.random() < 0.5 else f" {i}") for i, k in enumerate(picks)]
    threshold = draw(st.floats(0.5, 1.0))
    top_k = draw(st.one_of(st.none(), st.integers(1, 30)))
    return desc, cls, texts, threshold, top_k


def _run(desc, cls, texts, threshold, top_k):
    return refine_descriptions(
        torch.from_numpy(desc).float(), torch.from_numpy(cls).float(), threshold, top_k, texts
    ).tolist()


def _non_duplicates(texts):
    seen, keep = set(), []
    for i, t in enumerate(texts):
        k = " ".join(t.lower().split())
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


@PROPS
@given(problems())
def test_kept_descriptions_are_pairwise_within_threshold(problem):
    desc, cls, texts, thr, top_k = problem
    kept = _run(desc, cls, texts, thr, top_k)
    _, pair = _cosines(desc, cls)
    for a in kept:
        for b in kept:
            if a != b:
                assert pair[a, b] <= thr + EPS


@PROPS
@given(problems())
def test_dropped_descriptions_are_redundant_with_an_earlier_kept_one(problem):
    desc, cls, texts, thr, top_k = problem
    kept = _run(desc, cls, texts, thr, top_k)
    rel, pair = _cosines(desc, cls)
    candidates = _non_duplicates(texts)
    ranking = sorted(candidates, key=lambda i: (-rel[i], i))
    # Walk the ranking up to the last visited position (all of it unless top_k was reached).
    capped = top_k is not None and len(kept) == top_k
    visited = ranking[: ranking.index(kept[-1]) + 1] if capped else ranking
    for pos, j in enumerate(visited):
        if j not in kept:
            earlier_kept = [i for i in visited[:pos] if i in kept]
            assert any(pair[i, j] > thr - EPS for i in earlier_kept)


@PROPS
@given(problems())
def test_result_is_in_descending_relevance_order_and_respects_top_k(problem):
    desc, cls, texts, thr, top_k = problem
    kept = _run(desc, cls, texts, thr, top_k)
    rel, _ = _cosines(desc, cls)
    assert len(kept) == len(set(kept))
    for a, b in zip(kept, kept[1:]):
        assert rel[a] >= rel[b] - EPS  # exact ties are covered by the example test below
    if top_k is not None:
        assert len(kept) <= top_k


@PROPS
@given(problems())
def test_normalised_duplicate_texts_are_dropped_and_first_occurrence_kept(problem):
    desc, cls, texts, thr, top_k = problem
    kept = _run(desc, cls, texts, thr, top_k)
    firsts = set(_non_duplicates(texts))
    assert set(kept) <= firsts
    assert len({normalize_text(texts[i]) for i in kept}) == len(kept)


@PROPS
@given(problems())
def test_refinement_is_deterministic(problem):
    desc, cls, texts, thr, top_k = problem
    assert _run(desc, cls, texts, thr, top_k) == _run(desc, cls, texts, thr, top_k)


def test_ties_rank_by_original_index_and_identical_embeddings_collapse():
    cls = torch.tensor([1.0, 0.0, 0.0])
    desc = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    # Index 3 is most relevant; 0, 1, 2 tie at cosine 0 and keep index order.
    assert refine_descriptions(desc, cls, threshold=0.99, top_k=None).tolist() == [3, 0, 1, 2]
    same = torch.tensor([[1.0, 1.0, 0.0]] * 3)  # exact ties: the first index wins
    assert refine_descriptions(same, cls, threshold=0.99, top_k=None).tolist() == [0]
    scaled = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [3.0, 3.0, 0.0]])
    assert len(refine_descriptions(scaled, cls, threshold=0.99, top_k=None)) == 1


def test_top_k_and_duplicate_texts_examples():
    cls = torch.tensor([1.0, 0.0])
    desc = torch.tensor([[1.0, 0.1], [1.0, -0.5], [1.0, 0.3], [0.2, 1.0]])
    assert refine_descriptions(desc, cls, threshold=1.0, top_k=2).tolist() == [0, 2]
    texts = ["Has a red beak.", "has a  red beak.", "striped tail", "tiny"]
    kept = refine_descriptions(desc, cls, threshold=1.0, top_k=None, texts=texts)
    assert kept.tolist() == [0, 2, 3]


def test_empty_input_and_normalize_text():
    assert refine_descriptions(torch.zeros(0, 4), torch.ones(4)).tolist() == []
    assert normalize_text("  A  Red\tBEAK\n") == "a red beak"
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 1.5}, {"top_k": 0}, {"texts": ["only one"]}],
)
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        refine_descriptions(torch.ones(2, 3), torch.ones(3), **kwargs)


def test_mismatched_dimensions_raise_config_error():
    with pytest.raises(ConfigError):
        refine_descriptions(torch.ones(2, 3), torch.ones(4))
