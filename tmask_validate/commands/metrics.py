"""``tmask-validate metrics``: aggregate per-dataset analysis results.

Reads the analysis files ``<structure>/<dose>/<thickness>.nc`` (and the tidy metrics CSV next to
each) and writes to ``--out-dir``:

- ``metrics.csv``: every per-dataset metric row, one table (columns: structure, dose_key,
  dose_e_per_A2, thickness_nm, thickness_config_nm, name, family, target, ..., metric, species,
  value);
- ``metrics.nc``: the same values as one array per structure, ``value_<structure>`` with dims
  (dose, thickness, name, metric, species); coordinates ``dose`` (key), ``dose_e_per_A2``
  (inf = noiseless), ``thickness`` (config value, nm), and ``thickness_nm_<structure>`` (the
  thickness actually simulated). Combinations that do not exist are NaN (fill only);
- ``mask_similarity.csv``: Pearson r between masks of the same name across thickness (every pair
  of thicknesses, same dose) and noisy vs noiseless (same thickness).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

#: mask families compared across thickness / dose
SIMILARITY_FAMILIES = ("template", "adf_opt", "eigen", "adf_pcc", "partial", "abf_best")


def register(subparsers) -> None:
    p = subparsers.add_parser("metrics", help="aggregate per-dataset metrics (CSV + NetCDF)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="analysis .nc files (metrics CSV next to each)")
    p.add_argument("--config", default=None, help="config YAML (unused except for checks)")
    p.add_argument("--out-dir", required=True, help="output folder (results/metrics)")
    p.set_defaults(func=run)


def _meta(ads: xr.Dataset) -> dict:
    return json.loads(ads.attrs.get("meta", "{}"))


def _key(meta: dict) -> tuple[str, str, float]:
    t = meta.get("thickness_config_nm", meta.get("thickness_nm"))
    return str(meta.get("structure", "")), str(meta.get("dose_key", "")), float(t or 0.0)


def mask_similarity_table(paths: list[Path]) -> pd.DataFrame:
    """Mask similarities across thickness (same dose) and dose vs noiseless (same thickness)."""
    from tmask_validate.metrics import mask_similarity

    entries = {}
    for p in paths:
        with xr.open_dataset(p, engine="h5netcdf") as ads:
            meta = _meta(ads)
            fam = ads["family"].values.astype(str)
            keep = np.isin(fam, SIMILARITY_FAMILIES) & ads["has_mask"].values.astype(bool)
            names = ads["name"].values.astype(str)[keep]
            masks = ads["masks"].values[keep]
            entries[_key(meta)] = ({n: masks[i] for i, n in enumerate(names)},
                                   float(meta.get("thickness_nm") or 0.0))
    rows = []

    def add(kind, a, b):
        ma, mb = entries[a][0], entries[b][0]
        for name in sorted(set(ma) & set(mb)):
            try:
                r = float(mask_similarity(ma[name], mb[name]))
            except ValueError:
                r = 0.0
            rows.append({"structure": a[0], "comparison": kind, "name": name,
                         "dose_key_a": a[1], "thickness_config_nm_a": a[2],
                         "dose_key_b": b[1], "thickness_config_nm_b": b[2], "value": r})

    keys = sorted(entries)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a[0] == b[0] and a[1] == b[1] and a[2] != b[2]:
                add("thickness", a, b)
        if a[1] == "noiseless":
            for b in keys:
                if b[0] == a[0] and b[2] == a[2] and b[1] not in ("noiseless", ""):
                    add("dose_vs_noiseless", a, b)
    return pd.DataFrame(rows, columns=["structure", "comparison", "name", "dose_key_a",
                                       "thickness_config_nm_a", "dose_key_b",
                                       "thickness_config_nm_b", "value"])


def metrics_dataset(df: pd.DataFrame) -> xr.Dataset:
    """One (dose, thickness, name, metric, species) array per structure."""
    out = xr.Dataset()
    if df.empty:
        return out
    d = df.copy()
    d["thickness"] = d["thickness_config_nm"].fillna(d["thickness_nm"]).astype(float)
    doses = (d[["dose_key", "dose_e_per_A2"]].drop_duplicates("dose_key")
             .assign(v=lambda x: x["dose_e_per_A2"].fillna(np.inf).astype(float))
             .sort_values("v"))
    dose_keys = doses["dose_key"].tolist()
    thick = sorted(d["thickness"].unique().tolist())
    for s, ds_ in d.groupby("structure", sort=True):
        arr = (ds_.drop_duplicates(["dose_key", "thickness", "name", "metric", "species"])
               .set_index(["dose_key", "thickness", "name", "metric", "species"])["value"]
               .to_xarray())
        arr = arr.reindex(dose_key=dose_keys, thickness=thick).rename(dose_key="dose")
        var = f"value_{s}"
        out[var] = arr.rename({"name": f"name_{s}", "species": f"species_{s}",
                               "metric": f"metric_{s}"})
        out[var].attrs["description"] = f"metrics of {s}; NaN = combination not computed"
        tn = (ds_.groupby("thickness")["thickness_nm"].first().reindex(thick))
        out[f"thickness_nm_{s}"] = ("thickness", tn.to_numpy(float))
    out = out.assign_coords(dose_e_per_A2=("dose", doses["v"].to_numpy(float)))
    out.attrs["note"] = "dose_e_per_A2 = inf marks noiseless data"
    return out


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.inputs]
    frames = []
    for p in paths:
        csv = p.with_suffix(".csv")
        if not csv.is_file():
            raise FileNotFoundError(f"metrics CSV missing next to {p}: {csv}")
        frames.append(pd.read_csv(csv, keep_default_na=False, na_values=[""]))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("dose_e_per_A2", "thickness_config_nm", "thickness_nm"):
        if col not in df:
            df[col] = np.nan
    df["dose_e_per_A2"] = pd.to_numeric(df["dose_e_per_A2"], errors="coerce")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = out_dir / f".metrics.csv.tmp-{pid}"
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out_dir / "metrics.csv")
    nc = metrics_dataset(df)
    tmp = out_dir / f".metrics.nc.tmp-{pid}"
    nc.to_netcdf(tmp, engine="h5netcdf")
    tmp.replace(out_dir / "metrics.nc")
    sim = mask_similarity_table(paths)
    tmp = out_dir / f".mask_similarity.csv.tmp-{pid}"
    sim.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out_dir / "mask_similarity.csv")
    print(f"metrics: {len(df)} rows from {len(paths)} datasets, {len(sim)} similarities "
          f"-> {out_dir}")
    return 0
