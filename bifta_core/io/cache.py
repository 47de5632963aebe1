"""bifta's one cache root, and a folder per kind of cached thing.

``$BIFTA_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/bifta``, else ``~/.cache/bifta``:

=============  =========================================================================
folder         holds
=============  =========================================================================
downloads/     model checkpoints fetched from ``s3://``/``https://`` (once per node)
labelsets/     encoded label sets (content-hashed Parquet) and, in ``facts/``, model facts
llm/           LLM answers of ``bifta describe`` (a rerun makes no call)
ray-train/     Ray Train's own run folder (``bifta train`` keeps checkpoints under ``--out``)
=============  =========================================================================

Flags that name a folder (``--model-cache-dir``, ``--labelset-cache``, ``bifta describe
--cache-dir``) still override their kind.
"""

from __future__ import annotations

import os

CACHE_ENV = "BIFTA_CACHE_DIR"
KINDS = ("downloads", "labelsets", "llm", "ray-train")


def cache_root() -> str:
    """The cache root (see the module docstring), ``~`` expanded."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "bifta")
    return os.path.abspath(os.path.expanduser(root))


def cache_dir(kind: str) -> str:
    """The folder of one kind of cached thing under :func:`cache_root`."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return os.path.join(cache_root(), kind)
