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
from dataclasses import dataclass, field

import ray

from bifta_core.config import LabelConfig
from bifta_core.errors import LabelSetError
from bifta_core.io.label_set_artifacts import load_artifact, save_artifact
from bifta_core.io.label_sets import LabelSet, load_label_set
from bifta_core.method.registry import METHODS
from bifta_core.io.models import model_identity, text_precision
from bifta_core.method.text_banks import BankSpec, LabelSetEmbeddings, build_label_set_embeddings, content_hash

logger = logging.getLogger("bifta.label_set")


def bank_specs(config: LabelConfig) -> list[BankSpec]:
    """The text banks a labelling run needs: its method's, then a cascade's first stage's (a
    method scored by its class prompt needs none)."""
    specs = []
    if METHODS[config.method].has_bank:
        specs.append(BankSpec.of(config.method, refine=config.refines_descriptions, seed=config.seed,
                                 waffle_words=config.waffle_words, threshold=config.desc_threshold,
                                 top_k=config.desc_top_k))
    first = first_stage_spec(config)
    if first is not None and all(s.key != first.key for s in specs):
        specs.append(first)
    return specs


def first_stage_spec(config: LabelConfig) -> BankSpec | None:
    """The text bank of a cascade's first stage, as ``--method FIRST`` builds it (None: no cascade,
    or a first stage scored by its class prompt)."""
    if not config.cascade or not METHODS[config.cascade_first].has_bank:
        return None
    return BankSpec.of(config.cascade_first, refine=METHODS[config.cascade_first].refine, seed=config.seed,
                       waffle_words=config.waffle_words, threshold=config.desc_threshold, top_k=config.desc_top_k)


def run_methods(config: LabelConfig) -> list[str]:
    """The methods a run scores with: its method, and a cascade's first stage."""
    return [config.method, config.cascade_first] if config.cascade else [config.method]


def default_cache_dir() -> str:
    """The ``labelsets`` folder of :mod:`bifta_core.io.cache`."""
    from bifta_core.io.cache import cache_dir

    return cache_dir("labelsets")


def _cache_path(config: LabelConfig, digest: str) -> str | None:
    if config.labelset_cache == "":
        return None
    return os.path.join(config.labelset_cache or default_cache_dir(), f"{digest}.parquet")


def text_model_config(model_cfg: dict) -> dict:
    """The model settings of the label-set text encode: the run's, at :func:`text_precision`
    (``auto`` → fp32), which is also what the cache key records."""
    return {**model_cfg, "precision": text_precision(model_cfg.get("precision", "auto"))}


def label_set_identity(config: LabelConfig) -> str:
    """Model part of the label-set cache key: architecture, weights, activation, text precision."""
    m = config.model
    return model_identity(m.model, m.pretrained, m.cache_dir, quick_gelu=m.quick_gelu,
                          precision=text_precision(m.precision))


@ray.remote
def _encode_label_sets(label_sets: list[LabelSet], model_cfg: dict, specs: list[BankSpec], text_scale: float,
                       threads: int | None = None, show_progress: bool = True):
    """The text encode of the label-set stage, with a progress line per label set (printed by the
    worker, shown by the driver; none with ``show_progress`` False: ``--quiet``) and ``threads``
    torch threads on CPU."""
    import torch

    from bifta_core.progress import ProgressLine
    from pipelines.encode import load_gpu_checked_model

    if threads:
        torch.set_num_threads(threads)
    model = load_gpu_checked_model(text_model_config(model_cfg), ray.get_gpu_ids())
    return [build_label_set_embeddings(ls, model, specs, text_scale=text_scale,
                                       progress=ProgressLine(f"label set '{ls.name}'", "texts").update
                                       if show_progress else None)
            for ls in label_sets]


def text_encode_options(num_gpus: float) -> dict:
    """Resources of the label-set text encode: a GPU when asked, else every CPU of the largest node.
    It runs before the pipeline starts (nothing else needs those CPUs then), and a Ray task that
    reserves one CPU also gets one torch thread: the ImageNet set's ~117k texts took 17 minutes so."""
    if num_gpus:
        return {"num_gpus": num_gpus, "threads": None}
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    most = max(cpus, default=1) or 1
    return {"num_cpus": most, "threads": most}


def load_label_sets(config: LabelConfig) -> list[LabelSet]:
    """Load and validate every ``--labels`` (no Ray, no model): a bad label set fails before start-up."""
    methods = run_methods(config)
    needed = frozenset().union(*(METHODS[m].files for m in methods))
    loaded = [load_label_set(path, name, merge_duplicates=config.merge_duplicate_classes, needed=needed)
              for name, path in config.label_specs()]
    for ls in loaded:
        for m in methods:
            ls.require(m)  # raises LabelSetError naming the file this method needs
    return loaded


@dataclass
class LabelSetPlan:
    """What the label-set stage will produce, known before any text is encoded.

    Per label set: its content hash (the run id depends on it), and either a ready embedding (an
    artifact or a cache hit) or the validated label set still to encode.
    """

    hashes: list[str]
    ready: dict[int, LabelSetEmbeddings] = field(default_factory=dict)
    missing: list[tuple[int, LabelSet, str, str | None]] = field(default_factory=list)


def plan_label_sets(config: LabelConfig, loaded: list[LabelSet] | None = None, *,
                    identity: str | None = None) -> LabelSetPlan:
    """Hash every label set, read artifacts and cache hits; encode nothing yet. ``identity`` is
    :func:`label_set_identity` when the caller computed it already (off the driver)."""
    specs = bank_specs(config)
    identity = identity or label_set_identity(config)
    if loaded is None:
        loaded = load_label_sets(config)
    plan = LabelSetPlan(hashes=[])
    for i, ls in enumerate(loaded):
        digest = content_hash(ls, identity, specs, config.text_scale)
        plan.hashes.append(digest)
        cache = _cache_path(config, digest)
        if cache and os.path.exists(cache):
            try:
                emb = load_artifact(cache)
                emb.name = ls.name
                plan.ready[i] = emb
                logger.info("label set '%s': %d classes from cache %s (no text encoded)", ls.name, ls.num_classes, cache)
                continue
            except LabelSetError as exc:
                logger.warning("ignoring unreadable label-set cache %s: %s", cache, exc)
        plan.missing.append((i, ls, digest, cache))
    for j, path in enumerate(config.labelset_artifacts):
        emb = _artifact(path, config, identity, specs)
        plan.ready[len(loaded) + j] = emb
        plan.hashes.append(emb.content_hash)
    return plan


def prepare_label_sets(config: LabelConfig, model_cfg: dict, *, num_gpus: float = 0,
                       plan: LabelSetPlan | None = None, remote: dict | None = None,
                       show_progress: bool = True) -> list[LabelSetEmbeddings]:
    """Every ``--labels`` and ``--labelset-artifact`` as embeddings; encodes only what the cache lacks
    (with a progress line unless ``show_progress`` is False)."""
    plan = plan or plan_label_sets(config)
    ready = dict(plan.ready)
    if plan.missing:
        for _, ls, _, _ in plan.missing:
            logger.info("label set '%s': %d classes, refining and encoding descriptions", ls.name, ls.num_classes)
        resources = text_encode_options(num_gpus)
        threads = resources.pop("threads")
        task = _encode_label_sets.options(**resources, **(remote or {}))
        # The activation the cache key was computed with, whatever the caller's model_cfg says.
        text_cfg = {**model_cfg, "quick_gelu": config.model.quick_gelu}
        built = ray.get(task.remote([m[1] for m in plan.missing], text_cfg, bank_specs(config), config.text_scale,
                                    threads, show_progress))
        for (i, ls, digest, cache), emb in zip(plan.missing, built):
            emb.content_hash = digest  # the driver's hash names it, whatever node encoded it
            if cache:
                save_artifact(emb, cache)
            ready[i] = emb
    result = [ready[i] for i in range(len(plan.hashes))]
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
    # Artifacts record the model identity they were encoded with (activation included, see
    # ClipModel.identity); one encoded with another activation must never score this run.
    built_identity = emb.params.get("model_identity")
    wanted = identity.rsplit("|", 1)[0]  # label_set_identity minus the text precision
    if built_identity is not None and built_identity != wanted:
        raise LabelSetError(
            f"label-set artifact {path} was encoded with {built_identity}, this run uses {wanted} "
            f"(the activation differs, see --quick-gelu); rebuild it with `bifta labelset build`"
        )
    built_precision = emb.params.get("text_precision")
    if built_precision is not None and built_precision != identity.rsplit("|", 1)[1]:
        logger.warning("label-set artifact %s was encoded in %s, this run encodes text in %s",
                       path, built_precision, identity.rsplit("|", 1)[1])
    built_ids = {BankSpec(**{k: v for k, v in d.items() if k != "waffle"}).key: d for d in emb.params.get("specs", [])}
    built = {k: BankSpec(**{f: v for f, v in d.items() if f != "waffle"}) for k, d in built_ids.items()}
    for spec in specs:
        if spec.key not in emb.banks:
            raise LabelSetError(
                f"label-set artifact {path} has no '{spec.key}' descriptions (it has {sorted(emb.banks) or 'none'}); "
                f"its label set lacks the file --method {config.method} needs, or the artifact predates it: "
                "rebuild it with `bifta labelset build`"
            )
        have = built.get(spec.key)
        if spec.refine and have is not None and (have.threshold, have.top_k) != (spec.threshold, spec.top_k):
            raise LabelSetError(
                f"label-set artifact {path} refined descriptions with --desc-threshold {have.threshold} "
                f"--desc-top-k {have.top_k}, this run asks for {spec.threshold} / {spec.top_k}"
            )
        drawn = built_ids.get(spec.key, {}).get("waffle")
        if drawn is not None and drawn != spec.identity().get("waffle"):
            raise LabelSetError(f"label-set artifact {path} drew its WaffleCLIP texts with another --seed or "
                                "--waffle-words; rebuild it with this run's settings")
    if spec_scale := emb.params.get("text_scale"):
        if float(spec_scale) != float(config.text_scale):
            raise LabelSetError(
                f"label-set artifact {path} was built with --text-scale {spec_scale}, this run uses {config.text_scale}"
            )
    return emb
