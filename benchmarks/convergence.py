"""Convergence of the default simulation settings (issue 13): sampling, slices, phonons, detector.

For LiFePO4 [001] at 30 and 70 nm and PbTiO3 [100] at 40 nm, one setting of
``config/default.yaml`` is varied at a time and the quantities the workflow reports are
compared:

==========  ===================================================================
family      settings (default first)
==========  ===================================================================
sampling    0.1 / 0.085 / 0.073 Å (reference 0.073)
slices      c/2 (2.35 Å) / c/4 (1.18 Å) (reference c/4)
phonons     1 / 2 / 4 / 8 configurations, seeded (reference: the most configurations run),
            at the default's sampling (0.085 Å: the ``samp085`` variant's configurations)
detector    40 / 50 / 64 / 90 mrad extent of the pixelated detector (reference 90; from the
            0.073 Å run, whose antialiasing cutoff is 114 mrad)
==========  ===================================================================

Every simulation is a ``tmask-validate simulate`` job of a derived config (same code path,
physics and seeds as the workflow; one process per job, resumable: finished stores are kept).
Frozen-phonon configuration ``k`` has the same seed (hence the same displacements) in every
variant, so the sampling, slice and detector comparisons use the same phonon draw (k = 0) and
measure the setting alone; the phonon family reads the per-configuration results that
``--keep-checkpoint`` keeps and averages the first 1, 2, 4, 8 of them.

Measured per (structure, thickness, setting, species template):

* ``mask_pcc``: Pearson correlation of the noiseless PCC mask with the reference setting's
  mask (binary template of that species, one-cell periodic scan; common detector region);
* ``contrast_rel``: the noiseless target-column contrast of the mask image relative to the
  reference's; ``specificity``: 1 - the largest positive crosstalk of another species;
* ``cnr_xfit``: CNR of the target columns in a cross-fitted image at 1e5 e/Å² (3 x 3 tiled
  field: the mask from one Poisson draw, applied to an independent draw), and ``cnr_xfit_b``
  the same with two other draws: ``|cnr_xfit - cnr_xfit_b|`` is the noise of the conclusion;
* ``mask_pcc_noise``: PCC between the masks of two independent draws (the noise floor of a
  mask comparison at that dose).

Usage::

    python benchmarks/convergence.py simulate --workdir results/convergence   # resumable
    python benchmarks/convergence.py analyse --workdir results/convergence \\
        --out benchmarks/results-convergence
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: one setting changed at a time from config/default.yaml's simulation section
VARIANTS = {
    # "base" is pinned to 0.1 Å, the default when the sampling/slice/detector families were
    # measured (config/default.yaml has used 0.085 Å since); "samp085" is today's default
    "base": {"sampling_A": 0.1},
    "samp085": {"sampling_A": 0.085},
    "samp073": {"sampling_A": 0.073, "max_angle_mrad": 90},
    "slice4": {"slice_thickness_A": 1.18},
}
STRUCTURES = {"LiFePO4_001": [30, 70], "PbTiO3_100": [40]}
N_CONFIGS = 8
#: jobs in priority order (most informative first; on a busy machine the tail may not run):
#: (variant, configuration chunk, structure)
_L, _P = "LiFePO4_001", "PbTiO3_100"
JOBS = [("base", "0:1", _L), ("base", "0:1", _P), ("samp073", "0:1", _L), ("slice4", "0:1", _L),
        ("base", "1:2", _L), ("samp085", "0:1", _L), ("samp073", "0:1", _P),
        ("base", "1:2", _P), ("base", "2:4", _L), ("slice4", "0:1", _P),
        ("samp085", "0:1", _P), ("base", "2:4", _P), ("base", "4:8", _L), ("base", "4:8", _P),
        # the phonon family at the current default sampling (0.085 Å), up to 8 configurations
        ("samp085", "1:2", _L), ("samp085", "1:2", _P), ("samp085", "2:4", _L),
        ("samp085", "2:4", _P), ("samp085", "4:8", _L), ("samp085", "4:8", _P)]
#: the variant whose configurations make the phonon family (the default's settings)
PHONON_VARIANT = "samp085"
FAMILIES = ("sampling", "slices", "phonons", "detector")
DOSE = 1e5
SEEDS = ((101, 102), (103, 104))


def variant_config(variant: str, lfp_step_A: float, pto_step_A: float) -> dict:
    from tmask_validate.config import load_config

    cfg = copy.deepcopy(load_config(ROOT / "config" / "default.yaml"))
    cfg["name"] = f"convergence-{variant}"
    cfg["simulation"].update(VARIANTS[variant])
    cfg["simulation"]["phonons"]["configurations"] = N_CONFIGS
    steps = {"LiFePO4_001": lfp_step_A, "PbTiO3_100": pto_step_A}
    cfg["structures"] = {s: dict(cfg["structures"][s], thicknesses_nm=t,
                                 scan={"step_A": steps[s]})
                         for s, t in STRUCTURES.items()}
    return cfg


def _store(work: Path, variant: str, structure: str, chunk: str) -> Path:
    i, j = chunk.split(":")
    return work / "sims" / variant / structure / f"c{i}-{j}.zarr"


def run_simulations(args) -> None:
    work = Path(args.workdir)
    exe = str(Path(sys.executable).with_name("tmask-validate"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = work / "simulate-log.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in JOBS if (args.only is None or j[0] in args.only)
            and (args.only_chunks is None or j[1] in args.only_chunks)]
    for variant, chunk, structure in jobs:
        if int(chunk.split(":")[1]) > args.max_configs:
            continue
        cfg = variant_config(variant, args.lfp_step_A, args.pto_step_A)
        cfg_path = work / f"{variant}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out = _store(work, variant, structure, chunk)
        if out.exists():
            continue
        t0 = time.perf_counter()
        r = subprocess.run([exe, "simulate", "--config", str(cfg_path), "--structure",
                            structure, "--configurations", chunk, "--keep-checkpoint",
                            "--out", str(out), "--quiet"], env=env,
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{variant} {structure} {chunk} failed:\n{r.stderr[-3000:]}")
        from tmask_validate.simulate import load_store

        ds = load_store(out)
        rec = {"variant": variant, "structure": structure, "configurations": chunk,
               "wall_s": round(time.perf_counter() - t0, 1),
               "cpu_s": round(float(ds.attrs["cpu_time_s"]), 1),
               "grid_gpts": json.loads(ds.attrs["grid_gpts"]),
               "shape": list(ds.intensity.shape)}
        with log.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------


def _config_arrays(work: Path, variant: str, structure: str) -> tuple[list[np.ndarray], Path]:
    """Per-configuration float32 intensities (k = 0, 1, ...) of a variant, and one store."""
    arrays, store = {}, None
    for d in sorted((work / "sims" / variant / structure).glob("c*.zarr")):
        store = d
        part = d.with_name(d.name + ".partial")
        for cdir in part.glob("config-*"):
            k = int(cdir.name.split("-")[1])
            arrays[k] = np.load(cdir / "intensity.npy", mmap_mode="r")
    ks = sorted(arrays)
    ks = ks[: next((i for i, k in enumerate(ks) if k != i), len(ks))]  # contiguous 0..n-1
    return [arrays[k] for k in ks], store


def _mean(arrays: list[np.ndarray], n: int, it: int) -> np.ndarray:
    m = np.asarray(arrays[0][it], dtype=np.float64)
    for i in range(1, n):
        m = m + (np.asarray(arrays[i][it]) - m) / (i + 1)
    return m


def _crop(data: np.ndarray, k_src: tuple[np.ndarray, np.ndarray], max_mrad: float):
    """Detector crop to |ky|, |kx| <= max_mrad (the same pixels in every variant)."""
    ky, kx = k_src
    sy = np.flatnonzero(np.abs(ky) <= max_mrad + 1e-6)
    sx = np.flatnonzero(np.abs(kx) <= max_mrad + 1e-6)
    return data[..., sy[0]:sy[-1] + 1, sx[0]:sx[-1] + 1]


def _box_crop(data: np.ndarray, k_src: tuple[np.ndarray, np.ndarray], box) -> np.ndarray:
    """Detector crop to the pixels whose (ky, kx) [mrad] lie in ``box`` = (y0, y1, x0, x1)."""
    ky, kx = k_src
    tol = 0.25 * float(np.diff(ky[:2])[0])
    sy = np.flatnonzero((ky >= box[0] - tol) & (ky <= box[1] + tol))
    sx = np.flatnonzero((kx >= box[2] - tol) & (kx <= box[3] + tol))
    return data[..., sy[0]:sy[-1] + 1, sx[0]:sx[-1] + 1]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, float).ravel() - np.mean(a)
    b = np.asarray(b, float).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _measure(data: np.ndarray, sites, step_A, cell_A, electrons: float) -> dict:
    """Masks, noiseless contrasts/specificity and cross-fitted CNRs of every species."""
    from tmask_validate import analysis, core, metrics, templates

    shape = data.shape[:2]
    tpl = templates.species_templates(sites, shape, step_A=step_A, kind="binary",
                                      periodic=True, include_all=False)
    fields = [analysis.tiled_field(data, sites, cell_A=cell_A, cells=(3, 3),
                                   electrons_per_probe=electrons, seed=s)
              for pair in SEEDS for s in pair]
    fsites = fields[0][1]
    out = {}
    for label, t in tpl.items():
        mask = core.pcc_mask(data, t)
        img = core.apply_mask(data, mask)
        m = metrics.image_metrics(img, sites, step_A=step_A, periodic=True, target=label)
        tgt = m[m["label"] == label].iloc[0]
        others = m[m["label"] != label]["crosstalk"].to_numpy(float)
        spec = 1.0 - max(float(np.max(others, initial=0.0)), 0.0)
        ft = np.tile(t, (3, 3))
        cnrs, nmasks = [], []
        for (fa, _), (fb, _) in ((fields[0], fields[1]), (fields[2], fields[3])):
            ma = core.pcc_mask(fa, ft)
            nmasks.append(ma)
            ib = core.apply_mask(fb, ma)
            mb = metrics.image_metrics(ib, fsites, step_A=step_A, periodic=True, target=label)
            cnrs.append(float(mb[mb["label"] == label]["cnr"].iloc[0]))
        out[label] = {"mask": mask, "contrast": float(tgt["contrast"]), "specificity": spec,
                      "cnr_xfit": cnrs[0], "cnr_xfit_b": cnrs[1],
                      "mask_pcc_noise": _pearson(nmasks[0], nmasks[1])}
    return out


def analyse(args) -> pd.DataFrame:
    from tmask_validate import noise
    from tmask_validate.simulate import load_store, store_calibration, store_sites

    work = Path(args.workdir)
    families = set(args.families)
    rows = []
    for structure in STRUCTURES:
        base, store = _config_arrays(work, "base", structure)
        phon, pstore = _config_arrays(work, PHONON_VARIANT, structure)
        if store is None:
            store = pstore
        if store is None:
            continue
        ds = load_store(store)
        cal = store_calibration(ds)
        sites = store_sites(ds)
        cell_A = tuple(ds.attrs["cell_A"])
        electrons = noise.electrons_per_probe(DOSE, cal.step_A)
        extra = {}
        for v in ("samp085", "samp073", "slice4"):
            arrs, st = _config_arrays(work, v, structure)
            if arrs:
                sds = load_store(st)
                extra[v] = (arrs, (sds.ky.values, sds.kx.values))
        k_base = (ds.ky.values, ds.kx.values)
        # the detector box every sampling variant covers (grids differ by a pixel or two)
        ks = [k_base] + [extra[v][1] for v in ("samp085", "slice4") if v in extra]
        box = (max(k[0].min() for k in ks), min(k[0].max() for k in ks),
               max(k[1].min() for k in ks), min(k[1].max() for k in ks))
        for it, t_nm in enumerate(ds.thickness.values):
            cases = {}  # (family, setting) -> data
            n_avail = [n for n in (1, 2, 4, 8) if n <= len(phon)]
            for n in n_avail:
                cases[("phonons", f"{n}")] = _mean(phon, n, it)
            if "samp073" in extra:
                arrs, k73 = extra["samp073"]
                full = _mean(arrs, 1, it)
                for ext in (40.0, 50.0, 64.0, 90.0):
                    cases[("detector", f"{ext:g} mrad")] = _crop(full, k73, ext)
                cases[("sampling", "0.073 A")] = _box_crop(full, k73, box)
            if "samp085" in extra:
                arrs, k85 = extra["samp085"]
                cases[("sampling", "0.085 A")] = _box_crop(_mean(arrs, 1, it), k85, box)
            if base:
                cases[("sampling", "0.1 A")] = _box_crop(_mean(base, 1, it), k_base, box)
                cases[("slices", "c/2")] = cases[("sampling", "0.1 A")]
            if "slice4" in extra:
                arrs, k4 = extra["slice4"]
                cases[("slices", "c/4")] = _box_crop(_mean(arrs, 1, it), k4, box)
            cases = {key: d for key, d in cases.items() if key[0] in families}
            refs = {"phonons": f"{n_avail[-1]}" if n_avail else "-", "sampling": "0.073 A",
                    "slices": "c/4", "detector": "90 mrad"}
            res = {key: _measure(np.asarray(d, np.float32), sites, cal.step_A, cell_A,
                                 electrons) for key, d in cases.items()}
            for (fam, setting), per in res.items():
                ref = res.get((fam, refs[fam]))
                for label, r in per.items():
                    row = {"structure": structure, "thickness_nm": round(float(t_nm), 1),
                           "family": fam, "setting": setting, "reference": refs[fam],
                           "label": label}
                    if ref is not None:
                        rm = ref[label]["mask"]
                        mm = r["mask"]
                        if fam == "detector":  # compare the pixels both detectors have
                            ky73, kx73 = extra["samp073"][1]
                            k90 = (ky73[np.abs(ky73) <= 90.0 + 1e-6],
                                   kx73[np.abs(kx73) <= 90.0 + 1e-6])
                            rm = _crop(rm, k90, float(setting.split()[0]))
                        row["mask_pcc"] = _pearson(mm, rm)
                        row["contrast_rel"] = r["contrast"] / ref[label]["contrast"]
                    row.update({k: r[k] for k in ("contrast", "specificity", "cnr_xfit",
                                                  "cnr_xfit_b", "mask_pcc_noise")})
                    rows.append(row)
            print(f"{structure} {t_nm:.1f} nm: {len(cases)} settings", flush=True)
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> str:
    """Markdown table: per structure x thickness x family x setting, worst case over species."""
    df = df.copy()
    df["dcnr"] = np.nan
    for _, g in df.groupby(["structure", "thickness_nm", "family", "label"]):
        ref = g[g["setting"] == g["reference"].iloc[0]]
        if len(ref):
            idx = g.index
            df.loc[idx, "dcnr"] = (g["cnr_xfit"] - float(ref["cnr_xfit"].iloc[0])).abs()
    df["cnr_noise"] = (df["cnr_xfit"] - df["cnr_xfit_b"]).abs()
    lines = ["| structure | t (nm) | family | setting (ref) | min mask PCC | "
             "contrast / ref | specificity | max abs ΔCNR vs ref | CNR noise (2 draws) | "
             "mask PCC between 2 noise draws |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {"sampling": 0, "slices": 1, "phonons": 2, "detector": 3}
    keys = df[["structure", "thickness_nm", "family", "setting", "reference"]]
    keys = keys.drop_duplicates()
    keys = keys.sort_values(["structure", "thickness_nm", "family", "setting"],
                            key=lambda c: c.map(order) if c.name == "family" else c)
    for _, k in keys.iterrows():
        g = df[(df.structure == k.structure) & (df.thickness_nm == k.thickness_nm)
               & (df.family == k.family) & (df.setting == k.setting)]
        lines.append(
            f"| {k.structure} | {k.thickness_nm:g} | {k.family} | {k.setting} ({k.reference}) "
            f"| {g['mask_pcc'].min():.4f} | {g['contrast_rel'].min():.3f}–"
            f"{g['contrast_rel'].max():.3f} | {g['specificity'].min():.2f}–"
            f"{g['specificity'].max():.2f} | {g['dcnr'].max():.2f} | {g['cnr_noise'].max():.2f} "
            f"| {g['mask_pcc_noise'].min():.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--lfp-step-A", type=float, default=0.8)
    s.add_argument("--pto-step-A", type=float, default=0.4)
    s.add_argument("--max-configs", type=int, default=N_CONFIGS)
    s.add_argument("--only", nargs="*", default=None, help="variants to run")
    s.add_argument("--only-chunks", nargs="*", default=None, metavar="I:J",
                   help="configuration chunks to run (default: all)")
    a = sub.add_parser("analyse")
    a.add_argument("--out", default=str(ROOT / "benchmarks" / "results-convergence"))
    a.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    a.add_argument("--merge", action="store_true",
                   help="replace only these families' rows of the existing <out>.csv")
    for p in (s, a):
        p.add_argument("--workdir", default=str(ROOT / "results" / "convergence"))
    args = ap.parse_args(argv)
    if args.what == "simulate":
        run_simulations(args)
        return 0
    df = analyse(args)
    if args.merge and Path(args.out + ".csv").exists():
        old = pd.read_csv(args.out + ".csv")
        old = old[~old["family"].isin(args.families)]
        df = pd.concat([old, df], ignore_index=True)
    df.to_csv(args.out + ".csv", index=False, float_format="%.5g")
    text = summarise(df)
    Path(args.out + ".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
