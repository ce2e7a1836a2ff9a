"""Hypothesis property tests of the PCC mask / Eq. 7 duality."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tmask_validate import core

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def datasets(draw):
    sy = draw(st.integers(2, 5))
    sx = draw(st.integers(2, 5))
    ky = draw(st.integers(1, 4))
    kx = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]))
    if np.dtype(dtype).kind == "u":
        elems = st.integers(0, int(min(np.iinfo(dtype).max, 1000)))
    else:
        elems = st.floats(-1e3, 1e3, width=32)
    data = draw(hnp.arrays(dtype, (sy, sx, ky, kx), elements=elems))
    tmpl = draw(hnp.arrays(np.float64, (sy, sx), elements=st.floats(-10, 10)))
    if np.ptp(tmpl) < 1e-3:
        tmpl = tmpl + np.arange(sy * sx).reshape(sy, sx)
    return data, tmpl


@SETTINGS
@given(datasets())
def test_pcc_in_unit_interval_and_finite(dt):
    data, tmpl = dt
    r = core.pcc_mask(data, tmpl)
    assert np.all(np.isfinite(r))
    assert np.all(np.abs(r) <= 1.0)
    rm = core.pcc_mask(data, tmpl, normalisation="mean")
    assert np.all(np.isfinite(rm))


@SETTINGS
@given(datasets(), st.data())
def test_template_equal_to_a_column_gives_one(dt, draw):
    data, _ = dt
    ky, kx = data.shape[2:]
    k = (draw.draw(st.integers(0, ky - 1)), draw.draw(st.integers(0, kx - 1)))
    col = data[..., k[0], k[1]].astype(np.float64)
    if np.ptp(col) <= 1e-6 * max(1.0, np.abs(col).max()):
        return
    r = core.pcc_mask(data, col)
    assert abs(r[k] - 1.0) < 1e-9


@SETTINGS
@given(datasets(), st.floats(0.01, 100), st.floats(-1e3, 1e3))
def test_template_scale_and_offset_invariance(dt, scale, offset):
    data, tmpl = dt
    r1 = core.pcc_mask(data, tmpl)
    r2 = core.pcc_mask(data, scale * tmpl + offset)
    np.testing.assert_allclose(r1, r2, atol=1e-9)
    r3 = core.pcc_mask(data, -tmpl)
    np.testing.assert_allclose(r1, -r3, atol=1e-12)


@SETTINGS
@given(datasets(), st.sampled_from(["pcc", "mean"]))
def test_eq7_equals_mask_applied_column_by_column(dt, normalisation):
    """s_out = D̂ rᵀ = Σ_k r_k ŝ_k, where ŝ_k is column k normalised by itself."""
    data, tmpl = dt
    r = core.pcc_mask(data, tmpl, normalisation=normalisation)
    s = core.apply_mask(data, r, normalisation=normalisation)
    want = np.zeros(data.shape[:2])
    for i in range(data.shape[2]):
        for j in range(data.shape[3]):
            col = data[..., i, j].astype(np.float64)
            sd = col.std()
            mu = col.mean()
            if sd == 0 or (normalisation == "mean" and mu == 0):
                continue
            hat = (col - mu) / sd
            if normalisation == "mean":
                hat = hat / mu
            want += r[i, j] * hat
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(s, want, atol=1e-8 * scale)
