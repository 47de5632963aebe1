"""``bifta demo`` / ``python -m jobs.demo`` — the README's first command.

Labels ten photos that ship inside scikit-image (astronaut, cat, coffee, rocket…) against the
bundled example label set ``jobs/examples/labelset`` with BiFTA and the default real weights
(ViT-B-32, ``openai``), on an embedded local Ray, and prints the summary and each prediction.

Where no model hub is reachable and the weights are not cached (as on air-gapped machines), the
demo — and only the demo — falls back to ``--pretrained random`` behind a banner saying the labels
are meaningless; ``bifta label`` itself never falls back.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from bifta_core.errors import ModelLoadError
from bifta_core.validation import integer

EXAMPLE_LABELSET = Path(__file__).parent / "examples" / "labelset"
#: scikit-image sample -> true class in the example label set
EXAMPLE_PHOTOS = {
    "astronaut": "astronaut",
    "chelsea": "tabby cat",
    "coffee": "cup of coffee",
    "rocket": "rocket",
    "stereo_motorcycle": "motorcycle",
    "hubble_deep_field": "galaxy",
    "camera": "photographer",
    "coins": "coins",
    "clock": "wall clock",
    "retina": "retina",
}

RANDOM_BANNER = """
!!! ----------------------------------------------------------------------------------- !!!
!!!  No model hub is reachable and '{pretrained}' weights for {model} are not cached.
!!!  The demo runs with RANDOM weights instead: the pipeline is real, the labels are
!!!  MEANINGLESS. Download a checkpoint and pass --pretrained PATH for real labels.
!!! ----------------------------------------------------------------------------------- !!!
"""


def write_example_images(folder: Path) -> Path:
    """Save the scikit-image photos as JPEGs plus a manifest ``image_id,uri,label``; returns the manifest."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "uri", "label"])
        for name, label in EXAMPLE_PHOTOS.items():
            pixels = getattr(skimage.data, name)()
            if isinstance(pixels, tuple):  # stereo pairs: keep the left view
                pixels = pixels[0]
            image = Image.fromarray(np.asarray(pixels)).convert("RGB")
            path = folder / f"{name}.jpg"
            image.save(path, quality=95)
            writer.writerow([name, path.name, label])
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bifta-demo-out", help="output folder")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--pretrained", default="openai", help="weights: tag, checkpoint path/URI, or random")
    parser.add_argument("--method", default="bifta", help="scoring method")
    parser.add_argument("--num-views", type=int, default=None, help="views per image (default: the method's preset)")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"label only the first N of the {len(EXAMPLE_PHOTOS)} photos")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _weights_available(model: str, pretrained: str) -> bool:
    from bifta_core.io.models import load_model

    try:
        load_model(model, pretrained, device="cpu")
        return True
    except ModelLoadError as exc:
        if "unreachable" in str(exc) or "download failed" in str(exc):
            return False
        raise


def run(args: argparse.Namespace) -> int:
    import polars as pl

    from bifta_core.config import LabelConfig, ModelConfig
    from jobs.common import format_label_summary, print_progress
    from pipelines.pipeline import run_label_job

    # Optional so a Namespace built by a caller without them (the Python API) still works.
    num_views, limit = getattr(args, "num_views", None), getattr(args, "limit", None)
    for flag, value in (("--num-views", num_views), ("--limit", limit)):
        integer(flag, value, optional=True)
    out = Path(args.out).resolve()
    manifest = write_example_images(out / "images")
    pretrained = args.pretrained
    if pretrained != "random" and not _weights_available(args.model, pretrained):
        print(RANDOM_BANNER.format(pretrained=pretrained, model=args.model), file=sys.stderr)
        pretrained = "random"
    config = LabelConfig(
        input=str(manifest),
        labels=[f"example={EXAMPLE_LABELSET}"],
        out=str(out / "predictions"),
        method=args.method,
        model=ModelConfig(model=args.model, pretrained=pretrained),
        num_views=num_views,
        limit=limit,
    )
    summary = run_label_job(config, on_progress=None if args.quiet else print_progress)
    print(format_label_summary(summary))
    table = (
        pl.read_parquet(os.path.join(config.out, "*.parquet"))
        .select("image_id", "true_label", "label", "score", "margin")
        .sort("image_id")
    )
    with pl.Config(tbl_rows=20, tbl_hide_dataframe_shape=True, fmt_str_lengths=40):
        print(table)
    if pretrained == "random":
        print("(random weights: the labels above are meaningless)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.common import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
