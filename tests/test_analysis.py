"""Known-answer tests of tmask_validate.analysis / claims on synthetic species-specific 4D data.

The synthetic "crystal" has three column types whose diffraction signals live in disjoint
detector regions (Hv: high angles, Md: one pair of BF-disc lobes, Lt: the other pair), so a
template mask of the right type must give a specific image and wrong-site controls must not.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from tmask_validate.analysis import (
    analyse_dataset,
    analysis_options,
    control_sites,
    dataset_metrics,
    lightest_label,
    partial_window,
    tiled_field,
)
from tmask_validate.calibration import Calibration
from tmask_validate.claims import _control_rows, evaluate_claims, label_for
from tmask_validate.workflow import targets

STEP = 0.2
CELL_PX = 20
BASIS = pd.DataFrame({
    "label": ["Hv", "Hv", "Md", "Md", "Lt", "Lt"],
    "y_A": [0.5, 2.5, 0.5, 2.5, 1.5, 3.5],
    "x_A": [0.5, 2.5, 2.5, 0.5, 1.5, 3.5],
    "composition": ["Pb1", "Pb1", "Ti1", "Ti1", "O1", "O1"],
    "n_atoms": [1] * 6,
})
OPTS = {
    "detectors_mrad": {"bf": [0, 6], "abf": [6, 14], "adf": [16, 40]},
    "abf_sweep": {"inner_mrad": [4, 8], "outer_mrad": [12, 14]},
    "templates": {"kinds": ["binary", "gaussian"], "gaussian_sigma_A": [0.35],
                  "normalisations": ["pcc"]},
    "metrics": {"radius_A": 0.3},
}


def synthetic(cells: int = 1, dose: float | None = None, seed: int = 0, det: int = 24):
    """Periodic scan of ``cells`` x ``cells`` unit cells; returns data, sites, calibration, cell."""
    n = CELL_PX * cells
    cell = CELL_PX * STEP
    sites = pd.concat([BASIS.assign(y_A=BASIS.y_A + i * cell, x_A=BASIS.x_A + j * cell)
                       for i in range(cells) for j in range(cells)], ignore_index=True)
    yy, xx = np.mgrid[0:n, 0:n] * STEP
    ky, kx = np.mgrid[0:det, 0:det] - (det - 1) / 2
    r, th = np.hypot(ky, kx), np.arctan2(ky, kx)
    region = {
        "Hv": (r > 8) * (1 + 0.3 * np.cos(4 * th)),
        "Md": ((r > 3) & (r < 7) & (np.cos(2 * th) > 0.3)).astype(float),
        "Lt": ((r > 2) & (r < 6) & (np.sin(2 * th) > 0.3)).astype(float),
    }
    amp = {"Hv": 3.0, "Md": 2.0, "Lt": 1.0}
    data = np.tile((r < 7) * 5.0 + 0.2, (n, n, 1, 1))
    period = n * STEP
    for row in sites.itertuples():
        dy = yy - row.y_A
        dy -= period * np.round(dy / period)
        dx = xx - row.x_A
        dx -= period * np.round(dx / period)
        bump = np.exp(-(dy**2 + dx**2) / (2 * 0.3**2))
        data += amp[row.label] * bump[:, :, None, None] * region[row.label][None, None]
    if dose is not None:
        data = np.random.default_rng(seed).poisson(data * dose).astype(np.float32)
    cal = Calibration(step_A=(STEP, STEP), mrad_per_px=(2.0, 2.0),
                      center_px=((det - 1) / 2, (det - 1) / 2))
    return data.astype(np.float32), sites, cal, (cell, cell)


@pytest.fixture(scope="module")
def analysed():
    data, sites, cal, cell = synthetic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ads = analyse_dataset(data, sites, cal, cell_A=cell, periodic=True, options=OPTS,
                              meta={"structure": "synth", "dose_key": "noiseless"})
        met = dataset_metrics(ads)
    return ads, met


def _value(met, name, metric, species):
    v = met[(met["name"] == name) & (met["metric"] == metric) & (met["species"] == species)]
    assert len(v) == 1, (name, metric, species)
    return float(v["value"].iloc[0])


def test_every_entry_finite_and_described(analysed):
    ads, met = analysed
    assert np.all(np.isfinite(ads["images"].values))
    assert np.all(np.isfinite(ads["masks"].values))
    assert np.all(np.isfinite(met["value"].to_numpy()))
    names = [str(n) for n in ads["name"].values]
    for must in ("bf", "abf", "adf", "abf_best", "adf_pcc", "adf_opt", "icom", "eigen",
                 "tm_pcc_binary_Hv", "tm_pcc_g0.35_all", "partial_pcc_g0.35_Lt",
                 "ctl_random_pcc_binary", "ctl_shift_pcc_g0.35_Lt", "half_pcc_binary_Md",
                 "half_ctl_random_pcc_g0.35"):
        assert must in names, must
    cal = json.loads(ads.attrs["calibration"])
    assert cal["step_A"] == [STEP, STEP]
    # the optimised-ADF mask is the Eq. 8 map thresholded at r > 0
    assert np.all(ads["masks"].sel(name="adf_opt").values >= 0)


@pytest.mark.parametrize("label", ["Hv", "Md", "Lt"])
def test_right_template_is_specific(analysed, label):
    _, met = analysed
    name = f"tm_pcc_g0.35_{label}"
    assert _value(met, name, "target_bright", label) == 1.0
    assert _value(met, name, "specificity", label) > 0.9
    # and the image's own columns stand far above the clutter
    assert _value(met, name, "cnr", label) > 3.0


def test_controls_are_not_specific(analysed):
    """Random/shifted-site templates must not light their (empty) sites: their fake-site CNR
    is a small fraction of the true templates' target CNR, and their images do not reproduce
    the wrong-site template."""
    _, met = analysed
    rows = {r["claim_id"]: r for r in _control_rows(met, ("synth", "noiseless", 0.0), 0.5,
                                                    ["Hv", "Md", "Lt"],
                                                    (("binary", 0.0), ("gaussian", 0.35)))}
    assert rows["controls_not_specific"]["passed"], rows["controls_not_specific"]
    assert rows["controls_not_specific"]["measured"] < 0.1
    assert rows["heldout_controls_not_specific"]["passed"]
    assert rows["controls_not_reproduced"]["passed"]
    # binary controls vs binary templates: the output hardly resembles the wrong-site template
    tp = met[(met.metric == "template_pcc") & (met.template_kind == "binary")]
    assert tp[tp.family == "control"]["value"].max() < 0.25 * tp[tp.family == "template"][
        "value"].median()


def test_held_out_half_generalises(analysed):
    _, met = analysed
    for label in ("Hv", "Md", "Lt"):
        assert _value(met, f"half_pcc_g0.35_{label}", "specificity", label) > 0.9
        assert _value(met, f"half_pcc_g0.35_{label}", "template_pcc", label) > 0.3


def test_eigen_image_resembles_adf(analysed):
    _, met = analysed
    assert _value(met, "eigen", "image_similarity", "adf") > 0.9


def test_best_abf_is_the_sweep_maximum(analysed):
    ads, met = analysed
    target = ads.attrs["abf_best_target"]
    assert target == "Lt"  # the lightest column type (O1 < Ti1 < Pb1)
    cnrs = met[(met.family.isin(["abf_sweep", "virtual"])) & (met.metric == "cnr")
               & (met.species == target) & (met.name.str.startswith("abf"))]
    best = _value(met, "abf_best", "cnr", target)
    assert best == pytest.approx(cnrs["value"].max(), rel=1e-6)


def test_partial_template_equals_full_on_tiled_periodic_data():
    """On a 3 x 3-cell periodic scan the 1/9 window is exactly one cell, which holds the same
    (template, pattern) pairs as the whole scan: partial and full masks must coincide."""
    data, sites, cal, cell = synthetic(cells=3)
    opts = {**OPTS, "controls": {"enabled": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ads = analyse_dataset(data, sites, cal, cell_A=cell, periodic=True, options=opts)
    assert ads["region_partial"].values.sum() == CELL_PX * CELL_PX
    for label in ("Hv", "Md", "Lt", "all"):
        part = ads["masks"].sel(name=f"partial_pcc_g0.35_{label}").values
        full = ads["masks"].sel(name=f"tm_pcc_g0.35_{label}").values
        np.testing.assert_allclose(part, full, atol=1e-5)


def test_noisy_data_still_specific_and_netcdf_roundtrip(tmp_path):
    data, sites, cal, cell = synthetic(dose=20.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ads = analyse_dataset(data, sites, cal, cell_A=cell, periodic=True, options=OPTS,
                              meta={"structure": "synth", "dose_key": "d20"})
        path = tmp_path / "a.nc"
        ads.to_netcdf(path, engine="h5netcdf")
        import xarray as xr

        back = xr.open_dataset(path, engine="h5netcdf").load()
        m1, m2 = dataset_metrics(ads), dataset_metrics(back)
    pd.testing.assert_frame_equal(m1, m2, check_dtype=False, atol=1e-6)
    assert _value(m1, "tm_pcc_g0.35_Hv", "specificity", "Hv") > 0.8
    assert set(m1["dose_key"]) == {"d20"}


def test_lightest_label_and_label_for():
    assert lightest_label(BASIS) == "Lt"
    lfp = pd.DataFrame({"label": ["Fe", "P+O", "Li", "O"], "y_A": 0.0, "x_A": 0.0,
                        "composition": ["Fe1", "P1O1", "Li1", "O1"]})
    assert lightest_label(lfp) == "Li"
    assert label_for(["Pb", "Ti+O", "O"], "Ti") == "Ti+O"
    assert label_for(["Pb", "Ti+O", "O"], "O") == "O"
    assert label_for(["Fe", "P+O"], "P") == "P+O"
    assert label_for(["Fe"], "Li") is None


def test_control_sites_keep_away_from_columns():
    ctl = control_sites(BASIS, (CELL_PX, CELL_PX), step_A=STEP, periodic=True,
                        min_distance_A=0.6, seed=3)
    real = BASIS[["y_A", "x_A"]].to_numpy()
    period = CELL_PX * STEP
    for key, tab in ctl.items():
        pts = tab[["y_A", "x_A"]].to_numpy()
        d = pts[:, None] - real[None]
        d -= period * np.round(d / period)
        assert np.sqrt((d**2).sum(-1)).min() >= 0.6 - 1e-9, key
    assert len(ctl["random"]) == 2  # as many as the most numerous column type
    assert {"shift_Hv", "shift_Md", "shift_Lt"} <= set(ctl)


def test_partial_window_is_a_ninth_and_holds_every_type():
    reg = partial_window(BASIS.assign(y_A=BASIS.y_A, x_A=BASIS.x_A), (30, 30), step_A=STEP * 2 / 3,
                         periodic=True)
    assert reg.sum() == 100
    with pytest.raises(ValueError):
        partial_window(BASIS, (9, 9), step_A=STEP, fraction=0.0)


def test_options_validated():
    assert analysis_options()["detectors_mrad"]["abf"] == [11.0, 23.5]
    with pytest.raises(ValueError):
        analysis_options({"templates": {"normalisations": ["nope"]}})


def test_claim_that_fails_is_reported_failing():
    rows = []
    for name, lab, spec in (("tm_pcc_binary_O", "O", 0.3), ("tm_pcc_binary_Li", "Li", 0.95)):
        rows += [{"name": name, "family": "template", "target": lab, "normalisation": "pcc",
                  "template_kind": "binary", "metric": "specificity", "species": lab,
                  "value": spec},
                 {"name": name, "family": "template", "target": lab, "normalisation": "pcc",
                  "template_kind": "binary", "metric": "target_bright", "species": lab,
                  "value": 1.0},
                 {"name": name, "family": "template", "target": lab, "normalisation": "pcc",
                  "template_kind": "binary", "metric": "cnr", "species": lab, "value": 5.0}]
    met = pd.DataFrame(rows).assign(structure="LFP", dose_key="noiseless", thickness_nm=70.0,
                                    thickness_config_nm=70.0)
    cfg = {"structures": {"LFP": {"builder": "LiFePO4"}}}
    claims = evaluate_claims(met, config=cfg).set_index("claim_id")
    assert not claims.loc["O_specific", "passed"]
    assert claims.loc["O_specific", "measured"] == pytest.approx(0.3)
    assert claims.loc["Li_specific", "passed"]


def test_workflow_keys():
    assert targets.thickness_key(20) == "t20nm"
    assert targets.thickness_key(72.5) == "t72.5nm"
    assert targets.dose_key(1e4) == "d10000"
    assert targets.dose_key(1e12) == "d1e12"
    assert targets.dose_key(None) == "noiseless"
    cfg = {"simulation": {"phonons": {"configurations": 5, "chunk_size": 2}}}
    assert targets.chunk_ranges(cfg) == {"c0-2": "0:2", "c2-4": "2:4", "c4-5": "4:5"}


@pytest.mark.slow
def test_cli_analyse_experimental_file(tmp_path):
    """An experimental-style file (.npy + calibration YAML + sites CSV, or a config experiments
    entry) gives masks/images (.nc), the metrics CSV and a summary figure."""
    import subprocess
    import sys

    import xarray as xr
    import yaml

    data, sites, cal, _ = synthetic()
    np.save(tmp_path / "scan.npy", data)
    (tmp_path / "cal.yaml").write_text(yaml.safe_dump(cal.to_dict()))
    sites.to_csv(tmp_path / "sites.csv", index=False)
    cfg = {"name": "exp", "seed": 0, "analysis": OPTS,
           "experiments": {"synth": {"file": "scan.npy", "calibration": "cal.yaml",
                                     "structure": "PbTiO3", "sites": "sites.csv",
                                     "region": {"y_A": [0, 1.9], "x_A": [0, 1.9]}}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    exe = [sys.executable, "-m", "tmask_validate.cli", "analyse"]
    runs = {
        "a": [str(tmp_path / "scan.npy"), "--calibration", str(tmp_path / "cal.yaml"),
              "--sites", str(tmp_path / "sites.csv"), "--config", str(tmp_path / "exp.yaml")],
        "b": [str(tmp_path / "scan.npy"), "--config", str(tmp_path / "exp.yaml"),
              "--experiment", "synth"],
    }
    for key, args in runs.items():
        out = tmp_path / f"{key}.nc"
        res = subprocess.run(exe + args + ["--out", str(out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        assert out.is_file() and out.with_suffix(".csv").is_file()
        assert out.with_suffix(".png").is_file() and out.with_suffix(".pdf").is_file()
        ads = xr.open_dataset(out, engine="h5netcdf")
        assert "tm_pcc_g0.35_Hv" in ads["name"].values
        if key == "b":  # the configured partial-template region was used
            assert int(ads["region_partial"].values.sum()) == 10 * 10
        ads.close()


def _partial_sims(met):
    return met[(met.metric == "mask_similarity") & (met.family == "partial")]


def test_tiled_field_exact_tiling_and_independent_noise():
    data, sites, _, cell = synthetic(det=8)
    field, fs = tiled_field(data, sites, cell_A=cell, cells=(3, 2))
    assert field.shape == (3 * CELL_PX, 2 * CELL_PX, 8, 8) and len(fs) == 6 * len(sites)
    np.testing.assert_array_equal(field[CELL_PX:2 * CELL_PX, CELL_PX:], data)
    assert fs["y_A"].max() == pytest.approx(sites["y_A"].max() + 2 * cell[0])
    counts, _ = tiled_field(data, sites, cell_A=cell, cells=(3, 3), electrons_per_probe=50.0,
                            seed=4)
    assert counts.dtype == np.uint32
    cells = counts.reshape(3, CELL_PX, 3, CELL_PX, 8, 8).astype(float)
    # every cell is its own Poisson draw of the same expectation
    assert not np.array_equal(cells[0, :, 0], cells[1, :, 2])
    np.testing.assert_allclose(counts.mean(axis=(0, 1)), 50.0 * data.mean(axis=(0, 1)),
                               rtol=0.02, atol=0.5)
    again, _ = tiled_field(data, sites, cell_A=cell, cells=(3, 3), electrons_per_probe=50.0,
                           seed=4)
    np.testing.assert_array_equal(counts, again)
    with pytest.raises(ValueError, match="cells"):
        tiled_field(data, sites, cell_A=cell, cells=(0, 3))


def test_partial_on_one_cell_noiseless_scan_is_tiled_and_trivial(analysed):
    """One-cell periodic scan: partial templates come from an (offset) 1/9 window of a 3x3-cell
    tiled field; noiseless, that window is one whole cell, so partial = full
    mask (uninformative)."""
    ads, met = analysed
    names = [str(n) for n in ads["name"].values]
    assert "partialref_pcc_g0.35_Lt" in names and "region_partial" not in ads
    sims = _partial_sims(met)
    assert set(sims["region"]) == {"partial_tiled"}
    assert set(sims["species"]) == {n.replace("partial_", "partialref_") for n in sims["name"]}
    assert sims["value"].min() > 1 - 1e-9  # binary too: tiled templates are exactly periodic
    # the whole tiled field gives the same mask as the one-cell scan (periodicity)
    for lab in ("Hv", "Md", "Lt"):
        np.testing.assert_allclose(ads["masks"].sel(name=f"partialref_pcc_g0.35_{lab}"),
                                   ads["masks"].sel(name=f"tm_pcc_g0.35_{lab}"), atol=1e-5)
    claims = evaluate_claims(met.assign(thickness_nm=1.0, thickness_config_nm=np.nan,
                                        dose_e_per_A2=np.nan))
    row = claims[claims.claim_id == "partial_reproduces"].iloc[0]
    assert row["status"] == "uninformative" and not row["passed"]
    assert "not informative" in row["detail"]


@pytest.mark.parametrize("dose, expect_pass", [(2000.0, True), (0.5, False)])
def test_partial_on_one_cell_noisy_scan_uses_independent_noise(dose, expect_pass):
    clean, sites, cal, cell = synthetic()
    noisy = np.random.default_rng(2).poisson(clean * dose).astype(np.float32)
    # the synthetic intensities are not fractions of a probe: electrons = dose * step area
    meta = {"structure": "synth", "dose_key": f"d{dose:g}",
            "dose_e_per_A2": dose / (STEP * STEP)}
    opts = {**OPTS, "controls": {"enabled": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ads = analyse_dataset(noisy, sites, cal, cell_A=cell, periodic=True, options=opts,
                              meta=meta, noiseless=clean)
        met = dataset_metrics(ads)
    assert any("independent Poisson noise" in n for n in json.loads(ads.attrs["notes"]))
    sims = _partial_sims(met)
    assert set(sims["region"]) == {"partial_tiled"} and len(sims) == 8
    assert sims["value"].max() < 1 - 1e-6  # different noise in the window and the field
    claims = evaluate_claims(met.assign(thickness_nm=1.0, thickness_config_nm=np.nan))
    row = claims[claims.claim_id == "partial_reproduces"].iloc[0]
    assert row["status"] == ("pass" if expect_pass else "fail")
    assert bool(row["passed"]) is expect_pass
    # without the noiseless source: the old 1/9 window of the one-cell scan, with a note
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ads2 = analyse_dataset(noisy, sites, cal, cell_A=cell, periodic=True, options=opts,
                               meta=meta)
    assert "region_partial" in ads2
    assert any("without its noiseless source" in n for n in json.loads(ads2.attrs["notes"]))
