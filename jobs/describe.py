"""Generate class descriptions for a label set with an OpenAI-compatible LLM.

Example::

    python -m jobs.describe --classes my-classes.txt --out labelsets/products \\
        --base-url http://localhost:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct \\
        --category-hint "a type of product"

Writes ``classes.json``, ``cupl.json``, ``clip-d.json`` and ``describe-report.json`` to
``--out``. Answers are cached (``--cache-dir``), so rerunning after an interruption or a change
of cleaning limits makes no repeated requests. The API key is read from ``OPENAI_API_KEY`` only
(never a flag, so it stays out of shell history and process lists).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bifta_core.io.description_generation import (
    REPORT_FILE,
    DescribeConfig,
    generate_label_set,
    load_classes,
    load_questions,
)
from bifta_core.io.llm import BASE_URL_ENV, MODEL_ENV, ChatClient, default_cache_dir


def _number(cast: type, minimum: float, inclusive: bool, what: str):
    """argparse ``type=`` for a number with a lower bound (a bad value is a one-line usage error)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value == float("inf") or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, True, "a positive integer")
_non_negative_int = _number(int, 0, True, "an integer >= 0")
_positive_float = _number(float, 0.0, False, "a positive number")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``describe`` flags to ``parser`` (also used by a combined ``bifta`` CLI)."""
    defaults = DescribeConfig()
    parser.add_argument(
        "--classes",
        required=True,
        type=Path,
        help="classes.json (list of names or synonym lists), a label-set folder, "
        "or a .txt file with one class per line",
    )
    parser.add_argument("--out", required=True, type=Path, help="label-set folder to write")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"OpenAI-compatible API base, e.g. http://localhost:8000/v1 "
        f"(default: ${BASE_URL_ENV})",
    )
    parser.add_argument(
        "--llm-model", default=None, help=f"model name to request (default: ${MODEL_ENV})"
    )
    parser.add_argument(
        "--questions-file",
        type=Path,
        default=None,
        help="questions, one per line (or a JSON list), each with '{}' for the class "
        "(default: the five CuPL-style questions)",
    )
    parser.add_argument(
        "--answers-per-question",
        type=_positive_int,
        default=defaults.answers_per_question,
        help="answers sampled per question and class (default: %(default)s)",
    )
    parser.add_argument(
        "--max-per-class",
        type=_positive_int,
        default=defaults.max_per_class,
        help="most generated sentences kept per class (default: %(default)s)",
    )
    parser.add_argument(
        "--max-chars",
        type=_positive_int,
        default=defaults.max_chars,
        help="drop sentences longer than this (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="sampling temperature for sentences (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        help="requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--n-per-request",
        type=_positive_int,
        default=1,
        help="answers asked for per HTTP request via 'n' (default: %(default)s; "
        "not every server supports n > 1)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="seconds before one HTTP request times out (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=_non_negative_int,
        default=5,
        help="retries after 429/5xx/timeouts/connection errors (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"answer cache folder (default: {default_cache_dir()})",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument(
        "--category-hint",
        default=None,
        help="what the classes are, e.g. 'a type of product'; added to every question",
    )
    parser.add_argument(
        "--merge",
        action="append",
        type=Path,
        default=[],
        metavar="CUPL_JSON",
        help="existing {class: [sentence, ...]} file whose sentences are kept first "
        "(repeatable)",
    )
    parser.add_argument(
        "--no-descriptors", action="store_true", help="do not generate clip-d.json"
    )


def run(args: argparse.Namespace) -> int:
    """Generate the label set described by parsed ``args``; returns the exit code (0).

    Raises:
        BiftaUserError: bad input, configuration or an unusable LLM endpoint.
    """
    classes = load_classes(args.classes)
    questions = load_questions(args.questions_file) if args.questions_file else None
    config = DescribeConfig(
        **({"questions": questions} if questions else {}),
        answers_per_question=args.answers_per_question,
        max_per_class=args.max_per_class,
        max_chars=args.max_chars,
        temperature=args.temperature,
        category_hint=args.category_hint,
        descriptors=not args.no_descriptors,
        merge_with=tuple(args.merge),
    )
    client = ChatClient(
        base_url=args.base_url,
        model=args.llm_model,
        timeout_s=args.timeout,
        max_retries=args.retries,
        max_concurrency=args.concurrency,
        n_per_request=args.n_per_request,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
    )
    report = generate_label_set(classes, client, args.out, config)
    n_sent = sum(c.sentences for c in report.classes)
    print(
        f"wrote {len(report.classes)} classes, {n_sent} sentences to {report.out_dir} "
        f"({report.http_requests} requests, {report.cache_hits} cached answers)"
    )
    if report.empty_classes:
        print(
            f"warning: {len(report.empty_classes)} classes have no sentences "
            f"(e.g. {report.empty_classes[0]!r}); see {report.out_dir / REPORT_FILE}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.describe``: the same as ``bifta describe``."""
    from jobs.common import main as cli_main

    return cli_main(["describe", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
