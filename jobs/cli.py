"""The ``bifta`` console command (``pyproject``'s entry point): see :mod:`jobs.common`."""

from __future__ import annotations

from jobs.common import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
