"""Poisson dose noise: statistics against the model, seeding, chunk independence, integer
safety, and the store-level step (no abTEM run needed: stores are built by hand)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from tmask_validate import noise
from tmask_validate.calibration import Calibration


def _intensity(shape=(2, 6, 5, 9, 8), seed=0) -> np.ndarray:
    """Asymmetric float32 'patterns' that sum to < 1 (some intensity off the detector)."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape).astype(np.float32) ** 3
    x /= x.sum(axis=(-2, -1), keepdims=True) * np.float32(1.05)
    return x


def test_electrons_per_probe():
    assert noise.electrons_per_probe(1e5, (0.3, 0.4)) == pytest.approx(12000.0)
    for bad in (0, -1, np.nan):
        with pytest.raises(ValueError):
            noise.electrons_per_probe(bad, (0.3, 0.3))
    with pytest.raises(ValueError):
        noise.electrons_per_probe(1e5, (0.3, -1))


def test_mean_and_variance_match_poisson():
    x = _intensity((1, 40, 40, 9, 8))
    dose, step = 2e4, (0.35, 0.3)
    counts = noise.add_dose_noise(x, dose_e_per_A2=dose, step_A=step, seed=5)
    assert counts.dtype == np.uint32 and counts.shape == x.shape
    lam = x.astype(np.float64) * dose * step[0] * step[1]
    # per pattern: expected total = electrons x fraction on the detector (1/1.05)
    tot = counts.sum(axis=(-2, -1), dtype=np.float64)
    expected_tot = lam.sum(axis=(-2, -1))
    assert np.allclose(expected_tot, 2100 / 1.05)
    z = (tot - expected_tot) / np.sqrt(expected_tot)
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and 0.85 < z.std() < 1.15
    # per pixel: mean ~ lambda, variance ~ mean (standardised residuals ~ N(0, 1))
    ok = lam > 5
    r = (counts[ok] - lam[ok]) / np.sqrt(lam[ok])
    assert abs(r.mean()) < 0.02 and abs(r.var() - 1) < 0.03


def test_seeded_reproducible_and_chunk_independent():
    x = _intensity()
    kw = dict(dose_e_per_A2=1e5, step_A=(0.3, 0.3))
    a = noise.add_dose_noise(x, seed=1, rows_per_block=1, **kw)
    b = noise.add_dose_noise(x, seed=1, rows_per_block=4, **kw)
    c = noise.add_dose_noise(x, seed=2, **kw)
    d = noise.add_dose_noise(x, seed=1, dose_e_per_A2=2e5, step_A=(0.3, 0.3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a * 2, d)
    # different variables (streams) of one store get different random numbers
    e = noise.add_dose_noise(x, seed=1, stream=noise.stream_id("detector_ADF"), **kw)
    assert not np.array_equal(a, e)


def test_integer_safety_and_bad_input():
    x = np.ones((1, 2, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="overflow"):
        noise.add_dose_noise(x, dose_e_per_A2=1e12, step_A=(1, 1), seed=0)
    y = x.copy()
    y[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        noise.add_dose_noise(y, dose_e_per_A2=1.0, step_A=(1, 1), seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        noise.add_dose_noise(-x, dose_e_per_A2=1.0, step_A=(1, 1), seed=0)
    with pytest.raises(ValueError, match="seed"):
        noise.add_dose_noise(x, dose_e_per_A2=1.0, step_A=(1, 1), seed=-1)
    # a large but representable dose: counts near 1e9 stay exact uint32
    big = noise.add_dose_noise(x, dose_e_per_A2=1e9, step_A=(1, 1), seed=0)
    assert big.dtype == np.uint32 and abs(big.astype(np.float64).mean() - 1e9) < 1e6
    assert noise.dose_key(1e5) == "dose_1e+05"


def _fake_store(tmp_path):
    from tmask_validate import simulate as S

    x = _intensity((2, 5, 4, 7, 6))
    cal = Calibration(step_A=(0.3, 0.25), mrad_per_px=(2.0, 2.0), center_px=(3, 3))
    ds = xr.Dataset(
        {"intensity": (("thickness", "scan_y", "scan_x", "ky", "kx"), x),
         "detector_ADF": (("thickness", "scan_y", "scan_x"), x[..., :2, :].sum((-2, -1))),
         "site_label": ("site", np.array(["Li", "Fe"], dtype=object))},
        coords={"thickness": [2.0, 4.0], "scan_y": 0.3 * np.arange(5),
                "scan_x": 0.25 * np.arange(4), "ky": 2.0 * (np.arange(7) - 3),
                "kx": 2.0 * (np.arange(6) - 3)},
        attrs={"calibration": json.dumps(cal.to_dict()), "dose_e_per_A2": None,
               "structure": "fake", "config": "{}", "seeds": "[]"},
    )
    return S.write_store(ds, tmp_path / "clean.zarr"), x


def test_noise_store(tmp_path):
    from tmask_validate import simulate as S

    clean, x = _fake_store(tmp_path)
    out = S.noise_store(clean, tmp_path / "n.zarr", dose_e_per_A2=1e5, seed=4)
    noisy = S.load_store(out)
    assert noisy.attrs["dose_e_per_A2"] == 1e5 and noisy.attrs["noise_seed"] == 4
    assert noisy.attrs["electrons_per_probe"] == pytest.approx(1e5 * 0.3 * 0.25)
    assert noisy.intensity.dtype == np.uint32
    assert noisy.intensity.dims == ("thickness", "scan_y", "scan_x", "ky", "kx")
    # same numbers as the in-memory function (chunking of the store does not matter)
    ref = noise.add_dose_noise(x, dose_e_per_A2=1e5, step_A=(0.3, 0.25), seed=4)
    assert np.array_equal(noisy.intensity.values, ref)
    assert noisy.detector_ADF.dtype == np.uint32
    assert list(noisy.site_label.values) == ["Li", "Fe"]
    again = S.load_store(S.noise_store(clean, tmp_path / "m.zarr", dose_e_per_A2=1e5, seed=4))
    assert np.array_equal(again.intensity.values, noisy.intensity.values)
    with pytest.raises(ValueError, match="already holds noisy"):
        S.noise_store(out, tmp_path / "nn.zarr", dose_e_per_A2=1e5, seed=4)
