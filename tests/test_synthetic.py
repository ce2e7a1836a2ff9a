"""Tests of tmask_validate.synthetic (synthetic experiments from one-cell periodic data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmask_validate.synthetic import (
    descan_shifts_px,
    make_experiment,
    sample_periodic,
    truth_sites,
)


def _disc_cell(ny=5, nx=7, det=(21, 23), seed=0):
    """Random positive one-cell data with a bright disc at the detector centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: det[0], : det[1]]
    disc = ((yy - 10) ** 2 + (xx - 11) ** 2 <= 16).astype(float)
    halo = ((yy - 10) ** 2 + (xx - 11) ** 2 <= 36).astype(float)  # diffuse part, off the edges
    data = disc[None, None] * (1 + 0.3 * rng.random((ny, nx, 1, 1))) + 0.01 * halo * rng.random(
        (ny, nx) + det)
    return data / data.sum(axis=(2, 3), keepdims=True) * 0.9


def _com(pattern):
    """Intensity-weighted centroid (ky, kx) of a pattern (linear shifts preserve it exactly)."""
    p = np.asarray(pattern, float)
    yy, xx = np.mgrid[: p.shape[0], : p.shape[1]]
    return np.array([(p * yy).sum(), (p * xx).sum()]) / p.sum()


def test_zero_drift_infinite_dose_is_exact_tiling():
    src = _disc_cell()
    cell = (2.5, 4.9)  # steps 0.5, 0.7 Å
    out, truth = make_experiment(src, cell_A=cell, fov_cells=(3, 2), dose_e_per_A2=None)
    assert out.shape == (15, 14) + src.shape[2:]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.tile(src, (3, 2, 1, 1)).astype(np.float32))
    assert truth["saturated_fraction"] == 0


def test_sample_periodic_matches_naive_bilinear():
    rng = np.random.default_rng(1)
    src = rng.random((4, 6, 3, 2))
    cell = (2.0, 3.0)  # 0.5 Å steps
    y, x = np.array([0.3, 1.9, -0.2]), np.array([2.95, 0.1, 7.3])
    got = sample_periodic(src, cell, y, x)
    for k in range(3):
        fy, fx = (y[k] / 0.5) % 4, (x[k] / 0.5) % 6
        i, j = int(fy), int(fx)
        wy, wx = fy - i, fx - j
        ref = ((1 - wy) * (1 - wx) * src[i, j] + (1 - wy) * wx * src[i, (j + 1) % 6]
               + wy * (1 - wx) * src[(i + 1) % 4, j] + wy * wx * src[(i + 1) % 4, (j + 1) % 6])
        np.testing.assert_allclose(got[k], ref, rtol=1e-12)


def test_descan_moves_disc_centre_as_specified():
    src = _disc_cell()
    m = np.array([[0.4, -0.2], [0.1, 0.3]])  # px per Å
    ref0 = _com(src[0, 0])
    # linear shifts move the centroid exactly; cubic ones up to the clipped overshoot
    for order, atol in ((1, 1e-5), (3, 0.06)):
        out, truth = make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(2, 1),
                                     dose_e_per_A2=None, descan_px_per_A=m,
                                     descan_offset_px=(0.5, -0.25), descan_order=order)
        for i, j in [(0, 0), (9, 6), (4, 2), (7, 0)]:
            y, x = i * 0.5, j * 0.7
            expected = ref0 + np.array([0.5, -0.25]) + m @ np.array([y, x])
            src_c = _com(src[i % 5, j % 7])
            got = _com(out[i, j])
            np.testing.assert_allclose(got - src_c + ref0, expected, atol=atol)
            np.testing.assert_allclose(truth["descan_px"][:, i, j], expected - ref0, atol=1e-12)
    np.testing.assert_allclose(descan_shifts_px((2, 2), (1, 1), m)[:, 1, 1], m.sum(axis=1))


def test_counts_mean_matches_dose_and_saturation_reported():
    src = _disc_cell(seed=2)
    dose = 2e4
    out, truth = make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(4, 4), dose_e_per_A2=dose,
                                 seed=5)
    assert out.dtype == np.uint16
    electrons = dose * 0.5 * 0.7
    assert truth["electrons_per_probe"] == pytest.approx(electrons)
    tiled = np.tile(src, (4, 4, 1, 1))
    expected = tiled.sum(axis=(2, 3)) * electrons
    np.testing.assert_allclose(truth["expected_counts_per_pattern"], expected, rtol=1e-9)
    got = out.reshape(out.shape[0] * out.shape[1], -1).sum(axis=1, dtype=np.float64)
    # mean total counts within 4 standard errors of the Poisson expectation
    assert abs(got.mean() - expected.mean()) < 4 * np.sqrt(expected.mean() / got.size)
    assert truth["n_saturated"] == 0
    # reproducible with the seed, different with another
    again, _ = make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(4, 4), dose_e_per_A2=dose,
                               seed=5)
    np.testing.assert_array_equal(out, again)
    # a tiny bit depth saturates the disc: clipped and reported
    sat, t2 = make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(1, 1), dose_e_per_A2=dose,
                              bit_depth=6)
    assert sat.max() == 63 and t2["n_saturated"] > 0
    assert t2["saturated_fraction"] == pytest.approx(t2["n_saturated"] / sat.size)


def test_truth_sites_follow_drift():
    sites = pd.DataFrame({"label": ["A", "B"], "y_A": [0.5, 1.5], "x_A": [1.0, 3.0]})
    cell, step, shape = (2.5, 4.9), (0.5, 0.7), (20, 14)
    drift = (0.01, 0.03)
    t = truth_sites(sites, cell, shape, step, drift)
    # the drifted probe of the site's (fractional) pixel lands on the site's sample position
    i = t["y_A"].to_numpy() / step[0]
    np.testing.assert_allclose(t["y_A"] + i * drift[0], t["sample_y_A"], atol=1e-9)
    np.testing.assert_allclose(t["x_A"] + i * drift[1], t["sample_x_A"], atol=1e-9)
    # the same from an explicit drift field
    rows = np.arange(shape[0])[:, None] * np.ones((1, shape[1]))
    field = np.stack([rows * drift[0], rows * drift[1]])
    t2 = truth_sites(sites, cell, shape, step, field)
    np.testing.assert_allclose(t2[["y_A", "x_A"]].to_numpy(), t[["y_A", "x_A"]].to_numpy(),
                               atol=1e-8)
    # without drift: plain tiling, all sites inside the scan
    t0 = truth_sites(sites, cell, shape, step)
    assert len(t0) == 2 * 4 * 2  # 20*0.5/2.5 = 4 cells in y, 14*0.7/4.9 = 2 in x
    assert set(t0["label"]) == {"A", "B"}


def test_bad_inputs():
    src = _disc_cell()
    with pytest.raises(ValueError, match="dose"):
        make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(1, 1), dose_e_per_A2=-1)
    with pytest.raises(ValueError, match="descan"):
        make_experiment(src, cell_A=(2.5, 4.9), fov_cells=(1, 1), dose_e_per_A2=None,
                        descan_px_per_A=[1, 2, 3])
    with pytest.raises(ValueError, match="intensity4d"):
        make_experiment(src[0], cell_A=(2.5, 4.9), fov_cells=(1, 1), dose_e_per_A2=None)
