"""What every ``bifta`` command shares: the command table and entry point, the one-line error
parser, the model/view/description flags, logging, the progress line and the labelling summary.

Each command lives in ``jobs/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``;
``bifta <name>`` and ``python -m jobs.<name>`` (what ``ray job submit`` runs) both come through
:func:`main`. Job modules import this module; this module imports them only by name, when the
parser is built, so no two job modules import each other. A user mistake prints one ``error:``
line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from bifta_core.config import parse_scale
from bifta_core.errors import BiftaUserError, ConfigError

EXIT_USER_ERROR = 2

# flag dest -> LabelConfig field (model fields live under config.model)
MODEL_FIELDS = {"model", "pretrained", "device", "precision", "model_cache_dir"}


def scale_arg(value: str) -> tuple[float, float]:
    """argparse type for ``--scale``: a malformed value is a usage error, not a traceback."""
    try:
        return parse_scale(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag prints one ``error:`` line (not the whole usage block) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and view flags shared by ``label``, ``evaluate`` and ``labelset build``."""
    s = argparse.SUPPRESS
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=s, help="open_clip architecture (default ViT-B-32)")
    g.add_argument("--pretrained", default=s,
                   help="open_clip tag (default openai), checkpoint PATH or URI (s3://…), or 'random' (tests only)")
    g.add_argument("--device", default=s, help="auto (default), cpu, cuda, cuda:1 …")
    g.add_argument("--precision", default=s, choices=["auto", "fp32", "fp16", "bf16"], help="autocast on CUDA")
    g.add_argument("--model-cache-dir", default=s, help="where downloaded checkpoints are kept")
    g.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=s,
                   help="build the model with QuickGELU (default: what the weights were trained with)")
    g.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_false", default=s)
    v = parser.add_argument_group("views (WCA / BiFTA)")
    v.add_argument("--preset", default=s, help="a released WCA/BiFTA configuration, e.g. bifta-cub (`bifta presets` lists them)")
    v.add_argument("--grid", type=int, default=s, help="tiles per side of grid views (3, BiFTA's --num_grid)")
    v.add_argument("--num-views", type=int, default=s, help="crops sampled per image (wca 60, bifta 100)")
    v.add_argument("--max-views", type=int, default=s, help="crops kept after IoU refinement (bifta 100)")
    v.add_argument("--iou-threshold", type=float, default=s, help="drop a crop whose IoU with a kept one exceeds this (bifta 0.85)")
    v.add_argument("--scale", type=scale_arg, default=s, help="crop side range A,B as fractions of the short side (wca 0.1,0.9; bifta 0.5,0.9)")
    v.add_argument("--seed", type=int, default=s, help="global seed; views are seeded from (seed, image id)")
    d = parser.add_argument_group("descriptions and scoring")
    d.add_argument("--refine-descriptions", dest="refine_descriptions", action="store_true", default=s,
                   help="BiFTA description refinement (default for --method bifta)")
    d.add_argument("--no-refine-descriptions", dest="refine_descriptions", action="store_false", default=s)
    d.add_argument("--desc-threshold", type=float, default=s, help="cosine above which a description is a near-duplicate (0.99)")
    d.add_argument("--desc-top-k", type=int, default=s, help="descriptions kept per class after refinement (50)")
    d.add_argument("--image-scale", type=float, default=s, help="crop-weight temperature exponent (4.0 → e^4)")
    d.add_argument("--text-scale", type=float, default=s, help="description-weight temperature exponent (2.0 → e^2)")
    d.add_argument("--aggregation", choices=["normalized", "sum"], default=s, help="WCA aggregation (normalized)")
    d.add_argument("--waffle-words", default=s,
                   help="WaffleCLIP word list (.pkl as released, .json, .txt); default: the bundled English list")
    d.add_argument("--merge-duplicate-classes", action="store_true", default=s,
                   help="keep the first of repeated class names instead of failing")
    p = parser.add_argument_group("CLIP-PGS")
    p.add_argument("--pgs-keep", type=float, default=s, help="keep ratio of ViT patch tokens for view encodes (off)")
    p.add_argument("--pgs-whole-image", action="store_true", default=s, help="also apply PGS to the whole-image encode")


def add_label_set_cache_arguments(group: argparse._ArgumentGroup) -> None:
    """``--labelset-cache``, ``--no-labelset-cache`` and ``--labelset-artifact`` (label and relabel)."""
    s = argparse.SUPPRESS
    group.add_argument("--labelset-cache", default=s,
                       help="label-set embedding cache folder (the labelsets folder of the cache root, $BIFTA_CACHE_DIR)")
    group.add_argument("--no-labelset-cache", dest="labelset_cache", action="store_const", const="", default=s)
    group.add_argument("--labelset-artifact", dest="labelset_artifacts", action="append", default=s,
                       help="prebuilt label set from `bifta labelset build` (repeatable)")


def add_s3_arguments(parser: argparse.ArgumentParser) -> None:
    """The S3 settings as flags (label and relabel); credentials only from the environment."""
    s = argparse.SUPPRESS
    s3 = parser.add_argument_group("S3 (default: the standard AWS environment; credentials only from there)")
    s3.add_argument("--s3-endpoint-url", default=s, help="S3-compatible endpoint, e.g. http://minio:9000")
    s3.add_argument("--s3-region", default=s, help="S3 region")
    s3.add_argument("--s3-anon", action="store_true", default=s, help="unsigned requests (public buckets)")


def format_label_summary(summary: dict[str, Any]) -> str:
    """The one-screen end-of-run summary."""
    lines = [
        "",
        "bifta label — summary",
        f"  output        {summary['out']}",
        f"  method        {summary['method']}  model {summary['model']} ({summary['pretrained']})",
        "  label sets    " + ", ".join(f"{k} ({v['classes']} classes)" for k, v in summary["label_sets"].items()),
        f"  inputs        {summary['inputs']} in {summary['shards']} shards  "
        f"(already done {summary['skipped_already_done']})",
        f"  labelled      {summary['ok']} ok, {summary['errors']} errors",
        f"  throughput    {summary['images_per_second']} images/s over {summary['encode_seconds']} s",
        f"  views         {summary['views_per_image']} encoded per image; {100 * summary['share_with_views']:.1f}% "
        f"of images needed views" + (f" (cascade: {summary['cascade']['first']} decides where its margin >= "
                                     f"{summary['cascade']['margin']})" if summary.get("cascade") else ""),
        f"  files         {summary['files_written']} written, {summary['rows_written']} rows",
    ]
    if summary.get("embeddings"):
        lines.append(f"  embeddings    {summary['embeddings']} (bifta relabel {summary['embeddings']} --labels NEW --out OUT2)")
    if summary["error_reasons"]:
        lines.append("  error reasons " + "; ".join(f"{k} ×{v}" for k, v in summary["error_reasons"].items()))
    if summary.get("random_weights"):
        lines.append("  WARNING       random weights: these labels are meaningless")
    return "\n".join(lines)


def print_progress(info: dict) -> None:
    done, total = info["done"], info["total"]
    rate = done / info["elapsed_s"] if info["elapsed_s"] else 0.0
    eta = (total - done) / rate if rate else float("nan")
    print(f"[bifta] {done}/{total} images ({100 * done / total:.0f}%), {info['errors']} errors, "
          f"{rate:.2f} img/s, eta {eta:.0f}s", file=sys.stderr, flush=True)


def configure_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bifta").setLevel(logging.WARNING if quiet else logging.INFO)


#: sub-command -> (module, one-line help)
COMMANDS = {
    "label": ("jobs.label", "label images with a label set (Ray Data pipeline)"),
    "relabel": ("jobs.relabel", "score embeddings kept by `label --save-embeddings` against a new label set"),
    "evaluate": ("jobs.evaluate", "score every method on a labelled dataset from one encoding pass"),
    "report": ("jobs.report", "summarise a prediction folder with polars"),
    "review": ("jobs.review", "one static HTML page to look at the labels (thumbnails, views, filters)"),
    "export": ("jobs.export", "hand the labels to annotators (export label-studio)"),
    "describe": ("jobs.describe", "generate class descriptions with an LLM"),
    "labelset": ("jobs.labelset", "build a reusable label-set artifact"),
    "presets": ("jobs.presets", "list the released WCA/BiFTA configurations --preset accepts"),
    "train": ("jobs.train", "CLIP / CLIP-PGS contrastive training on Ray Train"),
    "bench": ("jobs.bench", "benchmarks (pipeline, cascade, relabel, scaling, pgs, pgs-train)"),
    "demo": ("jobs.demo", "label the bundled example photos end to end"),
}


def build_parser() -> argparse.ArgumentParser:
    # Sub-parsers inherit the class, so every `bifta <command>` flag error is one line, exit 2.
    parser = OneLineErrorParser(prog="bifta", description="Zero-shot image labelling with CLIP, WCA and BiFTA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # sub-command not shipped in this build
            raise
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        _add_verbose(p)
        p.set_defaults(func=module.run)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on a command and on each of its own sub-commands (``export label-studio``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)
            return
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs and progress blocks (default: bifta's progress line and summary)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipelines.plan import set_verbosity

    configure_logging(getattr(args, "quiet", False))
    set_verbosity(getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except BiftaUserError as exc:
        # One line whatever the message holds, so scripts can grep it.
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerunning the same command resumes where it stopped", file=sys.stderr)
        return 130


