"""Command-line entry point ``tmask-validate``.

Each subcommand lives in its own module under :mod:`tmask_validate.commands` and exposes
``register(subparsers)``; this file only collects them, so the CLI stays a thin layer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand modules, in the order they appear in ``--help``
COMMAND_MODULES = [
    "tmask_validate.commands.simulate",
    "tmask_validate.commands.noise",
    "tmask_validate.commands.analyse",
    "tmask_validate.commands.inspect",
    "tmask_validate.commands.descan",
    "tmask_validate.commands.pacbed",
    "tmask_validate.commands.find_sites",
    "tmask_validate.commands.metrics",
    "tmask_validate.commands.figures",
    "tmask_validate.commands.evidence",
    "tmask_validate.commands.claims",
    "tmask_validate.commands.report",
    "tmask_validate.commands.workflow",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="tmask-validate", description="Template masks for atomic-resolution 4D-STEM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"tmask-validate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
