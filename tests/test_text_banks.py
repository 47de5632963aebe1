"""Text banks per method with the tiny CLIP, BiFTA refinement, content hashes and the artifact file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bifta_core.method.refinement import normalize_text
from bifta_core.errors import LabelSetError
from bifta_core.io.label_set_artifacts import from_table, load_artifact, save_artifact, to_table
from bifta_core.io.label_sets import load_label_set
from bifta_core.method.registry import METHOD_NAMES
from bifta_core.io.models import load_model
from bifta_core.method.text_banks import BankSpec, LabelSetEmbeddings, build_label_set_embeddings, content_hash

CLASSES = ["cat", "golden_retriever", "bird"]
CUPL = {
    "cat": ["A cat is a small furry animal.", "Cats purr when happy.", "A cat has whiskers and a long tail."],
    "golden retriever": ["A golden retriever is a large dog.", "Golden retrievers have golden fur."],
    "bird": [
        "Birds have feathers and wings.",
        "A bird has a beak.",
        "Birds can fly.",
        "A small bird sits on a branch.",
    ],
}
POOL = {
    "cat": [
        "A cat is a small furry animal!",  # near-duplicate of a cupl sentence
        "cats purr  when happy.",  # the same sentence after case/whitespace folding
        "A cat sleeps most of the day.",
    ],
    "golden retriever": ["A golden retriever is a large dog.", "Golden retrievers love to swim in lakes."],
    "bird": ["Birds can fly.", "Many birds migrate south in winter.", "Birds lay eggs in nests."],
}
DESCRIPTORS = {
    "cat": ["pointed ears", "a small mammal", "can climb trees"],
    "golden retriever": ["golden fur"],
    "bird": ["feathers", "a beak"],
}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} in the wild."]

ALL_SPECS = [BankSpec(m) for m in METHOD_NAMES if m != "bifta"] + [BankSpec("bifta", refine=True)]


def _write_label_set(folder: Path, cupl: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "classes.json": CLASSES,
        "cupl.json": cupl if cupl is not None else CUPL,
        "llm-pool.json": POOL,
        "clip-d.json": DESCRIPTORS,
        "clip-e.json": TEMPLATES,
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def label_set(tmp_path_factory):
    return load_label_set(str(_write_label_set(tmp_path_factory.mktemp("labels") / "animals")))


@pytest.fixture(scope="module")
def embeddings(label_set, tiny_vit_model) -> LabelSetEmbeddings:
    return build_label_set_embeddings(label_set, tiny_vit_model, ALL_SPECS, text_scale=2.0, batch_size=4)


def _per_class(bank, c: int) -> list[str]:
    return [t for t, k in zip(bank.texts, bank.desc_class.tolist()) if k == c]


# ------------------------------------------------------------------------------ bank keys


def test_bank_keys():
    assert BankSpec("bifta", refine=True).key == "bifta"
    assert BankSpec("bifta").key == "bifta-unrefined"
    assert BankSpec("wca").key == "wca"
    assert BankSpec("wca", refine=True).key == "wca+refined"
    assert BankSpec("clip-e").key == "clip-e"


# ------------------------------------------------------------------------------ shapes per method


def test_class_embeddings(embeddings, label_set, tiny_vit_model):
    assert embeddings.name == "animals"
    assert embeddings.classes == CLASSES
    assert embeddings.num_classes == 3
    assert embeddings.class_emb.shape == (3, 64)
    expected = tiny_vit_model.encode_text(label_set.class_prompts())
    torch.testing.assert_close(embeddings.class_emb, expected, atol=1e-5, rtol=0)
    assert embeddings.model == "bifta-tiny-vit"
    assert set(embeddings.banks) == {s.key for s in ALL_SPECS}


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "bifta"])
def test_unrefined_banks_hold_the_method_texts(method, embeddings, label_set, tiny_vit_model):
    bank = embeddings.bank(method)
    groups = label_set.texts_for(method)
    assert bank.method == method
    assert bank.texts == [t for g in groups for t in g]
    assert bank.desc_class.tolist() == [c for c, g in enumerate(groups) for _ in g]
    assert bank.desc_class.dtype == torch.long
    assert bank.desc_emb.shape == (len(bank.texts), 64)
    assert bank.desc_emb.dtype == torch.float32
    torch.testing.assert_close(bank.desc_emb.norm(dim=-1), torch.ones(len(bank.texts)), atol=1e-5, rtol=0)
    torch.testing.assert_close(bank.desc_emb, tiny_vit_model.encode_text(bank.texts), atol=1e-5, rtol=0)
    assert bank.pool_sizes == [len(g) for g in groups]
    assert (bank.weights is not None) == (method == "wca")


def test_bank_sizes(embeddings):
    assert len(embeddings.bank("clip").texts) == 3
    assert embeddings.bank("clip").texts == ["a photo of a cat.", "a photo of a golden retriever.", "a photo of a bird."]
    assert embeddings.bank("clip-e").desc_emb.shape == (3 * len(TEMPLATES), 64)
    assert embeddings.bank("clip-e").texts[3:6] == [t.format("golden retriever") for t in TEMPLATES]
    assert len(embeddings.bank("clip-d").texts) == sum(len(v) for v in DESCRIPTORS.values())
    assert embeddings.bank("clip-d").texts[:2] == ["cat, which has pointed ears", "cat, which is a small mammal"]
    assert len(embeddings.bank("cupl").texts) == sum(len(v) for v in CUPL.values())
    assert embeddings.bank("wca").texts == embeddings.bank("cupl").texts


# ------------------------------------------------------------------------------ WCA weights


@pytest.mark.parametrize("key", ["wca", "bifta"])
def test_weights_sum_to_one_per_class(key, embeddings):
    bank = embeddings.bank(key)
    assert bank.weights is not None and bank.weights.shape == (len(bank.texts),)
    assert bank.weights.dtype == torch.float32
    assert (bank.weights > 0).all()
    sums = torch.zeros(3).index_add_(0, bank.desc_class, bank.weights)
    torch.testing.assert_close(sums, torch.ones(3), atol=1e-5, rtol=0)


def test_wca_weights_follow_the_formula(embeddings):
    bank = embeddings.bank("wca")
    for c in range(3):
        rows = (bank.desc_class == c).nonzero().flatten()
        cos = bank.desc_emb[rows] @ embeddings.class_emb[c]
        expected = torch.softmax(math.exp(2.0) * cos, dim=0)
        torch.testing.assert_close(bank.weights[rows], expected, atol=1e-5, rtol=0)


def test_text_scale_changes_weights(label_set, tiny_vit_model, embeddings):
    other = build_label_set_embeddings(label_set, tiny_vit_model, [BankSpec("wca")], text_scale=0.0)
    assert not torch.allclose(other.bank("wca").weights, embeddings.bank("wca").weights)
    assert other.params["text_scale"] == 0.0


# ------------------------------------------------------------------------------ BiFTA refinement


def test_bifta_bank_is_refined(embeddings, label_set):
    bank = embeddings.bank("bifta")
    spec = BankSpec("bifta", refine=True)
    pool = label_set.refinement_pool()
    assert bank.pool_sizes == [len(g) for g in pool] == [6, 4, 7]
    for c in range(3):
        kept = _per_class(bank, c)
        assert kept, f"class {c} lost every description"
        assert len(kept) <= spec.top_k
        assert set(kept) <= set(pool[c])
        folded = [normalize_text(t) for t in kept]
        assert len(folded) == len(set(folded)), "duplicates across cupl/llm-pool kept"
        rows = (bank.desc_class == c).nonzero().flatten()
        emb = bank.desc_emb[rows]
        sim = emb @ emb.T - 2 * torch.eye(len(rows))
        assert (sim <= spec.threshold + 1e-6).all(), "near-duplicate pair above the threshold kept"
        # ranked by cosine to the class prompt, most relevant first
        rel = (emb @ embeddings.class_emb[c]).tolist()
        assert rel == sorted(rel, reverse=True)
    cat = _per_class(bank, 0)
    assert not {"Cats purr when happy.", "cats purr  when happy."} <= set(cat)
    assert not {"A cat is a small furry animal.", "A cat is a small furry animal!"} <= set(cat)
    # the exact cupl/pool repeats are gone
    assert _per_class(bank, 1).count("A golden retriever is a large dog.") == 1
    assert _per_class(bank, 2).count("Birds can fly.") == 1


def test_bifta_top_k_and_threshold(label_set, tiny_vit_model):
    specs = [BankSpec("bifta", refine=True, top_k=2), BankSpec("wca", refine=True, threshold=-1.0, top_k=None)]
    emb = build_label_set_embeddings(label_set, tiny_vit_model, specs)
    top2 = emb.bank("bifta")
    assert [len(_per_class(top2, c)) for c in range(3)] == [2, 2, 2]
    one = emb.bank("wca+refined")  # threshold -1: every second description is "redundant"
    assert [len(_per_class(one, c)) for c in range(3)] == [1, 1, 1]
    assert one.weights is not None and torch.allclose(one.weights, torch.ones(3))


def test_unrefined_bifta_bank_is_the_cupl_texts(label_set, tiny_vit_model, embeddings):
    emb = build_label_set_embeddings(label_set, tiny_vit_model, [BankSpec("bifta")])
    assert emb.bank("bifta-unrefined").texts == embeddings.bank("cupl").texts


def test_every_distinct_text_is_encoded_once(label_set, tiny_vit_model, monkeypatch):
    seen: list[str] = []
    original = tiny_vit_model.encode_text

    def spy(texts, batch_size=256, **kwargs):
        seen.extend(texts)
        return original(texts, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(tiny_vit_model, "encode_text", spy)
    build_label_set_embeddings(label_set, tiny_vit_model, ALL_SPECS + [BankSpec("bifta")])
    assert len(seen) == len(set(seen))
    assert "A golden retriever is a large dog." in seen


# ------------------------------------------------------------------------------ content hash


def test_content_hash_is_stable(label_set, tiny_vit_model, embeddings):
    again = build_label_set_embeddings(label_set, tiny_vit_model, ALL_SPECS, text_scale=2.0, batch_size=64)
    assert again.content_hash == embeddings.content_hash
    assert len(embeddings.content_hash) == 64
    assert content_hash(label_set, tiny_vit_model.identity, ALL_SPECS, 2.0) == embeddings.content_hash


def test_content_hash_changes_with_a_description(label_set, tmp_path):
    cupl = {k: list(v) for k, v in CUPL.items()}
    cupl["bird"][1] = "A bird has a sharp beak."
    changed = load_label_set(str(_write_label_set(tmp_path / "animals", cupl)))
    assert changed.name == label_set.name
    assert content_hash(changed, "m", ALL_SPECS, 2.0) != content_hash(label_set, "m", ALL_SPECS, 2.0)
    same = load_label_set(str(_write_label_set(tmp_path / "copy")))
    assert content_hash(same, "m", ALL_SPECS, 2.0) == content_hash(label_set, "m", ALL_SPECS, 2.0)


def test_content_hash_changes_with_settings(label_set):
    base = content_hash(label_set, "m", ALL_SPECS, 2.0)
    assert content_hash(label_set, "m", ALL_SPECS, 3.0) != base
    assert content_hash(label_set, "m", ALL_SPECS[:-1], 2.0) != base
    tweaked = ALL_SPECS[:-1] + [BankSpec("bifta", refine=True, threshold=0.95)]
    assert content_hash(label_set, "m", tweaked, 2.0) != base


def test_content_hash_changes_with_the_model(label_set, tiny_vit_model):
    random_vit = load_model("bifta-tiny-vit", "random", device="cpu")
    specs = [BankSpec("clip")]
    a = build_label_set_embeddings(label_set, tiny_vit_model, specs)
    b = build_label_set_embeddings(label_set, random_vit, specs)
    assert tiny_vit_model.identity != random_vit.identity
    assert a.content_hash != b.content_hash
    # same weights, different source: equal embeddings, but a different identity
    torch.testing.assert_close(a.class_emb, b.class_emb, atol=1e-6, rtol=0)
    assert content_hash(label_set, "bifta-tiny-rn|random:0", specs, 2.0) != a.content_hash


# ------------------------------------------------------------------------------ artifact


def _assert_equal_embeddings(a: LabelSetEmbeddings, b: LabelSetEmbeddings) -> None:
    assert a.name == b.name
    assert a.classes == b.classes
    assert a.content_hash == b.content_hash
    assert a.params == b.params
    assert a.model == b.model and a.pretrained == b.pretrained
    assert torch.equal(a.class_emb, b.class_emb)
    assert list(a.banks) == list(b.banks)
    for key in a.banks:
        x, y = a.banks[key], b.banks[key]
        assert x.key == y.key and x.method == y.method
        assert x.texts == y.texts
        assert torch.equal(x.desc_class, y.desc_class)
        assert torch.equal(x.desc_emb, y.desc_emb)
        assert (x.weights is None) == (y.weights is None)
        if x.weights is not None:
            assert torch.equal(x.weights, y.weights)
        assert x.pool_sizes == y.pool_sizes


def test_artifact_round_trip(embeddings, tmp_path):
    path = tmp_path / "sub" / "animals.parquet"
    assert save_artifact(embeddings, str(path)) == str(path)
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    loaded = load_artifact(str(path))
    _assert_equal_embeddings(embeddings, loaded)
    _assert_equal_embeddings(embeddings, load_artifact(f"file://{path}"))


def test_artifact_table_is_self_describing(embeddings):
    table = to_table(embeddings)
    n_text = sum(len(b.texts) for b in embeddings.banks.values())
    assert table.num_rows == 3 + n_text
    assert table.column("kind").to_pylist().count("class") == 3
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.list_size == 64
    meta = json.loads(table.schema.metadata[b"bifta"])
    assert meta["content_hash"] == embeddings.content_hash
    assert meta["classes"] == CLASSES
    _assert_equal_embeddings(embeddings, from_table(table))


def test_foreign_parquet_is_rejected(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    with pytest.raises(LabelSetError, match="not a bifta label-set artifact") as info:
        load_artifact(str(path))
    assert str(path) in str(info.value)


def test_artifact_of_another_format_is_rejected(embeddings, tmp_path):
    table = to_table(embeddings)
    meta = json.loads(table.schema.metadata[b"bifta"])
    meta["format"] = 99
    path = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata({b"bifta": json.dumps(meta).encode()}), path)
    with pytest.raises(LabelSetError, match="format 99"):
        load_artifact(str(path))


def test_missing_or_unreadable_artifact(tmp_path):
    with pytest.raises(LabelSetError, match="not found"):
        load_artifact(str(tmp_path / "nope.parquet"))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"definitely not parquet")
    with pytest.raises(LabelSetError, match="cannot read"):
        load_artifact(str(garbage))
