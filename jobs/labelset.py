"""``bifta labelset build`` / ``python -m jobs.labelset build`` — a reusable label-set artifact.

Runs description refinement and text encoding once and writes one Parquet file (classes, kept
descriptions per method, embeddings as fixed-size lists, description weights, parameters, content
hash) that ``bifta label --labelset-artifact FILE`` uses without touching the text encoder:

    python -m jobs.labelset build --labels ../shared/descriptions/cub --out cub-vitb32.parquet
"""

from __future__ import annotations

import argparse
import logging
import sys

from bifta_core.errors import LabelSetError
from bifta_core.io.label_set_artifacts import save_artifact
from bifta_core.io.label_sets import LabelSet, load_label_set
from bifta_core.method.registry import METHODS
from bifta_core.io.models import load_model, text_precision
from bifta_core.method.text_banks import BankSpec, build_label_set_embeddings
from bifta_core.method.waffle import words_location

logger = logging.getLogger("bifta.label_set")


def available_specs(label_set: LabelSet, threshold: float, top_k: int, *, seed: int = 0,
                    waffle_words: str | None = None) -> list[BankSpec]:
    """A bank for every method of :data:`bifta_core.method.registry.METHODS` the label set supports, so one
    artifact serves any ``--method`` (WaffleCLIP's texts drawn from ``seed`` and ``waffle_words``)."""
    specs = []
    for m in METHODS.values():
        if not m.has_bank:
            continue  # scored by the class prompts every artifact holds
        try:
            label_set.require(m.name)
        except LabelSetError:
            continue
        refinement = dict(threshold=threshold, top_k=top_k) if m.refine else {}
        specs.append(BankSpec.of(m.name, refine=m.refine, seed=seed, waffle_words=waffle_words, **refinement))
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="refine + encode a label set into a Parquet artifact")
    b.add_argument("--labels", required=True, metavar="[NAME=]LABELSET", help="label-set folder, classes file or 'a,b,c'")
    b.add_argument("--out", required=True, help="artifact file (.parquet), local or s3://")
    b.add_argument("--model", default="ViT-B-32")
    b.add_argument("--pretrained", default="openai")
    b.add_argument("--device", default="auto")
    b.add_argument("--precision", default="auto")
    b.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                   help="build the model with QuickGELU (default: what the weights were trained with)")
    b.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_false")
    b.add_argument("--desc-threshold", type=float, default=0.99)
    b.add_argument("--desc-top-k", type=int, default=50)
    b.add_argument("--text-scale", type=float, default=2.0)
    b.add_argument("--seed", type=int, default=0, help="seed of the WaffleCLIP texts (as bifta label --seed)")
    b.add_argument("--waffle-words", default=None, help="WaffleCLIP word list (default: the bundled list)")
    b.add_argument("--merge-duplicate-classes", action="store_true")
    b.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    name, sep, path = args.labels.partition("=")
    if not (sep and name and "/" not in name and "," not in name):
        name, path = None, args.labels
    label_set = load_label_set(path, name, merge_duplicates=args.merge_duplicate_classes)
    # Texts in the precision a labelling run's label-set stage uses (auto → fp32), same activation rules.
    model = load_model(args.model, args.pretrained, device=args.device, precision=text_precision(args.precision),
                       quick_gelu=args.quick_gelu)
    words = words_location(args.waffle_words) if args.waffle_words else None
    specs = available_specs(label_set, args.desc_threshold, args.desc_top_k, seed=args.seed, waffle_words=words)
    emb = build_label_set_embeddings(label_set, model, specs, text_scale=args.text_scale)
    written = save_artifact(emb, args.out)
    banks = ", ".join(f"{k} ({len(b.texts)} texts)" for k, b in emb.banks.items())
    print(f"wrote {written}: label set '{emb.name}', {emb.num_classes} classes, model {emb.model} "
          f"({emb.pretrained}), banks: {banks}; content hash {emb.content_hash[:16]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.common import main as cli_main

    return cli_main(["labelset", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
