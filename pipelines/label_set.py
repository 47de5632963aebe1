"""Label-set stage — once per label set, never per image.

Loads and validates each label set, refines descriptions (BiFTA), encodes all text once and
returns :class:`LabelSetEmbeddings`. Results are cached on disk as label-set artifacts keyed by a
content hash of (model, weights, classes, descriptions, refinement parameters): a second run with
the same label set encodes no text. Misses are encoded in one Ray task that takes a GPU when the
cluster has one, so a CPU-only head node never runs the text encoder.
"""

from __future__ import annotations

import logging
import os

import ray

from bifta_core.config import LabelConfig
from bifta_core.errors import LabelSetError
from bifta_core.labelset_artifact import load_artifact, save_artifact
from bifta_core.labelsets import LabelSet, load_label_set
from bifta_core.models import load_model, model_identity
from bifta_core.text_banks import BankSpec, LabelSetEmbeddings, build_label_set_embeddings, content_hash

logger = logging.getLogger("bifta.label_set")


def bank_specs(config: LabelConfig) -> list[BankSpec]:
    """The text banks a labelling run needs (CLIP needs only class prompts)."""
    if config.method == "clip":
        return []
    return [
        BankSpec(
            method=config.method,
            refine=config.refines_descriptions,
            threshold=config.desc_threshold,
            top_k=config.desc_top_k,
        )
    ]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "bifta", "labelsets")


def _cache_path(config: LabelConfig, digest: str) -> str | None:
    if config.labelset_cache == "":
        return None
    return os.path.join(config.labelset_cache or default_cache_dir(), f"{digest}.parquet")


@ray.remote
def _encode_label_sets(label_sets: list[LabelSet], model_cfg: dict, specs: list[BankSpec], text_scale: float):
    model = load_model(**model_cfg)
    return [build_label_set_embeddings(ls, model, specs, text_scale=text_scale) for ls in label_sets]


def load_label_sets(config: LabelConfig) -> list[LabelSet]:
    """Load and validate every ``--labels`` (no Ray, no model): a bad label set fails before start-up."""
    loaded = [load_label_set(path, name, merge_duplicates=config.merge_duplicate_classes)
              for name, path in config.label_specs()]
    for ls in loaded:
        ls.texts_for(config.method)  # raises LabelSetError naming the file this method needs
    return loaded


def prepare_label_sets(config: LabelConfig, model_cfg: dict, *, num_gpus: float = 0,
                       loaded: list[LabelSet] | None = None) -> list[LabelSetEmbeddings]:
    """Load every ``--labels`` and ``--labelset-artifact``; encode only what the cache lacks.

    ``loaded`` is :func:`load_label_sets`'s result when the caller has already validated them.
    """
    specs = bank_specs(config)
    identity = model_identity(config.model.model, config.model.pretrained, config.model.cache_dir)
    ready: dict[int, LabelSetEmbeddings] = {}
    missing: list[tuple[int, LabelSet, str, str | None]] = []
    entries = config.label_specs()
    if loaded is None:
        loaded = load_label_sets(config)
    for i, ls in enumerate(loaded):
        digest = content_hash(ls, identity, specs, config.text_scale)
        cache = _cache_path(config, digest)
        if cache and os.path.exists(cache):
            try:
                emb = load_artifact(cache)
                emb.name = ls.name
                ready[i] = emb
                logger.info("label set '%s': %d classes from cache %s (no text encoded)", ls.name, ls.num_classes, cache)
                continue
            except LabelSetError as exc:
                logger.warning("ignoring unreadable label-set cache %s: %s", cache, exc)
        missing.append((i, ls, digest, cache))
    if missing:
        for _, ls, _, _ in missing:
            logger.info("label set '%s': %d classes, refining and encoding descriptions", ls.name, ls.num_classes)
        task = _encode_label_sets.options(num_gpus=num_gpus)
        built = ray.get(task.remote([m[1] for m in missing], model_cfg, specs, config.text_scale))
        for (i, ls, digest, cache), emb in zip(missing, built):
            if cache:
                save_artifact(emb, cache)
            ready[i] = emb
    artifacts = [_artifact(path, config, identity, specs) for path in config.labelset_artifacts]
    result = [ready[i] for i in range(len(entries))] + artifacts
    names = [e.name for e in result]
    if len(set(names)) != len(names):
        raise LabelSetError(f"two label sets share the name(s) {sorted({n for n in names if names.count(n) > 1})}; "
                            "name them with --labels NAME=PATH")
    return result


def _artifact(path: str, config: LabelConfig, identity: str, specs: list[BankSpec]) -> LabelSetEmbeddings:
    emb = load_artifact(path)
    arch = identity.split("|", 1)[0]
    if emb.model != arch or emb.pretrained != config.model.pretrained:
        raise LabelSetError(
            f"label-set artifact {path} was built for {emb.model} ({emb.pretrained}), "
            f"this run uses {arch} ({config.model.pretrained}); rebuild it with `bifta labelset build`"
        )
    for spec in specs:
        if spec.key not in emb.banks:
            raise LabelSetError(
                f"label-set artifact {path} has no '{spec.key}' descriptions (it has {sorted(emb.banks) or 'none'}); "
                f"rebuild it with --method {config.method}"
            )
    return emb
