"""core.crossfit_template_image against an explicit per-fold loop, noise imprint, passes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SHAPE, CountingArray, make_template, make_tiny_data

from tmask_validate import core


# ----------------------------------------------------------------------------- naive reference
def naive_crossfit(data, template, folds, normalisation="pcc", valid=None):
    """For each fold: select the out-of-fold rows, build D̂ and t̂ from them, fit, apply."""
    a = np.asarray(data, dtype=np.float64)
    sy, sx, ky, kx = a.shape
    D = a.reshape(sy * sx, ky * kx)
    t = np.asarray(template, dtype=np.float64)
    stack = t.ndim == 3
    t = t.reshape(-1, sy * sx)
    lab = np.asarray(folds).reshape(-1)
    v = np.ones(ky * kx, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    nfold = lab.max() + 1
    masks = np.zeros((nfold, t.shape[0], ky * kx))
    img = np.full((t.shape[0], sy * sx), np.nan)
    for f in range(nfold):
        out = (lab >= 0) & (lab != f)
        ins = lab == f
        Do = D[out]
        mean = Do.mean(axis=0)
        std = Do.std(axis=0)
        scale = np.zeros(ky * kx)  # 1/σ (or 1/(σ·mean)) on usable columns, 0 elsewhere
        for c in range(ky * kx):
            if not v[c] or std[c] == 0:
                continue
            if normalisation == "mean" and mean[c] == 0:
                continue
            scale[c] = 1.0 / std[c]
            if normalisation == "mean":
                scale[c] /= mean[c]
        pcc_cols = np.where(scale != 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
        Dhat_pcc = (Do - mean) * pcc_cols  # Eq. 4 columns (0 on unusable ones)
        for i, ti in enumerate(t):
            to = ti[out]
            th = (to - to.mean()) / to.std()
            r = np.clip(th @ Dhat_pcc / out.sum(), -1, 1)
            if normalisation == "mean":
                r = np.where(scale != 0, r / np.where(mean != 0, mean, 1.0), 0.0)
            masks[f, i] = r
            img[i, ins] = ((D[ins] - mean) * scale) @ r
    masks = masks.reshape(nfold, t.shape[0], ky, kx)
    img = img.reshape(t.shape[0], sy, sx)
    return (masks, img) if stack else (masks[:, 0], img[0])


def tiny_folds(seed=3, nfold=3, unused=True):
    """Irregular fold labels over the tiny scan, every label present, some positions unused."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, nfold, size=TINY_SHAPE[:2])
    if unused:
        lab[rng.random(TINY_SHAPE[:2]) < 0.15] = -1
        lab[0, 0] = -3  # any negative value means unused
    for f in range(nfold):  # every label present
        lab.flat[2 * f + 1] = f
    return lab


def block_folds():
    """Folds in blocks of scan rows (long runs of one fold: the 4-row / 2-row kernel tiles)."""
    lab = np.repeat(np.arange(7) // 3, 5).reshape(TINY_SHAPE[:2])  # folds 0, 0, 0, 1, 1, 1, 2
    lab[4, 1] = -1
    return lab


def tiny_valid():
    v = np.ones(TINY_SHAPE[2:], bool)
    v[3, 1:4] = False
    v[1, 5] = False
    return v


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def backend(request):
    prev = core.use_numba()
    core.use_numba(request.param)
    yield request.param
    core.use_numba(prev)


# ----------------------------------------------------------------------------- (a) reference
@pytest.mark.parametrize("dtype", [np.uint16, np.float32], ids=["uint16", "float32"])
@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("k", [None, 3], ids=["single", "stack3"])
@pytest.mark.parametrize("use_valid", [False, True], ids=["all_px", "valid"])
@pytest.mark.parametrize("chunk_bytes", [None, 100, 7 * 24 * 2 + 3], ids=["default", "2rows",
                                                                          "7rows"])
@pytest.mark.parametrize("fold_kind", ["random", "blocks"])
def test_crossfit_matches_naive_per_fold_loop(dtype, normalisation, k, use_valid, chunk_bytes,
                                              fold_kind, backend):
    data = make_tiny_data(dtype)
    tmpl = make_template(k=k)
    folds = tiny_folds() if fold_kind == "random" else block_folds()
    valid = tiny_valid() if use_valid else None
    masks, img = core.crossfit_template_image(data, tmpl, folds, normalisation=normalisation,
                                              valid=valid, chunk_bytes=chunk_bytes)
    want_m, want_i = naive_crossfit(data, tmpl, folds, normalisation, valid)
    nk = () if k is None else (k,)
    assert masks.shape == (3, *nk, *TINY_SHAPE[2:])
    assert img.shape == (*nk, *TINY_SHAPE[:2])
    np.testing.assert_allclose(masks, want_m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(img, want_i, rtol=1e-9, atol=1e-9)
    # unused positions are NaN, all others finite; dead and invalid pixels give exactly 0
    unused = folds < 0
    assert np.all(np.isnan(img[..., unused])) and np.all(np.isfinite(img[..., ~unused]))
    assert np.all(masks[..., 0, :2] == 0)
    if use_valid:
        assert np.all(masks[..., ~valid] == 0)
    if normalisation == "pcc":
        assert np.all(np.abs(masks) <= 1)


@pytest.mark.parametrize("nfold", [2, 35], ids=["K2", "leave_one_out"])
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_crossfit_fold_counts_template_counts(nfold, k, backend):
    data = make_tiny_data(np.float64)
    tmpl = make_template(k=k)
    if nfold == 35:
        folds = np.arange(35).reshape(TINY_SHAPE[:2])
    else:
        folds = tiny_folds(seed=5, nfold=2, unused=False)
    masks, img = core.crossfit_template_image(data, tmpl, folds, chunk_bytes=150)
    want_m, want_i = naive_crossfit(data, tmpl, folds)
    np.testing.assert_allclose(masks, want_m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(img, want_i, rtol=1e-9, atol=1e-9)


def test_crossfit_differs_from_in_sample_and_one_fold_mask_is_out_of_fold_pcc():
    """Each fold's mask is pcc_mask on the out-of-fold region (an independent code path)."""
    data = make_tiny_data(np.float64)
    tmpl = make_template(k=2)
    folds = tiny_folds()
    masks, _ = core.crossfit_template_image(data, tmpl, folds, normalisation="mean")
    for f in range(3):
        region = (folds >= 0) & (folds != f)
        want = core.pcc_mask(data, tmpl, normalisation="mean", region=region)
        np.testing.assert_allclose(masks[f], want, rtol=1e-9, atol=1e-12)
    in_sample = core.pcc_mask(data, tmpl, normalisation="mean", region=folds >= 0)
    assert not np.allclose(masks[0], in_sample)


def test_crossfit_lazy_inputs_agree(tmp_path):
    import dask.array as da
    import zarr

    arr = make_tiny_data(np.uint16)
    tmpl = make_template(k=3)
    folds = tiny_folds()
    want_m, want_i = core.crossfit_template_image(arr, tmpl, folds)
    z = zarr.create_array(store=str(tmp_path / "d.zarr"), shape=arr.shape, dtype=arr.dtype,
                          chunks=(2, 3, *arr.shape[2:]))
    z[...] = arr
    kinds = {"zarr": z, "dask": da.from_array(arr, chunks=(3, 2, -1, -1)),
             "fortran": np.asfortranarray(arr), "uint8": arr.astype(np.uint8) % 200}
    for name, src in kinds.items():
        m, i = core.crossfit_template_image(src, tmpl, folds, chunk_bytes=200)
        if name == "uint8":
            want_m, want_i = naive_crossfit(src, tmpl, folds)
        np.testing.assert_allclose(m, want_m, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(i, want_i, rtol=1e-10, atol=1e-9, err_msg=name)


def naive_in_sample(data, template, folds, normalisation="pcc", valid=None):
    """The mask fitted on all used positions, applied there with the used-position stats."""
    a = np.asarray(data, dtype=np.float64)
    sy, sx, ky, kx = a.shape
    D = a.reshape(sy * sx, ky * kx)
    used = np.asarray(folds).reshape(-1) >= 0
    v = np.ones(ky * kx, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    t = np.asarray(template, dtype=np.float64).reshape(-1, sy * sx)
    Du = D[used]
    mean, std = Du.mean(axis=0), Du.std(axis=0)
    ok = v & (std > 0)
    if normalisation == "mean":
        ok &= mean != 0
    Dh = np.zeros_like(Du)
    Dh[:, ok] = (Du[:, ok] - mean[ok]) / std[ok]
    masks, img = [], np.full((t.shape[0], sy * sx), np.nan)
    for i, ti in enumerate(t):
        tu = ti[used]
        r = np.clip((tu - tu.mean()) / tu.std() @ Dh / used.sum(), -1, 1)
        if normalisation == "mean":
            r[ok] /= mean[ok]
            img[i, used] = (Dh[:, ok] / mean[ok]) @ r[ok]
        else:
            img[i, used] = Dh @ r
        masks.append(r)
    masks = np.array(masks).reshape(-1, ky, kx)
    img = img.reshape(-1, sy, sx)
    return (masks, img) if np.ndim(template) == 3 else (masks[0], img[0])


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("k", [None, 3], ids=["single", "stack3"])
def test_crossfit_in_sample_counterpart(normalisation, k, backend):
    data = make_tiny_data(np.uint16)
    tmpl = make_template(k=k)
    folds = tiny_folds()
    valid = tiny_valid()
    masks, img, m_in, i_in = core.crossfit_template_image(
        data, tmpl, folds, normalisation=normalisation, valid=valid, chunk_bytes=300,
        in_sample=True)
    want_m, want_i = naive_crossfit(data, tmpl, folds, normalisation, valid)
    np.testing.assert_allclose(masks, want_m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(img, want_i, rtol=1e-9, atol=1e-9)
    # in-sample mask = pcc_mask over the used positions (independent code path)
    np.testing.assert_allclose(
        m_in, core.pcc_mask(data, tmpl, normalisation=normalisation, region=folds >= 0,
                            valid=valid), rtol=1e-9, atol=1e-12)
    # in-sample image: explicit formulas
    want_mi, want_ii = naive_in_sample(data, tmpl, folds, normalisation, valid)
    np.testing.assert_allclose(m_in, want_mi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(i_in, want_ii, rtol=1e-9, atol=1e-9)
    assert np.all(np.isnan(i_in[..., folds < 0]))
    # no unused positions: the in-sample pair is template_mask_image's
    all_folds = np.abs(folds) % 3
    _, _, m2, i2 = core.crossfit_template_image(data, tmpl, all_folds,
                                                normalisation=normalisation, in_sample=True)
    want_m2, want_i2 = core.template_mask_image(data, tmpl, normalisation=normalisation)
    np.testing.assert_allclose(m2, want_m2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(i2, want_i2, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- (b) noise imprint
def test_noise_in_sample_reproduces_random_template_crossfit_does_not():
    """Pure Poisson noise, n = 2400 pixels > m = 1200 positions: C ≈ (n/m) I in-sample."""
    rng = np.random.default_rng(2026)
    sy, sx, ky, kx = 40, 30, 48, 50
    data = rng.poisson(5.0, size=(sy, sx, ky, kx)).astype(np.uint16)
    tmpl = rng.normal(size=(sy, sx))
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    folds = (yy // 10) * 3 + xx // 10  # 4 x 3 "cells" of 10 x 10 positions, K = 12
    _, img_in = core.template_mask_image(data, tmpl)
    _, img_cf = core.crossfit_template_image(data, tmpl, folds)
    r_in = np.corrcoef(img_in.ravel(), tmpl.ravel())[0, 1]
    r_cf = np.corrcoef(img_cf.ravel(), tmpl.ravel())[0, 1]
    # in-sample: image ≈ (n/m) t̂ + noise of std sqrt(n/m) -> r ≈ sqrt(2/3) = 0.82
    assert r_in > 0.75
    # held out: r ~ N(0, 1/sqrt(m) = 0.029)
    assert abs(r_cf) < 0.1


def test_real_signal_survives_crossfitting():
    """Columns that truly follow a lattice pattern: the held-out image still shows it."""
    rng = np.random.default_rng(7)
    sy, sx, ky, kx = 40, 30, 48, 50
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    t_true = np.cos(2 * np.pi * yy / 10) * np.cos(2 * np.pi * xx / 10)
    # 10 % of the pixels brighten (+1) or darken (-1) with the pattern, the rest are pure noise
    g = np.where(rng.random((ky, kx)) < 0.1, rng.choice([-1.0, 1.0], (ky, kx)), 0.0)
    lam = 5.0 * (1 + 0.3 * t_true[..., None, None] * g[None, None])
    data = rng.poisson(lam).astype(np.uint16)
    folds = (yy // 10) * 3 + xx // 10
    t_rand = rng.normal(size=(sy, sx))
    masks, img = core.crossfit_template_image(data, np.stack([t_true, t_rand]), folds)
    assert np.corrcoef(img[0].ravel(), t_true.ravel())[0, 1] > 0.9  # measured 0.98
    assert abs(np.corrcoef(img[1].ravel(), t_rand.ravel())[0, 1]) < 0.1  # measured -0.005
    # every fold's mask finds the signal pixels: sign of g on them
    on = g != 0
    for f in range(12):
        assert np.mean(np.sign(masks[f, 0][on]) == g[on]) > 0.9


# ----------------------------------------------------------------------------- (c) passes
@pytest.mark.parametrize("nfold", [2, 7, 35])
@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_crossfit_two_passes_whatever_k(nfold, normalisation):
    arr = make_tiny_data(np.uint16)
    folds = np.arange(35).reshape(TINY_SHAPE[:2]) % nfold
    counting = CountingArray(arr)
    masks, img = core.crossfit_template_image(counting, make_template(k=4), folds,
                                              normalisation=normalisation, chunk_bytes=150)
    assert counting.passes == 2
    want_m, want_i = naive_crossfit(arr, make_template(k=4), folds, normalisation)
    np.testing.assert_allclose(img, want_i, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- (d) bad input
def test_crossfit_bad_input():
    data = make_tiny_data(np.uint16)
    t = make_template()
    folds = tiny_folds()
    cf = core.crossfit_template_image
    with pytest.raises(ValueError, match=r"folds shape \(5, 7\) does not match the scan shape"):
        cf(data, t, folds.T)
    with pytest.raises(ValueError, match="fold 0 holds every used probe position"):
        cf(data, t, np.zeros(TINY_SHAPE[:2], int))
    one = np.full(TINY_SHAPE[:2], -1)
    one[2:, :] = 0
    with pytest.raises(ValueError, match="fold 0 holds every used probe position.*K >= 2"):
        cf(data, t, one)
    only1 = np.ones(TINY_SHAPE[:2], int)
    with pytest.raises(ValueError, match="fold 1 holds every used probe position"):
        cf(data, t, only1)
    with pytest.raises(ValueError, match="non-integer"):
        cf(data, t, folds + 0.5)
    with pytest.raises(ValueError, match="non-integer or non-finite"):
        cf(data, t, np.where(folds == 0, np.nan, folds.astype(float)))
    with pytest.raises(ValueError, match="integer array of fold labels"):
        cf(data, t, folds > 0)
    with pytest.raises(ValueError, match="every label is negative"):
        cf(data, t, np.full(TINY_SHAPE[:2], -1))
    huge = folds.copy()
    huge[folds == 2] = 10**12  # no bincount of 10**12 bins: one clear line
    with pytest.raises(ValueError, match=r"999999999998 fold label\(s\) below K = "
                       r"1000000000001 have no probe position \(2, 3, 4, .*11, \.\.\.\)"):
        cf(data, t, huge)
    gap = np.where(folds == 1, 2, folds)  # labels 0 and 2 only
    with pytest.raises(ValueError,
                       match=r"1 fold label\(s\) below K = 3 have no probe position \(1\)"):
        cf(data, t, gap)
    # integral floats are accepted and equal the int result
    np.testing.assert_array_equal(cf(data, t, folds.astype(float))[1], cf(data, t, folds)[1])
    # a template constant outside one fold
    tc = np.ones(TINY_SHAPE[:2])
    two = np.where(np.arange(35).reshape(TINY_SHAPE[:2]) < 10, 0, 1)
    tc[two == 0] = np.arange(10)
    with pytest.raises(ValueError, match="template 0 has zero variance .* outside fold 0"):
        cf(data, tc, two)
    with pytest.raises(ValueError, match="zero variance over the used"):
        cf(data, np.ones(TINY_SHAPE[:2]), folds)
    with pytest.raises(ValueError, match="unknown normalisation"):
        cf(data, t, folds, normalisation="zscore")
    with pytest.raises(ValueError, match="valid shape"):
        cf(data, t, folds, valid=np.ones((6, 4), bool))
    with pytest.raises(ValueError, match="template shape"):
        cf(data, t.T, folds)
    bad = data.astype(np.float32)
    bad[3, 2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        cf(bad, t, folds)


# ----------------------------------------------------------------------------- apply masks
def naive_apply_fold_masks(data, masks, folds, normalisation="pcc", valid=None):
    """Per fold: out-of-fold mean/std of each column, then the explicit Eq. 7 sum."""
    a = np.asarray(data, dtype=np.float64)
    sy, sx, ky, kx = a.shape
    D = a.reshape(sy * sx, ky * kx)
    mk = np.asarray(masks, dtype=np.float64)
    single = mk.ndim == 3
    mk = mk.reshape(mk.shape[0], -1, ky * kx)
    lab = np.asarray(folds).reshape(-1)
    v = np.ones(ky * kx, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    img = np.full((mk.shape[1], sy * sx), np.nan)
    for f in range(mk.shape[0]):
        out = (lab >= 0) & (lab != f)
        mean, std = D[out].mean(axis=0), D[out].std(axis=0)
        for j in np.flatnonzero(lab == f):
            for i in range(mk.shape[1]):
                total = 0.0
                for c in range(ky * kx):
                    if not v[c] or std[c] == 0 or (normalisation == "mean" and mean[c] == 0):
                        continue
                    z = (D[j, c] - mean[c]) / std[c]
                    if normalisation == "mean":
                        z /= mean[c]
                    total += z * mk[f, i, c]
                img[i, j] = total
    img = img.reshape(-1, sy, sx)
    return img[0] if single else img


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("k", [None, 2], ids=["single", "stack2"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32], ids=["uint16", "float32"])
def test_crossfit_apply_masks_matches_naive(normalisation, k, dtype, backend):
    other = make_tiny_data(dtype, seed=9)
    folds = tiny_folds()
    valid = tiny_valid()
    rng = np.random.default_rng(4)
    masks = rng.normal(size=(3, *((k,) if k else ()), *TINY_SHAPE[2:]))
    counting = CountingArray(other)
    got = core.crossfit_apply_masks(counting, masks, folds, normalisation=normalisation,
                                    valid=valid, chunk_bytes=130)
    assert counting.passes == 2
    want = naive_apply_fold_masks(other, masks, folds, normalisation, valid)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # the cross-fitted masks applied to their own data give the cross-fitted image
    data = make_tiny_data(dtype)
    tmpl = make_template(k=k)
    m, img = core.crossfit_template_image(data, tmpl, folds, normalisation=normalisation,
                                          valid=valid)
    again = core.crossfit_apply_masks(data, m, folds, normalisation=normalisation, valid=valid)
    np.testing.assert_allclose(again, img, rtol=1e-10, atol=1e-10)


def test_crossfit_apply_masks_bad_input():
    data = make_tiny_data(np.uint16)
    folds = tiny_folds()
    ap = core.crossfit_apply_masks
    with pytest.raises(ValueError, match="2 fold masks given but folds has K = 3"):
        ap(data, np.ones((2, *TINY_SHAPE[2:])), folds)
    with pytest.raises(ValueError, match=r"masks shape \(3, 6, 4\) must be"):
        ap(data, np.ones((3, 6, 4)), folds)
    with pytest.raises(ValueError, match="masks contain NaN"):
        ap(data, np.full((3, *TINY_SHAPE[2:]), np.nan), folds)
    with pytest.raises(ValueError, match="holds every used probe position"):
        ap(data, np.ones((1, *TINY_SHAPE[2:])), np.zeros(TINY_SHAPE[:2], int))
