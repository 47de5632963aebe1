"""``bifta evaluate`` / ``python -m jobs.evaluate`` — every method's accuracy from one encoding pass.

    python -m jobs.evaluate labels.csv --label-column class_name \\
        --labels ../shared/descriptions/imagenet --out eval/ --save-embeddings

INPUT is a manifest (.csv/.parquet with ``uri``/``path`` and a label column) or a folder with one
sub-folder per class. Each image's whole view and the views of each preset the rows need are
encoded once; CLIP, CLIP-E, CLIP-D, CuPL, WCA and BiFTA (and their refinement/aggregation variants)
are all scored from those embeddings: ``wca*`` rows on WCA's views (scale 0.1–0.9, 60 views, no IoU
refinement) and ``bifta*`` rows on BiFTA's (scale 0.5–0.9, 100 views, IoU 0.85), each sampled and
encoded exactly as ``bifta label --method wca|bifta`` does. The view flags override both presets,
as each would override it in ``bifta label``. ``--from-embeddings DIR`` re-scores saved embeddings
without encoding. A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError
from bifta_core.evaluation.metrics import method_names
from bifta_core.method.presets import PRESETS
from jobs.common import MODEL_FIELDS, add_model_arguments

logger = logging.getLogger("bifta.evaluate")

#: LabelConfig fields evaluate takes from flags (the rest keep their defaults).
_CONFIG_FIELDS = {
    "num_views", "max_views", "iou_threshold", "scale", "seed", "desc_threshold", "desc_top_k", "image_scale",
    "text_scale", "merge_duplicate_classes", "pgs_keep", "pgs_whole_image", "batch_size", "view_batch_size",
    "num_encoders", "gpus", "num_decoders", "shard_size", "limit", "max_pixels", "labelset_cache",
    "preset", "grid", "waffle_words",
}
#: Flags that fix the image embeddings: with --from-embeddings they must match the saved ones.
_VIEW_FLAGS = ("num_views", "max_views", "iou_threshold", "scale", "seed", "pgs_keep", "pgs_whole_image", "preset", "grid")

_EPILOG = (
    "Views: wca* rows are scored on WCA's views (scale 0.1-0.9, 60 views, no IoU refinement), bifta* rows on "
    "BiFTA's (scale 0.5-0.9, 100 views, IoU 0.85, max 100); both are sampled and encoded in the one pass, "
    "seeded from (--seed, image id) exactly as `bifta label --method wca|bifta` samples them. The view flags "
    "(--num-views, --max-views, --iou-threshold, --scale) override BOTH presets, the way each overrides it in "
    "`bifta label` (so evaluate's wca/bifta rows predict what `bifta label --method wca|bifta` with the same "
    "flags predicts). The bifta-unrefined-views rows use BiFTA's views without IoU refinement."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("input", nargs="?", default=None,
                        help="manifest .csv/.parquet with a label column, or a folder with one sub-folder per class")
    parser.add_argument("--labels", required=True, metavar="[NAME=]LABELSET",
                        help="label-set folder (classes.json, cupl.json, clip-d.json, clip-e.json …)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--label-column", default="label", help="manifest column holding the ground-truth class")
    parser.add_argument("--methods", "--method", dest="methods", action="append", default=None, metavar="ROWS",
                        help="rows to score, comma-separated and/or repeated (--method is the same flag; "
                             "default all: " + ", ".join(method_names()) + ")")
    add_model_arguments(parser)
    parser.epilog = _EPILOG
    e = parser.add_argument_group("evaluation")
    e.add_argument("--protocol-runs", type=int, default=None, help="WCA protocol: runs of random view subsets")
    e.add_argument("--protocol-views", type=int, default=None, help="WCA protocol: views drawn per image and run")
    e.add_argument("--save-embeddings", action="store_true", help="keep OUT/embeddings/ (one Parquet file per shard) for re-scoring")
    e.add_argument("--from-embeddings", default=None, metavar="DIR",
                   help="re-score embeddings saved by an earlier --save-embeddings run (no image is encoded)")
    e.add_argument("--logit-scale", type=float, default=100.0, help="confidence = softmax(logit scale × score)")
    e.add_argument("--bins", type=int, default=10, help="confidence bins of the reliability curve")
    e.add_argument("--cascade-first", default=None, metavar="ROW",
                   help="first stage of the cascade curve (cascade.parquet): a whole-image row (default cupl)")
    e.add_argument("--cascade-method", default=None, metavar="ROW",
                   help="final method of the cascade curve: a row scored on views (default bifta)")
    x = parser.add_argument_group("execution")
    x.add_argument("--batch-size", type=int, default=s, help="images per encode batch (8)")
    x.add_argument("--view-batch-size", type=int, default=s, help="crops per encoder forward pass (256)")
    x.add_argument("--num-encoders", type=int, default=s,
                   help="encode actors (default: --gpus, else one per GPU up now, else 1)")
    x.add_argument("--gpus", type=int, default=s, help="GPU encode actors to ask the cluster for")
    x.add_argument("--num-decoders", type=int, default=s, help="most decode+views tasks at once (default: free CPUs)")
    x.add_argument("--shard-size", type=int, default=s, help="images per embeddings file (20000)")
    x.add_argument("--limit", type=int, default=s, help="evaluate only the first N inputs")
    x.add_argument("--max-pixels", type=int, default=s, help="refuse images larger than this")
    x.add_argument("--labelset-cache", default=s, help="label-set embedding cache folder (the labelsets folder of the cache root, $BIFTA_CACHE_DIR)")
    x.add_argument("--no-labelset-cache", dest="labelset_cache", action="store_const", const="", default=s)
    x.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    """The shared model/view/description settings as a :class:`LabelConfig`."""
    given = vars(args)
    data: dict[str, Any] = {k: v for k, v in given.items() if k in _CONFIG_FIELDS}
    model = {("cache_dir" if k == "model_cache_dir" else k): v for k, v in given.items() if k in MODEL_FIELDS}
    if "refine_descriptions" in given or "aggregation" in given:
        logger.warning("evaluate scores refined and unrefined descriptions and both aggregations; "
                       "--refine-descriptions/--aggregation are ignored")
    data.update(
        input=args.input or args.from_embeddings or "",
        labels=[args.labels],
        out=args.out,
        method=None,  # only resolves view presets (the --preset's method, else bifta); evaluate scores all
        model=model,
    )
    return LabelConfig.from_dict(data)


def _check_saved(config: LabelConfig, args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Adopt the saved embeddings' model; refuse flags that contradict how they were made."""
    from bifta_core.io.models import model_identity

    given = vars(args)
    saved_model, saved_pretrained = meta.get("model"), meta.get("pretrained")
    asked_model = config.model.model.replace("/", "-")
    if ("model" in given and asked_model != saved_model) or ("pretrained" in given and config.model.pretrained != saved_pretrained):
        raise ConfigError(
            f"--from-embeddings {args.from_embeddings} holds {saved_model} ({saved_pretrained}) embeddings; "
            f"this run asks for {asked_model} ({config.model.pretrained}) — the model must match"
        )
    config.model.model, config.model.pretrained = str(saved_model), str(saved_pretrained)
    if "seed" not in given and isinstance(meta.get("seed"), int):  # WaffleCLIP's texts are drawn from the run's seed
        config.seed = meta["seed"]
    if model_identity(config.model.model, config.model.pretrained, config.model.cache_dir) != meta.get("model_identity"):
        raise ConfigError(
            f"the weights {saved_pretrained} changed since the embeddings in {args.from_embeddings} were made; "
            "re-encode without --from-embeddings"
        )
    if any(f in given for f in _VIEW_FLAGS):
        import dataclasses

        from pipelines.evaluate_stages import view_presets

        # Embeddings saved before grid views existed hold random views without the generator fields.
        saved = {name: {"generator": "random", "grid": 3, **v, "scale": list(v.get("scale", []))}
                 for name, v in (meta.get("views") or {}).items()}
        asked = {name: dict(dataclasses.asdict(v), scale=list(v.scale))
                 for name, v in view_presets(config, list(saved)).items()}
        mismatch = saved != asked or config.seed != meta.get("seed") or config.pgs_keep != meta.get("pgs_keep") \
            or config.pgs_whole_image != meta.get("pgs_whole_image")
        if mismatch:
            shown = "; ".join(f"{k}: {v['num_views']} views, scale {tuple(v['scale'])}, IoU {v['iou_threshold']}, "
                              f"max {v['max_views']}" for k, v in saved.items()) or "no views"
            raise ConfigError(
                f"view settings are fixed by the saved embeddings ({shown}; seed {meta.get('seed')}); "
                "drop the view flags or re-encode without --from-embeddings"
            )


def parse_methods(values: list[str] | None) -> list[str] | None:
    """``--methods``/``--method`` values (repeated and/or comma-separated) → row names, or None for all."""
    if not values:
        return None
    names = [n.strip() for v in values for n in str(v).split(",")]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--methods/--method got no method name; pass e.g. --method wca --method bifta")
    return list(dict.fromkeys(names))


def options_from_args(args: argparse.Namespace):
    from pipelines.evaluate import EvaluateOptions

    methods = parse_methods(args.methods)
    release = PRESETS.get(getattr(args, "preset", None) or "")
    if release is not None:  # a released preset also fixes the released repeated-run protocol
        args.protocol_runs = release.protocol_runs if args.protocol_runs is None else args.protocol_runs
        args.protocol_views = release.protocol_views if args.protocol_views is None else args.protocol_views
    return EvaluateOptions(
        out=args.out,
        label_column=args.label_column,
        methods=methods,
        protocol_runs=args.protocol_runs,
        protocol_views=args.protocol_views,
        save_embeddings=args.save_embeddings,
        from_embeddings=args.from_embeddings,
        logit_scale=args.logit_scale,
        bins=args.bins,
        cascade_first=args.cascade_first,
        cascade_method=args.cascade_method,
    )


def format_metrics(summary: dict[str, Any], metrics_rows: list[dict[str, Any]]) -> str:
    """Compact end-of-run table."""
    lines = ["", f"bifta evaluate — {summary['images']} images, label set {summary['label_set']['name']} "
                 f"({summary['label_set']['classes']} classes), model {summary['model']} ({summary['pretrained']})"]
    protocol = summary.get("protocol")
    if protocol:
        lines.append(f"  protocol: {protocol['runs']} runs × {protocol['views']} views (mean ± std)")
    lines.append(f"  {'method':<28}{'top-1 %':>16}{'top-5 %':>16}")
    for r in metrics_rows:
        t1 = f"{100 * r['top1']:.2f}" + (f" ± {100 * r['top1_std']:.2f}" if "top1_std" in r else "")
        t5 = f"{100 * r['top5']:.2f}" + (f" ± {100 * r['top5_std']:.2f}" if "top5_std" in r else "")
        lines.append(f"  {r['method']:<28}{t1:>16}{t5:>16}")
    grouped: dict[str, list[str]] = {}
    for name, reason in summary.get("skipped", {}).items():
        grouped.setdefault(reason, []).append(name)
    for reason, names in grouped.items():
        lines.append(f"  skipped {', '.join(names)}: {reason}")
    cascade = summary.get("cascade")
    if cascade:
        for tol, row in cascade["recommended"].items():
            lines.append(f"  cascade {cascade['first']} → {cascade['final']}: T = {row['threshold']:.6g} keeps top-1 "
                         f"within {tol} ({100 * row['top1']:.2f}%) at {row['views_per_image']:.1f} views per image "
                         f"(--cascade-margin {row['threshold']:.6g})")
    if summary["errors"]:
        lines.append("  errors: " + "; ".join(f"{k} ×{v}" for k, v in summary["error_reasons"].items()))
    written = "metrics.parquet, per_class.parquet, predictions.parquet, " + ("cascade.parquet, " if cascade else "")
    lines.append(f"  written to {summary['out']} ({written}report.md)")
    if summary.get("random_weights"):
        lines.append("  WARNING random weights: these numbers are meaningless")
    return "\n".join(lines)


def _progress(info: dict) -> None:
    print(f"[bifta] {info['done']}/{info['total']} images encoded, {info['errors']} errors, "
          f"{info['elapsed_s']:.0f}s", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags; raises :class:`BiftaUserError` for user mistakes."""
    import polars as pl

    from pipelines.evaluate import read_embeddings_meta, run_evaluation

    if not args.input and not args.from_embeddings:
        raise ConfigError("no INPUT given (a manifest with a label column or a folder of class folders), "
                          "and no --from-embeddings")
    config = config_from_args(args)
    options = options_from_args(args)
    # Every flag is checked before a file is read or Ray starts.
    options.validate()
    config.validate()
    options.protocol(config.seed)
    for flag, value in (("--image-scale", config.image_scale), ("--text-scale", config.text_scale)):
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if args.from_embeddings:
        if args.input:
            logger.warning("INPUT %s is ignored: --from-embeddings re-scores the saved images", args.input)
        _check_saved(config, args, read_embeddings_meta(args.from_embeddings))
    summary = run_evaluation(config, options, on_progress=None if args.quiet else _progress)
    from bifta_core.io import storage

    with storage.open_input(storage.join(args.out, "metrics.parquet")) as fh:
        rows = pl.read_parquet(fh).to_dicts()
    print(format_metrics(summary, rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.evaluate``: the same as ``bifta evaluate``."""
    from jobs.common import main as cli_main

    return cli_main(["evaluate", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
