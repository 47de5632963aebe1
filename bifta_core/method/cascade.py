"""The cascade: views only where the whole image is unsure.

WCA and BiFTA encode 60–100 views per image, CLIP one whole image — and the whole image is encoded
anyway (it sets WCA's view weights), so a whole-image method's answer is free. The cascade keeps
that *first stage*'s answer when its top-1 margin (``top1 − top2`` score, the ``margin`` column)
is at least ``T``, and sends only the other images through views and the full method:

* ``T = 0``: every image keeps the first stage's answer (margins are never negative), no view;
* ``T = ∞``: every image goes through views, as the full method alone;
* in between: exactly the images with ``margin < T`` are encoded view by view.

With several label sets in one pass each label set decides its own rows (its own margin), so a
label set's labels never depend on which others share the pass; an image's views are encoded
once, when at least one label set needs them.

:func:`cascade_curve` replays the rule over an evaluation's per-image predictions for a grid of
``T`` (accuracy against views encoded per image); :func:`recommended_thresholds` names the
cheapest ``T`` whose top-1 stays within a tolerance of the full method's. Pure numpy/polars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from bifta_core.errors import ConfigError
from bifta_core.method.registry import METHODS

if TYPE_CHECKING:  # polars is imported where a curve is computed: the config (driver) needs only the rule
    import polars as pl

#: The default first stage: CuPL scores the same sentences the WCA/BiFTA text side is built from.
DEFAULT_FIRST_STAGE = "cupl"
#: Tolerances (absolute top-1 points, as fractions) for which evaluate names the cheapest ``T``.
TOLERANCES = (0.01, 0.005)
#: Shares of images sent through views that the default ``T`` grid aims at (plus 0 and ∞).
GRID_SHARES = tuple(i / 20 for i in range(1, 20))


def first_stage_methods() -> tuple[str, ...]:
    """Methods that can be a first stage: those scored on the whole image alone."""
    return tuple(m.name for m in METHODS.values() if not m.uses_views)


def check_cascade(method: str, first: str, threshold: float | None) -> None:
    """:class:`ConfigError` for a cascade that cannot run (``threshold`` None: no cascade)."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ConfigError(f"--cascade-margin must be a number >= 0 (or inf), got {threshold!r}")
    if method not in METHODS or not METHODS[method].uses_views:
        view_methods = ", ".join(m.name for m in METHODS.values() if m.uses_views)
        raise ConfigError(f"--cascade-margin needs a method that encodes views ({view_methods}), not {method}")
    if first not in first_stage_methods():
        raise ConfigError(f"--cascade-first must be a whole-image method ({', '.join(first_stage_methods())}), "
                          f"got '{first}'")


def needs_views(margin: np.ndarray | Sequence[float], threshold: float) -> np.ndarray:
    """The cascade rule: bool per image, True where the first stage's margin is below ``threshold``."""
    return np.asarray(margin, dtype=np.float64) < float(threshold)


@dataclass(frozen=True)
class CascadeSpec:
    """A cascade as evaluated: first-stage and final evaluation rows (``method`` names)."""

    first: str = DEFAULT_FIRST_STAGE
    final: str = "bifta"


def default_thresholds(margins: np.ndarray, shares: Sequence[float] = GRID_SHARES) -> list[float]:
    """``T`` values sending about each of ``shares`` of the images through views, plus 0 and ∞.

    Each ``T`` lies halfway between two consecutive sorted margins, so a margin recomputed in
    another run (the last bit of a float may differ) falls on the same side of it.
    """
    m = np.sort(np.asarray(margins, dtype=np.float64))
    out = {0.0, math.inf}
    n = m.size
    for share in shares:
        k = int(round(share * n))  # images below T
        if 0 < k < n and m[k] > m[k - 1]:
            out.add(float((m[k - 1] + m[k]) / 2))
    return sorted(out)


def cascade_curve(predictions: pl.DataFrame, spec: CascadeSpec, thresholds: Sequence[float] | None = None
                  ) -> pl.DataFrame:
    """Replay the cascade over an evaluation's ``predictions`` (one row per method and image, with
    ``margin``, ``true_rank`` and ``views_encoded``) → one row per ``T``:

    ``threshold, share_with_views, views_per_image, top1, top5, n, first, final``.

    An image whose ``spec.first`` margin is ≥ ``T`` takes that row's rank and costs no view; the
    others take ``spec.final``'s rank and its views. ``T = 0`` reproduces the first row's accuracy
    and ``T = ∞`` the final row's (both are always in the grid).
    """
    import polars as pl

    cols = ["image_id", "margin", "true_rank", "views_encoded"]
    for name in (spec.first, spec.final):
        if predictions.filter(pl.col("method") == name).height == 0:
            raise ConfigError(f"the cascade needs the '{name}' row; score it too (--method {name})")
    first = predictions.filter(pl.col("method") == spec.first).select(cols).sort("image_id")
    final = predictions.filter(pl.col("method") == spec.final).select(cols).sort("image_id")
    if first["image_id"].to_list() != final["image_id"].to_list():
        raise ConfigError(f"rows {spec.first} and {spec.final} hold different images")
    margin = first["margin"].cast(pl.Float64).to_numpy()
    rank1, rank2 = first["true_rank"].to_numpy(), final["true_rank"].to_numpy()
    views = final["views_encoded"].cast(pl.Float64).to_numpy()
    grid = sorted(set(thresholds)) if thresholds is not None else default_thresholds(margin)
    rows = []
    for t in grid:
        unsure = needs_views(margin, t)
        rank = np.where(unsure, rank2, rank1)
        rows.append({"threshold": float(t), "share_with_views": float(unsure.mean()),
                     "views_per_image": float(np.where(unsure, views, 0.0).mean()),
                     "top1": float((rank == 1).mean()), "top5": float((rank <= 5).mean()), "n": int(rank.size)})
    return pl.DataFrame(rows, schema={"threshold": pl.Float64, "share_with_views": pl.Float64,
                                      "views_per_image": pl.Float64, "top1": pl.Float64, "top5": pl.Float64,
                                      "n": pl.Int64}).with_columns(first=pl.lit(spec.first), final=pl.lit(spec.final))


def recommended_thresholds(curve: pl.DataFrame, tolerances: Sequence[float] = TOLERANCES) -> dict[str, dict]:
    """Per tolerance, the cheapest grid row (fewest views per image, then the higher top-1) whose
    top-1 is at least the full method's (``T = ∞``) minus the tolerance → ``{"1%": row, …}``."""
    import polars as pl

    full = curve.filter(pl.col("threshold") == math.inf)
    if full.height == 0:
        raise ConfigError("the cascade curve has no T = inf row")
    best_top1 = float(full["top1"][0])
    out = {}
    for tol in tolerances:
        ok = curve.filter(pl.col("top1") >= best_top1 - tol - 1e-12)
        row = ok.sort(["views_per_image", "top1"], descending=[False, True]).row(0, named=True)
        out[f"{100 * tol:g}%"] = row
    return out
