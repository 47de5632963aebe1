"""Human-readable evaluation report: Markdown plus PNG plots (matplotlib, Agg backend).

:func:`render_report` turns the evaluation tables into ``{file name: bytes}``; writing them is
the caller's business (local or object storage). Plots: accuracy per method, confidence
histograms (correct vs wrong), reliability curves (accuracy vs confidence bins) and the worst
classes of the reference method.
"""

from __future__ import annotations

import io
import math
from typing import Any

import polars as pl

from bifta_core.evaluation.metrics import reliability_table, worst_classes

#: Rows drawn in the reliability plot when present (the full set would be unreadable).
RELIABILITY_METHODS = ("clip", "clip-e", "cupl", "wca", "bifta")
PLOTS = ("accuracy.png", "confidence.png", "reliability.png", "worst_classes.png")  # + cascade.png with a curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def reference_method(metrics: pl.DataFrame) -> str:
    """The row the per-class views focus on: ``bifta`` when evaluated, else the first row."""
    names = metrics["method"].to_list()
    return "bifta" if "bifta" in names else names[0]


def plot_accuracy(metrics: pl.DataFrame) -> bytes:
    """Horizontal bars of top-1 and top-5 accuracy per method (± std under the protocol)."""
    plt = _pyplot()
    names = metrics["method"].to_list()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    y = list(range(len(names)))
    for offset, k, color in ((-0.2, "top1", "#1f77b4"), (0.2, "top5", "#9ecae1")):
        vals = [100 * v for v in metrics[k].to_list()]
        err = [100 * v for v in metrics[f"{k}_std"].to_list()] if f"{k}_std" in metrics.columns else None
        ax.barh([i + offset for i in y], vals, height=0.38, xerr=err, color=color, label=k)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title(f"accuracy per method (n = {int(metrics['n'].max())} images)")
    return _png(fig)


def plot_confidence(predictions: pl.DataFrame, methods: list[str]) -> bytes:
    """Small multiples: histogram of top-1 confidence per method, correct and wrong stacked."""
    plt = _pyplot()
    cols = 4
    rows = max(1, math.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    bins = [i / 20 for i in range(21)]
    for ax, m in zip(axes.flat, methods):
        p = predictions.filter(pl.col("method") == m)
        right = p.filter(pl.col("correct"))["confidence"].to_list()
        wrong = p.filter(~pl.col("correct"))["confidence"].to_list()
        ax.hist([right, wrong], bins=bins, stacked=True, color=["#2ca02c", "#d62728"], label=["correct", "wrong"])
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("confidence (top-1 softmax probability)")
    fig.supylabel("images")
    fig.tight_layout()
    return _png(fig)


def plot_reliability(reliability: pl.DataFrame, methods: list[str]) -> bytes:
    """Accuracy vs mean confidence per confidence bin, with the perfect-calibration diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="calibrated")
    for m in methods:
        r = reliability.filter(pl.col("method") == m)
        if r.height:
            ax.plot(r["confidence"].to_list(), r["accuracy"].to_list(), marker="o", ms=3, label=m)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=8)
    ax.set_title("reliability")
    return _png(fig)


def plot_worst_classes(worst: pl.DataFrame, method: str) -> bytes:
    """Horizontal bars of the lowest per-class top-1 accuracies of ``method``."""
    plt = _pyplot()
    names = [f"{c} (n={n})" for c, n in zip(worst["class"].to_list(), worst["n"].to_list())]
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(1, len(names)) + 1.2))
    ax.barh(range(len(names)), [100 * v for v in worst["top1"].to_list()], color="#ff7f0e")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(f"worst classes — {method}")
    return _png(fig)


def plot_cascade(curve: pl.DataFrame, recommended: dict[str, dict]) -> bytes:
    """Top-1 and top-5 against views encoded per image, one point per cascade threshold ``T``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = curve["views_per_image"].to_list()
    for col, marker in (("top1", "o"), ("top5", "s")):
        ax.plot(x, [100 * v for v in curve[col].to_list()], marker=marker, ms=3, label=col.replace("top", "top-"))
    for tol, row in recommended.items():
        ax.annotate(f"T={row['threshold']:.4g} (within {tol})", (row["views_per_image"], 100 * row["top1"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=7)
    first, final = curve["first"][0], curve["final"][0]
    ax.set_xlabel(f"views encoded per image (0: {first} only; right end: {final} on every image)")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"cascade {first} → {final}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def cascade_markdown(curve: pl.DataFrame, recommended: dict[str, dict]) -> list[str]:
    """The report's cascade section: how to read it, the recommended ``T`` values and the curve."""
    first, final = curve["first"][0], curve["final"][0]
    full = curve.filter(pl.col("threshold") == float("inf")).row(0, named=True)
    method_flag = f" --method {final}" if final in ("wca", "bifta") else ""  # other rows are ablations
    lines = ["## Cascade: accuracy for views", "",
             f"An image keeps the `{first}` answer where its margin (top-1 − top-2 score) is at least T; the others "
             f"are encoded view by view and scored with `{final}`. T = 0 is `{first}` alone, T = inf is `{final}` "
             f"alone ({full['views_per_image']:.1f} views per image).", ""]
    for tol, row in recommended.items():
        lines.append(f"- cheapest T within {tol} (top-1 points) of `{final}`: **T = {row['threshold']:.6g}** — "
                     f"top-1 {100 * row['top1']:.2f}%, {row['views_per_image']:.1f} views per image, "
                     f"{100 * row['share_with_views']:.0f}% of images encoded with views "
                     f"(`bifta label{method_flag} --cascade-first {first} --cascade-margin {row['threshold']:.6g}`)")
    lines += ["", "| T | images with views % | views / image | top-1 % | top-5 % |", "|---|---|---|---|---|"]
    for r in curve.iter_rows(named=True):
        lines.append(f"| {r['threshold']:.6g} | {100 * r['share_with_views']:.1f} | {r['views_per_image']:.2f} | "
                     f"{100 * r['top1']:.2f} | {100 * r['top5']:.2f} |")
    lines += ["", "![cascade](cascade.png)", ""]
    return lines


def _fmt(v: Any, std: Any = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if std is not None:
        return f"{100 * v:.2f} ± {100 * std:.2f}"
    return f"{100 * v:.2f}"


def metrics_markdown(metrics: pl.DataFrame) -> str:
    """The metrics table as Markdown (accuracies in %)."""
    protocol = "top1_std" in metrics.columns
    head = "| method | descriptions | views | aggregation | top-1 % | top-5 % | n | ECE |"
    lines = [head, "|" + "---|" * 8]
    for r in metrics.iter_rows(named=True):
        t1 = _fmt(r["top1"], r.get("top1_std") if protocol else None)
        t5 = _fmt(r["top5"], r.get("top5_std") if protocol else None)
        lines.append(
            f"| {r['method']} | {r['descriptions']} | {_views_cell(r)} | {r['aggregation'] or '–'} | {t1} | {t5} "
            f"| {r['n']} | {r['ece']:.3f} |"
        )
    return "\n".join(lines)


def _views_cell(row: dict[str, Any]) -> str:
    """``whole image``, or the view preset and which of its views: ``wca views, kept``."""
    views, preset = row.get("views"), row.get("view_preset")
    if views in (None, "none"):
        return "whole image"
    which = "all sampled" if views == "all" else "kept by refinement"
    return f"{preset} views, {which}" if preset else str(views)


def render_report(
    metrics: pl.DataFrame,
    per_class: pl.DataFrame,
    predictions: pl.DataFrame,
    context: dict[str, Any],
    bins: int = 10,
    cascade: pl.DataFrame | None = None,
) -> dict[str, bytes]:
    """``report.md`` and its PNG plots as ``{file name: bytes}``.

    ``context`` supplies the header lines: ``model``, ``pretrained``, ``label_set``, ``classes``,
    ``images``, ``errors``, ``views``, ``skipped`` (``{method: reason}``), ``protocol`` (or None),
    ``random_weights`` and ``source`` (encoded now, or the embeddings file re-scored). ``cascade``:
    the curve of :func:`bifta_core.method.cascade.cascade_curve`, plotted in ``cascade.png`` when given.
    """
    methods = metrics["method"].to_list()
    ref = reference_method(metrics)
    reliability = reliability_table(predictions, bins)
    worst = worst_classes(per_class, ref, 15)
    files = {
        "accuracy.png": plot_accuracy(metrics),
        "confidence.png": plot_confidence(predictions, methods),
        "reliability.png": plot_reliability(reliability, [m for m in RELIABILITY_METHODS if m in methods] or methods[:5]),
        "worst_classes.png": plot_worst_classes(worst, ref),
    }
    lines = [
        "# bifta evaluate",
        "",
        f"- model: `{context.get('model')}` ({context.get('pretrained')})",
        f"- label set: `{context.get('label_set')}` ({context.get('classes')} classes)",
        f"- images scored: {context.get('images')} (errors: {context.get('errors', 0)})",
        f"- views: {context.get('views') or 'not encoded'}",
        f"- embeddings: {context.get('source')}",
    ]
    if context.get("preset"):
        r = context["preset"]
        lines.append(f"- preset: `{r['name']}` ({r['source']}; released backbone {r['backbone']}): "
                     + ", ".join(f"{k} {v}" for k, v in r["views"].items()))
        lines += [f"  - note: {n}" for n in r["notes"]]
    if context.get("protocol"):
        p = context["protocol"]
        lines.append(f"- protocol: {p['runs']} runs × {p['views']} views per image (mean ± std over runs)")
    if context.get("random_weights"):
        lines.append("- **WARNING: random model weights — these numbers are meaningless**")
    grouped: dict[str, list[str]] = {}
    for name, reason in (context.get("skipped") or {}).items():
        grouped.setdefault(reason, []).append(name)
    for reason, names in grouped.items():
        lines.append(f"- skipped {', '.join(f'`{n}`' for n in names)}: {reason}")
    lines += ["", "## Accuracy", "", metrics_markdown(metrics), "", "![accuracy](accuracy.png)", ""]
    lines += ["## Confidence", "", "Confidence is the top-1 probability of softmax(logit scale · score).", "",
              "![confidence](confidence.png)", "", "![reliability](reliability.png)", ""]
    lines += [f"## Worst classes ({ref})", "", "| class | n | top-1 % | top-5 % |", "|---|---|---|---|"]
    for r in worst.iter_rows(named=True):
        lines.append(f"| {r['class']} | {r['n']} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} |")
    lines += ["", "![worst classes](worst_classes.png)", ""]
    if cascade is not None:
        from bifta_core.method.cascade import recommended_thresholds

        recommended = recommended_thresholds(cascade)
        files["cascade.png"] = plot_cascade(cascade, recommended)
        lines += cascade_markdown(cascade, recommended)
    files["report.md"] = "\n".join(lines).encode("utf-8")
    return files
