"""The ``bifta`` command: one entry point, one sub-command per job module.

Each sub-command lives in its own ``jobs/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; the same module runs as ``python -m jobs.<name>`` (what ``ray job submit``
runs). User mistakes print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bifta_core.errors import BiftaUserError

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
    from jobs.label import OneLineErrorParser

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
    from jobs.label import configure_logging
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


if __name__ == "__main__":
    raise SystemExit(main())
