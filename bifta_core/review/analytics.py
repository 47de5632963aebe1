"""Analytics over a ``bifta label`` prediction folder, as polars lazy queries.

Every function takes a :class:`polars.LazyFrame` over the folder's ``part-*.parquet`` files (one
row per image and label set: ``image_id, uri, status, error, label, score, margin, topk_labels,
label_set, …`` — see ``pipelines.write``) and returns a small collected :class:`polars.DataFrame`
or, for row-level results, a LazyFrame the caller streams to files. Nothing here reads files or
converts to pandas; the caller builds the LazyFrame (``pl.scan_parquet`` or an Arrow dataset).

Error rows repeat once per label set, so image counts use distinct ``image_id`` values.
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from bifta_core.errors import ConfigError, InputError

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Columns every prediction folder has (the rest depend on the run: ``true_label``…).
REQUIRED_COLUMNS = ("image_id", "status", "error", "label", "score", "margin", "label_set")


def check_columns(lf: pl.LazyFrame) -> list[str]:
    """Column names of ``lf``; :class:`InputError` when it is not a prediction table."""
    names = lf.collect_schema().names()
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(f"not a bifta prediction table: missing column(s) {', '.join(missing)}")
    return names


def ok_rows(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Rows with a prediction (``status == 'ok'``)."""
    return lf.filter(pl.col("status") == "ok")


def overview(lf: pl.LazyFrame) -> dict[str, Any]:
    """Images, rows, ok/error images, label sets and methods of a prediction table."""
    names = check_columns(lf)
    extra = [pl.col("method").unique().sort().implode().alias("methods")] if "method" in names else []
    row = lf.select(
        pl.len().alias("rows"),
        pl.col("image_id").n_unique().alias("images"),
        pl.col("image_id").filter(pl.col("status") == "ok").n_unique().alias("ok_images"),
        pl.col("image_id").filter(pl.col("status") != "ok").n_unique().alias("error_images"),
        pl.col("label_set").unique().sort().implode().alias("label_sets"),
        *extra,
    ).collect().row(0, named=True)
    return {k: (list(v) if isinstance(v, pl.Series) else v) for k, v in row.items()}


def label_counts(lf: pl.LazyFrame, top: int | None = None) -> pl.DataFrame:
    """Predicted-label counts per label set: ``label_set, label, n, share`` (most frequent first).

    ``share`` is the fraction of that label set's predicted images; ``top`` keeps the first N
    labels of each label set.
    """
    counts = (
        ok_rows(lf)
        .group_by(["label_set", "label"])
        .agg(n=pl.len())
        .with_columns(share=pl.col("n") / pl.col("n").sum().over("label_set"))
        .sort(["label_set", "n", "label"], descending=[False, True, False])
    )
    if top is not None:
        if top < 1:
            raise ConfigError(f"--top must be a positive integer, got {top}")
        counts = counts.filter(pl.int_range(pl.len()).over("label_set") < top)
    return counts.collect()


def score_quantiles(lf: pl.LazyFrame, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> pl.DataFrame:
    """Confidence (``score``) and ``margin`` distribution per label set.

    One row per (label set, metric) with ``n, mean, min, q<p>…, max`` (``q50`` is the median).
    """
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"quantiles must lie in [0, 1], got {q}")
    frames = []
    for metric in ("score", "margin"):
        col = pl.col(metric).cast(pl.Float64)
        aggs = [pl.len().alias("n"), col.mean().alias("mean"), col.min().alias("min")]
        aggs += [col.quantile(q, interpolation="linear").alias(f"q{round(q * 100):02d}") for q in quantiles]
        aggs.append(col.max().alias("max"))
        frames.append(
            ok_rows(lf).filter(pl.col(metric).is_not_null()).group_by("label_set").agg(aggs)
            .with_columns(metric=pl.lit(metric))
        )
    out = pl.concat(frames).collect()
    return out.select("label_set", "metric", *[c for c in out.columns if c not in ("label_set", "metric")]).sort(
        ["label_set", "metric"], descending=[False, True]
    )


def error_reason_expr() -> pl.Expr:
    """The reason class of an error message: its text before the first ``:`` (``decode failed: …``)."""
    return pl.col("error").fill_null("unknown error").str.split(":").list.first().str.strip_chars()


def error_reasons(lf: pl.LazyFrame) -> pl.DataFrame:
    """Error images grouped by reason: ``reason, images, example_image_id, example_error``."""
    return (
        lf.filter(pl.col("status") != "ok")
        .with_columns(reason=error_reason_expr())
        .group_by("reason")
        .agg(
            images=pl.col("image_id").n_unique(),
            example_image_id=pl.col("image_id").sort().first(),
            example_error=pl.col("error").sort_by("image_id").first(),
        )
        .sort(["images", "reason"], descending=[True, False])
        .collect()
    )


def review_queue(lf: pl.LazyFrame, min_margin: float | None = 0.01, min_score: float | None = None) -> pl.LazyFrame:
    """Predictions to check by hand: ``margin < min_margin`` or ``score < min_score`` (None: off).

    Columns ``image_id, uri, label_set, label, score, margin, topk_labels, reason`` (``low margin``,
    ``low score`` or both joined by ``+``), least certain first (smallest margin, then score).
    """
    if min_margin is None and min_score is None:
        raise ConfigError("the review queue needs --min-margin and/or --min-score")
    names = lf.collect_schema().names()
    low_margin = (pl.col("margin") < min_margin) if min_margin is not None else pl.lit(False)
    low_score = (pl.col("score") < min_score) if min_score is not None else pl.lit(False)
    reason = pl.concat_str(
        [pl.when(low_margin).then(pl.lit("low margin")), pl.when(low_score).then(pl.lit("low score"))],
        separator="+", ignore_nulls=True,
    )
    cols = [c for c in ("image_id", "uri", "label_set", "label", "score", "margin", "topk_labels", "true_label",
                        "method") if c in names]
    return (
        ok_rows(lf)
        .filter(low_margin.fill_null(False) | low_score.fill_null(False))
        .select(*cols, reason.alias("reason"))
        .sort(["margin", "score", "image_id", "label_set"])
    )


def lists_as_text(lf: pl.LazyFrame, separator: str = "|") -> pl.LazyFrame:
    """List columns joined into text (``a|b|c``; elements cast to string), for CSV, which holds no lists.

    Stays lazy, so the caller can ``sink_csv`` it without collecting."""
    schema = lf.collect_schema()
    return lf.with_columns([
        pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(separator)
        for c, t in schema.items() if isinstance(t, pl.List)
    ])


def _key(expr: pl.Expr) -> pl.Expr:
    """Polars twin of :func:`bifta_core.io.label_sets.key_of` (lower case, ``_`` → space, collapsed spaces)."""
    return expr.str.replace_all("_", " ").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def truth_accuracy(lf: pl.LazyFrame) -> pl.DataFrame | None:
    """Top-1 and top-k accuracy per label set when the run had a ``true_label`` column, else None.

    Labels compare after :func:`bifta_core.io.label_sets.key_of`-style normalisation.
    """
    names = lf.collect_schema().names()
    if "true_label" not in names:
        return None
    rows = ok_rows(lf).filter(pl.col("true_label").is_not_null())
    hit_k = (
        pl.col("topk_labels").list.eval(_key(pl.element())).list.contains(_key(pl.col("true_label")))
        if "topk_labels" in names else pl.lit(None)
    )
    return (
        rows.group_by("label_set")
        .agg(
            n=pl.len(),
            top1=(_key(pl.col("label")) == _key(pl.col("true_label"))).mean(),
            topk=hit_k.mean(),
        )
        .sort("label_set")
        .collect()
    )


def agreement(a: pl.LazyFrame, b: pl.LazyFrame, top_pairs: int = 10) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Compare two runs (or two methods) image by image.

    Returns ``(summary, confusions)``: per label set ``common, agree, agreement`` (fraction of
    images predicted in both runs with the same top-1 label), and the ``top_pairs`` most frequent
    disagreements ``label_set, label_a, label_b, n``.
    """
    keys = ["image_id", "label_set"]
    left = ok_rows(a).select(*keys, pl.col("label").alias("label_a"))
    right = ok_rows(b).select(*keys, pl.col("label").alias("label_b"))
    joined = left.join(right, on=keys, how="inner")
    summary = (
        joined.group_by("label_set")
        .agg(common=pl.len(), agree=(pl.col("label_a") == pl.col("label_b")).sum())
        .with_columns(agreement=pl.col("agree") / pl.col("common"))
        .sort("label_set")
        .collect()
    )
    if summary.height == 0:
        raise InputError("the two runs share no predicted (image, label set) pair")
    confusions = (
        joined.filter(pl.col("label_a") != pl.col("label_b"))
        .group_by(["label_set", "label_a", "label_b"])
        .agg(n=pl.len())
        .sort(["label_set", "n", "label_a", "label_b"], descending=[False, True, False, False])
        .filter(pl.int_range(pl.len()).over("label_set") < top_pairs)
        .collect()
    )
    return summary, confusions
