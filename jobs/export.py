"""``bifta export label-studio`` / ``python -m jobs.export`` — hand the labels to annotators.

    bifta export label-studio preds/ --out tasks.json --only-review

Writes a Label Studio import file (:mod:`bifta_core.review.label_studio`): one task per image with the
image reference and a prediction per label set, so reviewers correct the unsure ones; next to it
``<out>.label_config.xml``, the labeling config the tasks fit (one ``<Choices>`` per label set, its
classes read from the label sets the run used, or from ``--labels``). ``--only-review`` keeps the
images a reviewer should see: a margin below ``--min-margin`` in some label set, or an error.
"""

from __future__ import annotations

import argparse
import json
import sys

import polars as pl

from bifta_core.io import storage
from bifta_core.errors import ConfigError
from bifta_core.review.label_studio import labeling_config, tasks

COLUMNS = ("image_id", "uri", "status", "error", "label", "score", "margin", "label_set", "method", "model",
           "pretrained", "run_id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    ls = sub.add_parser("label-studio", help="Label Studio import JSON (tasks with predictions) + labeling config")
    ls.add_argument("predictions", metavar="OUT", help="prediction folder written by bifta label (local or s3://)")
    ls.add_argument("--out", required=True, help="tasks file to write (.json, local or s3://)")
    ls.add_argument("--only-review", action="store_true",
                    help="only images with a margin below --min-margin in some label set, and error rows")
    ls.add_argument("--min-margin", type=float, default=0.01, help="the review threshold of --only-review")
    ls.add_argument("--local-root", default="/",
                    help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images are referenced below it")
    ls.add_argument("--labels", action="append", default=None, metavar="[NAME=]LABELSET",
                    help="label sets for the labeling config (default: those the run used)")
    ls.add_argument("--quiet", action="store_true", help="print only the file's location")


def _label_sets(predictions: str, given: list[str] | None, names: list[str]) -> dict[str, list[str]]:
    """``{label set: classes}`` for the labeling config, from ``--labels`` or the run file."""
    from bifta_core.config import LabelConfig
    from bifta_core.errors import LabelSetError
    from bifta_core.io.label_sets import load_label_set
    from pipelines.write import RUN_FILE, read_json

    run_config = (read_json(predictions, RUN_FILE) or {}).get("config") or {}
    specs = given if given is not None else run_config.get("labels") or []
    merge = bool(run_config.get("merge_duplicate_classes", False))
    out: dict[str, list[str]] = {}
    for name, path in LabelConfig(labels=list(specs)).label_specs():
        try:
            # as the run loaded it: its duplicate-class rule, and only the class list is needed
            ls = load_label_set(path, name, merge_duplicates=merge, needed=frozenset())
        except LabelSetError as exc:
            raise ConfigError(f"cannot read label set {path} for the labeling config ({exc}); pass --labels") from None
        out[ls.name] = list(ls.classes)
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(f"no classes for label set(s) {', '.join(missing)} of {predictions}; pass --labels NAME=PATH")
    return {n: out[n] for n in names}


def run(args: argparse.Namespace) -> int:
    from jobs.report import scan

    lf = scan(args.predictions).select(list(COLUMNS))
    if args.only_review:
        unsure = (pl.col("status") != "ok") | (pl.col("margin") < args.min_margin)
        lf = lf.filter(unsure.any().over("image_id"))
    rows = lf.sort(["image_id", "label_set"]).collect()
    names = sorted(set(rows["label_set"].to_list())) if rows.height else []
    config = labeling_config(_label_sets(args.predictions, args.labels, names))
    try:
        made = tasks(rows.iter_rows(named=True), local_root=args.local_root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    storage.write_bytes_atomic(args.out, json.dumps(made, indent=1, ensure_ascii=False).encode("utf-8"))
    config_path = args.out.removesuffix(".json") + ".label_config.xml"
    storage.write_bytes_atomic(config_path, config.encode("utf-8"))
    if not args.quiet:
        print(f"bifta export label-studio — {len(made)} tasks ({sum('predictions' in t for t in made)} with a "
              f"prediction) for label set(s) {', '.join(names)}; labeling config {config_path}")
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.export``: the same as ``bifta export``."""
    from jobs.common import main as cli_main

    return cli_main(["export", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
