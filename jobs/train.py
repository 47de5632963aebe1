"""``bifta train`` / ``python -m jobs.train`` — CLIP / CLIP-PGS contrastive training on Ray Train.

Trains or fine-tunes any open_clip ViT on (image, caption) manifests with CLIP-PGS patch masking
(``--pgs-mask 0.5``; 0 = plain CLIP), with an embedded local Ray or on the cluster in
``RAY_ADDRESS`` (``ray job submit`` sets it)::

    python -m jobs.train --data captions.parquet --out runs/ft1 --model ViT-B-16 --pretrained openai \\
        --pgs-mask 0.5 --steps 2000 --batch-size 128 --num-workers 4 --use-gpu

Checkpoints are open_clip state dicts: ``bifta label --model ViT-B-16 --pretrained runs/ft1/model.pt``.
Flags override ``--config FILE`` (YAML/JSON, same names with underscores). A user mistake prints
one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bifta_core.config import parse_scale
from bifta_core.errors import ConfigError
from bifta_core.method.training import TrainConfig


def _scale_arg(value: str) -> tuple[float, float]:
    try:
        return parse_scale(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--data", action="append", default=s, metavar="MANIFEST",
                        help="manifest .parquet/.csv (local or s3://) with uri (or image bytes) and caption columns; "
                             "repeatable")
    parser.add_argument("--out", default=s, help="checkpoints, metrics and summary (local folder or s3://)")
    parser.add_argument("--config", default=None, help="YAML/JSON config file; flags override it")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=s, help="open_clip architecture (default ViT-B-16, as in the paper)")
    m.add_argument("--pretrained", default=s,
                   help="start from an open_clip tag, a checkpoint PATH or s3:// URI, or random/scratch (default)")
    m.add_argument("--pgs-mask", type=float, default=s,
                   help="CLIP-PGS masking ratio of ViT patch tokens, e.g. 0.3 or 0.5 (default 0.5); 0 = plain CLIP")
    o = parser.add_argument_group("optimisation (defaults: open_clip / CLIP-PGS)")
    o.add_argument("--steps", type=int, default=s, help="optimiser steps (default: --epochs worth)")
    o.add_argument("--epochs", type=int, default=s, help="passes over the data (default 1)")
    o.add_argument("--batch-size", type=int, default=s, help="images per worker per micro-step (64)")
    o.add_argument("--accum-steps", type=int, default=s,
                   help="micro-steps per optimiser step; the loss sees the whole accumulated batch (1)")
    o.add_argument("--lr", type=float, default=s, help="peak learning rate (5e-4)")
    o.add_argument("--weight-decay", type=float, default=s, help="AdamW weight decay on weight matrices (0.2)")
    o.add_argument("--beta1", type=float, default=s, help="AdamW beta1 (0.9)")
    o.add_argument("--beta2", type=float, default=s, help="AdamW beta2 (0.98)")
    o.add_argument("--eps", type=float, default=s, help="AdamW epsilon (1e-6)")
    o.add_argument("--warmup", type=int, default=s, help="linear warm-up steps (default min(10000, 10%% of steps))")
    o.add_argument("--grad-clip-norm", type=float, default=s, help="clip the gradient norm (off)")
    o.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=s,
                   help="auto: fp32 on CPU, fp16 autocast with grad scaling on CUDA")
    o.add_argument("--aug-scale", type=_scale_arg, default=s, help="RandomResizedCrop area range A,B (0.9,1.0)")
    o.add_argument("--seed", type=int, default=s, help="global seed (data order, crops, PGS patches) (0)")
    e = parser.add_argument_group("execution")
    e.add_argument("--num-workers", type=int, default=s, help="Ray Train workers (DDP ranks); one per GPU (1)")
    e.add_argument("--use-gpu", action="store_true", default=s, help="one GPU per worker, NCCL")
    e.add_argument("--cpus-per-worker", type=int, default=s, help="CPUs (torch threads) per worker (1)")
    e.add_argument("--data-cpus", type=float, default=s, help="CPUs per decode/augment task (1)")
    e.add_argument("--checkpoint-every", type=int, default=s, help="checkpoint every N steps, and at the end (1000)")
    e.add_argument("--resume", action="store_true", default=s, help="continue the run in --out from its latest checkpoint")
    e.add_argument("--caption-column", default=s, help="manifest caption column (caption)")
    e.add_argument("--uri-column", default=s, help="manifest image URI column (uri)")
    e.add_argument("--image-column", default=s, help="manifest image-bytes column, when there is no URI column (image)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    s3 = parser.add_argument_group("S3 (default: the standard AWS environment; credentials only from there)")
    s3.add_argument("--s3-endpoint-url", default=s, help="S3-compatible endpoint, e.g. http://minio:9000")
    s3.add_argument("--s3-region", default=s, help="S3 region")
    s3.add_argument("--s3-anon", action="store_true", default=s, help="unsigned requests (public buckets)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Config file (if any) overlaid with the flags that were given."""
    base = TrainConfig.from_file(args.config) if getattr(args, "config", None) else TrainConfig()
    data = base.to_dict()
    data.update({k: v for k, v in vars(args).items() if k not in ("config", "quiet", "verbose", "command", "func")})
    return TrainConfig.from_dict(data)


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join([
        "",
        "bifta train — summary",
        f"  output        {summary['out']}",
        f"  model         {summary['model']} from {summary['pretrained']}, CLIP-PGS mask {summary['pgs_mask']}",
        f"  steps         {summary['steps']} of {summary['total_steps']} (resumed from {summary['resumed_from_step']}), "
        f"global batch {summary['global_batch']} on {summary['num_workers']} worker(s)",
        f"  loss          {summary['first_loss']} → {summary['final_loss']}, logit scale {summary['final_logit_scale']:.2f}",
        f"  throughput    {summary['images_per_s']} images/s over {summary['seconds']} s",
        f"  final model   {summary['final_model']}",
    ])


def run(args: argparse.Namespace) -> int:
    """Run from parsed flags; raises :class:`BiftaUserError` for user mistakes."""
    from pipelines.train import run_train_job

    summary = run_train_job(config_from_args(args))
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.train``: the same as ``bifta train``."""
    from jobs.common import main as cli_main

    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
