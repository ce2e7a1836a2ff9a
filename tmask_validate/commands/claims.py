"""``tmask-validate claims``: evaluate the paper's claims on the aggregated metrics.

Writes one row per claim x dataset (claim, dataset, measured number, threshold, status
pass/fail/uninformative, baseline sensitivity) to ``--out`` (``results/claims.csv``); with
``--evidence results/species_evidence.csv`` also the species-detection claims (Li_detected,
O_detected, PTO_O_detected); see :mod:`tmask_validate.claims`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd


def register(subparsers) -> None:
    p = subparsers.add_parser("claims", help="paper claims -> claims.csv (pass/fail)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True, help="results/metrics/metrics.csv")
    p.add_argument("--similarity", default=None, help="results/metrics/mask_similarity.csv")
    p.add_argument("--evidence", default=None,
                   help="results/species_evidence.csv (species-detection claims)")
    p.add_argument("--config", default=None, help="config YAML (thresholds, builders)")
    p.add_argument("--out", required=True, help="output CSV (results/claims.csv)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tmask_validate.claims import evaluate_claims
    from tmask_validate.config import load_config

    cfg = load_config(args.config) if args.config else None
    metrics = pd.read_csv(args.metrics, keep_default_na=False, na_values=[""])
    sim = pd.read_csv(args.similarity) if args.similarity else None
    claims = evaluate_claims(metrics, sim, config=cfg, evidence=args.evidence)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    claims.to_csv(tmp, index=False, float_format="%.4g")
    tmp.replace(out)
    n_pass = int(claims["passed"].sum()) if len(claims) else 0
    na = claims["status"].eq("uninformative") if len(claims) else claims["passed"]
    print(f"claims: {n_pass}/{len(claims) - int(na.sum())} passed"
          + (f" ({int(na.sum())} uninformative)" if na.any() else "") + f" -> {out}")
    for cid, g in claims.groupby("claim_id", sort=False):
        g_na = int(g["status"].eq("uninformative").sum())
        g_bs = int(g["baseline_sensitive"].astype(bool).sum())
        print(f"  {cid:32s} {int(g['passed'].sum())}/{len(g) - g_na} pass"
              + (f" ({g_na} uninformative)" if g_na else "")
              + (f" [{g_bs} baseline-sensitive]" if g_bs else ""))
    return 0
