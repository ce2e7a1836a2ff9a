"""Realism test (end to end): a synthetic LiFePO4 [001] "experiment" through the experimental path.

Two independent abTEM simulations (smoke-like settings, 0.15 Å grid, 0.43 x 0.45 Å one-cell
scan, 2 frozen-phonon configurations): the sample at a held-out thickness (22.5 nm, seed 101)
and a PACBED library 10-40 nm in 5 nm steps (seed 202; 22.5 nm not in it). The sample becomes
an 8 x 4 cell (112 x 92 probe positions) field of view with scan drift (0.02, 0.01) Å/row, a
descan of ~3 px across the scan and Poisson noise at 1e6 e/Å², saved as a 12-bit Merlin .mib
with a calibration sidecar; the analysis sees only that file (see tmask_validate.realism).

Pass criteria (the issue's): PCC masks of O and Li (gaussian templates, sites from lattice
fitting) match the noiseless one-cell masks with the true sites at PCC >= 0.8, and the PACBED
thickness is within 5 nm. Cost: ~1 min of simulation + ~1 min of analysis on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the stated dose of the realism test [e-/Å²]
DOSE_E_PER_A2 = 1.0e6


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    pytest.importorskip("abtem")
    from tmask_validate import realism

    work = tmp_path_factory.mktemp("realism_sim")
    return realism.simulate_inputs(work, realism.settings(), root=ROOT)


@pytest.fixture(scope="module")
def result(stores, tmp_path_factory):
    from tmask_validate import realism

    work = tmp_path_factory.mktemp("realism_exp")
    res = realism.run(work, {"dose_e_per_A2": DOSE_E_PER_A2}, root=ROOT, stores=stores)
    print("\n" + realism.format_report(res))
    return res


@pytest.mark.slow
def test_realism_masks_sites_and_thickness(result):
    res = result
    # the experiment is realistic: noisy 12-bit counts, nothing (meaningful) saturated
    assert res["saturated_fraction"] < 1e-4
    assert res["scan_shape"] == [112, 92]
    # sites found by lattice fitting land on the true (drifted) columns, none missing
    for label, err in res["site_errors"].items():
        assert err["missing"] == 0, (label, err)
        assert err["rms_A"] < 0.1, (label, err)
    # masks: experiment (sites fitted) vs noiseless one-cell simulation (true sites)
    pcc = res["mask_pcc"]
    assert pcc["O"] >= 0.8, pcc
    assert pcc["Li"] >= 0.8, pcc
    assert pcc["all"] >= 0.8, pcc
    # PACBED thickness of the binned experiment against the independent library
    assert abs(res["thickness_error_nm"]) <= 5.0, res
    lo, hi = res["thickness_interval_nm"]
    assert lo - 1.0 <= res["thickness_true_nm"] <= hi + 1.0, res
    assert all(np.isfinite(v) for v in pcc.values())


@pytest.mark.slow
def test_realism_through_the_cli(result, tmp_path):
    """The same file through `tmask-validate inspect / find-sites / analyse`."""
    import pandas as pd
    import xarray as xr

    from tmask_validate.cli import main
    from tmask_validate.realism import site_errors

    mib, cal = result["files"]["mib"], result["files"]["calibration"]
    assert main(["inspect", mib, "--calibration", cal]) == 0
    sites_csv = tmp_path / "sites.csv"
    assert main(["find-sites", mib, "--calibration", cal, "--structure", "LiFePO4",
                 "--lattice-rotation-deg", "0", "--out", str(sites_csv)]) == 0
    sites = pd.read_csv(sites_csv)
    assert set(sites["label"]) == {"Li", "Fe", "P+O", "O"}
    out = tmp_path / "exp.nc"
    assert main(["analyse", mib, "--calibration", cal, "--sites", str(sites_csv),
                 "--out", str(out)]) == 0
    for path in (out, out.with_suffix(".csv"), out.with_suffix(".png")):
        assert path.is_file() and path.stat().st_size > 0, path
    with xr.open_dataset(out, engine="h5netcdf") as ads:
        masks = ads["masks"].values
        images = ads["images"].values
        has_mask = ads["has_mask"].values.astype(bool)
        cal_out = json.loads(ads.attrs["calibration"])
    assert np.all(np.isfinite(masks[has_mask]))
    assert np.all(np.isfinite(images))
    assert cal_out["step_A"] == pytest.approx(result["step_A"], rel=1e-9)
    metrics = pd.read_csv(out.with_suffix(".csv"))
    assert len(metrics) > 0 and np.all(np.isfinite(metrics["value"].to_numpy(float)))
    # find-sites (no descan correction, its own ADF range) also lands on the true columns
    truth = result["truth_sites"]
    sy, sx = result["scan_shape"]
    inner = truth[(truth["y_A"] >= 1) & (truth["y_A"] <= (sy - 1) * result["step_A"][0] - 1)
                  & (truth["x_A"] >= 1) & (truth["x_A"] <= (sx - 1) * result["step_A"][1] - 1)]
    errors = site_errors(sites, inner)
    print("find-sites CLI site errors vs truth:", errors)
    for label, err in errors.items():
        assert err["missing"] == 0 and err["rms_A"] < 0.1, (label, err)
