"""``tmask-validate report``: one self-contained HTML page of a workflow run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="self-contained HTML report", description=__doc__)
    p.add_argument("--figures", required=True, help="results/figures/figures.json")
    p.add_argument("--claims", required=True, help="results/claims.csv")
    p.add_argument("--metrics", required=True, help="results/metrics/metrics.csv")
    p.add_argument("--config", default=None, help="config YAML")
    p.add_argument("--extra-figures", nargs="*", default=[], help="further PNGs (experiments)")
    p.add_argument("--out", required=True, help="output HTML (results/report/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tmask_validate.config import load_config
    from tmask_validate.report import build_report

    cfg = load_config(args.config) if args.config else None
    text = build_report(args.figures, args.claims, args.metrics, config=cfg,
                        extra_figures=args.extra_figures)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"report: {out.resolve()} ({len(text) / 1e6:.1f} MB)")
    return 0
