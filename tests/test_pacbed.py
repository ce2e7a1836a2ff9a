"""tmask_validate.pacbed: PACBED averaging, library resampling, thickness matching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_cbed import toy_library, toy_pattern

from tmask_validate.pacbed import match_thickness, pacbed, resample_library


def test_pacbed_mean_and_variance_match_naive():
    rng = np.random.default_rng(0)
    data = rng.poisson(5.0, (9, 4, 6, 7)).astype(np.uint16)
    mean, var = pacbed(data, n_blocks=3, variance="blocks")
    np.testing.assert_allclose(mean, data.mean(axis=(0, 1)))
    blocks = data.reshape(3, 3 * 4, 6, 7).mean(axis=1)
    np.testing.assert_allclose(var, blocks.var(axis=0, ddof=1) / 3, rtol=1e-10)
    region = np.zeros((9, 4), bool)
    region[2:5, 1:3] = True
    m2, _ = pacbed(data, region=region)
    np.testing.assert_allclose(m2, data[region].mean(axis=0))
    import dask.array as da

    m3, v3 = pacbed(da.from_array(data, chunks=(2, 4, 6, 7)), n_blocks=3)
    np.testing.assert_allclose(v3, mean / 36)  # poisson for integer counts
    np.testing.assert_allclose(m3, mean)


def test_resample_library_identity_and_scaling():
    lib = toy_library([10.0])
    same, cov = resample_library(lib.values, library_mrad_per_px=0.8, library_center_px=(48, 50),
                                 out_shape=(97, 101), out_mrad_per_px=0.8,
                                 out_center_px=(48, 50))
    np.testing.assert_allclose(same, lib.values, atol=1e-12)
    assert cov.all()
    out, cov = resample_library(lib.values, library_mrad_per_px=0.8, library_center_px=(48, 50),
                                out_shape=(60, 64), out_mrad_per_px=1.1,
                                out_center_px=(30.3, 31.7))
    exp = toy_pattern((60, 64), 1.1, (30.3, 31.7), 10.0)
    inner = cov & (np.hypot(*np.mgrid[-30.3:29.7:60j, -31.7:32.3:64j]) * 1.1 < 36)
    assert np.abs(out[0] - exp)[inner].max() < 0.03


@pytest.mark.parametrize("metric", ["sqdiff", "correlation"])
def test_exact_library_member_gives_zero_misfit(metric):
    ts = np.arange(2.0, 41.0, 2.0)
    lib = toy_library(ts)
    p = lib.values[7] * 123.0  # scale does not matter
    res = match_thickness(p, lib, pattern_mrad_per_px=0.8, pattern_center_px=(48, 50),
                          metric=metric)
    assert res.best_index == 7 and res.misfit[7] == pytest.approx(0.0, abs=1e-12)
    auto = match_thickness(p, lib, pattern_mrad_per_px=0.8, metric=metric)  # centre measured
    assert auto.best_index == 7
    assert abs(res.thickness_nm - 16.0) < 0.3 and not res.at_edge
    assert len(res.misfit) == len(ts) and np.all(np.isfinite(res.misfit))


@pytest.mark.parametrize("t_true", [13.3, 27.9])
def test_held_out_thickness_with_noise_other_grid(t_true):
    rng = np.random.default_rng(int(t_true * 10))
    ts = np.arange(2.0, 41.0, 2.0)
    lib = toy_library(ts)
    # "measured": another detector grid, off-centre, Poisson noise over many positions
    shape, mrad, center = (64, 70), 1.05, (30.6, 36.2)
    clean = toy_pattern(shape, mrad, center, t_true) * 200.0
    frames = rng.poisson(clean, (6, 5) + shape)
    mean, var = pacbed(frames)
    res = match_thickness(mean, lib, pattern_mrad_per_px=mrad, pattern_center_px=center,
                          pattern_var=var)
    assert abs(res.thickness_nm - t_true) < 0.5
    lo, hi = res.interval_nm
    assert lo <= t_true <= hi or abs(res.thickness_nm - t_true) < 0.2
    assert 0 < res.uncertainty_nm < 3.0
    assert res.noise_misfit > 0
    d = res.to_dict()
    assert d["thicknesses_nm"][0] == 2.0 and len(d["misfit"]) == len(ts)


def test_more_noise_wider_interval():
    ts = np.arange(2.0, 41.0, 2.0)
    lib = toy_library(ts)
    shape, mrad, center = (64, 70), 1.05, (30.6, 36.2)
    out = []
    for dose in (2000.0, 5.0):
        rng = np.random.default_rng(5)
        frames = rng.poisson(toy_pattern(shape, mrad, center, 21.0) * dose, (4, 4) + shape)
        mean, var = pacbed(frames)
        out.append(match_thickness(mean, lib, pattern_mrad_per_px=mrad,
                                   pattern_center_px=center, pattern_var=var).uncertainty_nm)
    assert out[1] > out[0]


def test_beyond_library_is_flagged_and_errors():
    ts = np.arange(4.0, 21.0, 2.0)
    lib = toy_library(ts)
    p = toy_pattern((97, 101), 0.8, (48, 50), 3.0)  # thinner than the thinnest library entry
    res = match_thickness(p, lib, pattern_mrad_per_px=0.8, pattern_center_px=(48, 50))
    assert res.at_edge and res.thickness_nm == 4.0 and res.best_index == 0
    with pytest.raises(ValueError, match="metric"):
        match_thickness(p, lib, pattern_mrad_per_px=0.8, pattern_center_px=(48, 50),
                        metric="l1")
    with pytest.raises(ValueError, match="needs thicknesses_nm"):
        match_thickness(p, lib.values, pattern_mrad_per_px=0.8, pattern_center_px=(48, 50))
    with pytest.raises(ValueError, match="share"):
        match_thickness(p, lib, pattern_mrad_per_px=0.8, pattern_center_px=(5000, 5000))


@pytest.mark.slow
def test_abtem_thickness_series_held_out(tmp_path):
    """Smoke-scale PbTiO3 [100] series (abTEM): hold out 4 nm, add dose noise, bin the detector."""
    pytest.importorskip("abtem")
    import copy

    from tmask_validate.config import load_config
    from tmask_validate.io import load
    from tmask_validate.pacbed import library_from_store
    from tmask_validate.preprocess import bin_detector
    from tmask_validate.simulate import simulate_structure

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = copy.deepcopy(load_config(root / "config" / "smoke.yaml"))
    cfg["simulation"]["phonons"]["configurations"] = 1
    entry = cfg["structures"]["PbTiO3_100"]
    entry["thicknesses_nm"] = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    store = simulate_structure(cfg, "PbTiO3_100", tmp_path / "pto.zarr", progress=False)
    lib = library_from_store(store)
    held = float(lib["thickness"].values[2])  # ~3.9 nm (whole periods)
    library = lib.sel(thickness=[t for t in lib["thickness"].values if abs(t - held) > 0.01])
    arr = bin_detector(load(store, thickness_nm=held), 2)
    assert arr.attrs["selected_thickness"] == held
    rng = np.random.default_rng(7)
    cal = json.loads(arr.attrs["calibration"])
    counts = rng.poisson(np.asarray(arr.values, np.float64) * 2e4)  # ~2e4 e- per probe
    mean, var = pacbed(counts)
    res = match_thickness(mean, library, pattern_mrad_per_px=cal["mrad_per_px"],
                          pattern_center_px=cal["center_px"], pattern_var=var)
    assert abs(res.thickness_nm - held) < 0.75
    assert res.interval_nm[0] - 0.5 <= held <= res.interval_nm[1] + 0.5
