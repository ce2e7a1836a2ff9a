"""``tmask-validate workflow``: run the Snakemake validation workflow.

Runs ``snakemake`` in a subprocess (the package never imports Snakemake) with the repository's
``Snakefile``, the given config, ``--cores`` and the rerun triggers of the config's
``workflow.rerun_triggers`` (default ``mtime params input``: a job re-runs when an input is newer,
when the config values it depends on changed, or when its set of inputs changed). Extra
arguments after ``--`` are passed to snakemake unchanged (e.g. ``-- --forceall`` or
``-- --executor slurm``); ``-n`` is a dry run. At the end it prints where the report is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("workflow", help="run the Snakemake workflow (report at the end)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config YAML (e.g. config/default.yaml)")
    p.add_argument("--cores", default="all", help="cores for snakemake (default: all)")
    p.add_argument("--profile", default=None, help="snakemake profile (e.g. config/profiles/slurm)")
    p.add_argument("--snakefile", default=None, help="Snakefile (default: the repository's)")
    p.add_argument("--directory", default=None,
                   help="working directory (results/ lands under it; default: current)")
    p.add_argument("-n", "--dry-run", action="store_true", help="only show what would run")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                   help="further arguments passed to snakemake (after --, e.g. -- --forceall)")
    p.set_defaults(func=run)


def find_snakefile() -> Path:
    """The repository's Snakefile (next to the installed package in an editable install)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "Snakefile"
        if cand.is_file():
            return cand
    cand = Path.cwd() / "Snakefile"
    if cand.is_file():
        return cand
    raise FileNotFoundError("no Snakefile found next to the package or in the current folder")


def snakemake_command(args: argparse.Namespace) -> list[str]:
    """The snakemake command line this invocation runs."""
    from tmask_validate.config import load_config

    cfg = load_config(args.config)
    local = Path(sys.executable).parent / "snakemake"
    exe = str(local) if local.exists() else (shutil.which("snakemake") or "snakemake")
    snakefile = Path(args.snakefile) if args.snakefile else find_snakefile()
    cmd = [exe, "--snakefile", str(snakefile), "--configfile", str(Path(args.config).resolve()),
           "--cores", str(args.cores), "--rerun-triggers", *cfg["workflow"]["rerun_triggers"],
           "--rerun-incomplete", "--printshellcmds", "--show-failed-logs"]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.directory:
        cmd += ["--directory", args.directory]
    if getattr(args, "dry_run", False):
        cmd.append("--dry-run")
    extra = [a for a in (args.snakemake_args or []) if a != "--"]
    return cmd + extra


def workflow_env() -> dict[str, str]:
    """Environment for snakemake and its jobs.

    This interpreter's ``bin`` folder goes first on ``PATH`` so that every rule finds the
    ``tmask-validate`` (and ``snakemake``) of the same installation, also when the command was
    started as ``.venv/bin/tmask-validate`` without activating the virtual environment.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` and wait for it; SIGINT/SIGTERM to this process are passed on, not fatal.

    snakemake runs in its own session, so a Ctrl-C in the terminal reaches only this wrapper,
    which forwards it once per press; snakemake then stops its jobs, removes incomplete outputs
    and releases its lock on the working directory, and the wrapper waits for it (killing it
    instead, as ``subprocess.call`` does on KeyboardInterrupt, left the directory locked).
    """
    # default SIGINT/SIGTERM handling in snakemake even when this process was started with
    # them ignored (e.g. `cmd &` from a script): the wrapper decides what to forward
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_default_signals)
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)
        if proc.poll() is None:
            if len(received) == 1:
                print("\ntmask-validate workflow: interrupted; waiting for snakemake to stop "
                      "its jobs and release its lock (press again to forward again)",
                      file=sys.stderr, flush=True)
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    from tmask_validate.config import load_config

    cmd = snakemake_command(args)
    print("+ " + " ".join(cmd), flush=True)
    rc = run_forwarding_signals(cmd, workflow_env())
    cfg = load_config(args.config)
    base = Path(args.directory) if args.directory else Path.cwd()
    report = (base / cfg["workflow"]["results_dir"] / "report" / "report.html").resolve()
    if rc == 0 and report.is_file() and not args.dry_run:
        print(f"\nReport: {report}")
        print(f"Claims: {report.parent.parent / 'claims.csv'}")
    elif rc != 0:
        print(f"\nsnakemake failed (exit {rc}); logs under "
              f"{base / cfg['workflow']['results_dir'] / 'logs'}", file=sys.stderr)
    return rc
