"""End-to-end realism check: a synthetic LiFePO4 "experiment" through the experimental path.

Used by ``tests/test_realism.py`` and ``benchmarks/realism_report.py`` (same code, same numbers).

1. :func:`simulate_inputs` runs two independent abTEM simulations of LiFePO4 [001] (one projected
   cell, periodic scan): (a) the held-out thickness ``T`` with its own phonon seed — the "sample"
   — and (b) a thickness series (``T`` not in it) with another seed — the PACBED library.
2. :func:`write_experiment` turns (a) into a multi-cell, drifted, descanned, Poisson-noisy
   12-bit Merlin ``.mib`` file plus a calibration sidecar
   (:func:`tmask_validate.synthetic.make_experiment`).
3. :func:`analyse_experiment` treats the file as a user would: :func:`tmask_validate.io.load`
   (lazy) → :func:`tmask_validate.preprocess.descan_correct` → virtual ADF → sites by lattice
   fitting (:func:`tmask_validate.sites.sites_from_image`, basis Li/Fe/P+O/O mapped) → gaussian
   templates → :func:`tmask_validate.core.pcc_mask`; PACBED of the 2×-binned detector (a
   different "camera length" than the library) → :func:`tmask_validate.pacbed.match_thickness`.
4. :func:`reference_masks` makes the masks of the noiseless one-cell data at ``T`` with the true
   sites; :func:`compare` aligns the experimental masks on the reference detector grid (by the
   calibrated zero-angle pixel) and reports the mask PCCs, the thickness error and the site
   errors against the truth.

abTEM is imported only inside :func:`simulate_inputs` (via :mod:`tmask_validate.simulate`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import ndimage
from scipy.spatial import cKDTree

STRUCTURE = "LiFePO4_001"
LABELS = ("Li", "Fe", "P+O", "O")

#: settings of the realism check (smoke scale; see the README of the test for the costs)
DEFAULTS: dict[str, Any] = {
    "base_config": "config/smoke.yaml",
    "sampling_A": 0.15,              # multislice grid (antialias cutoff ~56 mrad at 200 kV)
    "scan_step_A": 0.45,             # one-cell scan -> 0.429 x 0.449 Å, 14 x 23 positions
    "phonon_configurations": 2,
    "held_out_thickness_nm": 22.5,   # realised as 48 periods = 22.5 nm
    "library_thicknesses_nm": [10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0],
    "held_out_seed": 101,
    "library_seed": 202,
    "fov_cells": [8, 4],             # 48.1 x 41.3 Å field of view (112 x 92 positions)
    "dose_e_per_A2": 1.0e5,
    "drift_A_per_row": [0.02, 0.01],
    "descan_px_per_A": [[0.05, 0.015], [-0.02, 0.06]],   # ~3 px across the scan
    "descan_offset_px": [0.0, 0.0],
    "noise_seed": 7,
    "bit_depth": 12,
    "adf_mrad": [25.0, 50.0],
    "template_sigma_A": 0.35,
    "pacbed_binning": 2,
    "descan_method": "integer",
}


def settings(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The realism settings: :data:`DEFAULTS` updated with ``overrides`` (unknown keys rejected)."""
    s = copy.deepcopy(DEFAULTS)
    for k, v in (overrides or {}).items():
        if k not in s:
            raise ValueError(f"unknown realism setting {k!r}; known: {sorted(s)}")
        s[k] = v
    return s


def _config(s: Mapping[str, Any], root: Path, thicknesses: Sequence[float], seed: int) -> dict:
    from tmask_validate.config import load_config

    base = Path(s["base_config"])
    cfg = copy.deepcopy(load_config(base if base.is_absolute() else root / base))
    cfg["seed"] = int(seed)
    cfg["simulation"]["sampling_A"] = float(s["sampling_A"])
    cfg["simulation"]["phonons"]["configurations"] = int(s["phonon_configurations"])
    entry = cfg["structures"][STRUCTURE]
    entry["thicknesses_nm"] = [float(t) for t in thicknesses]
    entry["scan"] = {"step_A": float(s["scan_step_A"])}
    cfg["structures"] = {STRUCTURE: entry}
    return cfg


def simulate_inputs(workdir: str | Path, s: Mapping[str, Any], *, root: str | Path = ".",
                    progress: bool = False) -> dict[str, Any]:
    """Held-out sample store and library store (abTEM). Returns paths and wall times."""
    from tmask_validate.simulate import simulate_structure

    workdir, root = Path(workdir), Path(root)
    workdir.mkdir(parents=True, exist_ok=True)
    lib_t = [float(t) for t in s["library_thicknesses_nm"]]
    held = float(s["held_out_thickness_nm"])
    out = {}
    t0 = time.perf_counter()
    out["sample_store"] = simulate_structure(
        _config(s, root, [held], s["held_out_seed"]), STRUCTURE, workdir / "sample.zarr",
        progress=progress)
    out["sample_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["library_store"] = simulate_structure(
        _config(s, root, lib_t, s["library_seed"]), STRUCTURE, workdir / "library.zarr",
        progress=progress)
    out["library_wall_s"] = time.perf_counter() - t0
    return out


def load_sample(sample_store: str | Path) -> dict[str, Any]:
    """Noiseless one-cell data, calibration, cell, sites and thickness of the sample store."""
    from tmask_validate.simulate import load_store, store_calibration, store_sites

    ds = load_store(sample_store)
    inten = ds["intensity"]
    if inten.sizes["thickness"] != 1:
        raise ValueError("the sample store must hold one thickness")
    cell = ds.attrs["cell_A"]
    cell = json.loads(cell) if isinstance(cell, str) else cell
    return {
        "intensity": np.asarray(inten.isel(thickness=0).values, dtype=np.float32),
        "calibration": store_calibration(ds),
        "cell_A": tuple(float(v) for v in cell),
        "sites": store_sites(ds),
        "thickness_nm": float(ds["thickness"].values[0]),
    }


def write_experiment(sample: Mapping[str, Any], workdir: str | Path,
                     s: Mapping[str, Any]) -> dict[str, Any]:
    """The synthetic experiment as ``experiment.mib`` + ``experiment.calibration.yaml``."""
    from tmask_validate.io import write_mib
    from tmask_validate.synthetic import make_experiment

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    counts, truth = make_experiment(
        sample["intensity"], cell_A=sample["cell_A"], fov_cells=s["fov_cells"],
        dose_e_per_A2=s["dose_e_per_A2"], drift_A_per_row=s["drift_A_per_row"],
        descan_px_per_A=s["descan_px_per_A"], descan_offset_px=s["descan_offset_px"],
        seed=s["noise_seed"], bit_depth=s["bit_depth"], sites_one_cell=sample["sites"])
    mib = write_mib(workdir / "experiment.mib", counts, bit_depth=int(s["bit_depth"]))
    cal = sample["calibration"]
    # what a microscopist knows: nominal step, detector sampling, energy; the centre is measured
    side = {"step_A": [float(v) for v in truth["step_A"]],
            "mrad_per_px": [float(v) for v in cal.mrad_per_px],
            "energy_keV": float(cal.energy_keV), "scan_rotation_deg": 0.0}
    cal_path = workdir / "experiment.calibration.yaml"
    cal_path.write_text(yaml.safe_dump(side, sort_keys=False))
    return {"mib": mib, "calibration": cal_path, "truth": truth, "shape": counts.shape}


def _site_table_one_cell() -> tuple[pd.DataFrame, tuple[float, float]]:
    from tmask_validate import structures

    table = structures.projected_columns("LiFePO4")
    cell = structures.projected_cell_A(structures.build("LiFePO4"))
    return table, (float(cell[0]), float(cell[1]))


def _templates(sites, shape, step_A, sigma_A, periodic) -> dict[str, np.ndarray]:
    from tmask_validate.templates import species_templates

    return species_templates(sites, shape, step_A=step_A, kind="gaussian", sigma_A=sigma_A,
                             periodic=periodic, labels=list(LABELS))


def _pcc_masks(data, temps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from tmask_validate import core

    names = list(temps)
    masks = core.pcc_mask(data, np.stack([temps[n] for n in names]))
    return {n: np.asarray(masks[i], dtype=np.float64) for i, n in enumerate(names)}


def reference_masks(sample: Mapping[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    """PCC masks of the noiseless one-cell data with the true (periodic) sites."""
    cal = sample["calibration"]
    shape = sample["intensity"].shape[:2]
    temps = _templates(sample["sites"], shape, cal.step_A, s["template_sigma_A"], True)
    # zero-angle pixel measured as on the experiment (mean BF-disc centre, the descan target),
    # so that the two detector grids are aligned by the same estimator
    from tmask_validate.preprocess import disc_centers

    centre = disc_centers(sample["intensity"]).mean(axis=(1, 2))
    return {"masks": _pcc_masks(sample["intensity"], temps),
            "center_px": (float(centre[0]), float(centre[1])),
            "calibrated_center_px": tuple(cal.center_px), "mrad_per_px": tuple(cal.mrad_per_px)}


def analyse_experiment(mib: str | Path, calibration: str | Path, library_store: str | Path,
                       s: Mapping[str, Any]) -> dict[str, Any]:
    """The experimental path on the ``.mib`` file (no simulation ground truth used)."""
    from tmask_validate import core, io, pacbed, preprocess
    from tmask_validate.calibration import Calibration
    from tmask_validate.sites import sites_from_image

    t0 = time.perf_counter()
    arr = io.load(mib, calibration=calibration)
    corrected = preprocess.descan_correct(arr, method=s["descan_method"])
    cal = Calibration.from_dict(json.loads(corrected.attrs["calibration"]))
    data = np.asarray(corrected.data.compute())  # small: one read, many passes follow
    det = data.shape[2:]
    adf = core.virtual_detector_masks(det, {"adf": tuple(s["adf_mrad"])},
                                      center_px=cal.center_px, mrad_per_px=cal.mrad_per_px)
    adf_img = np.asarray(core.virtual_images(data, adf)["adf"], dtype=np.float64)
    table, cell = _site_table_one_cell()
    # crystal rotation from the calibration (as `tmask-validate analyse --structure` does); the
    # rotation search (rotation_deg=None) is run as well and reported, not relied on
    sites, info = sites_from_image(adf_img, table, cell, step_A=cal.step_A, match_label="Fe",
                                   rotation_deg=cal.scan_rotation_deg)
    try:
        _, searched = sites_from_image(adf_img, table, cell, step_A=cal.step_A,
                                       match_label="Fe", rotation_deg=None)
        info["searched_rotation_deg"] = float(searched["rotation_deg"])
    except ValueError as err:
        info["searched_rotation_deg"] = f"failed: {err}"
    temps = _templates(sites, data.shape[:2], cal.step_A, s["template_sigma_A"], False)
    masks = _pcc_masks(data, temps)
    # PACBED on a 2x binned detector (another camera length than the library's)
    binned = preprocess.bin_detector(corrected, int(s["pacbed_binning"]))
    bcal = Calibration.from_dict(json.loads(binned.attrs["calibration"]))
    mean, var = pacbed.pacbed(binned)
    library = pacbed.library_from_store(library_store)
    match = pacbed.match_thickness(mean, library, pattern_mrad_per_px=bcal.mrad_per_px,
                                   pattern_center_px=bcal.center_px, pattern_var=var)
    return {"sites": sites, "site_info": info, "masks": masks, "calibration": cal,
            "descan": json.loads(corrected.attrs["descan"]), "adf_image": adf_img,
            "pacbed": match, "wall_s": time.perf_counter() - t0}


def align_mask(mask: np.ndarray, center_px: Sequence[float], target_shape: Sequence[int],
               target_center_px: Sequence[float], *, order: int = 3) -> np.ndarray:
    """Resample a mask onto another detector grid of the same mrad/px (centres aligned).

    Cubic-spline interpolation (``order``). Pixels that fall outside the source grid are NaN
    (ignored by
    :func:`tmask_validate.metrics.mask_similarity`).
    """
    d = np.asarray(center_px, float) - np.asarray(target_center_px, float)
    yy, xx = np.mgrid[: int(target_shape[0]), : int(target_shape[1])].astype(float)
    return ndimage.map_coordinates(np.asarray(mask, float), [yy + d[0], xx + d[1]], order=order,
                                   mode="constant", cval=np.nan)


def site_errors(found: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Per label: matched columns, RMS and max distance [Å] from each true column to the found one.

    Only true columns at least 1 Å inside the field of view are scored; a label also reports
    ``missing`` (no found column of that label within 1 Å).
    """
    out = {}
    for lab in LABELS:
        f = found.loc[found["label"] == lab, ["y_A", "x_A"]].to_numpy(float)
        t = truth.loc[truth["label"] == lab, ["y_A", "x_A"]].to_numpy(float)
        if len(t) == 0:
            continue
        if len(f) == 0:
            out[lab] = {"n": int(len(t)), "missing": int(len(t)), "rms_A": float("inf"),
                        "max_A": float("inf")}
            continue
        d, _ = cKDTree(f).query(t)
        ok = d < 1.0
        out[lab] = {"n": int(len(t)), "missing": int((~ok).sum()),
                    "rms_A": float(np.sqrt(np.mean(d[ok] ** 2))) if ok.any() else float("inf"),
                    "max_A": float(d[ok].max()) if ok.any() else float("inf")}
    return out


def compare(exp: Mapping[str, Any], ref: Mapping[str, Any], truth: Mapping[str, Any],
            thickness_nm: float) -> dict[str, Any]:
    """Mask PCCs (experiment vs noiseless reference), thickness error and site errors."""
    from tmask_validate.metrics import mask_similarity

    cal = exp["calibration"]
    pccs = {}
    for name, ref_mask in ref["masks"].items():
        aligned = align_mask(exp["masks"][name], cal.center_px, ref_mask.shape,
                             ref["center_px"])
        pccs[name] = mask_similarity(aligned, ref_mask)
    # true sites that lie >= 1 Å inside the scanned area
    sy, sx = truth["scan_shape"]
    st_y, st_x = truth["step_A"]
    t = truth["sites"]
    inside = ((t["y_A"] >= 1.0) & (t["y_A"] <= (sy - 1) * st_y - 1.0)
              & (t["x_A"] >= 1.0) & (t["x_A"] <= (sx - 1) * st_x - 1.0))
    match = exp["pacbed"]
    return {
        "mask_pcc": pccs,
        "thickness_true_nm": float(thickness_nm),
        "thickness_fit_nm": float(match.thickness_nm),
        "thickness_uncertainty_nm": float(match.uncertainty_nm),
        "thickness_interval_nm": [float(v) for v in match.interval_nm],
        "thickness_error_nm": float(match.thickness_nm - thickness_nm),
        "site_errors": site_errors(exp["sites"], t[inside]),
        "rotation_deg": float(exp["site_info"]["rotation_deg"]),
        "lattice_rms_px": float(exp["site_info"]["fit"]["rms"]),
        "searched_rotation_deg": exp["site_info"]["searched_rotation_deg"],
        "descan_residual_rms_px": [float(v) for v in exp["descan"]["residual_rms_px"]],
        "saturated_fraction": float(truth["saturated_fraction"]),
        "electrons_per_probe": float(truth["electrons_per_probe"] or 0.0),
    }


def run(workdir: str | Path, overrides: Mapping[str, Any] | None = None, *,
        root: str | Path = ".", stores: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whole check: simulate (unless ``stores`` given), build, analyse, compare."""
    s = settings(overrides)
    workdir = Path(workdir)
    t0 = time.perf_counter()
    if stores is None:
        stores = simulate_inputs(workdir, s, root=root)
    sample = load_sample(stores["sample_store"])
    exp_files = write_experiment(sample, workdir, s)
    exp = analyse_experiment(exp_files["mib"], exp_files["calibration"],
                             stores["library_store"], s)
    ref = reference_masks(sample, s)
    res = compare(exp, ref, exp_files["truth"], sample["thickness_nm"])
    res["settings"] = s
    res["step_A"] = [float(v) for v in exp_files["truth"]["step_A"]]
    res["sites"] = exp["sites"]
    res["truth_sites"] = exp_files["truth"]["sites"]
    res["scan_shape"] = list(exp_files["shape"][:2])
    res["detector_shape"] = list(exp_files["shape"][2:])
    res["analysis_wall_s"] = float(exp["wall_s"])
    res["simulation_wall_s"] = {k: float(v) for k, v in stores.items() if k.endswith("wall_s")}
    res["total_wall_s"] = float(time.perf_counter() - t0)
    res["files"] = {"mib": str(exp_files["mib"]), "calibration": str(exp_files["calibration"]),
                    **{k: str(v) for k, v in stores.items() if k.endswith("store")}}
    return res


def format_report(res: Mapping[str, Any]) -> str:
    """Human-readable summary of :func:`run`'s result."""
    s = res["settings"]
    lines = [
        "Realism check (synthetic LiFePO4 [001] experiment through the experimental path)",
        f"  sample: {res['thickness_true_nm']:.2f} nm, seed {s['held_out_seed']}; library "
        f"{s['library_thicknesses_nm']} nm, seed {s['library_seed']}; "
        f"{s['phonon_configurations']} phonon configs, {s['sampling_A']} Å grid",
        f"  experiment: scan {res['scan_shape']} (fov {s['fov_cells']} cells), detector "
        f"{res['detector_shape']}, dose {s['dose_e_per_A2']:.3g} e/Å² "
        f"({res['electrons_per_probe']:.0f} e/probe), drift {s['drift_A_per_row']} Å/row, "
        f"descan {s['descan_px_per_A']} px/Å, 12-bit, saturated "
        f"{100 * res['saturated_fraction']:.3f} %",
        f"  descan residual rms (ky, kx) px: "
        f"{res['descan_residual_rms_px'][0]:.3f}, {res['descan_residual_rms_px'][1]:.3f}",
        f"  lattice: rotation {res['rotation_deg']:.2f} deg (search without it: "
        f"{res['searched_rotation_deg']}), rms {res['lattice_rms_px']:.3f} px",
        "  site errors vs truth (Å): " + "; ".join(
            f"{k} rms {v['rms_A']:.3f} max {v['max_A']:.3f} (n {v['n']}, missing "
            f"{v['missing']})" for k, v in res["site_errors"].items()),
        "  mask PCC (experiment vs noiseless one-cell, true sites): " + ", ".join(
            f"{k} {v:.3f}" for k, v in res["mask_pcc"].items()),
        f"  PACBED thickness: {res['thickness_fit_nm']:.2f} ± "
        f"{res['thickness_uncertainty_nm']:.2f} nm (true {res['thickness_true_nm']:.2f}, error "
        f"{res['thickness_error_nm']:+.2f} nm)",
        f"  wall time: simulation {res['simulation_wall_s']}, analysis "
        f"{res['analysis_wall_s']:.1f} s, total {res['total_wall_s']:.1f} s",
    ]
    return "\n".join(lines)
