"""Command-line entry point ``tmask-validate``.

Each subcommand lives in its own module under :mod:`tmask_validate.commands` and exposes
``register(subparsers)``; this file only collects them, so the CLI stays a thin layer.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

#: OSErrors that are the machine's state, not a bug: reported as one line
USER_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}

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
    "tmask_validate.commands.live",
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


def _one_line_warnings(command: str) -> None:
    """Show the package's data warnings as one ``tmask-validate CMD: warning: ...`` line."""
    from tmask_validate.io import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"tmask-validate {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings(args.command)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # bad input (file, config, calibration, arguments): one line, no traceback. TypeError,
        # KeyError etc. are programming errors and keep their traceback.
        print(f"tmask-validate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        what = USER_ERRNOS[exc.errno]
        target = exc.filename or getattr(args, "out", None)
        where = f" writing {target}" if target else ""
        print(f"tmask-validate {args.command}: error: {what}{where} ({exc.strerror}); "
              f"nothing was written there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tmask-validate {args.command}: interrupted; no partial output kept",
              file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
