"""CoM / iCoM conventions pinned on a synthetic weak-phase object (numpy FFT only)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SHAPE, make_tiny_data, weak_phase_dataset

from tmask_validate import core


@pytest.fixture(scope="module")
def weak_phase():
    data, V, (ys, xs), P2 = weak_phase_dataset()
    # expected iCoM ∝ V correlated with the probe intensity, sampled at the scan positions
    blurred = np.fft.ifft2(np.fft.fft2(V) * np.conj(np.fft.fft2(P2))).real
    return data, V, ys, xs, blurred[np.ix_(ys, xs)]


def _corr(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_com_points_towards_the_atom(weak_phase):
    data, _, ys, xs, _ = weak_phase
    com = core.center_of_mass(data)
    assert com.shape == (2, ys.size, xs.size)
    # atom 1 at (y, x) = (20.3, 30.1) px; probe at (20, 24): left of it -> +x deflection
    iy, ix = list(ys).index(20), list(xs).index(24)
    assert com[1, iy, ix] > 10 * abs(com[0, iy, ix]) > 0
    # probe at (14, 30): above it -> +y deflection
    iy, ix = list(ys).index(14), list(xs).index(30)
    assert com[0, iy, ix] > 10 * abs(com[1, iy, ix]) > 0
    # probe at (26, 36): below-right -> points back (-y, -x)
    iy, ix = list(ys).index(26), list(xs).index(36)
    assert com[0, iy, ix] < 0 and com[1, iy, ix] < 0


def test_icom_atoms_bright_non_square_step(weak_phase):
    data, _, ys, xs, expected = weak_phase
    step = (2.0, 3.0)  # the scan step in object pixels (non-square)
    com = core.center_of_mass(data)
    for pad in ("mirror", None, "zero"):
        ic = core.integrated_center_of_mass(com, step_A=step, pad=pad)
        assert ic.shape == (ys.size, xs.size)
        assert _corr(ic, expected) > 0.995, pad
        # the brightest pixel is the scan position nearest the strong atom (20.3, 30.1)
        assert np.unravel_index(np.argmax(ic), ic.shape) == (10, 10), pad
    # the step matters: swapping it makes the field inconsistent
    wrong = core.integrated_center_of_mass(com, step_A=step[::-1], pad=None)
    assert _corr(wrong, expected) < _corr(core.integrated_center_of_mass(com, step_A=step,
                                                                       pad=None), expected)
    # calling with the data only works and equals the two-step call
    np.testing.assert_allclose(core.integrated_center_of_mass(data, step_A=step),
                               core.integrated_center_of_mass(com, step_A=step), atol=1e-12)
    # the weaker, elongated atom (44, 12.5) is a local maximum too
    ic = core.integrated_center_of_mass(com, step_A=step)
    assert ic[22, 4] > np.median(ic)


def test_icom_partial_scan_mirror_padding(weak_phase):
    """A non-periodic window of the scan: mirror padding keeps the atom bright."""
    data, _, _, _, expected = weak_phase
    sub = data[4:20, 5:16]
    ic = core.integrated_center_of_mass(sub, step_A=(2.0, 3.0), pad="mirror")
    assert _corr(ic, expected[4:20, 5:16]) > 0.95
    assert np.unravel_index(np.argmax(ic), ic.shape) == (6, 5)
    hp = core.integrated_center_of_mass(sub, step_A=(2.0, 3.0), highpass=0.02)
    assert np.unravel_index(np.argmax(hp), hp.shape) == (6, 5)


def test_icom_rotation_undoes_a_rotated_field(weak_phase):
    data, _, _, _, expected = weak_phase
    com = core.center_of_mass(data)
    th = np.deg2rad(30.0)
    # detector frame rotated by -30 deg relative to the scan frame
    rx = com[1] * np.cos(-th) - com[0] * np.sin(-th)
    ry = com[1] * np.sin(-th) + com[0] * np.cos(-th)
    rotated = np.stack([ry, rx])
    fixed = core.integrated_center_of_mass(rotated, step_A=(2, 3), rotation_deg=30.0)
    np.testing.assert_allclose(fixed, core.integrated_center_of_mass(com, step_A=(2, 3)),
                               atol=1e-10)


def test_com_matches_naive_reference():
    data = make_tiny_data(np.uint16, dead=False)
    data[2, 3] = 0  # an empty pattern -> CoM 0, never NaN
    D = data.reshape(35, 24).astype(float)
    ky, kx = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    tot = D.sum(1)
    pac = D.sum(0)
    origin = ((pac * ky.ravel()).sum() / pac.sum(), (pac * kx.ravel()).sum() / pac.sum())
    com, org = core.center_of_mass(data, return_origin=True)
    assert org == pytest.approx(origin)
    assert org == pytest.approx(core.estimate_center_px(data))
    ok = tot > 0
    want_y = np.zeros(35)
    want_x = np.zeros(35)
    want_y[ok] = (D[ok] * ky.ravel()).sum(1) / tot[ok] - origin[0]
    want_x[ok] = (D[ok] * kx.ravel()).sum(1) / tot[ok] - origin[1]
    np.testing.assert_allclose(com[0].ravel(), want_y, atol=1e-12)
    np.testing.assert_allclose(com[1].ravel(), want_x, atol=1e-12)
    assert com[0, 2, 3] == 0 and com[1, 2, 3] == 0
    # explicit origin and mrad units
    c2 = core.center_of_mass(data, center_px=(1.0, 2.0), mrad_per_px=(0.5, 2.0))
    np.testing.assert_allclose(c2[0].ravel()[ok], 0.5 * (want_y[ok] + origin[0] - 1.0))
    np.testing.assert_allclose(c2[1].ravel()[ok], 2.0 * (want_x[ok] + origin[1] - 2.0))
    # mass-weighted mean CoM about the PACBED centroid is zero
    assert np.sum(tot * com[0].ravel()) == pytest.approx(0, abs=1e-9 * tot.sum())


def test_icom_bad_input():
    with pytest.raises(ValueError, match="CoM field"):
        core.integrated_center_of_mass(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="pad"):
        core.integrated_center_of_mass(np.zeros((2, 4, 5)), pad="reflect101")
    with pytest.raises(ValueError, match="step_A"):
        core.integrated_center_of_mass(np.zeros((2, 4, 5)), step_A=(0, 1))
    bad = np.zeros((2, *TINY_SHAPE[:2]))
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        core.integrated_center_of_mass(bad)
