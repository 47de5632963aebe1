"""Generate a label set's class descriptions with an LLM (CuPL sentences, CLIP-D descriptors).

CuPL (Pratt et al., ICCV 2023) asks a language model several open questions per class ("What
does a {} look like?") and samples several answers to each; the answers become the class's
description sentences (``cupl.json``). "Classify by description" (Menon & Vondrick, ICLR 2023)
asks for a list of distinguishing visual features instead (``clip-d.json``). This module builds
those prompts, cleans the answers with pure functions and writes the files in the same format as
the published label sets, so that a user's own taxonomy plugs into CuPL, WCA and BiFTA unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bifta_core.errors import ConfigError, LabelSetError
from bifta_core.io.llm import ChatClient, ChatRequest, Completion, write_json_atomic

log = logging.getLogger("bifta.describe")

# CuPL's question styles; ``{}`` is replaced by the class name.
DEFAULT_QUESTIONS: tuple[str, ...] = (
    "Describe what a {} looks like.",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}.",
    "A caption of an image of a {}:",
)
DEFAULT_DESCRIPTOR_QUESTION = "What are useful visual features for distinguishing a {} in a photo?"
# Chat models otherwise tend to answer with headings, lists and pleasantries.
DEFAULT_SENTENCE_SYSTEM_PROMPT = (
    "You write short visual descriptions for an image classifier. Answer in one or two plain "
    "sentences that mention the subject by name. No lists, no markdown, no preamble."
)
DEFAULT_DESCRIPTOR_SYSTEM_PROMPT = (
    "You list visual features for an image classifier. Answer only with a bullet list, one "
    "short feature per line, each line starting with '- '. No other text."
)
REPORT_FILE = "describe-report.json"

_STOPWORDS = frozenset(
    "a an the of and or with without in on for to by at from as is are its it this that "
    "type kind sort".split()
)
# A list marker at the start of a line: "-", "*", "•", "1.", "1)", "(1)", "a)", "#".
_MARKER = re.compile(
    r"^\s*(?:[-*•·‣◦▪–—>#]+\s*|\d{1,3}[.):](?=\s)\s*|\(\d{1,3}\)\s*|[a-zA-Z]\)\s+)"
)
# A label the model puts before its actual answer.
_LABEL = re.compile(r"^(?:answer|caption|description|a)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’«»`"
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|as an ai|i cannot|i can'?t|i'?m unable)", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"[.!?](?=[\s\"')\]]|$)")


@dataclass(frozen=True)
class DescribeConfig:
    """How descriptions are asked for and cleaned.

    Attributes:
        questions: CuPL-style questions, each with exactly one ``{}`` (the class name) and
            optionally ``{hint}`` (the category hint).
        answers_per_question: answers sampled per question and class.
        max_per_class: most generated sentences kept per class (merged ones come on top).
        max_chars: sentences longer than this are dropped.
        category_hint: e.g. ``"a type of product"``; placed at ``{hint}`` or, if a question has
            no ``{hint}``, in parentheses after the class name, to disambiguate names such as
            "mouse" or "crane".
        sentence_system_prompt / descriptor_system_prompt: system messages (``None``: none).
        temperature, max_tokens: sampling settings for sentences (CuPL used high temperature
            for diverse answers).
        descriptors: also generate ``clip-d.json``.
        descriptor_question: the descriptor question, with one ``{}``.
        descriptor_samples: answers sampled for the descriptor question per class.
        descriptor_temperature, descriptor_max_tokens: sampling settings for descriptors.
        max_descriptors_per_class, max_descriptor_chars: descriptor limits.
        merge_with: ``{class: [sentence, ...]}`` files (e.g. a published ``cupl.json``) whose
            sentences are put before the generated ones; classes are matched by name or synonym.
        progress_every: log a progress line every this many finished classes.
    """

    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    answers_per_question: int = 10
    max_per_class: int = 50
    max_chars: int = 300
    category_hint: str | None = None
    sentence_system_prompt: str | None = DEFAULT_SENTENCE_SYSTEM_PROMPT
    temperature: float = 0.99
    max_tokens: int = 80
    descriptors: bool = True
    descriptor_question: str = DEFAULT_DESCRIPTOR_QUESTION
    descriptor_system_prompt: str | None = DEFAULT_DESCRIPTOR_SYSTEM_PROMPT
    descriptor_samples: int = 1
    descriptor_temperature: float = 0.7
    descriptor_max_tokens: int = 256
    max_descriptors_per_class: int = 15
    max_descriptor_chars: int = 100
    merge_with: tuple[Path, ...] = ()
    progress_every: int = 25

    def __post_init__(self) -> None:
        if isinstance(self.questions, str) or not self.questions:
            raise ConfigError("at least one question is needed (a list of strings with '{}')")
        for q in (*self.questions, self.descriptor_question):
            if not isinstance(q, str) or q.replace("{hint}", "").count("{}") != 1:
                raise ConfigError(f"each question needs exactly one '{{}}' for the class: {q!r}")
        for name in (
            "answers_per_question",
            "max_per_class",
            "max_chars",
            "max_tokens",
            "descriptor_samples",
            "descriptor_max_tokens",
            "max_descriptors_per_class",
            "max_descriptor_chars",
            "progress_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("temperature", "descriptor_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 2:
                raise ConfigError(f"{name} must be between 0 and 2, got {value!r}")
        if self.category_hint is not None and not self.category_hint.strip():
            raise ConfigError("category hint must not be empty")


@dataclass(frozen=True)
class CleanResult:
    """Cleaned texts and how many candidates were dropped, by reason."""

    kept: list[str]
    dropped: dict[str, int]


@dataclass
class ClassReport:
    """What happened for one class."""

    name: str
    sentences: int = 0
    merged: int = 0
    answers: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    descriptors: int | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class DescribeReport:
    """Outcome of :func:`generate_label_set`; also written to ``describe-report.json``."""

    out_dir: Path
    model: str
    classes: list[ClassReport]
    empty_classes: list[str]
    empty_descriptor_classes: list[str]
    merge_unmatched: list[str]
    http_requests: int
    cache_hits: int
    failed_samples: int

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (paths as strings)."""
        return {
            "out_dir": str(self.out_dir),
            "model": self.model,
            "n_classes": len(self.classes),
            "empty_classes": list(self.empty_classes),
            "empty_descriptor_classes": list(self.empty_descriptor_classes),
            "merge_unmatched": list(self.merge_unmatched),
            "http_requests": self.http_requests,
            "cache_hits": self.cache_hits,
            "failed_samples": self.failed_samples,
            "classes": {
                c.name: {
                    "sentences": c.sentences,
                    "merged": c.merged,
                    "answers": c.answers,
                    "dropped": dict(c.dropped),
                    "descriptors": c.descriptors,
                    "errors": list(c.errors),
                }
                for c in self.classes
            },
        }


# ------------------------------------------------------------------------ class lists


def class_entries(classes: Sequence[str | Sequence[str]]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, synonyms)`` per entry of a ``classes.json`` list, in order.

    An entry is a name or a non-empty list of synonyms whose first item is the name; names and
    synonyms are stripped of surrounding whitespace.

    Raises:
        LabelSetError: the list is empty or an entry is not a non-empty string or list of them.
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise LabelSetError("classes must be a list of class names")
    if not classes:
        raise LabelSetError("the class list is empty")
    out: list[tuple[str, tuple[str, ...]]] = []
    for i, entry in enumerate(classes):
        items = [entry] if isinstance(entry, str) else entry
        if isinstance(items, (bytes, Mapping)) or not isinstance(items, Sequence) or not items:
            raise LabelSetError(f"class entry {i} must be a name or a list of synonyms: {entry!r}")
        names = []
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise LabelSetError(f"class entry {i} has an empty or non-text name: {entry!r}")
            names.append(item.strip())
        out.append((names[0], tuple(names)))
    return out


def load_classes(path: str | Path) -> list[str | list[str]]:
    """Read a class list: ``classes.json`` (as in shared/descriptions), a label-set folder
    holding one, or a text file with one class name per line (blank lines skipped).

    Raises:
        LabelSetError: the file is missing, unreadable or not a valid class list.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "classes.json"
    if not path.is_file():
        raise LabelSetError(f"classes file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelSetError(f"cannot read classes file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LabelSetError(f"classes file {path} is not valid JSON: {exc}") from None
    else:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise LabelSetError(f"classes file {path} must hold a JSON list of class names")
    try:
        class_entries(data)
    except LabelSetError as exc:
        raise LabelSetError(f"{path}: {exc}") from None
    return data


def load_questions(path: str | Path) -> tuple[str, ...]:
    """Read questions from a JSON list or a text file (one per line; blank and ``#`` lines
    skipped). Each must contain ``{}``; that is checked by :class:`DescribeConfig`.

    Raises:
        ConfigError: the file is missing, unreadable or holds no questions.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"questions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read questions file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"questions file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise ConfigError(f"questions file {path} must hold a JSON list of strings")
        questions = [q.strip() for q in data if q.strip()]
    else:
        questions = [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
    if not questions:
        raise ConfigError(f"questions file {path} holds no questions")
    return tuple(questions)


def load_description_file(path: str | Path) -> dict[str, list[str]]:
    """Read a ``{class: [sentence, ...]}`` file such as a published ``cupl.json``.

    Raises:
        LabelSetError: missing, unreadable or not of that shape.
    """
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise LabelSetError(f"description file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LabelSetError(f"cannot read description file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise LabelSetError(f"description file {path} must map class names to lists of strings")
    return data


# ------------------------------------------------------------------------ prompts


def display_name(name: str) -> str:
    """How a class name is written in prompts: underscores as spaces, single-spaced."""
    return " ".join(name.replace("_", " ").split())


def fill_question(question: str, name: str, hint: str | None = None) -> str:
    """Put a class name (and optional category hint) into a question.

    ``"a {}"`` becomes ``"an ..."`` before a vowel so that prompts read naturally.
    """
    subject = display_name(name)
    if "{hint}" in question:
        question = question.replace("{hint}", hint.strip() if hint else "")
    elif hint:
        subject = f"{subject} ({hint.strip()})"
    before, _, after = question.partition("{}")
    if subject[:1].lower() in "aeiou" and re.search(r"(?:^|\s)[aA] $", before):
        before = before[:-2] + ("an " if before[-2] == "a" else "An ")
    return " ".join(f"{before}{subject}{after}".split())


def _messages(system: str | None, user: str) -> tuple[dict[str, str], ...]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return tuple(msgs)


def sentence_requests(name: str, config: DescribeConfig) -> list[ChatRequest]:
    """The CuPL requests for one class: one per question, ``answers_per_question`` samples."""
    return [
        ChatRequest(
            messages=_messages(
                config.sentence_system_prompt, fill_question(q, name, config.category_hint)
            ),
            label=name,
            samples=config.answers_per_question,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        )
        for q in config.questions
    ]


def descriptor_request(name: str, config: DescribeConfig) -> ChatRequest:
    """The CLIP-D request for one class (answered as a bullet list)."""
    question = fill_question(config.descriptor_question, name, config.category_hint)
    return ChatRequest(
        messages=_messages(config.descriptor_system_prompt, question),
        label=name,
        samples=config.descriptor_samples,
        temperature=config.descriptor_temperature,
        max_tokens=config.descriptor_max_tokens,
    )


# ------------------------------------------------------------------------ cleaning


def normalize_key(text: str) -> str:
    """Duplicate-detection key: casefolded, single-spaced, without trailing punctuation."""
    return " ".join(text.casefold().split()).rstrip(" .!?;,")


def clean_text(text: str) -> str:
    """One candidate as a single clean line: no list marker, label, markdown emphasis or
    surrounding quotes, whitespace collapsed."""
    # Markers, emphasis and quotes can nest ('1. "**A photo** ..."'), so peel until nothing
    # changes; that also makes cleaning idempotent.
    prev = None
    while prev != text:
        prev = text
        text = " ".join(text.replace("**", "").replace("__", "").split())
        text = _MARKER.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1)
        text = text.strip().strip(_QUOTES).strip()
    return text


def trim_truncated(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence, if any."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


def split_answer(text: str) -> list[str]:
    """Candidates in one answer: each list item if the answer is a list of two or more items,
    otherwise the whole answer joined onto one line. Lines that only introduce a list
    ("Here are some captions:") are dropped."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    marked = [bool(_MARKER.match(ln)) for ln in lines]
    if sum(marked) >= 2:
        return [ln for ln in lines if not ln.rstrip().endswith(":")]
    joined = " ".join(ln.strip() for ln in lines)
    return [joined] if joined else []


def _topic_patterns(names: Sequence[str]) -> list[re.Pattern[str]]:
    def norm(s: str) -> str:
        return " ".join(re.sub(r"[_\-]", " ", s.casefold()).split())

    pats: list[re.Pattern[str]] = []
    for name in names:
        phrase = norm(name)
        if phrase:
            pats.append(re.compile(r"\b" + re.escape(phrase) + r"(?:e?s)?\b"))
        for word in re.findall(r"[^\W_]+", phrase):
            if word in _STOPWORDS:
                continue
            forms = [re.escape(word) + r"(?:e?s)?"]
            if len(word) > 2 and word.endswith("y"):
                forms.append(re.escape(word[:-1]) + "ies")
            pats.append(re.compile(r"\b(?:" + "|".join(forms) + r")\b"))
    return pats


def is_on_topic(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` mentions a class: any synonym, or any content word of one (plurals
    allowed), case-insensitive, with underscores and hyphens read as spaces."""
    norm = " ".join(re.sub(r"[_\-]", " ", text.casefold()).split())
    return any(p.search(norm) for p in _topic_patterns(names))


def clean_sentences(
    answers: Iterable[str],
    names: Sequence[str],
    *,
    max_chars: int = 300,
    max_count: int = 50,
    seen: Iterable[str] = (),
) -> CleanResult:
    """Turn raw LLM answers into a class's description sentences.

    Each answer is split into candidates (:func:`split_answer`), cleaned (:func:`clean_text`)
    and dropped if empty, a refusal, longer than ``max_chars``, a repeat of an earlier
    candidate or of ``seen`` (:func:`normalize_key`), off-topic (:func:`is_on_topic` against
    ``names``), or beyond ``max_count``.

    Returns:
        kept sentences in answer order, and counts per drop reason (``empty``, ``refusal``,
        ``overlong``, ``duplicate``, ``off_topic``, ``over_limit``).
    """
    patterns = _topic_patterns(names)
    seen_keys = {normalize_key(s) for s in seen}
    kept: list[str] = []
    dropped: Counter[str] = Counter()
    for answer in answers:
        candidates = split_answer(answer)
        if not candidates:
            dropped["empty"] += 1
        for cand in candidates:
            s = clean_text(cand)
            norm = " ".join(re.sub(r"[_\-]", " ", s.casefold()).split())
            if not s:
                reason = "empty"
            elif _REFUSAL.match(s):
                reason = "refusal"
            elif len(s) > max_chars:
                reason = "overlong"
            elif normalize_key(s) in seen_keys:
                reason = "duplicate"
            elif not any(p.search(norm) for p in patterns):
                reason = "off_topic"
            elif len(kept) >= max_count:
                reason = "over_limit"
            else:
                seen_keys.add(normalize_key(s))
                kept.append(s)
                continue
            dropped[reason] += 1
    return CleanResult(kept, dict(dropped))


def clean_descriptors(
    answers: Iterable[str],
    *,
    max_chars: int = 100,
    max_count: int = 15,
) -> CleanResult:
    """Turn raw bullet-list answers into short CLIP-D descriptors ("long, hooked bill").

    Bulleted lines are the descriptors when an answer has any; otherwise every line is.
    Introductory lines ending in ``:`` are skipped, trailing punctuation is removed and a
    leading capital is lowered (descriptors are used as ``"{c}, which has {d}"``). No topic
    filter applies: a good descriptor ("black feet") rarely names its class.
    """
    kept: list[str] = []
    keys: set[str] = set()
    dropped: Counter[str] = Counter()
    for answer in answers:
        lines = [ln for ln in answer.splitlines() if ln.strip()]
        bulleted = [ln for ln in lines if _MARKER.match(ln)]
        for line in bulleted or lines:
            if line.rstrip().endswith(":"):
                continue
            d = clean_text(line).rstrip(" .;,")
            if len(d) > 1 and d[0].isupper() and not d[1].isupper():
                d = d[0].lower() + d[1:]
            if not d:
                reason = "empty"
            elif _REFUSAL.match(d):
                reason = "refusal"
            elif len(d) > max_chars:
                reason = "overlong"
            elif normalize_key(d) in keys:
                reason = "duplicate"
            elif len(kept) >= max_count:
                reason = "over_limit"
            else:
                keys.add(normalize_key(d))
                kept.append(d)
                continue
            dropped[reason] += 1
    return CleanResult(kept, dict(dropped))


def _answer_texts(completions: Sequence[Completion], *, list_answer: bool = False) -> list[str]:
    """Raw texts, with answers that hit the token limit cut back to complete content."""
    out = []
    for c in completions:
        text = c.text
        if c.finish_reason == "length":
            if list_answer:
                # The last line of a cut-off list is a half-written item.
                lines = text.rstrip().splitlines()
                text = "\n".join(lines[:-1]) if len(lines) > 1 else text
            else:
                text = trim_truncated(text)
        out.append(text)
    return out


# ------------------------------------------------------------------------ the run


def _merge_sources(
    paths: Sequence[Path], entries: Sequence[tuple[str, tuple[str, ...]]]
) -> tuple[dict[str, list[str]], list[str]]:
    """Sentences from ``paths`` per class name (matched by name or synonym), and the keys of
    those files that match no class."""
    lookup: dict[str, str] = {}
    for name, synonyms in entries:
        for s in synonyms:
            lookup.setdefault(normalize_key(display_name(s)), name)
    merged: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for path in paths:
        for key, sentences in load_description_file(path).items():
            name = lookup.get(normalize_key(display_name(key)))
            if name is None:
                unmatched.append(key)
                continue
            bucket = merged.setdefault(name, [])
            have = {normalize_key(s) for s in bucket}
            for s in sentences:
                s = s.strip()
                if s and normalize_key(s) not in have:
                    have.add(normalize_key(s))
                    bucket.append(s)
    return merged, unmatched


def generate_label_set(
    classes: Sequence[str | Sequence[str]],
    client: ChatClient,
    out_dir: str | Path,
    config: DescribeConfig | None = None,
) -> DescribeReport:
    """Ask ``client`` for descriptions of every class and write a label-set folder.

    Writes ``classes.json`` (``classes`` as given), ``cupl.json`` (merged sentences first, then
    up to ``max_per_class`` cleaned generated ones), ``clip-d.json`` (unless
    ``config.descriptors`` is false) and ``describe-report.json`` to ``out_dir``, all UTF-8 JSON
    in the layout of ``shared/descriptions/<dataset>/``. Repeated class names are described once.
    A class that ends up without sentences keeps an empty list and is listed in
    ``empty_classes``; failures of single requests are recorded per class, never raised.

    Raises:
        LabelSetError: invalid ``classes`` or merge file.
        ConfigError: ``out_dir`` is not a usable folder.
        LLMError: the endpoint refuses the key/model/URL, or keeps failing (see
            :class:`~bifta_core.io.llm.ChatClient`); answers obtained so far stay in its cache.
    """
    config = config or DescribeConfig()
    entries = class_entries(classes)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path exists and is not a folder: {out}")
    merged, unmatched = _merge_sources(config.merge_with, entries)
    if unmatched:
        log.warning(
            "%d classes in merge files match no class in the label set (e.g. %r)",
            len(unmatched),
            unmatched[0],
        )

    # One description job per distinct name; synonyms of repeated names are pooled.
    synonyms: dict[str, list[str]] = {}
    for name, syns in entries:
        pool = synonyms.setdefault(name, [])
        pool.extend(s for s in syns if s not in pool)
    names = list(synonyms)

    requests: list[ChatRequest] = []
    owner: list[tuple[str, str]] = []  # (class name, "sentences" | "descriptors") per request
    for name in names:
        for req in sentence_requests(name, config):
            requests.append(req)
            owner.append((name, "sentences"))
        if config.descriptors:
            requests.append(descriptor_request(name, config))
            owner.append((name, "descriptors"))

    log.info(
        "describing %d classes with %s: %d prompts, %d answers wanted",
        len(names),
        client.model,
        len(requests),
        sum(r.samples for r in requests),
    )
    remaining = Counter(n for n, _ in owner)
    results: dict[int, list[Completion]] = {}
    reports = {n: ClassReport(n) for n in names}
    done = 0
    for idx, res in client.complete_all(requests):
        name = owner[idx][0]
        results[idx] = res.completions
        reports[name].errors.extend(f"{owner[idx][1]}: {e}" for e in res.errors)
        remaining[name] -= 1
        if remaining[name] == 0:
            done += 1
            if done % config.progress_every == 0 or done == len(names):
                log.info(
                    "described %d/%d classes (%d HTTP requests, %d cached answers)",
                    done,
                    len(names),
                    client.stats.http_requests,
                    client.stats.cache_hits,
                )

    # Assemble in request order so that the output does not depend on completion order.
    raw_sentences: dict[str, list[str]] = {n: [] for n in names}
    raw_descriptors: dict[str, list[str]] = {n: [] for n in names}
    for idx, (name, kind) in enumerate(owner):
        if kind == "sentences":
            raw_sentences[name].extend(_answer_texts(results.get(idx, [])))
        else:
            raw_descriptors[name].extend(_answer_texts(results.get(idx, []), list_answer=True))

    cupl: dict[str, list[str]] = {}
    clip_d: dict[str, list[str]] = {}
    for name in names:
        rep = reports[name]
        base = merged.get(name, [])
        cleaned = clean_sentences(
            raw_sentences[name],
            synonyms[name],
            max_chars=config.max_chars,
            max_count=config.max_per_class,
            seen=base,
        )
        cupl[name] = [*base, *cleaned.kept]
        rep.merged = len(base)
        rep.answers = len(raw_sentences[name])
        rep.dropped = cleaned.dropped
        rep.sentences = len(cupl[name])
        if config.descriptors:
            desc = clean_descriptors(
                raw_descriptors[name],
                max_chars=config.max_descriptor_chars,
                max_count=config.max_descriptors_per_class,
            )
            clip_d[name] = desc.kept
            rep.descriptors = len(desc.kept)

    empty = [n for n in names if not cupl[n]]
    empty_d = [n for n in names if config.descriptors and not clip_d[n]]
    for n in empty:
        log.warning("class %r got no usable sentences (%s)", n, _why(reports[n]))
    report = DescribeReport(
        out_dir=out,
        model=client.model,
        classes=[reports[n] for n in names],
        empty_classes=empty,
        empty_descriptor_classes=empty_d,
        merge_unmatched=unmatched,
        http_requests=client.stats.http_requests,
        cache_hits=client.stats.cache_hits,
        failed_samples=client.stats.failed_samples,
    )

    try:
        out.mkdir(parents=True, exist_ok=True)
        # Written as given (synonym lists kept), only stripped of stray whitespace.
        labels = [n if isinstance(c, str) else list(s) for c, (n, s) in zip(classes, entries)]
        write_json_atomic(out / "classes.json", labels, indent=2)
        write_json_atomic(out / "cupl.json", cupl, indent=2)
        if config.descriptors:
            write_json_atomic(out / "clip-d.json", clip_d, indent=2)
        write_json_atomic(out / REPORT_FILE, report.to_dict(), indent=2)
    except OSError as exc:
        raise ConfigError(f"cannot write label set to {out}: {exc}") from None
    return report


def _why(rep: ClassReport) -> str:
    if rep.errors:
        return f"{len(rep.errors)} request errors, first: {rep.errors[0]}"
    if rep.dropped:
        return "dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(rep.dropped.items()))
    return "no answers"
