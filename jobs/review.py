"""``bifta review`` / ``python -m jobs.review`` — one static HTML page to look at the labels.

    bifta review preds/ --max-items 300 --html review.html

Reads the prediction folder lazily (local or s3://), picks a review queue (lowest margin first,
then error rows) and a sample per predicted class (:mod:`bifta_core.review.page`), makes ≤ 256 px
thumbnails — on Ray workers when there are many — and writes one self-contained page that opens
from disk (no server, nothing fetched): thumbnails, top-k bars, margin, explanation, the
highest-weighted WCA/BiFTA views as boxes, and in-browser filters. Default location:
``OUT/_review/review.html``. A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl

from bifta_core.io import storage
from bifta_core.errors import ConfigError
from bifta_core.validation import integer
from bifta_core.review.page import Selection, Thumbnail, render_page, select_rows, thumbnail

REVIEW_DIR = "_review"
#: Above this many thumbnails they are made by Ray tasks (chunks of THUMBS_PER_TASK), else on local threads.
RAY_THUMBNAILS_ABOVE = 64
THUMBS_PER_TASK = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="prediction folder written by bifta label or relabel (local or s3://)")
    parser.add_argument("--html", default=None, metavar="PATH", help="where the page goes (OUT/_review/review.html)")
    parser.add_argument("--max-items", type=int, default=200, help="most rows on the page")
    parser.add_argument("--per-class", type=int, default=4, help="sampled rows per predicted class")
    parser.add_argument("--label-set", default=None, metavar="NAME", help="only this label set's rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class sample")
    parser.add_argument("--screenshot", default=None, metavar="PNG",
                        help="also render the page to a PNG with a headless Chromium (chromium must be installed)")
    parser.add_argument("--quiet", action="store_true", help="print only the page's location")


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    """A headless-capable Chromium on PATH; :class:`ConfigError` naming the package otherwise."""
    import shutil

    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError("--screenshot needs Chromium: install it (Debian: apt-get install chromium)")


def chromium(args: list[str], timeout: float = 120) -> str:
    """Run headless Chromium with ``args`` → its stdout (a DOM dump); sandbox off, as in containers."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bifta-chromium-") as profile:
        proc = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def screenshot(page: str, png: str, width: int = 1280, height: int = 900) -> None:
    """Render ``page`` (HTML text) to ``png`` (local or s3://) with headless Chromium."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bifta-review-") as tmp:
        html_path, shot = os.path.join(tmp, "review.html"), os.path.join(tmp, "review.png")
        with open(html_path, "w", encoding="utf-8") as fh:
            fh.write(page)
        chromium([f"--window-size={width},{height}", f"--screenshot={shot}", "file://" + html_path])
        with open(shot, "rb") as fh:
            storage.write_bytes_atomic(png, fh.read())


def _thumbs_local(uris: list[str]) -> dict[str, Thumbnail | None]:
    def one(uri: str) -> Thumbnail | None:
        try:
            return thumbnail(storage.read_bytes(uri))
        except Exception:  # unreadable or gone since labelling: the row shows without a picture
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(uris, pool.map(one, uris)))


def _thumbs_on_ray(uris: list[str]) -> dict[str, Thumbnail | None]:
    """Thumbnails made by Ray tasks, :data:`THUMBS_PER_TASK` images each, read where they run."""
    import ray

    from pipelines.pipeline import ensure_ray
    from pipelines.plan import env_args

    ensure_ray()
    env = storage.s3_env(None, None, False)
    task = ray.remote(_thumbs_local).options(num_cpus=1, **env_args(env, gpu=False))
    chunks = [uris[i:i + THUMBS_PER_TASK] for i in range(0, len(uris), THUMBS_PER_TASK)]
    out: dict[str, Thumbnail | None] = {}
    for part in ray.get([task.remote(c) for c in chunks]):
        out.update(part)
    return out


def build_page(out: str, selection: Selection, label_set: str | None = None,
               ray_above: int = RAY_THUMBNAILS_ABOVE) -> tuple[str, dict[str, Any]]:
    """The page's HTML and counts for the prediction folder ``out``."""
    from jobs.report import scan

    lf = scan(out)
    names = lf.select(pl.col("label_set").unique()).collect()["label_set"].to_list()
    if label_set is not None:
        if label_set not in names:
            raise ConfigError(f"--label-set {label_set}: {out} has label sets {', '.join(sorted(names))}")
        lf = lf.filter(pl.col("label_set") == label_set)
    total, random_weights = lf.select(pl.len(), pl.col("random_weights").any()).collect().row(0)
    rows = select_rows(lf, selection)
    items = rows.to_dicts()
    uris = list(dict.fromkeys(r["uri"] for r in items))
    thumbs = _thumbs_on_ray(uris) if len(uris) > ray_above else _thumbs_local(uris)
    counts = {"rows": total, "items": len(items), "images": len(uris),
              "thumbnails": sum(t is not None for t in thumbs.values()),
              "groups": rows.group_by("group").len().sort("group").rows() if items else []}
    page = render_page(items, thumbs, {"title": f"bifta review — {out}", "out": out, "rows": total,
                                       "random_weights": bool(random_weights)})
    return page, counts


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--max-items", args.max_items), ("--per-class", args.per_class)):
        integer(flag, value)
    integer("--seed", args.seed, minimum=0)
    if args.screenshot:
        browser()  # a missing Chromium fails before any work
    page, counts = build_page(args.out, Selection(args.max_items, args.per_class, args.seed), args.label_set)
    dest = args.html or storage.join(args.out, REVIEW_DIR, "review.html")
    storage.write_bytes_atomic(dest, page.encode("utf-8"))
    if args.screenshot:
        screenshot(page, args.screenshot)
    if not args.quiet:
        print(f"bifta review — {counts['items']} rows ({counts['images']} images, {counts['thumbnails']} thumbnails) "
              f"of {counts['rows']}: " + ", ".join(f"{g} {n}" for g, n in counts["groups"]))
    print(dest)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.review``: the same as ``bifta review``."""
    from jobs.common import main as cli_main

    return cli_main(["review", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
