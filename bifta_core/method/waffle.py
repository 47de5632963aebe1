"""WaffleCLIP's random descriptors (Roth et al., ICCV 2023), built as the WCA and BiFTA releases build them.

Each class gets ``pairs`` (15 in both releases) pairs of prompts ``"A photo of a {c}, which … {r}."``:
one whose ``r`` is a few random words, one whose ``r`` is groups of random characters. The sizes
follow the class names (mean number of words, mean word length, mean longest-word length and
mean number of spaces); the characters are those of the label set's CLIP-D descriptors. One class's
random set is drawn for every class and then shared by all of them, its class name swapped for
each class's own — WaffleCLIP's point: the class name and the prompt structure, not the content of
the descriptors, carry the gain. The scorer is the mean scorer (cosine to the re-normalised mean of
the unit text embeddings), as in the releases.

Random numbers come from NumPy's legacy ``RandomState(seed)`` in the releases' order (every class's
draws, then the shared class), so with their word list (``--waffle-words word_list.pkl``) the texts
are theirs for the same seed. A draw "without replacement" of one item is a full permutation in that
generator, which is what the releases consume, so it is kept. The bundled word list is the
lower-case words of SCOWL's American English list (``bifta_core/method/data/words.txt.gz``): WaffleCLIP's
own list is not part of either release.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
from functools import lru_cache
from typing import Sequence

import numpy as np

from bifta_core.errors import LabelSetError
from bifta_core.io.label_sets import descriptor_clause

#: Random (words, characters) prompt pairs per class in the WCA and BiFTA releases.
WAFFLE_PAIRS = 15
BUNDLED_WORDS = os.path.join(os.path.dirname(__file__), "data", "words.txt.gz")


def wordify(name: str) -> str:
    """The releases' class-name spelling in a prompt: ``_`` → space."""
    return name.replace("_", " ")


def waffle_prompt(random_text: str, class_name: str) -> str:
    return f"A photo of a {wordify(class_name)}, {descriptor_clause(random_text)}."


class _RestrictedUnpickler(pickle.Unpickler):
    """A word-list pickle is a list of strings: refuse anything that would run code."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(f"a word list may hold only strings, not {module}.{name}")


def words_location(path: str) -> str:
    """Where the label-set stage finds ``path``: a URI as it is, a local path made absolute (that
    stage may run in another working directory)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def load_words(path: str | None = None) -> list[str]:
    """Words from ``path`` (``.pkl`` list of strings as in WaffleCLIP, ``.json`` list, ``.txt``/``.txt.gz``
    one per line), or the bundled list. :class:`LabelSetError` for an unreadable or empty list."""
    return list(_load_words(path or BUNDLED_WORDS))


@lru_cache(maxsize=4)
def _load_words(path: str) -> tuple[str, ...]:
    try:
        if "://" in path and not path.startswith("file://"):  # workers read the list where the driver did
            from bifta_core.io import storage

            data = storage.read_bytes(path)
        else:
            with open(path.removeprefix("file://"), "rb") as fh:
                data = fh.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        if path.endswith(".pkl"):
            words = _RestrictedUnpickler(io.BytesIO(data)).load()
        elif path.endswith(".json"):
            words = json.loads(data.decode("utf-8"))
        else:
            words = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise LabelSetError(f"cannot read the WaffleCLIP word list {path}: {exc}") from None
    if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) for w in words):
        raise LabelSetError(f"the WaffleCLIP word list {path} must be a non-empty list of strings")
    return tuple(words)


def words_digest(path: str | None = None) -> str:
    """sha256 of the word list (part of the label-set cache key: other words, other texts)."""
    return hashlib.sha256("\n".join(_load_words(path or BUNDLED_WORDS)).encode("utf-8")).hexdigest()


def waffle_texts(classes: Sequence[str], descriptors: Sequence[Sequence[str]], words: Sequence[str], *,
                 seed: int, pairs: int = WAFFLE_PAIRS) -> list[list[str]]:
    """Per class (in ``classes`` order), the ``2 · pairs`` WaffleCLIP prompts of the releases.

    ``descriptors[i]`` are class ``i``'s CLIP-D descriptors: only their characters are used.
    """
    if not classes:
        return []
    rng = np.random.RandomState(seed)
    keys = list(classes)
    names = [wordify(k).split(" ") for k in keys]
    num_words = int(np.max([np.round(np.mean([len(n) for n in names])), 1]))
    word_length = int(np.round(np.mean([np.mean([len(w) for w in n]) for n in names])))
    pool = [w[:word_length] for w in words]
    # Characters of the descriptors' distinct space-separated tokens, without "," and "." (sorted).
    tokens = np.unique([t for group in descriptors for d in group for t in d.split(" ")])
    chars = np.unique(list("".join(t.replace(",", "").replace(".", "") for t in tokens)))
    if chars.size == 0:
        raise LabelSetError("WaffleCLIP needs CLIP-D descriptors with some characters to draw from")
    num_spaces = int(np.round(np.mean([np.sum(np.array(list(k)) == " ") for k in keys]))) + 1
    num_chars = int(np.ceil(np.mean([np.max([len(p) for p in k.split(" ")]) for k in keys])))
    num_chars += num_spaces - num_chars % num_spaces
    group = num_chars // num_spaces

    def one_of(n: int) -> int:
        return int(rng.permutation(n)[0])  # = RandomState.choice(a, 1, replace=False)[0]

    drawn: dict[str, list[str]] = {}
    for key in keys:
        texts = []
        for _ in range(pairs):
            texts.append(waffle_prompt(" ".join(pool[one_of(len(pool))] for _ in range(num_words)), key))
            noise = ", ".join("".join(str(chars[one_of(chars.size)]) for _ in range(group)) for _ in range(num_spaces))
            texts.append(waffle_prompt(noise, key))
        drawn[key] = texts
    shared = str(rng.choice(keys))  # the class whose random set every class shares
    return [[t.replace(wordify(shared), wordify(key)) for t in drawn[shared]] for key in keys]
