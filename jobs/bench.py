"""``python -m jobs.bench {pipeline,pgs,scaling}`` — benchmarks that print figures and fail on a miss.

Each benchmark measures its ratios within one run (machines are noisy), prints human-readable
figures, ends with one JSON line, and exits 1 when its target is missed. They are jobs like any
other: submit them to a cluster to size it.

- ``pipeline``: full labelling pipeline images/s vs the bare encoder's images/s for the same model
  and views per image. Target: ratio ≥ 0.85.
- ``pgs``: view-encode throughput at CLIP-PGS keep 1.0 / 0.7 / 0.5 on one model, top-1 agreement
  with the unmasked run on real photos, and PGS vs random token dropping. Target: ≥ 1.6× at 0.5.
- ``scaling``: see ``jobs.bench_scaling``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PIPELINE_TARGET = 0.85
PGS_SPEEDUP_TARGET = 1.6


# ----------------------------------------------------------------------------------- pipeline
def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-sized JPEGs with structure (gradients + shapes), so decode and crops cost what they do."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, size=(1, 1, 3))
        img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse((x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))),
                         fill=tuple(int(c) for c in rng.integers(0, 255, size=3)))
        img.save(folder / f"img_{i:05d}.jpg", quality=90)


def bare_encoder_images_per_second(model, views_per_image: int, images: int, view_batch_size: int) -> float:
    """Images/s of the model alone: one whole image + ``views_per_image`` crops per image, in batches."""
    s = model.image_size
    total = images * (views_per_image + 1)
    pixels = model.normalize_pixels(torch.randint(0, 256, (min(total, view_batch_size), 3, s, s), dtype=torch.uint8))
    model.encode_images(pixels[:2])  # warm-up
    start = time.perf_counter()
    done = 0
    while done < total:
        n = min(view_batch_size, total - done)
        model.encode_images(pixels[:n])
        done += n
    return images / (time.perf_counter() - start)


class _BareEncoder:
    """The model alone, in the same kind of process the pipeline's encode actor runs in."""

    def __init__(self, model_name: str, pretrained: str, threads: int | None) -> None:
        from bifta_core.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_name, pretrained)

    def measure(self, views_per_image: int, images: int, view_batch_size: int) -> float:
        return bare_encoder_images_per_second(self.model, views_per_image, images, view_batch_size)


def run_pipeline_bench(args: argparse.Namespace) -> int:
    from bifta_core.config import LabelConfig, ModelConfig
    from pipelines.encode import default_torch_threads
    from pipelines.pipeline import run_label_job

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bifta-bench-"))
    images_dir = work / "images"
    _write_images(images_dir, args.images)
    config = LabelConfig(
        input=str(images_dir), labels=[args.labels], out=str(work / f"out-{time.time_ns()}"), method="bifta",
        model=ModelConfig(model=args.model, pretrained=args.pretrained),
        num_views=args.num_views, max_views=args.num_views, iou_threshold=1.0,  # keep every view: fixed work
        batch_size=args.batch_size, view_batch_size=args.view_batch_size, labelset_cache=str(work / "cache"),
        explain=False,
    )
    # The bare encoder runs in a Ray actor with the encode actor's resources and threads, once before
    # and once after the pipeline, so both see the same machine and load.
    import ray

    from pipelines.pipeline import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=1)
    threads = None if gpus else default_torch_threads()
    bare_images = max(4, args.images // 2)

    def measure_bare() -> float:
        # A fresh actor each time: while it lives it holds the resources the pipeline's encoder needs.
        actor = ray.remote(**resources)(_BareEncoder).remote(args.model, args.pretrained, threads)
        try:
            return ray.get(actor.measure.remote(args.num_views, bare_images, args.view_batch_size))
        finally:
            ray.kill(actor)

    bare_runs = [measure_bare()]
    summary = run_label_job(config)
    bare_runs.append(measure_bare())
    pipeline_ips = summary["steady_images_per_second"] or summary["images_per_second"]
    bare_ips = statistics.mean(bare_runs)
    ratio = pipeline_ips / bare_ips if bare_ips else 0.0
    print(f"model {args.model} ({args.pretrained}) on {summary['gpus']} GPU(s); {args.num_views} views/image")
    print(f"pipeline   {pipeline_ips:.3f} images/s  (steady state; {summary['images_per_second']:.3f} incl. start-up)")
    print(f"bare       {bare_ips:.3f} images/s  (encoder alone, same views/image; runs: "
          f"{', '.join(f'{r:.3f}' for r in bare_runs)})")
    print(f"ratio      {ratio:.3f}  (target >= {PIPELINE_TARGET})")
    result = {"benchmark": "pipeline", "pipeline_images_per_s": round(pipeline_ips, 4),
              "bare_encoder_images_per_s": round(bare_ips, 4), "ratio": round(ratio, 4),
              "target": PIPELINE_TARGET, "images": args.images, "views_per_image": args.num_views,
              "model": args.model, "ok": ratio >= PIPELINE_TARGET}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------------- pgs
def _sample_views(paths: list[str], model, views: int, seed: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """BiFTA-preset views (and whole images) of real photos, normalised, as one flat batch."""
    from bifta_core.images import boxes_to_working, decode_image, whole_image_pixels, working_min_side
    from bifta_core.seeding import generator_for
    from bifta_core.views import VIEW_PRESETS, crop_resize_tensor, refine_boxes, sample_boxes

    preset = VIEW_PRESETS["bifta"]
    crops, counts, wholes = [], [], []
    for p in paths:
        data = Path(p).read_bytes()
        img = decode_image(data, max_pixels=10**9, min_side=working_min_side(model.image_size, preset.scale[0]))
        boxes = sample_boxes(img.width, img.height, views, preset.scale, generator_for(seed, p))
        boxes = boxes[refine_boxes(boxes, preset.iou_threshold, views)]
        pix = torch.from_numpy(img.pixels).permute(2, 0, 1)
        crops.append(crop_resize_tensor(pix, boxes_to_working(boxes, img), model.image_size))
        counts.append(int(boxes.shape[0]))
        wholes.append(whole_image_pixels(img.pixels, model.image_size))
    return model.normalize_pixels(torch.cat(crops)), counts, model.normalize_pixels(torch.stack(wholes))


def _encode(model, pixels: torch.Tensor, keep: torch.Tensor | None, batch: int) -> torch.Tensor:
    return torch.cat([model.encode_images(pixels[s:s + batch], None if keep is None else keep[s:s + batch])
                      for s in range(0, pixels.shape[0], batch)])


def _select(model, pixels, keep_ratio, seed, random_drop=False) -> torch.Tensor | None:
    from bifta_core.pgs import PgsConfig, patch_size_of, random_patches, select_patches

    if keep_ratio >= 1.0:
        return None
    g = torch.Generator().manual_seed(seed)
    if random_drop:
        grid = model.image_size // patch_size_of(model.model)
        return random_patches(pixels.shape[0], grid * grid, keep_ratio, g)
    return select_patches(pixels, model.mean, model.std, patch_size_of(model.model), PgsConfig(keep_ratio=keep_ratio), g)


def run_pgs_bench(args: argparse.Namespace) -> int:
    from bifta_core.errors import BiftaUserError
    from bifta_core.labelsets import load_label_set
    from bifta_core.models import load_model
    from bifta_core.scoring import wca_scores

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_model(args.model, args.pretrained)
    photos_dir = Path(args.photos)
    if not photos_dir.is_dir():
        raise BiftaUserError(f"photo folder not found: {photos_dir} (--photos)")
    paths = sorted(str(p) for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.images]
    if not paths:
        raise BiftaUserError(f"no photos in {photos_dir}")
    views, counts, wholes = _sample_views(paths, model, args.num_views, args.seed)
    mask = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, n in enumerate(counts):
        mask[i, :n] = True

    # Class prompts as the description set keep text encoding cheap on CPU; the view side is exact WCA.
    label_set = load_label_set(args.labels)
    class_emb = model.encode_text(label_set.class_prompts())
    desc_class = torch.arange(class_emb.shape[0])
    image_emb = _encode(model, wholes, None, args.view_batch_size)

    def predictions(view_flat: torch.Tensor) -> torch.Tensor:
        ve = torch.zeros(len(counts), max(counts), view_flat.shape[1])
        start = 0
        for i, n in enumerate(counts):
            ve[i, :n] = view_flat[start:start + n]
            start += n
        return wca_scores(ve, mask, image_emb, class_emb, desc_class, class_emb).argmax(dim=1)

    timing_batch = views[: args.view_batch_size]
    results: dict[str, float] = {}
    reference = None
    times = {}
    for keep in (1.0, 0.7, 0.5):
        rounds = []
        for r in range(args.repeats):
            start = time.perf_counter()
            k = _select(model, timing_batch, keep, args.seed + r)  # selection cost is part of the encode
            _encode(model, timing_batch, k, args.view_batch_size)
            rounds.append(time.perf_counter() - start)
        times[keep] = statistics.median(rounds)
        pred = predictions(_encode(model, views, _select(model, views, keep, args.seed), args.view_batch_size))
        if reference is None:
            reference = pred
        results[f"agreement_keep_{keep}"] = float((pred == reference).float().mean())
        results[f"views_per_s_keep_{keep}"] = timing_batch.shape[0] / times[keep]
    rand = predictions(_encode(model, views, _select(model, views, 0.5, args.seed, random_drop=True), args.view_batch_size))
    results["agreement_random_keep_0.5"] = float((rand == reference).float().mean())
    for keep in (0.7, 0.5):
        results[f"speedup_keep_{keep}"] = times[1.0] / times[keep]

    print(f"model {args.model} ({args.pretrained}); {len(paths)} photos, {views.shape[0]} views; "
          f"timing batch {timing_batch.shape[0]} views, median of {args.repeats}")
    for keep in (1.0, 0.7, 0.5):
        print(f"keep {keep:.1f}: {results[f'views_per_s_keep_{keep}']:8.1f} views/s  "
              f"speed-up {times[1.0] / times[keep]:.2f}x  top-1 agreement {results[f'agreement_keep_{keep}']:.3f}")
    print(f"random dropping at keep 0.5: top-1 agreement {results['agreement_random_keep_0.5']:.3f} "
          f"(PGS {results['agreement_keep_0.5']:.3f})")
    if model.is_random:
        print("note: random weights — agreement figures exercise the code path, they say nothing about accuracy")
    ok = results["speedup_keep_0.5"] >= PGS_SPEEDUP_TARGET
    print(json.dumps({"benchmark": "pgs", **{k: round(v, 4) for k, v in results.items()},
                      "target_speedup_keep_0.5": PGS_SPEEDUP_TARGET, "model": args.model, "ok": ok}))
    return 0 if ok else 1


# ----------------------------------------------------------------------------------- CLI
def _shared_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    p = sub.add_parser("pipeline", help="full pipeline vs bare encoder images/s (target ratio >= 0.85)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="random", help="weights (random measures speed just as well)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--num-views", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--view-batch-size", type=int, default=128)
    p.add_argument("--labels", default="cat,dog,car,tree,house,person,boat,bird")
    p.add_argument("--workdir", default=None)
    p.set_defaults(bench_func=run_pipeline_bench)

    g = sub.add_parser("pgs", help="CLIP-PGS view-encode speed-up and agreement (target >= 1.6x at keep 0.5)")
    g.add_argument("--model", default="ViT-B-32")
    g.add_argument("--pretrained", default="random")
    g.add_argument("--photos", default=str(_shared_dir() / "datasets" / "imagenet-sample" / "images"))
    g.add_argument("--labels", default=str(_shared_dir() / "descriptions" / "imagenet"))
    g.add_argument("--images", type=int, default=16)
    g.add_argument("--num-views", type=int, default=16)
    g.add_argument("--view-batch-size", type=int, default=64)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(bench_func=run_pgs_bench)

    try:
        from jobs.bench_scaling import add_scaling_arguments, run_scaling
    except ModuleNotFoundError:
        return
    s = sub.add_parser("scaling", help="throughput and driver memory at N vs 10N images")
    add_scaling_arguments(s)
    s.set_defaults(bench_func=run_scaling)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_func(args))


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["bench", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
