"""core ``valid`` detector-pixel keyword: invalid columns contribute exactly nothing."""

from __future__ import annotations

import numpy as np
import pytest

from tmask_validate import core


def _data(seed=3):
    rng = np.random.default_rng(seed)
    d = rng.gamma(2.0, 1.0, size=(5, 7, 4, 6))
    # a near-constant "beyond the aperture" pixel: variance ~1e-30, would get unit weight
    d[..., 0, 0] = 1e-15 * (1 + 1e-3 * rng.standard_normal((5, 7)))
    valid = np.ones((4, 6), bool)
    valid[0, 0] = False
    valid[3, 5] = False  # a normal pixel can be excluded too
    return d, valid


def _naive_dhat(d, valid, region=None, normalisation="pcc"):
    """Normalised D (all columns), invalid columns zeroed; stats over ``region`` rows."""
    m = d.shape[0] * d.shape[1]
    dm = d.reshape(m, -1)
    sel = np.ones(m, bool) if region is None else region.reshape(-1)
    mu = dm[sel].mean(0)
    sd = dm[sel].std(0)
    dhat = np.zeros_like(dm)
    v = valid.reshape(-1)
    dhat[:, v] = (dm[:, v] - mu[v]) / sd[v]
    if normalisation == "mean":
        dhat[:, v] /= mu[v]
    return dhat, sel


def _naive_pcc(d, t, valid, region=None, normalisation="pcc"):
    dhat, sel = _naive_dhat(d, valid, region)
    tt = t.reshape(-1)[sel]
    that = (tt - tt.mean()) / tt.std()
    r = that @ dhat[sel] / sel.sum()
    if normalisation == "mean":
        mu = d.reshape(dhat.shape[0], -1)[sel].mean(0)
        r = np.where(valid.reshape(-1), r / mu, 0.0)
    return r.reshape(valid.shape)


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_pcc_mask_valid_matches_naive(normalisation):
    d, valid = _data()
    t = np.random.default_rng(9).standard_normal(d.shape[:2])
    reg = np.zeros(d.shape[:2], bool)
    reg[1:4, 2:6] = True
    for region in (None, reg):
        r = core.pcc_mask(d, t, normalisation=normalisation, region=region, valid=valid)
        ref = _naive_pcc(d, t, valid, region, normalisation)
        np.testing.assert_allclose(r, ref, rtol=1e-10, atol=1e-12)
        assert np.all(r[~valid] == 0.0)


def test_column_stats_valid_zeroes_std_keeps_mean():
    d, valid = _data()
    st = core.column_stats(d, valid=valid)
    ref = core.column_stats(d)
    np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-12)
    assert np.all(st.std[~valid] == 0) and np.all(st.std[valid] == ref.std[valid])
    assert ref.std[0, 0] > 0  # the tiny-variance pixel really has variance


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_apply_and_template_mask_image_valid(normalisation):
    d, valid = _data()
    m = d.shape[0] * d.shape[1]
    w = np.random.default_rng(4).standard_normal((2, *valid.shape))
    img = core.apply_mask(d, w, normalisation=normalisation, valid=valid)
    dhat, _ = _naive_dhat(d, valid, None, normalisation)
    ref = (dhat @ w.reshape(2, -1).T).T.reshape(2, *d.shape[:2])
    np.testing.assert_allclose(img, ref, rtol=1e-10, atol=1e-10)
    raw = core.apply_mask(d, w, normalised=False, valid=valid)
    ref_raw = (d.reshape(m, -1) @ (w * valid).reshape(2, -1).T).T.reshape(2, *d.shape[:2])
    np.testing.assert_allclose(raw, ref_raw, rtol=1e-12)
    # template_mask_image = pcc_mask + apply_mask, both restricted
    t = np.random.default_rng(5).standard_normal(d.shape[:2])
    reg = np.zeros(d.shape[:2], bool)
    reg[:3] = True
    mask, image = core.template_mask_image(d, t, normalisation=normalisation, region=reg,
                                           valid=valid)
    np.testing.assert_allclose(mask, _naive_pcc(d, t, valid, reg, normalisation),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(image, (dhat @ mask.reshape(-1)).reshape(d.shape[:2]),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["gram", "power"])
def test_eigen_image_valid(method):
    d, valid = _data()
    s, r, lam = core.eigen_image(d, valid=valid, method=method, n_iter=2000, tol=1e-14)
    dhat, _ = _naive_dhat(d, valid)
    evals, evecs = np.linalg.eigh(dhat @ dhat.T)
    ref = evecs[:, -1]
    ref = ref if ref @ s.reshape(-1) >= 0 else -ref
    assert lam == pytest.approx(evals[-1], rel=1e-8)
    np.testing.assert_allclose(s.reshape(-1), ref, atol=1e-6)
    assert np.all(r[~valid] == 0.0)
    np.testing.assert_allclose(r.reshape(-1), dhat.T @ s.reshape(-1), atol=1e-6)


def test_valid_bad_input():
    d, valid = _data()
    t = np.arange(35.0).reshape(5, 7)
    with pytest.raises(ValueError, match="detector shape"):
        core.pcc_mask(d, t, valid=valid[:3])
    with pytest.raises(ValueError, match="no detector pixel"):
        core.pcc_mask(d, t, valid=np.zeros_like(valid))
    with pytest.raises(ValueError, match="boolean"):
        core.apply_mask(d, np.ones(valid.shape), valid=valid * 2.0)
