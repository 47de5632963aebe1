"""``bifta report`` / ``python -m jobs.report`` — summarise a ``bifta label`` output folder.

    python -m jobs.report preds/ --min-margin 0.01 --compare other_preds/

Reads the folder's ``part-*.parquet`` files lazily with polars (local or s3://) and prints label
counts per label set, score and margin quantiles, error images by reason, accuracy when the run
had ground truth, and — with ``--compare`` — agreement with another run. Writes ``report.json``
and the review queue (``review.csv``, ``review.parquet``: low-margin / low-score predictions)
into ``--report-out`` (default ``OUT/_report/``). A user mistake prints one ``error:`` line and
exits 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import polars as pl

from bifta_core import analytics, storage
from bifta_core.errors import ConfigError, InputError

REPORT_DIR = "_report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="prediction folder written by bifta label (local or s3://)")
    parser.add_argument("--min-margin", type=float, default=0.01,
                        help="review predictions whose top-1 − top-2 score margin is below this")
    parser.add_argument("--min-score", type=float, default=None,
                        help="also review predictions whose top-1 score is below this (off by default)")
    parser.add_argument("--no-min-margin", dest="min_margin", action="store_const", const=None,
                        help="do not use the margin for the review queue")
    parser.add_argument("--compare", default=None, metavar="OTHER_OUT",
                        help="another prediction folder (other run or method): top-1 agreement per label set")
    parser.add_argument("--report-out", default=None, help="where report.json and review.* go (OUT/_report/)")
    parser.add_argument("--top", type=int, default=10, help="labels listed per label set")
    parser.add_argument("--quiet", action="store_true", help="print only the report path")


def prediction_files(out: str) -> list[str]:
    """The published ``part-*.parquet`` files under ``out``; :class:`InputError` when there are none."""
    from pipelines.write import part_files

    if not storage.exists(out):
        raise InputError(f"prediction folder not found: {out}")
    files = part_files(out)
    if not files:
        raise InputError(f"{out} holds no prediction files (part-*.parquet); run bifta label --out {out} first")
    return files


def scan(out: str) -> pl.LazyFrame:
    """Lazy scan of a prediction folder: ``pl.scan_parquet`` locally, an Arrow dataset on S3."""
    files = prediction_files(out)
    if not storage.is_remote(out):
        return pl.scan_parquet(files)
    import pyarrow.dataset as pads

    fs, _ = storage.get_arrow_fs(out)
    paths = [storage.get_arrow_fs(f)[1] for f in files]
    return pl.scan_pyarrow_dataset(pads.dataset(paths, filesystem=fs, format="parquet"))


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    return buf.getvalue()


def _csv_bytes(df: pl.DataFrame) -> bytes:
    flat = df.with_columns(
        [pl.col(c).list.join("|") for c, t in df.schema.items() if isinstance(t, pl.List)]
    )
    return flat.write_csv().encode("utf-8")


def build_report(out: str, *, min_margin: float | None, min_score: float | None, compare: str | None,
                 top: int) -> tuple[dict[str, Any], pl.DataFrame]:
    """All sections of the report as plain data, plus the collected review queue."""
    lf = scan(out)
    analytics.check_columns(lf)
    report: dict[str, Any] = {"out": out, "overview": analytics.overview(lf)}
    report["label_counts"] = analytics.label_counts(lf, top).to_dicts()
    report["quantiles"] = analytics.score_quantiles(lf).to_dicts()
    report["errors"] = analytics.error_reasons(lf).to_dicts()
    acc = analytics.truth_accuracy(lf)
    report["accuracy"] = acc.to_dicts() if acc is not None else None
    review = analytics.review_queue(lf, min_margin, min_score).collect()
    report["review"] = {"rows": review.height, "images": review["image_id"].n_unique(),
                        "min_margin": min_margin, "min_score": min_score}
    if compare:
        other = scan(compare)
        analytics.check_columns(other)
        summary, confusions = analytics.agreement(lf, other)
        report["compare"] = {"other": compare, "agreement": summary.to_dicts(), "top_confusions": confusions.to_dicts()}
    return report, review


def format_report(report: dict[str, Any], top: int) -> str:
    """Compact text rendering of :func:`build_report`."""
    ov = report["overview"]
    lines = [f"bifta report — {report['out']}",
             f"  images {ov['images']} ({ov['ok_images']} labelled, {ov['error_images']} errors), rows {ov['rows']}, "
             f"label sets {', '.join(ov['label_sets'])}" + (f", methods {', '.join(ov['methods'])}" if ov.get("methods") else "")]
    by_ls: dict[str, list[dict]] = {}
    for r in report["label_counts"]:
        by_ls.setdefault(r["label_set"], []).append(r)
    for ls, rows in by_ls.items():
        lines.append(f"  top labels [{ls}]: " + ", ".join(f"{r['label']} {r['n']} ({100 * r['share']:.0f}%)" for r in rows[:top]))
    for q in report["quantiles"]:
        qs = "  ".join(f"{k}={q[k]:.3f}" for k in q if k.startswith("q") and q[k] is not None)
        lines.append(f"  {q['metric']:<6} [{q['label_set']}] n={q['n']} mean={q['mean']:.3f} min={q['min']:.3f} {qs} max={q['max']:.3f}")
    if report["accuracy"]:
        for a in report["accuracy"]:
            lines.append(f"  accuracy [{a['label_set']}] top-1 {100 * a['top1']:.2f}%  top-k {100 * (a['topk'] or 0):.2f}%  n={a['n']}")
    if report["errors"]:
        lines.append("  errors: " + "; ".join(f"{e['reason']} ×{e['images']} (e.g. {e['example_image_id']})" for e in report["errors"]))
    else:
        lines.append("  errors: none")
    rv = report["review"]
    crit = " or ".join(s for s in (f"margin < {rv['min_margin']}" if rv["min_margin"] is not None else "",
                                   f"score < {rv['min_score']}" if rv["min_score"] is not None else "") if s)
    lines.append(f"  review queue: {rv['rows']} predictions of {rv['images']} images ({crit})")
    if report.get("compare"):
        c = report["compare"]
        for a in c["agreement"]:
            lines.append(f"  agreement with {c['other']} [{a['label_set']}]: {100 * a['agreement']:.2f}% of {a['common']} images")
        for p in c["top_confusions"][:5]:
            lines.append(f"    {p['label_a']} → {p['label_b']} ×{p['n']} [{p['label_set']}]")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags; raises :class:`BiftaUserError` for user mistakes."""
    if args.top < 1:
        raise ConfigError(f"--top must be a positive integer, got {args.top}")
    report, review = build_report(args.out, min_margin=args.min_margin, min_score=args.min_score,
                                  compare=args.compare, top=args.top)
    dest = args.report_out or storage.join(args.out, REPORT_DIR)
    storage.makedirs(dest)
    report["review"]["files"] = [storage.join(dest, "review.csv"), storage.join(dest, "review.parquet")]
    storage.write_bytes_atomic(storage.join(dest, "review.csv"), _csv_bytes(review))
    storage.write_bytes_atomic(storage.join(dest, "review.parquet"), _parquet_bytes(review))
    report_path = storage.join(dest, "report.json")
    storage.write_bytes_atomic(report_path, json.dumps(report, indent=2, default=str).encode("utf-8"))
    if not args.quiet:
        print(format_report(report, args.top))
    print(f"  written: {report_path}, review.csv, review.parquet")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.report``: the same as ``bifta report``."""
    from jobs.cli import main as cli_main

    return cli_main(["report", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
