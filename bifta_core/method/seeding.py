"""Deterministic per-image random streams.

Random view sampling (WCA Sec. 3 "localized visual prompting"; BiFTA view refinement) must give
the same crops for an image no matter which worker, process or machine handles it, and no matter
in what order images arrive. Each image therefore gets its own generator whose seed depends only
on the run's global seed and the image's stable identifier.
"""

from __future__ import annotations

import hashlib

import torch

from bifta_core.errors import ConfigError

_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed accepts non-negative 63-bit values safely


def derive_seed(global_seed: int, image_id: str) -> int:
    """Return a 63-bit seed derived from ``global_seed`` and ``image_id``.

    Hashes the UTF-8 text ``f"{global_seed}:{image_id}"`` with BLAKE2b (default 64-byte digest),
    reads its first 8 bytes as a big-endian integer and masks it to 63 bits. Python's built-in
    ``hash`` is salted per process, so it cannot be used.
    """
    if isinstance(global_seed, bool) or not isinstance(global_seed, int):
        raise ConfigError(f"global_seed must be an int, got {type(global_seed).__name__}")
    if not isinstance(image_id, str):
        raise ConfigError(f"image_id must be a str, got {type(image_id).__name__}")
    digest = hashlib.blake2b(f"{global_seed}:{image_id}".encode("utf-8")).digest()[:8]
    return int.from_bytes(digest, "big") & _SEED_MASK


def generator_for(global_seed: int, image_id: str) -> torch.Generator:
    """Return a fresh CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(global_seed, image_id))
    return gen
