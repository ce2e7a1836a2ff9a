"""tmask_validate.preprocess: disc centres, descan, binning/cropping, bad pixels."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from tmask_validate.calibration import Calibration
from tmask_validate.io import load
from tmask_validate.preprocess import (
    bad_pixel_report,
    bin_detector,
    crop_detector,
    descan_correct,
    disc_center,
    disc_centers,
    exclude_pixels,
    find_bad_pixels,
    fit_descan,
    shift_patterns,
)

REAL = Path("/work/shared/data/real-merlin")


def _discs(sy=6, sx=7, n=48, radius=8.0, plane=((20.0, 0.3, -0.2), (25.0, -0.15, 0.25)),
           dose=200.0, seed=0):
    """Poisson patterns of a BF disc whose centre follows a descan plane; returns data, centres."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:sy, :sx]
    cy = plane[0][0] + plane[0][1] * yy + plane[0][2] * xx
    cx = plane[1][0] + plane[1][1] * yy + plane[1][2] * xx
    ky, kx = np.mgrid[:n, :n]
    r = np.hypot(ky[None, None] - cy[..., None, None], kx[None, None] - cx[..., None, None])
    clean = dose / (1 + np.exp((r - radius) / 0.3)) + 0.5
    return rng.poisson(clean).astype(np.uint16), np.stack([cy, cx])


def _xr(data, cal=None):
    cal = cal or Calibration(step_A=0.5, mrad_per_px=0.7)
    sy, sx, ny, nx = data.shape
    return xr.DataArray(da.from_array(data, chunks=(2, -1, -1, -1)),
                        dims=("scan_y", "scan_x", "ky", "kx"),
                        coords={"scan_y": np.arange(sy) * 0.5, "scan_x": np.arange(sx) * 0.5,
                                "ky": (np.arange(ny) - (ny - 1) / 2) * 0.7,
                                "kx": (np.arange(nx) - (nx - 1) / 2) * 0.7},
                        attrs={"calibration": json.dumps(cal.to_dict()), "saturation_value": 4095})


def test_disc_center_and_centers_match_truth():
    data, truth = _discs()
    c = disc_centers(data, threshold_rel=0.5, rows_per_chunk=4)
    np.testing.assert_allclose(c, truth, atol=0.1)
    assert disc_center(data[2, 3]) == pytest.approx(tuple(truth[:, 2, 3]), abs=0.1)
    data[1, 1] = 0  # an empty pattern gets the mean centre, never NaN
    c = disc_centers(data)
    assert np.all(np.isfinite(c))
    with pytest.raises(ValueError):
        disc_center(np.zeros((5, 5)))


def test_fit_descan_recovers_plane_with_outliers():
    _, truth = _discs(sy=10, sx=12)
    c = truth + 0.02 * np.random.default_rng(1).standard_normal(truth.shape)
    c[:, 4, 5] += 7.0  # a bad pattern
    fit = fit_descan(c)
    np.testing.assert_allclose(fit["coef"], [[20.0, 0.3, -0.2], [25.0, -0.15, 0.25]], atol=0.01)
    assert fit["n_outliers"] >= 2 and np.all(fit["residual_rms_px"] < 0.05)


@pytest.mark.parametrize("method,tol", [("integer", 0.6), ("fourier", 0.15)])
def test_descan_correct_aligns_discs(method, tol):
    data, truth = _discs()
    arr = _xr(data)
    out = descan_correct(arr, method=method)
    assert isinstance(out.data, da.Array)
    target = np.array(json.loads(out.attrs["descan"])["target_px"])
    np.testing.assert_allclose(target, truth.mean(axis=(1, 2)), atol=0.1)
    c = disc_centers(out.values)
    assert np.abs(c - target[:, None, None]).max() < tol
    cal = Calibration.from_dict(json.loads(out.attrs["calibration"]))
    np.testing.assert_allclose(cal.center_px, target)
    iy = int(np.argmin(np.abs(out.ky.values)))
    assert abs(iy - target[0]) <= 0.5
    if method == "integer":
        assert out.dtype == data.dtype
        # integer shifts keep the counts (disc far from the edges)
        np.testing.assert_array_equal(out.values.sum(axis=(2, 3)) > 0, True)


def test_shift_patterns_integer_matches_naive():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 50, (2, 3, 9, 8)).astype(np.uint8)
    shifts = rng.integers(-3, 4, (2, 2, 3)).astype(float)
    out = shift_patterns(data, shifts).compute()
    for y in range(2):
        for x in range(3):
            ref = np.zeros((9, 8), np.uint8)
            dy, dx = int(shifts[0, y, x]), int(shifts[1, y, x])
            for i in range(9):
                for j in range(8):
                    if 0 <= i - dy < 9 and 0 <= j - dx < 8:
                        ref[i, j] = data[y, x, i - dy, j - dx]
            np.testing.assert_array_equal(out[y, x], ref)
    with pytest.raises(ValueError):
        shift_patterns(data, shifts[:, :1])


def test_bin_and_crop_update_calibration():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, (2, 2, 10, 12)).astype(np.uint8)
    cal = Calibration(step_A=0.5, mrad_per_px=0.7, center_px=(4.5, 5.0))
    arr = _xr(data, cal)
    b = bin_detector(arr, 2)
    np.testing.assert_array_equal(b.values, data.reshape(2, 2, 5, 2, 6, 2).sum(axis=(3, 5)))
    assert b.values.max() > 255  # no uint8 overflow
    bc = Calibration.from_dict(json.loads(b.attrs["calibration"]))
    assert bc.mrad_per_px == (1.4, 1.4) and bc.center_px == (2.0, 2.25)
    # a binned pixel's angle is the mean angle of its members
    np.testing.assert_allclose(b.kx.values, arr.kx.values.reshape(6, 2).mean(axis=1) * 0
                               + (np.arange(6) - 2.25) * 1.4)
    np.testing.assert_allclose(
        b.kx.values, ((np.arange(12) - 5.0) * 0.7).reshape(6, 2).mean(axis=1), atol=1e-12)
    c = crop_detector(arr, ky=(2, 9), kx=(1, 11))
    assert c.shape == (2, 2, 7, 10)
    np.testing.assert_array_equal(c.values, data[:, :, 2:9, 1:11])
    assert Calibration.from_dict(json.loads(c.attrs["calibration"])).center_px == (2.5, 4.0)
    np.testing.assert_allclose(c.kx.values, (np.arange(1, 11) - 5.0) * 0.7)
    with pytest.raises(ValueError):
        crop_detector(arr, ky=(5, 20))
    with pytest.raises(ValueError):
        bin_detector(arr, 0)


def test_find_bad_pixels_dead_hot_saturated():
    data, _ = _discs(sy=8, sx=8, dose=50.0, plane=((24.0, 0, 0), (24.0, 0, 0)))
    data[..., 30:, :5] = 0  # a genuinely dark corner: not dead
    data[..., 24, 26] = 0  # dead inside the disc
    data[..., 4, 40] = 0
    data[..., 40, 40] += 60  # hot outside the disc
    data[..., 20, 20] = 4095  # stuck at saturation
    rep = bad_pixel_report(_xr(data))
    expect = np.zeros((48, 48), bool)
    expect[24, 26] = expect[4, 40] = expect[40, 40] = expect[20, 20] = True
    np.testing.assert_array_equal(rep["bad"], expect)
    assert rep["n_dead"] == 2 and rep["n_hot"] >= 1 and rep["n_saturated_pixels"] == 1
    np.testing.assert_array_equal(find_bad_pixels(data, saturation_value=4095), expect)
    # exclude: constant columns, dtype kept, lazy
    ex = exclude_pixels(_xr(data), expect)
    assert isinstance(ex.data, da.Array) and ex.dtype == data.dtype
    v = ex.values
    assert np.all(v[..., expect] == 0) and np.array_equal(v[..., ~expect], data[..., ~expect])
    assert np.all(exclude_pixels(data, expect, value=7)[..., expect] == 7)
    with pytest.raises(ValueError):
        exclude_pixels(data.astype(np.uint8), expect, value=300)


@pytest.mark.skipif(not REAL.is_dir(), reason="real Merlin test files not available")
def test_real_fpd_centre_and_bad_pixels():
    arr = load(REAL / "FPD_HDF5.hdf5")
    c = disc_centers(arr)
    assert c.shape == (2, 16, 16) and np.all(np.isfinite(c))
    assert np.all((c > 60) & (c < 196))  # the BF disc is well inside the 256x256 detector
    rep = bad_pixel_report(arr)
    assert rep["bad"].shape == (256, 256) and rep["bad"].mean() < 0.01
    out = descan_correct(arr)
    assert out.shape == arr.shape and out.dtype == arr.dtype


def _hard_disc_patterns(sy=4, sx=5, n=64, radius=11.3, centre=(31.2, 32.7), shift_px=0.37,
                        intensity=1.0e6):
    """Noise-free patterns of a hard-edged BF disc (moving by ``shift_px`` per scan step) on a
    weak, broad dark-field halo: the disc edge is a one-pixel step at every dose."""
    ky, kx = np.mgrid[:n, :n].astype(float)
    out = np.zeros((sy, sx, n, n))
    for i in range(sy):
        for j in range(sx):
            r = np.hypot(ky - centre[0] - shift_px * i, kx - centre[1] - shift_px * j)
            out[i, j] = intensity * ((r < radius) + 1e-3 * np.exp(-r**2 / 450.0) + 1e-4)
    return out


@pytest.mark.parametrize("shift_px", [0.0, 0.37])
def test_bad_pixels_no_false_positives_at_sharp_disc_edge(shift_px):
    """Corners of a pixelated disc sticking out into the dark field are not hot pixels.

    Before the fix (local-median test only), 3 (static disc) and 6 (moving disc) edge pixels
    were flagged hot, noise-free and at 1e6 counts per pixel alike.
    """
    clean = _hard_disc_patterns(shift_px=shift_px)
    noisy = np.random.default_rng(5).poisson(clean).astype(np.uint32)
    for data in (clean, noisy):
        rep = bad_pixel_report(data)
        assert rep["n_hot"] == 0 and rep["n_dead"] == 0 and not rep["bad"].any()
    # planted hot pixels are still found: isolated in the dark field, an adjacent pair, and
    # one inside the bright disc exceeding it by 4x
    hot = noisy.copy()
    planted = [(5, 50), (55, 10), (55, 11), (31, 33)]
    for y, x in planted:
        hot[..., y, x] += np.uint32(4_000_000)
    rep = bad_pixel_report(hot)
    expect = np.zeros(hot.shape[2:], bool)
    for y, x in planted:
        expect[y, x] = True
    np.testing.assert_array_equal(rep["hot"], expect)
