"""``bifta label`` / ``python -m jobs.label`` — label images with a Ray Data pipeline.

Runs with an embedded local Ray, or on the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it):

    python -m jobs.label IMAGES --labels ../shared/descriptions/imagenet --out preds/ --method bifta

Flags override values from ``--config FILE`` (YAML/JSON with the same names, underscores for
dashes). A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from bifta_core.cascade import DEFAULT_FIRST_STAGE, first_stage_methods
from bifta_core.config import LabelConfig, parse_scale
from bifta_core.errors import ConfigError
from bifta_core.methods import METHOD_NAMES, VIEW_GENERATORS

EXIT_USER_ERROR = 2

# flag dest -> LabelConfig field (model fields live under config.model)
_MODEL_FIELDS = {"model", "pretrained", "device", "precision", "model_cache_dir"}


def _scale_arg(value: str) -> tuple[float, float]:
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
    v.add_argument("--scale", type=_scale_arg, default=s, help="crop side range A,B as fractions of the short side (wca 0.1,0.9; bifta 0.5,0.9)")
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
    e.add_argument("--num-decoders", type=int, default=s, help="most decode+views actors (default: free CPUs)")
    e.add_argument("--limit", type=int, default=s, help="label only the first N inputs")
    e.add_argument("--top-k", type=int, default=s, help="labels kept per image (5)")
    e.add_argument("--max-pixels", type=int, default=s, help="refuse images larger than this (decompression-bomb guard)")
    e.add_argument("--shard-size", type=int, default=s,
                   help="inputs per shard = per output file (20000); fixed by the first run's saved listing")
    e.add_argument("--retry-errors", action="store_true", default=s,
                   help="redo the shards whose files hold error rows (replaced atomically)")
    e.add_argument("--labelset-cache", default=s, help="label-set embedding cache folder (~/.cache/bifta/labelsets)")
    e.add_argument("--no-labelset-cache", dest="labelset_cache", action="store_const", const="", default=s)
    e.add_argument("--labelset-artifact", dest="labelset_artifacts", action="append", default=s,
                   help="prebuilt label set from `bifta labelset build` (repeatable)")
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
    s3 = parser.add_argument_group("S3 (default: the standard AWS environment; credentials only from there)")
    s3.add_argument("--s3-endpoint-url", default=s, help="S3-compatible endpoint, e.g. http://minio:9000")
    s3.add_argument("--s3-region", default=s, help="S3 region")
    s3.add_argument("--s3-anon", action="store_true", default=s, help="unsigned requests (public buckets)")


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
        if key in _MODEL_FIELDS:
            model["cache_dir" if key == "model_cache_dir" else key] = value
        else:
            data[key] = value
    if model:
        data["model"] = model
    return LabelConfig.from_dict(data)


def format_summary(summary: dict[str, Any]) -> str:
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
        lines.append(f"  embeddings    {summary['embeddings']} (bifta relabel {summary['out']} --labels NEW --out OUT2)")
    if summary["error_reasons"]:
        lines.append("  error reasons " + "; ".join(f"{k} ×{v}" for k, v in summary["error_reasons"].items()))
    if summary.get("random_weights"):
        lines.append("  WARNING       random weights: these labels are meaningless")
    return "\n".join(lines)


def _progress(info: dict) -> None:
    done, total = info["done"], info["total"]
    rate = done / info["elapsed_s"] if info["elapsed_s"] else 0.0
    eta = (total - done) / rate if rate else float("nan")
    print(f"[bifta] {done}/{total} images ({100 * done / total:.0f}%), {info['errors']} errors, "
          f"{rate:.2f} img/s, eta {eta:.0f}s", file=sys.stderr, flush=True)


def configure_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bifta").setLevel(logging.WARNING if quiet else logging.INFO)


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags; raises :class:`BiftaUserError` for user mistakes."""
    from pipelines.pipeline import run_label_job

    config = config_from_args(args)
    summary = run_label_job(config, on_progress=None if args.quiet else _progress)
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.label``: the same as ``bifta label``."""
    from jobs.cli import main as cli_main

    return cli_main(["label", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
