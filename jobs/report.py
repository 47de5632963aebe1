"""``bifta report`` / ``python -m jobs.report`` — summarise a ``bifta label`` output folder.

    python -m jobs.report preds/ --min-margin 0.01 --compare other_preds/

Reads the folder's ``part-*.parquet`` files lazily with polars (local or s3://) and prints label
counts per label set, score and margin quantiles, error images by reason, accuracy when the run
had ground truth, and — with ``--compare`` — agreement with another run. Writes ``report.json``
and the review queue (``review.csv``, ``review.parquet``: low-margin / low-score predictions)
into ``--report-out`` (default ``OUT/_report/``). The review queue is streamed from the lazy query
to the files (``sink_parquet``/``sink_csv``), never collected, so memory stays bounded however many
rows the folder holds. A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator

import polars as pl
import pyarrow as pa

from bifta_core.review import analytics
from bifta_core.io import storage
from bifta_core.errors import ConfigError, InputError
from bifta_core.validation import integer

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


@contextlib.contextmanager
def _staging(dest: str) -> Iterator[str]:
    """A private local folder for the review files: inside ``dest`` when it is local (so publishing
    is a rename), else in the system temp folder (then uploaded)."""
    parent = None
    if not storage.is_remote(dest):
        parent = os.path.abspath(os.path.expanduser(dest))
        os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bifta-review-", dir=parent) as tmp:
        yield tmp


def _publish(local: str, uri: str) -> None:
    """Move a staged file to ``uri`` (atomic rename locally, streamed upload to object storage)."""
    if not storage.is_remote(uri):
        path = os.path.abspath(os.path.expanduser(uri))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(local, 0o666 & ~umask)
        os.replace(local, path)
        return
    with open(local, "rb") as src, storage.open_output(uri) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def write_review(review: pl.LazyFrame, dest: str) -> dict[str, Any]:
    """Stream the review queue to ``dest``/``review.parquet`` and ``review.csv``; → ``{rows, images}``.

    The lazy query runs once, streamed into a staged Parquet file; the CSV (list columns joined with
    ``|``) and the counts are streamed from that file. Nothing holds the whole queue in memory.
    """
    with _staging(dest) as tmp:
        staged_parquet = os.path.join(tmp, "review.parquet")
        staged_csv = os.path.join(tmp, "review.csv")
        review.sink_parquet(staged_parquet, compression="zstd")
        staged = pl.scan_parquet(staged_parquet)
        analytics.lists_as_text(staged).sink_csv(staged_csv)
        counts = staged.select(rows=pl.len(), images=pl.col("image_id").n_unique()).collect().row(0, named=True)
        _publish(staged_csv, storage.join(dest, "review.csv"))
        _publish(staged_parquet, storage.join(dest, "review.parquet"))
    return {"rows": int(counts["rows"]), "images": int(counts["images"])}


def build_report(out: str, *, min_margin: float | None, min_score: float | None, compare: str | None,
                 top: int) -> tuple[dict[str, Any], pl.LazyFrame]:
    """All sections of the report as plain data, plus the review queue as a lazy query (not run).

    ``report["review"]`` holds the criteria; :func:`write_review` streams the queue and counts it."""
    lf = scan(out)
    analytics.check_columns(lf)
    report: dict[str, Any] = {"out": out, "overview": analytics.overview(lf)}
    report["label_counts"] = analytics.label_counts(lf, top).to_dicts()
    report["quantiles"] = analytics.score_quantiles(lf).to_dicts()
    report["errors"] = analytics.error_reasons(lf).to_dicts()
    acc = analytics.truth_accuracy(lf)
    report["accuracy"] = acc.to_dicts() if acc is not None else None
    review = analytics.review_queue(lf, min_margin, min_score)
    report["review"] = {"min_margin": min_margin, "min_score": min_score}
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
    integer("--top", args.top)
    for flag, value in (("--min-margin", args.min_margin), ("--min-score", args.min_score)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if args.min_margin is None and args.min_score is None:
        raise ConfigError("the review queue needs --min-margin and/or --min-score (--no-min-margin alone leaves none)")
    if args.report_out is not None and not args.report_out.strip():
        raise ConfigError("--report-out must name a folder, got an empty path")
    dest = args.report_out or storage.join(args.out, REPORT_DIR)
    try:
        report, review = build_report(args.out, min_margin=args.min_margin, min_score=args.min_score,
                                      compare=args.compare, top=args.top)
        storage.check_writable(dest)
        report["review"].update(write_review(review, dest))
    except (pl.exceptions.PolarsError, pa.ArrowException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read the prediction files of {args.out}"
                         + (f" or {args.compare}" if args.compare else "") + f": {first}") from None
    report["review"]["files"] = [storage.join(dest, "review.csv"), storage.join(dest, "review.parquet")]
    report_path = storage.join(dest, "report.json")
    storage.write_bytes_atomic(report_path, json.dumps(report, indent=2, default=str).encode("utf-8"))
    if not args.quiet:
        print(format_report(report, args.top))
    print(f"  written: {report_path}, review.csv, review.parquet")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.report``: the same as ``bifta report``."""
    from jobs.common import main as cli_main

    return cli_main(["report", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
