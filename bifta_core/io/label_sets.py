"""Label sets: classes, descriptions, descriptors and prompt templates, loaded and validated.

A label-set folder holds files by role (the layout of the published WCA/BiFTA/CuPL data):

============== ===================================================== ===========================
file           content                                               used by
============== ===================================================== ===========================
classes.json   class names in label order (an entry may be a list    every method
               of synonyms; the first is the name)
cupl.json      ``{class: [sentence, ...]}``                          CuPL, WCA, BiFTA pool
llm-pool.json  ``{class: [sentence, ...]}`` (optional)                BiFTA refinement pool
clip-d.json    ``{class: [descriptor, ...]}``                        CLIP-D
clip-e.json    ``["a photo of a {}.", ...]`` (optional)               CLIP-E (default: open_clip's
                                                                     80 ImageNet templates)
============== ===================================================== ===========================

A label set may also be a plain list of class names (a ``.json`` list, a ``.txt`` file with one
name per line, or ``"cat,dog,bird"``); then the CLIP-E templates stand in for descriptions.
Description keys match class names after case folding, ``_`` → space and whitespace collapsing
(the published Food-101 files key ``apple_pie`` as ``apple pie``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from bifta_core.errors import LabelSetError

logger = logging.getLogger("bifta.label_set")

CLASSES_FILE = "classes.json"
SENTENCES_FILE = "cupl.json"
POOL_FILE = "llm-pool.json"
DESCRIPTORS_FILE = "clip-d.json"
TEMPLATES_FILE = "clip-e.json"
CLASS_PROMPT = "a photo of a {}."

def key_of(name: str) -> str:
    """Normalised lookup key of a class name: casefold, ``_`` → space, collapsed whitespace."""
    return " ".join(name.replace("_", " ").casefold().split())


def prompt_name(name: str) -> str:
    """The class name as it reads in a sentence (``apple_pie`` → ``apple pie``)."""
    return " ".join(name.replace("_", " ").split())


def default_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompt templates as ``{}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def descriptor_sentence(class_name: str, descriptor: str) -> str:
    """Menon & Vondrick's descriptor → sentence rule (classify-by-description reference code).

    ``"{c}, which is {d}"`` when d starts with ``a``/``an``/``used``; ``"{c}, which {d}"`` when it
    starts with ``has``/``often``/``typically``/``may``/``can``; else ``"{c}, which has {d}"``.
    Like the reference, the test is a plain string prefix, so ``"angular shape"`` also reads
    ``"which is …"``.
    """
    return f"{prompt_name(class_name)}, {descriptor_clause(descriptor.strip())}"


def descriptor_clause(descriptor: str) -> str:
    """The ``which …`` clause of :func:`descriptor_sentence` (WaffleCLIP's prompts use it too)."""
    if descriptor.startswith(("a", "an", "used")):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    return f"which has {descriptor}"


@dataclass(frozen=True)
class LabelSet:
    """A validated label set. ``sentences``/``pool``/``descriptors`` are keyed by class *name*."""

    name: str
    source: str
    classes: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    sentences: Mapping[str, tuple[str, ...]] | None = None
    pool: Mapping[str, tuple[str, ...]] | None = None
    descriptors: Mapping[str, tuple[str, ...]] | None = None
    templates: tuple[str, ...] = field(default_factory=lambda: tuple(default_templates()))
    templates_are_default: bool = True
    is_plain_list: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_prompts(self) -> list[str]:
        """``"a photo of a {c}."`` per class — CLIP's prompt and WCA's description-weight anchor."""
        return [CLASS_PROMPT.format(prompt_name(c)) for c in self.classes]

    def texts_for(self, method: str, *, seed: int = 0, words: Sequence[str] | None = None) -> list[list[str]]:
        """Per class, the texts ``method`` encodes (before any refinement), by its entry in
        :data:`bifta_core.method.registry.METHODS`. WaffleCLIP's texts are drawn from ``seed`` and ``words``
        (default: the bundled list) by :func:`bifta_core.method.waffle.waffle_texts`.

        Raises :class:`LabelSetError` naming the missing file when the method's role is absent.
        """
        source = self.require(method)
        if source == "class prompt":
            return [[p] for p in self.class_prompts()]
        if source == "templates" or (source == "sentences" and self.sentences is None):  # a plain class list
            return [[t.format(prompt_name(c)) for t in self.templates] for c in self.classes]
        if source == "descriptors":
            return [[descriptor_sentence(c, d) for d in self.descriptors[c]] for c in self.classes]
        if source == "waffle":
            from bifta_core.method.waffle import load_words, waffle_texts

            return waffle_texts(self.classes, [self.descriptors[c] for c in self.classes],
                                load_words() if words is None else words, seed=seed)
        return [list(self.sentences[c]) for c in self.classes]

    def require(self, method: str) -> str:
        """The text source of ``method``; :class:`LabelSetError` for an unknown method or a missing
        label-set file it needs (checked before any text is built or encoded)."""
        from bifta_core.method.registry import METHOD_NAMES, METHODS  # the table imports this module's file names

        if method not in METHODS:
            raise LabelSetError(f"unknown method '{method}'; choose from {', '.join(METHOD_NAMES)}")
        source = METHODS[method].texts
        if source in ("descriptors", "waffle") and self.descriptors is None:  # WaffleCLIP draws its characters there
            raise self._missing(DESCRIPTORS_FILE, method)
        if source == "sentences" and self.sentences is None and not self.is_plain_list:
            raise self._missing(SENTENCES_FILE, method)
        return source

    def refinement_pool(self) -> list[list[str]]:
        """BiFTA's description pool per class: ``cupl.json`` ∪ ``llm-pool.json`` (in that order)."""
        base = self.texts_for("bifta")
        if self.pool is None:
            return base
        return [b + list(self.pool[c]) for b, c in zip(base, self.classes)]

    def _missing(self, filename: str, method: str) -> LabelSetError:
        return LabelSetError(f"label set '{self.name}' has no {filename} in {self.source}, needed by --method {method}")

    def content(self) -> dict[str, Any]:
        """Everything that determines the label set's embeddings (for content hashes)."""
        return {
            "classes": list(self.classes),
            "sentences": _plain(self.sentences),
            "pool": _plain(self.pool),
            "descriptors": _plain(self.descriptors),
            "templates": list(self.templates),
        }


def _plain(mapping: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]] | None:
    return None if mapping is None else {k: list(v) for k, v in mapping.items()}


# --------------------------------------------------------------------------------------------
# Reading files (local or any storage URI)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if _is_remote(base) else os.path.join(base, name)


def _exists(path: str) -> bool:
    if _is_remote(path):
        from bifta_core.io import storage

        return storage.exists(path)
    return os.path.exists(path)


def _isdir(path: str) -> bool:
    if _is_remote(path):
        from bifta_core.io import storage

        return storage.isdir(path)
    return os.path.isdir(path)


def _read_text(path: str) -> str:
    try:
        if _is_remote(path):
            from bifta_core.io import storage

            data = storage.read_bytes(path)
        else:
            with open(path, "rb") as fh:
                data = fh.read()
    except FileNotFoundError:
        raise LabelSetError(f"label file not found: {path}") from None
    except OSError as exc:
        raise LabelSetError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelSetError(f"{path} is not UTF-8 text") from None


def _read_json(path: str) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelSetError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


# --------------------------------------------------------------------------------------------
# Validation


def parse_classes(raw: Any, where: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Validate a class list (names or synonym lists) → (names, synonyms)."""
    if not isinstance(raw, list):
        raise LabelSetError(f"{where} must be a JSON list of class names, got {type(raw).__name__}")
    if not raw:
        raise LabelSetError(f"{where} lists no classes")
    names: list[str] = []
    synonyms: list[tuple[str, ...]] = []
    for i, entry in enumerate(raw):
        group = entry if isinstance(entry, list) else [entry]
        if not group or not all(isinstance(s, str) for s in group):
            raise LabelSetError(f"{where}: entry {i} must be a class name or a non-empty list of names, got {entry!r}")
        cleaned = tuple(" ".join(s.split()) for s in group)
        if not all(cleaned):
            raise LabelSetError(f"{where}: entry {i} has an empty class name")
        names.append(cleaned[0])
        synonyms.append(cleaned)
    return tuple(names), tuple(synonyms)


def _duplicates(names: Iterable[str]) -> list[str]:
    seen: dict[str, str] = {}
    dups: list[str] = []
    for n in names:
        k = key_of(n)
        if k in seen and seen[k] not in dups:
            dups.append(seen[k])
        seen.setdefault(k, n)
    return dups


def merge_duplicate_classes(
    names: Sequence[str], synonyms: Sequence[Sequence[str]]
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Keep the first of each group of equal names (after :func:`key_of`), joining their synonyms."""
    order: dict[str, int] = {}
    out_names: list[str] = []
    out_syn: list[list[str]] = []
    for n, syn in zip(names, synonyms):
        k = key_of(n)
        if k in order:
            group = out_syn[order[k]]
            group.extend(s for s in syn if s not in group)
            continue
        order[k] = len(out_names)
        out_names.append(n)
        out_syn.append(list(syn))
    return tuple(out_names), tuple(tuple(s) for s in out_syn)


def parse_texts_per_class(
    raw: Any, classes: Sequence[str], synonyms: Sequence[Sequence[str]], where: str, *, required: bool = True
) -> dict[str, tuple[str, ...]]:
    """Validate ``{class: [text, ...]}`` and re-key it by the class names of ``classes``.

    Keys match a class name or any of its synonyms after :func:`key_of`. Classes without an entry
    are an error naming them (when ``required``); keys naming no class are ignored with a warning.
    """
    if not isinstance(raw, dict):
        raise LabelSetError(f"{where} must be a JSON object {{class: [text, ...]}}, got {type(raw).__name__}")
    lookup: dict[str, str] = {}
    for name, syn in zip(classes, synonyms):
        for s in syn:
            lookup.setdefault(key_of(s), name)
    out: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, texts in raw.items():
        if not isinstance(texts, list):
            raise LabelSetError(f"{where}: entry '{key}' must be a list of strings, got {type(texts).__name__}")
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise LabelSetError(f"{where}: entry '{key}' has non-string items, e.g. {bad[0]!r}")
        cleaned = [" ".join(t.split()) for t in texts]
        cleaned = [t for t in cleaned if t]
        target = lookup.get(key_of(str(key)))
        if target is None:
            unknown.append(str(key))
            continue
        out.setdefault(target, []).extend(cleaned)
    if unknown:
        logger.warning("%s: %d entries name no class and are ignored (e.g. %s)", where, len(unknown), ", ".join(unknown[:3]))
    missing = [c for c in classes if c not in out]
    empty = [c for c in classes if c in out and not out[c]]
    if required and missing:
        raise LabelSetError(f"{where} has no entry for {len(missing)} classes: {_names(missing)}")
    if required and empty:
        raise LabelSetError(f"{where} has an empty list for {len(empty)} classes: {_names(empty)}")
    return {c: tuple(out.get(c, ())) for c in classes}


def parse_templates(raw: Any, where: str) -> tuple[str, ...]:
    """Validate prompt templates: a non-empty list of strings with exactly one ``{}`` each."""
    if not isinstance(raw, list) or not raw:
        raise LabelSetError(f"{where} must be a non-empty JSON list of templates like \"a photo of a {{}}.\"")
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise LabelSetError(f"{where}: template {i} is not a string: {t!r}")
        if t.count("{}") != 1:
            raise LabelSetError(f"{where}: template {i} must contain exactly one '{{}}': {t!r}")
    return tuple(raw)


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Loading


def load_label_set(
    spec: str, name: str | None = None, *, merge_duplicates: bool = False, needed: Iterable[str] | None = None
) -> LabelSet:
    """Load and validate a label set from a folder, a class-list file, or ``"a,b,c"``.

    Every file present is validated strictly unless ``needed`` names the files the caller will use
    (see ``files`` in :data:`bifta_core.method.registry.METHODS`): then a broken file outside that set is dropped with a warning, so
    e.g. an incomplete ``clip-d.json`` never blocks ``--method bifta``.

    Duplicate class names (after :func:`key_of`) are an error naming them unless
    ``merge_duplicates`` keeps the first of each (the published Places365 list has 365 entries but 344 distinct names).
    """
    if not spec or not spec.strip():
        raise LabelSetError("empty --labels value")
    spec = spec.strip()
    if _isdir(spec):
        return _load_folder(spec, name, merge_duplicates, None if needed is None else frozenset(needed))
    if _exists(spec):
        if spec.lower().endswith(".json"):
            raw = _read_json(spec)
            names, syn = parse_classes(raw, spec)
        else:
            lines = [ln.strip() for ln in _read_text(spec).splitlines()]
            names, syn = parse_classes([ln for ln in lines if ln and not ln.startswith("#")], spec)
        return _finish(names, syn, name or _stem(spec), spec, merge_duplicates, plain=True)
    looks_like_path = spec.endswith((".json", ".txt")) or "/" in spec or _is_remote(spec)
    if looks_like_path or "," not in spec:
        raise LabelSetError(f"label set not found: {spec} (give a folder, a classes file, or comma-separated names)")
    parts = [p.strip() for p in spec.split(",")]
    if any(not p for p in parts):
        raise LabelSetError(f"--labels '{spec}' has an empty class name")
    names, syn = parse_classes(parts, "--labels")
    return _finish(names, syn, name or "labels", "--labels", merge_duplicates, plain=True)


def _stem(path: str) -> str:
    base = os.path.basename(path.rstrip("/"))
    return os.path.splitext(base)[0] or "labels"


def _finish(names, syn, name, source, merge_duplicates, plain, **files) -> LabelSet:
    dups = _duplicates(names)
    if dups and not merge_duplicates:
        raise LabelSetError(
            f"{source} repeats {len(dups)} class names: {_names(dups)}; class names must be unique "
            f"(use --merge-duplicate-classes to keep the first of each)"
        )
    if dups:
        logger.warning("label set '%s': merged %d repeated class names (%s)", name, len(dups), _names(dups, 5))
        names, syn = merge_duplicate_classes(names, syn)
    if plain:
        logger.warning(
            "label set '%s' is a plain class list with no descriptions: the CLIP-E templates stand in for them", name
        )
    return LabelSet(name=name, source=source, classes=names, synonyms=syn, is_plain_list=plain, **files)


def _load_folder(folder: str, name: str | None, merge_duplicates: bool, needed: frozenset[str] | None) -> LabelSet:
    label_name = name or _stem(folder)
    classes_path = _join(folder, CLASSES_FILE)
    if not _exists(classes_path):
        raise LabelSetError(f"label set folder {folder} has no {CLASSES_FILE}")
    names, syn = parse_classes(_read_json(classes_path), classes_path)
    dups = _duplicates(names)
    if dups and not merge_duplicates:
        return _finish(names, syn, label_name, classes_path, False, plain=False)
    if dups:
        names, syn = merge_duplicate_classes(names, syn)
        logger.warning("label set '%s': merged %d repeated class names (%s)", label_name, len(dups), _names(dups, 5))

    def lenient(filename: str, parse):
        """Parse a file; a broken one that this run does not need is dropped with a warning."""
        try:
            return parse()
        except LabelSetError as exc:
            if needed is None or filename in needed:
                raise
            logger.warning("label set '%s': ignoring %s, which this method does not use: %s", label_name, filename, exc)
            return None

    def optional(filename: str) -> dict[str, tuple[str, ...]] | None:
        path = _join(folder, filename)
        if not _exists(path):
            return None
        return lenient(filename, lambda: parse_texts_per_class(_read_json(path), names, syn, path))

    templates_path = _join(folder, TEMPLATES_FILE)
    templates = None
    if _exists(templates_path):
        templates = lenient(TEMPLATES_FILE, lambda: parse_templates(_read_json(templates_path), templates_path))
    has_templates = templates is not None
    templates = templates if has_templates else tuple(default_templates())
    return LabelSet(
        name=label_name,
        source=folder,
        classes=names,
        synonyms=syn,
        sentences=optional(SENTENCES_FILE),
        pool=optional(POOL_FILE),
        descriptors=optional(DESCRIPTORS_FILE),
        templates=templates,
        templates_are_default=not has_templates,
        is_plain_list=False,
    )
