"""``tmask-validate evidence`` and ``evidence-table``: species evidence on held-out cells.

``evidence`` reads the variant stores of ONE structure (the crystal and its species-removed /
partial-occupancy variants, one store per frozen-phonon configuration, written by
``tmask-validate simulate --variant``) and writes that structure's evidence rows (see
:mod:`tmask_validate.evidence`)::

    tmask-validate evidence results/evidence/simulate/LiFePO4_001/*/*.zarr \\
        --config config/default.yaml --structure LiFePO4_001 \\
        --out results/evidence/LiFePO4_001.csv --images results/evidence/LiFePO4_001.npz

``evidence-table`` gathers the per-structure tables into ``results/species_evidence.csv`` (the
contract columns first), the detection-limit table and the evidence figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _atomic_csv(table: pd.DataFrame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    table.to_csv(tmp, index=False, float_format="%.5g")
    tmp.replace(out)


def _load_variants(paths, thicknesses_nm):
    """``{variant: [ {thickness: intensity}, ... per configuration ]}``, sites, step, attrs."""
    from tmask_validate.simulate import load_store, store_calibration, store_sites

    by_var: dict[str, list[tuple[int, dict]]] = {}
    sites = step = None
    realised: dict[str, list] = {}
    for p in paths:
        ds = load_store(p)
        var = json.loads(ds.attrs.get("variant", "null"))
        if var is None:
            raise ValueError(f"{p} is not an evidence variant store (no 'variant' attribute)")
        have = [float(t) for t in ds["thickness"].values]
        arrs = {}
        for t in thicknesses_nm:
            idx = int(np.argmin(np.abs(np.asarray(have) - float(t))))
            if abs(have[idx] - float(t)) > 0.6:  # realised thickness: whole periods
                raise ValueError(f"{p}: no thickness near {t} nm (have {have})")
            arrs[float(t)] = ds["intensity"].isel(thickness=idx).values
        cfg_index = min(json.loads(ds.attrs["configurations"]))
        by_var.setdefault(var["name"], []).append((cfg_index, arrs))
        realised[var["name"]] = json.loads(ds.attrs.get("occupancy_realised", "[]"))
        if sites is None:
            sites = store_sites(ds)
            step = store_calibration(ds).step_A
    variants = {k: [a for _, a in sorted(v, key=lambda x: x[0])] for k, v in by_var.items()}
    return variants, sites, step, realised


def _evidence(args: argparse.Namespace) -> int:
    from tmask_validate import evidence
    from tmask_validate.config import load_config

    cfg = load_config(args.config)
    ev = cfg["evidence"]
    ent = ev["structures"].get(args.structure)
    if ent is None:
        raise ValueError(f"structure {args.structure!r} has no evidence.structures entry")
    t0, c0 = time.perf_counter(), time.process_time()
    series = [float(t) for t in ent["thicknesses_nm"]]
    thick = series if not args.thickness_nm else [float(t) for t in args.thickness_nm]
    bad = [t for t in thick if t not in series]
    if bad:
        raise ValueError(f"--thickness-nm {bad} not in evidence thicknesses {series}")
    variants, sites, step, realised = _load_variants(args.stores, thick)
    realised = {k: dict(zip(series, v, strict=False)) for k, v in realised.items()}
    need = evidence.variants_from_config(cfg, args.structure)
    missing = sorted(set(need) - set(variants))
    if missing:
        raise ValueError(f"missing variant stores for {missing}")
    n_cfg = int(ev["phonon_configurations"])
    for name, cfgs in variants.items():
        if len(cfgs) != n_cfg:
            raise ValueError(f"variant {name}: {len(cfgs)} configuration stores, expected {n_cfg}")
    table, images = evidence.evaluate_structure(
        variants, thick, sites, step, evidence.comparisons_from_config(cfg, args.structure), ev,
        structure=args.structure, kinds=ent["templates"], scan_cells=ent["scan_cells"],
        thickness_indices=[series.index(t) for t in thick],
        progress=None if args.quiet else (lambda m: print(
            f"[{time.process_time() - c0:7.1f} s cpu] {m}", file=sys.stderr, flush=True)))
    # occupancy actually realised in the thinned variant at each thickness (whole periods)
    occ = {(name, t): r for name, rr in realised.items() for t, r in rr.items()}
    table["occupancy_realised"] = [
        occ.get((p, t), o) for p, t, o in zip(table["present"], table["thickness_nm"],
                                              table["occupancy"], strict=True)]
    table["cpu_s"] = time.process_time() - c0
    _atomic_csv(table, Path(args.out))
    if args.images:
        out = Path(args.images)
        tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.npz")
        images = dict(images, step_A=np.asarray(step, float),
                      structure=np.asarray(args.structure))
        np.savez_compressed(tmp, **{k.replace("/", "|"): v for k, v in images.items()})
        tmp.replace(out)
    n_det = int(table["verdict"].eq("detected").sum())
    print(f"evidence {args.structure}: {len(table)} rows, {n_det} detected -> {args.out} "
          f"({time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s cpu)")
    return 0


def _table(args: argparse.Namespace) -> int:
    from tmask_validate import evidence

    tables = [pd.read_csv(p) for p in args.inputs]
    table = evidence.order_columns(pd.concat(tables, ignore_index=True))
    _atomic_csv(table, Path(args.out))
    if args.limits_out:
        _atomic_csv(evidence.detection_limits(table[table["species"].isin(
            table.loc[table["occupancy"] < 1, "species"].unique())]), Path(args.limits_out))
    if args.figure:
        from tmask_validate import plots_evidence

        imgs = {}
        for p in args.images or []:
            with np.load(p) as z:
                structure = str(z["structure"]) if "structure" in z.files else Path(p).stem
                imgs.update({f"{structure}/" + k.replace("|", "/"): z[k] for k in z.files
                             if k != "structure"})
        plots_evidence.evidence_figure(table, imgs, args.figure)
    counts = table["verdict"].value_counts().to_dict()
    print(f"species evidence: {len(table)} rows {counts} -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evidence`` and ``evidence-table`` subcommands."""
    p = subparsers.add_parser(
        "evidence", help="species evidence of one structure on held-out cells (CSV)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+", help="variant stores (simulate --variant), all configs")
    p.add_argument("--config", required=True, help="config YAML (evidence section)")
    p.add_argument("--structure", required=True, help="key of evidence.structures")
    p.add_argument("--thickness-nm", type=float, action="append", default=None,
                   help="only this thickness of the evidence series (repeatable)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--images", default=None, help="output .npz of repeat-0 images (figure)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_evidence)

    t = subparsers.add_parser(
        "evidence-table", help="gather species evidence -> species_evidence.csv (+ limits)",
        description="Concatenate per-structure evidence tables (contract columns first); "
        "write the detection-limit table and the evidence figure.")
    t.add_argument("inputs", nargs="+", help="per-structure evidence CSVs")
    t.add_argument("--out", required=True, help="results/species_evidence.csv")
    t.add_argument("--limits-out", default=None, help="detection-limit CSV")
    t.add_argument("--images", nargs="*", default=None, help="per-structure .npz images")
    t.add_argument("--figure", default=None, help="evidence figure (PNG)")
    t.set_defaults(func=_table)
