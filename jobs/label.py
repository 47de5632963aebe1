"""``bifta label`` / ``python -m jobs.label`` — label images with a Ray Data pipeline.

Runs with an embedded local Ray, or on the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it):

    python -m jobs.label IMAGES --labels ../shared/descriptions/imagenet --out preds/ --method bifta

Flags override values from ``--config FILE`` (YAML/JSON with the same names, underscores for
dashes). A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bifta_core.method.cascade import DEFAULT_FIRST_STAGE, first_stage_methods
from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError
from bifta_core.method.registry import METHOD_NAMES, VIEW_GENERATORS
from jobs.common import (
    MODEL_FIELDS, add_label_set_cache_arguments, add_model_arguments, add_s3_arguments, format_label_summary,
    print_progress,
)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("input", nargs="?", default=s,
                        help="folder (recursive), glob, manifest .csv/.parquet with a 'uri' column, or s3:// prefix")
    parser.add_argument("--labels", action="append", default=s, metavar="[NAME=]LABELSET",
                        help="label-set folder, classes file or 'a,b,c'; repeat to label against several at once")
    parser.add_argument("--out", default=s, help="output folder (local or s3://); rerunning resumes")
    parser.add_argument("--method", choices=METHOD_NAMES, default=s,
                        help="scoring method (default: the --preset's, else bifta)")
    parser.add_argument("--config", default=None, help="YAML/JSON config file; flags override it")
    add_model_arguments(parser)
    parser.add_argument("--views", choices=VIEW_GENERATORS, default=s,
                        help="random crops (default) or BiFTA's grid of --grid x --grid tiles (wca, bifta)")
    c = parser.add_argument_group("cascade (wca, bifta): views only where the whole image is unsure")
    c.add_argument("--cascade-margin", type=float, default=s, metavar="T",
                   help="keep the first stage's answer where its top-1 margin is >= T; only the other images are "
                        "encoded view by view (0: first stage only; inf: views everywhere). `bifta evaluate` "
                        "names the T to use")
    c.add_argument("--cascade-first", choices=first_stage_methods(), default=s,
                   help=f"the whole-image method that decides first ({DEFAULT_FIRST_STAGE})")
    e = parser.add_argument_group("execution")
    e.add_argument("--batch-size", type=int, default=s, help="images per encode batch (8)")
    e.add_argument("--view-batch-size", type=int, default=s, help="crops per encoder forward pass (256)")
    e.add_argument("--num-encoders", type=int, default=s,
                   help="encode actors (default: --gpus, else one per GPU up now, else 1)")
    e.add_argument("--gpus", type=int, default=s,
                   help="GPU encode actors to ask the cluster for (autoscaling clusters start with none up)")
    e.add_argument("--num-decoders", type=int, default=s, help="most decode+views tasks at once (default: free CPUs)")
    e.add_argument("--limit", type=int, default=s, help="label only the first N inputs")
    e.add_argument("--top-k", type=int, default=s, help="labels kept per image (5)")
    e.add_argument("--max-pixels", type=int, default=s, help="refuse images larger than this (decompression-bomb guard)")
    e.add_argument("--shard-size", type=int, default=s,
                   help="inputs per shard = per output file (20000); fixed by the first run's saved listing")
    e.add_argument("--retry-errors", action="store_true", default=s,
                   help="redo the shards whose files hold error rows (replaced atomically)")
    add_label_set_cache_arguments(e)
    e.add_argument("--no-explain", dest="explain", action="store_false", default=s,
                   help="skip the explanation column")
    e.add_argument("--explain-views", type=int, default=s, metavar="K",
                   help="top_views: the K highest-weighted views of each WCA/BiFTA row, boxes in original pixels (5)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    k = parser.add_argument_group("kept embeddings (for `bifta relabel`)")
    k.add_argument("--save-embeddings", action="store_true", default=s,
                   help="keep each image's whole-image embedding in OUT/_embeddings/ (one file per part file)")
    k.add_argument("--save-view-embeddings", action="store_true", default=s,
                   help="also keep the encoded views' embeddings, boxes and weights (wca, bifta; ~100 KB per image "
                        "at 100 views in float16)")
    k.add_argument("--embeddings-dtype", choices=["float16", "float32"], default=s,
                   help="stored precision (float16: half the bytes; float32: relabel reproduces label's scores exactly)")
    add_s3_arguments(parser)


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    """Config file (if any) overlaid with the flags that were given; what neither sets keeps its
    default (so a ``--preset`` still picks the method when no ``--method`` is given)."""
    data = LabelConfig.read_file(args.config) if getattr(args, "config", None) else {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of option names to values")
    data = dict(data)
    model = data.get("model") or {}
    model = dict(model) if isinstance(model, dict) else {"model": model}
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("config", "quiet", "verbose", "command", "func")}
    for key, value in given.items():
        if key in MODEL_FIELDS:
            model["cache_dir" if key == "model_cache_dir" else key] = value
        else:
            data[key] = value
    if model:
        data["model"] = model
    return LabelConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags; raises :class:`BiftaUserError` for user mistakes."""
    from pipelines.pipeline import run_label_job

    config = config_from_args(args)
    summary = run_label_job(config, on_progress=None if args.quiet else print_progress)
    print(format_label_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.label``: the same as ``bifta label``."""
    from jobs.common import main as cli_main

    return cli_main(["label", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
