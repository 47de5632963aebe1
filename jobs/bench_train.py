"""``python -m jobs.bench pgs-train`` — CLIP-PGS training-step throughput at mask 0.5 vs plain CLIP.

Times :meth:`bifta_core.method.training.Trainer.train_step` (CLIP-PGS selection, forward, contrastive loss,
backward, AdamW step: everything a Ray Train worker does per step except receiving data) on one
model and one batch, at ``--pgs-mask`` 0 and 0.5, interleaved round by round so machine noise hits
both alike; images/s is the median round. Target: ≥ 1.6× at 0.5 (the paper reports roughly 2× less
image-tower compute at 50 % masking; the text tower and optimiser step are not masked, which caps
the whole-step gain). Default ViT-B-16 at 224 px, the paper's model: its image tower dominates the
step, as in the paper; a model whose text tower costs as much as its image tower cannot reach 1.6×.
Default batch 24: on CPU, a ViT-B layer has a per-call cost that does not shrink with the sequence
(at batch 8, 50 tokens cost as much as 99), so small batches understate what masking saves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch

from bifta_core.errors import ConfigError
from bifta_core.validation import integer

PGS_TRAIN_TARGET = 1.6
PGS_TRAIN_MASKS = (0.0, 0.5)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """``uint8 [n, 3, size, size]`` images with structure (gradients + shapes), so CLIP-PGS selects
    among real edges and flat regions rather than noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, size=(1, 1, 3))
        img = Image.fromarray(np.broadcast_to(base, (size, size, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, size=2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 2, size=2))
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in rng.integers(0, 255, size=3)))
        out.append(np.asarray(img).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def add_pgs_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip ViT (default ViT-B-16, the paper's)")
    p.add_argument("--pretrained", default="random", help="weights (random measures speed just as well)")
    p.add_argument("--batch-size", type=int, default=24,
                   help="images per training step (24: on CPU, smaller batches are dominated by per-call "
                        "overheads that masking does not shrink)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per setting (median)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda …")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)


def run_pgs_train(args: argparse.Namespace) -> int:
    from bifta_core.io.models import is_vit_architecture, load_model
    from bifta_core.method.training import TrainConfig, Trainer

    for name in ("batch_size", "repeats"):
        integer(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2 (a contrastive loss needs negatives)")
    if not is_vit_architecture(args.model):
        raise ConfigError(f"--model {args.model} has no ViT image tower; CLIP-PGS needs one")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cm = load_model(args.model, args.pretrained, device=args.device, precision=args.precision)
    device = cm.device
    pixels = _images(args.batch_size, cm.image_size, args.seed)
    tokens = cm.tokenizer([f"a photo of object number {i} on a plain background." for i in range(args.batch_size)])
    base = copy.deepcopy(cm.model).cpu()

    trainers = {}
    for mask in PGS_TRAIN_MASKS:
        cfg = TrainConfig(data=["-"], out="-", model=args.model, pgs_mask=mask, steps=10_000, warmup=1,
                          batch_size=args.batch_size, precision=args.precision, seed=args.seed)
        trainers[mask] = Trainer(copy.deepcopy(base), cfg, 10_000, mean=cm.mean, std=cm.std, device=device)
        trainers[mask].train_step([(pixels, tokens)])  # warm-up: allocator, kernel choice, optimiser state
    rounds: dict[float, list[float]] = {m: [] for m in PGS_TRAIN_MASKS}
    cpu_rounds: dict[float, list[float]] = {m: [] for m in PGS_TRAIN_MASKS}
    kept: dict[float, int] = {}
    for _ in range(args.repeats):
        for mask in PGS_TRAIN_MASKS:  # interleaved: drifting machine load hits both settings alike
            start, cpu_start = time.perf_counter(), time.process_time()
            result = trainers[mask].train_step([(pixels, tokens)])  # syncs the GPU before returning
            rounds[mask].append(time.perf_counter() - start)
            cpu_rounds[mask].append(time.process_time() - cpu_start)
            kept[mask] = result.kept_tokens

    ips = {m: args.batch_size / statistics.median(rounds[m]) for m in PGS_TRAIN_MASKS}
    speedup = ips[0.5] / ips[0.0]
    # CPU seconds of this process: on a shared machine, less disturbed by other processes than the
    # wall clock (for information; the verdict uses wall-clock throughput)
    cpu_speedup = statistics.median(cpu_rounds[0.0]) / statistics.median(cpu_rounds[0.5])
    print(f"bench pgs-train: {args.model} ({args.pretrained}), batch {args.batch_size}, {device}, "
          f"precision {trainers[0.5].precision}, {args.repeats} timed steps per setting")
    for m in PGS_TRAIN_MASKS:
        print(f"  mask {m:.1f}: {kept[m]:4d} patch tokens kept, {ips[m]:8.2f} images/s "
              f"(median step {statistics.median(rounds[m]):.3f} s)")
    print(f"  speed-up at mask 0.5: {speedup:.2f}x (target >= {PGS_TRAIN_TARGET}x); "
          f"in process CPU time {cpu_speedup:.2f}x")
    ok = speedup >= PGS_TRAIN_TARGET
    print(json.dumps({"benchmark": "pgs-train", "model": args.model, "batch_size": args.batch_size,
                      "device": str(device), "images_per_s_mask_0.0": round(ips[0.0], 3),
                      "images_per_s_mask_0.5": round(ips[0.5], 3), "kept_tokens_mask_0.0": kept[0.0],
                      "kept_tokens_mask_0.5": kept[0.5], "speedup_mask_0.5": round(speedup, 4),
                      "cpu_time_speedup_mask_0.5": round(cpu_speedup, 4),
                      "target_speedup_mask_0.5": PGS_TRAIN_TARGET, "ok": ok}))
    return 0 if ok else 1
