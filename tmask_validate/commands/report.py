"""``tmask-validate report``: one self-contained HTML page of a workflow run.

Summary (what was run, claims pass/fail/uninformative) and the lead figure first, then the
optional evidence table (``--evidence results/species_evidence.csv``), the figures, and the
long tables collapsed. Smoke-scale configs get a caveat at the top.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="self-contained HTML report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figures", required=True, help="results/figures/figures.json")
    p.add_argument("--claims", required=True, help="results/claims.csv")
    p.add_argument("--metrics", required=True, help="results/metrics/metrics.csv")
    p.add_argument("--config", default=None, help="config YAML")
    p.add_argument("--evidence", default=None, metavar="PATH",
                   help="species evidence table (results/species_evidence.csv), optional")
    p.add_argument("--evidence-figures", nargs="*", default=[], metavar="PNG",
                   help="figures of the evidence stage, shown in the evidence section")
    p.add_argument("--extra-figures", nargs="*", default=[], help="further PNGs (experiments)")
    p.add_argument("--out", required=True, help="output HTML (results/report/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tmask_validate.config import load_config
    from tmask_validate.report import build_report, run_scale, write_report

    cfg = load_config(args.config) if args.config else None
    text = build_report(args.figures, args.claims, args.metrics, config=cfg,
                        extra_figures=args.extra_figures, evidence_csv=args.evidence,
                        evidence_figures=args.evidence_figures,
                        scale=run_scale(cfg))
    out = write_report(args.out, text)
    print(f"report: {out.resolve()} ({len(text) / 1e6:.1f} MB)")
    return 0
