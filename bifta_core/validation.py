"""Checks of user-given values, one rule each, every failure one :class:`ConfigError` line naming
the flag. Config files can carry strings, booleans (``True`` is an ``int`` to Python) or NaN, so
each check states exactly what passes."""

from __future__ import annotations

import math
from typing import Any

from bifta_core.errors import ConfigError


def integer(flag: str, value: Any, *, minimum: int = 1, maximum: int | None = None, optional: bool = False) -> None:
    """An ``int`` (not a ``bool``) within ``[minimum, maximum]``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        if maximum is not None:
            wanted = f"an integer from {minimum} to {maximum}"
        else:
            wanted = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{flag} must be {wanted}, got {value!r}")


def number(flag: str, value: Any, *, positive: bool = False, optional: bool = False) -> None:
    """A finite ``int``/``float`` (not a ``bool``, not NaN or ±inf), ``> 0`` when ``positive``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ConfigError(f"{flag} must be a {'positive ' if positive else ''}finite number, got {value!r}")


def switch(flag: str, value: Any) -> None:
    """``True`` or ``False`` (a config file's ``"yes"`` is neither)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{flag} is a switch (true or false), got {value!r}")
