"""Label-set text side: per-method description banks, refined and encoded once per label set.

A :class:`TextBank` is what a scorer needs for one method: description embeddings ``[T,D]``, the
class of each description ``[T]``, and (WCA/BiFTA) the description weights
``v = softmax_c(e^{text_scale} · cos(desc, "a photo of a {c}."))`` (WCA §3.2). BiFTA's bank is the
refined pool (BiFTA description refinement: ``cupl.json`` ∪ ``llm-pool.json``, ranked by cosine to
the class prompt, near-duplicates above the threshold dropped, top-K kept).

Every distinct string is encoded once, however many banks use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from bifta_core.method.refinement import refine_descriptions
from bifta_core.io.label_sets import LabelSet
from bifta_core.method.registry import METHODS
from bifta_core.io.models import ClipModel, config_fingerprint
from bifta_core.method.scoring import description_weights

logger = logging.getLogger("bifta.text_banks")


@dataclass(frozen=True)
class BankSpec:
    """How to build one bank: the method's texts, optionally refined (BiFTA)."""

    method: str
    refine: bool = False
    threshold: float = 0.99
    top_k: int | None = 50
    waffle_seed: int | None = None  # WaffleCLIP: the seed its random texts are drawn from
    waffle_words: str | None = None  # WaffleCLIP: word list path (None: the bundled list)

    @property
    def key(self) -> str:
        """Bank name: the method, plus ``+refined``/``-unrefined`` where it departs from its default."""
        if self.refine == METHODS[self.method].refine:
            return self.method
        return f"{self.method}{'+refined' if self.refine else '-unrefined'}"

    @classmethod
    def of(cls, method: str, *, refine: bool, seed: int, waffle_words: str | None = None, **refinement) -> "BankSpec":
        """The bank of ``method``: ``seed`` and ``waffle_words`` are kept only where its texts are
        WaffleCLIP's (the one place that rule lives); ``refinement``: ``threshold``/``top_k``."""
        waffle = METHODS[method].texts == "waffle"
        return cls(method, refine=refine, waffle_seed=seed if waffle else None,
                   waffle_words=waffle_words if waffle else None, **refinement)

    def identity(self) -> dict:
        """What the bank's texts depend on (for content hashes): the WaffleCLIP settings only where
        they apply (so other banks hash as before), with the word list by content."""
        fields = {k: v for k, v in vars(self).items() if not k.startswith("waffle_")}
        if METHODS[self.method].texts == "waffle":
            from bifta_core.method.waffle import words_digest

            fields["waffle"] = {"seed": self.waffle_seed or 0, "words": words_digest(self.waffle_words)}
        return fields


@dataclass
class TextBank:
    """Encoded texts for one method of one label set."""

    key: str
    method: str
    texts: list[str]
    desc_class: torch.Tensor  # long [T]
    desc_emb: torch.Tensor  # float32 [T, D], unit norm
    weights: torch.Tensor | None = None  # float32 [T], per-class softmax (WCA/BiFTA)
    pool_sizes: list[int] | None = None  # per class, descriptions before refinement


@dataclass
class LabelSetEmbeddings:
    """All text-side matrices for one label set; shared read-only with every encode actor."""

    name: str
    classes: list[str]
    class_emb: torch.Tensor  # [C, D] "a photo of a {c}."
    banks: dict[str, TextBank]
    content_hash: str
    params: dict = field(default_factory=dict)
    model: str = ""
    pretrained: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def bank(self, key: str) -> TextBank:
        return self.banks[key]


def content_hash(label_set: LabelSet, model_identity: str, specs: Sequence[BankSpec], text_scale: float) -> str:
    """sha256 of everything the embeddings depend on: model+weights, label files, refinement settings."""
    return config_fingerprint(
        {
            "model": model_identity,
            "label_set": label_set.content(),
            "banks": [s.identity() for s in specs],
            "text_scale": text_scale,
            "format": 1,
        }
    )


def _encode_unique(model: ClipModel, texts: Iterable[str], batch_size: int,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    unique = list(dict.fromkeys(texts))
    on_batch = None if progress is None else (lambda done: progress(done, len(unique)))
    emb = model.encode_text(unique, batch_size=batch_size, on_batch=on_batch)
    return {t: emb[i] for i, t in enumerate(unique)}


def build_label_set_embeddings(
    label_set: LabelSet,
    model: ClipModel,
    specs: Sequence[BankSpec],
    *,
    text_scale: float = 2.0,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> LabelSetEmbeddings:
    """Encode the class prompts and every bank in ``specs`` (refining where asked);
    ``progress(texts done, texts in all)`` after each encoded batch."""
    per_bank_texts: dict[str, list[list[str]]] = {}
    for spec in specs:
        # Sentence methods refine BiFTA's pool (cupl ∪ llm-pool); others refine their own texts.
        if spec.refine and METHODS[spec.method].refinement_pool:
            per_bank_texts[spec.key] = label_set.refinement_pool()
        else:
            words = None
            if spec.waffle_words is not None:
                from bifta_core.method.waffle import load_words

                words = load_words(spec.waffle_words)
            per_bank_texts[spec.key] = label_set.texts_for(spec.method, seed=spec.waffle_seed or 0, words=words)
    prompts = label_set.class_prompts()
    all_texts = list(prompts)
    for texts in per_bank_texts.values():
        for group in texts:
            all_texts.extend(group)
    logger.info("label set '%s': encoding %d distinct texts", label_set.name, len(set(all_texts)))
    table = _encode_unique(model, all_texts, batch_size, progress)
    class_emb = torch.stack([table[p] for p in prompts])

    banks: dict[str, TextBank] = {}
    for spec in specs:
        groups = per_bank_texts[spec.key]
        texts, classes = [], []
        for c, group in enumerate(groups):
            if spec.refine:
                emb = torch.stack([table[t] for t in group]) if group else torch.empty(0, class_emb.shape[1])
                kept = refine_descriptions(emb, class_emb[c], threshold=spec.threshold, top_k=spec.top_k, texts=group)
                group = [group[i] for i in kept.tolist()]
            texts.extend(group)
            classes.extend([c] * len(group))
        desc_class = torch.tensor(classes, dtype=torch.long)
        desc_emb = torch.stack([table[t] for t in texts]) if texts else torch.empty(0, class_emb.shape[1])
        weights = None
        if METHODS[spec.method].weighted:
            weights = description_weights(desc_emb, desc_class, class_emb, text_scale)
        banks[spec.key] = TextBank(
            key=spec.key,
            method=spec.method,
            texts=texts,
            desc_class=desc_class,
            desc_emb=desc_emb,
            weights=weights,
            pool_sizes=[len(g) for g in per_bank_texts[spec.key]],
        )
    return LabelSetEmbeddings(
        name=label_set.name,
        classes=list(label_set.classes),
        class_emb=class_emb,
        banks=banks,
        # model.identity includes the activation (QuickGELU or GELU); the text precision is in params.
        content_hash=content_hash(label_set, model.identity, specs, text_scale),
        # What the texts were encoded with (activation inside the identity), checked when reused.
        params={"specs": [s.identity() for s in specs], "text_scale": text_scale,
                "model_identity": model.identity, "text_precision": model.precision},
        model=model.model_name,
        pretrained=model.pretrained,
    )
