"""``bifta relabel`` / ``python -m jobs.relabel`` — score kept embeddings against a new label set.

    bifta label IMAGES --labels v1 --out preds-v1/ --save-embeddings        # once
    bifta relabel preds-v1/ --labels v2 --out preds-v2/ --method cupl       # per label-set change

No image is read: the whole-image embeddings (and, with ``--save-view-embeddings``, the views) that
``bifta label --save-embeddings`` kept under ``OUT/_embeddings/`` are scored on Ray workers, shard
by shard, into the same output schema as ``label`` (rerunning resumes). The model, seed and CLIP-PGS
settings come from the embeddings; a flag that contradicts them is one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bifta_core.method.cascade import DEFAULT_FIRST_STAGE, first_stage_methods
from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError
from bifta_core.method.registry import METHOD_NAMES
from jobs.common import (
    MODEL_FIELDS, add_label_set_cache_arguments, add_model_arguments, add_s3_arguments, format_label_summary,
    print_progress,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("embeddings", nargs="?", default=s, metavar="EMBEDDINGS",
                        help="the --out of a `bifta label --save-embeddings` run (or its _embeddings/ folder)")
    parser.add_argument("--labels", action="append", default=s, metavar="[NAME=]LABELSET",
                        help="the new label set(s); repeat to score several in one pass")
    parser.add_argument("--out", default=s, help="output folder (local or s3://); rerunning resumes")
    parser.add_argument("--method", choices=METHOD_NAMES, default=s,
                        help="scoring method (default bifta); wca/bifta need --save-view-embeddings' views")
    add_model_arguments(parser)
    c = parser.add_argument_group("cascade (wca, bifta)")
    c.add_argument("--cascade-margin", type=float, default=s, metavar="T",
                   help="keep the first stage's answer where its margin is >= T, score saved views elsewhere")
    c.add_argument("--cascade-first", choices=first_stage_methods(), default=s,
                   help=f"the whole-image method that decides first ({DEFAULT_FIRST_STAGE})")
    e = parser.add_argument_group("execution")
    e.add_argument("--num-scorers", dest="num_encoders", type=int, default=s,
                   help="scoring actors (default: half the CPUs of an embedded Ray, else all)")
    e.add_argument("--top-k", type=int, default=s, help="labels kept per image (5)")
    add_label_set_cache_arguments(e)
    e.add_argument("--no-explain", dest="explain", action="store_false", default=s, help="skip the explanation column")
    e.add_argument("--explain-views", type=int, default=s, metavar="K",
                   help="top_views: the K highest-weighted saved views of each WCA/BiFTA row (5)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    add_s3_arguments(parser)


def config_from_args(args: argparse.Namespace) -> tuple[LabelConfig, set[str]]:
    """The run's :class:`LabelConfig` and the names of the fields flags set (the others follow the
    embeddings where they fix them)."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("quiet", "verbose", "command", "func")}
    data: dict[str, Any] = {"input": given.pop("embeddings", "")}
    model: dict[str, Any] = {}
    for key, value in given.items():
        if key in MODEL_FIELDS:
            model["cache_dir" if key == "model_cache_dir" else key] = value
        else:
            data[key] = value
    data["model"] = model
    return LabelConfig.from_dict(data), set(given) | set(model)


def run(args: argparse.Namespace) -> int:
    from pipelines.relabel import run_relabel_job

    config, given = config_from_args(args)
    if not config.input:
        raise ConfigError("no EMBEDDINGS given: the --out of a `bifta label --save-embeddings` run")
    summary = run_relabel_job(config, given=given, on_progress=None if args.quiet else print_progress)
    print(format_label_summary(summary).replace("bifta label — summary", "bifta relabel — summary"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.relabel``: the same as ``bifta relabel``."""
    from jobs.common import main as cli_main

    return cli_main(["relabel", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
