"""tmask_validate.core against naive explicit-D̂ float64 references on tiny asymmetric data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    DTYPES,
    TINY_SHAPE,
    CountingArray,
    make_region,
    make_template,
    make_tiny_data,
)

from tmask_validate import core


# ----------------------------------------------------------------------------- naive reference
def ref_D(data):
    a = np.asarray(data, dtype=np.float64)
    return a.reshape(a.shape[0] * a.shape[1], -1)


def ref_Dhat(D, normalisation="pcc"):
    """Explicit normalised matrix (Eq. 4 / Eq. 8); dead columns set to 0."""
    mean = D.mean(axis=0)
    std = D.std(axis=0)  # ddof=0
    out = np.zeros_like(D)
    for k in range(D.shape[1]):
        if std[k] == 0 or (normalisation == "mean" and mean[k] == 0):
            continue
        out[:, k] = (D[:, k] - mean[k]) / std[k]
        if normalisation == "mean":
            out[:, k] /= mean[k]
    return out


def ref_pcc(data, template, normalisation="pcc", region=None):
    D = ref_D(data)
    t = np.asarray(template, dtype=np.float64)
    stack = t.ndim == 3
    t = t.reshape(-1, D.shape[0])
    sel = np.ones(D.shape[0], bool) if region is None else np.asarray(region).reshape(-1)
    Ds = D[sel]
    Dh = ref_Dhat(Ds, normalisation)
    out = []
    for ti in t:
        ts = ti[sel]
        th = (ts - ts.mean()) / ts.std()
        out.append(th @ Dh / sel.sum())
    det = np.shape(data)[2:]
    out = np.array(out).reshape(-1, *det)
    return out if stack else out[0]


def ref_apply(data, mask, normalised=True, normalisation="pcc", threshold=None):
    D = ref_D(data)
    w = np.asarray(mask, dtype=np.float64)
    stack = w.ndim == 3
    w = w.reshape(-1, D.shape[1])
    if threshold is not None:
        w = np.where(w > threshold, w, 0)
    M = ref_Dhat(D, normalisation) if normalised else D
    out = (M @ w.T).T.reshape(-1, *np.shape(data)[:2])
    return out if stack else out[0]


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def backend(request):
    prev = core.use_numba()
    core.use_numba(request.param)
    yield request.param
    core.use_numba(prev)


# ----------------------------------------------------------------------------- PCC masks
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("use_region", [False, True])
def test_pcc_mask_matches_reference(dtype, normalisation, use_region, backend):
    data = make_tiny_data(dtype)
    tmpl = make_template(k=3)
    region = make_region() if use_region else None
    got = core.pcc_mask(data, tmpl, normalisation=normalisation, region=region)
    want = ref_pcc(data, tmpl, normalisation, region)
    assert got.shape == (3, *TINY_SHAPE[2:])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # single template gives the first slice of the stack
    one = core.pcc_mask(data, tmpl[0], normalisation=normalisation, region=region)
    assert one.shape == TINY_SHAPE[2:]
    np.testing.assert_allclose(one, got[0], rtol=1e-12, atol=1e-14)
    # dead columns are exactly 0, never NaN
    assert np.all(np.isfinite(got))
    assert np.all(got[:, 0, :2] == 0)
    if normalisation == "pcc":
        assert np.all(np.abs(got) <= 1)


def test_mean_normalisation_zero_mean_column_gives_zero():
    data = make_tiny_data(np.float64)
    col = np.tile([1.0, -1.0], 18)[:35]
    col[-1] = 0.0  # varies, mean exactly 0
    data[..., 2, 3] = col.reshape(TINY_SHAPE[:2])
    t = make_template()
    r = core.pcc_mask(data, t, normalisation="mean")
    assert np.all(np.isfinite(r))
    assert r[2, 3] == 0
    assert core.pcc_mask(data, t)[2, 3] != 0
    img = core.apply_mask(data, np.ones((4, 6)), normalisation="mean")
    np.testing.assert_allclose(img, ref_apply(data, np.ones((4, 6)), True, "mean"), atol=1e-9)


def test_pcc_equals_pearson_of_column(tiny_data):
    tmpl = make_template()
    r = core.pcc_mask(tiny_data, tmpl)
    k = (2, 4)
    want = np.corrcoef(tmpl.ravel(), tiny_data[..., k[0], k[1]].ravel())[0, 1]
    assert r[k] == pytest.approx(want, abs=1e-12)


def test_pcc_large_offset_no_cancellation():
    """Columns with a huge mean and small fluctuations keep full PCC accuracy."""
    data = make_tiny_data(np.float64) * 1e-3 + 1e7
    tmpl = make_template()
    np.testing.assert_allclose(core.pcc_mask(data, tmpl), ref_pcc(data, tmpl), atol=1e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
def test_integer_data_never_overflows(dtype):
    rng = np.random.default_rng(3)
    hi = np.iinfo(dtype).max
    data = rng.integers(hi - 50, hi, size=TINY_SHAPE, endpoint=True).astype(dtype)
    data[..., 1, 1] = rng.integers(0, hi, size=TINY_SHAPE[:2], endpoint=True)
    tmpl = make_template()
    np.testing.assert_allclose(core.pcc_mask(data, tmpl), ref_pcc(data, tmpl), atol=1e-9)
    img = core.apply_mask(data, np.ones(TINY_SHAPE[2:]), normalised=False)
    np.testing.assert_allclose(img, ref_D(data).sum(axis=1).reshape(TINY_SHAPE[:2]), rtol=1e-15)
    st = core.column_stats(data)
    np.testing.assert_allclose(st.mean, ref_D(data).mean(0).reshape(TINY_SHAPE[2:]), rtol=1e-14)
    np.testing.assert_allclose(st.std, ref_D(data).std(0).reshape(TINY_SHAPE[2:]), rtol=1e-9,
                               atol=1e-9)


# ----------------------------------------------------------------------------- apply / stats
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("threshold", [None, 0.0, 0.3])
def test_apply_mask_matches_reference(dtype, normalisation, threshold, backend):
    data = make_tiny_data(dtype)
    rng = np.random.default_rng(7)
    mask = rng.normal(size=(2, *TINY_SHAPE[2:]))
    for normalised in (True, False):
        got = core.apply_mask(data, mask, normalised=normalised, normalisation=normalisation,
                              threshold=threshold)
        want = ref_apply(data, mask, normalised, normalisation, threshold)
        assert got.shape == (2, *TINY_SHAPE[:2])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)
    single = core.apply_mask(data, mask[1], normalisation=normalisation, threshold=threshold)
    np.testing.assert_allclose(single, ref_apply(data, mask[1], True, normalisation, threshold),
                               rtol=1e-10, atol=1e-9)


def test_column_stats_matches_numpy(tiny_data_any_dtype):
    data = tiny_data_any_dtype
    st = core.column_stats(data)
    D = ref_D(data)
    assert st.count == D.shape[0]
    np.testing.assert_allclose(st.mean.ravel(), D.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st.std.ravel(), D.std(0), rtol=1e-9, atol=1e-12)
    assert st.std[0, 0] == 0 and st.std[0, 1] == 0
    assert not st.valid[0, 0] and st.valid[1, 1]
    reg = make_region()
    st_r = core.column_stats(data, region=reg)
    Dr = D[reg.ravel()]
    assert st_r.count == reg.sum()
    np.testing.assert_allclose(st_r.mean.ravel(), Dr.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st_r.std.ravel(), Dr.std(0), rtol=1e-9, atol=1e-12)


def test_apply_mask_with_precomputed_stats_skips_a_pass():
    arr = make_tiny_data(np.float32)
    st = core.column_stats(arr)
    mask = make_template((4, 6), seed=9)
    counting = CountingArray(arr)
    img = core.apply_mask(counting, mask, stats=st)
    assert counting.passes == 1
    np.testing.assert_allclose(img, ref_apply(arr, mask), rtol=1e-10, atol=1e-9)
    counting2 = CountingArray(arr)
    core.apply_mask(counting2, mask)
    assert counting2.passes == 2


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("use_region", [False, True])
def test_template_mask_image_two_passes(normalisation, use_region):
    arr = make_tiny_data(np.uint16)
    tmpl = make_template(k=2)
    region = make_region() if use_region else None
    counting = CountingArray(arr)
    mask, img = core.template_mask_image(counting, tmpl, normalisation=normalisation,
                                         region=region, threshold=0.0)
    assert counting.passes == 2
    want_mask = ref_pcc(arr, tmpl, normalisation, region)
    np.testing.assert_allclose(mask, want_mask, rtol=1e-10, atol=1e-12)
    # image: Eq. 7 with ALL-position statistics
    want_img = ref_apply(arr, want_mask, True, normalisation, 0.0)
    np.testing.assert_allclose(img, want_img, rtol=1e-9, atol=1e-9)


def test_single_passes_for_mask_and_virtual_images():
    arr = make_tiny_data(np.uint8)
    c1 = CountingArray(arr)
    core.pcc_mask(c1, make_template(k=4))
    assert c1.passes == 1
    c2 = CountingArray(arr)
    core.virtual_images(c2, np.ones((5, *TINY_SHAPE[2:])))
    assert c2.passes == 1
    c3 = CountingArray(arr)
    core.center_of_mass(c3)
    assert c3.passes == 1


# ----------------------------------------------------------------------------- input kinds
def _all_kinds(arr, tmp_path):
    import dask.array as da
    import zarr

    mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=arr.dtype,
                                   shape=arr.shape)
    mm[...] = arr
    mm.flush()
    z = zarr.create_array(store=str(tmp_path / "d.zarr"), shape=arr.shape, dtype=arr.dtype,
                          chunks=(2, 3, *arr.shape[2:]))
    z[...] = arr
    strided = np.asfortranarray(arr)
    return {
        "memmap": np.load(tmp_path / "d.npy", mmap_mode="r+"),
        "zarr": z,
        "dask": da.from_array(arr, chunks=(3, 2, -1, -1)),
        "fortran": strided,
        "list": arr.tolist(),
    }


@pytest.mark.parametrize("chunk_bytes", [None, 1, 200, 24 * 8 * 3 + 5])
def test_chunked_and_lazy_inputs_agree(tmp_path, chunk_bytes):
    arr = make_tiny_data(np.uint16)
    tmpl = make_template(k=2)
    region = make_region()
    masks = np.random.default_rng(2).normal(size=(3, *TINY_SHAPE[2:]))
    want_r = core.pcc_mask(arr, tmpl, region=region)
    want_i = core.apply_mask(arr, masks, normalisation="mean")
    want_v = core.virtual_images(arr, masks)
    want_c = core.center_of_mass(arr)
    kinds = _all_kinds(arr, tmp_path)
    if chunk_bytes == 1:  # one pattern per read: dask's per-read overhead is not worth it
        kinds.pop("dask")
    for name, src in {"numpy": arr, **kinds}.items():
        kw = {"chunk_bytes": chunk_bytes}
        np.testing.assert_allclose(core.pcc_mask(src, tmpl, region=region, **kw), want_r,
                                   rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(core.apply_mask(src, masks, normalisation="mean", **kw),
                                   want_i, rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(core.virtual_images(src, masks, **kw), want_v, rtol=1e-12,
                                   err_msg=name)
        np.testing.assert_allclose(core.center_of_mass(src, **kw), want_c, rtol=1e-10,
                                   atol=1e-12, err_msg=name)


def test_peak_extra_memory_on_memmap(tmp_path):
    """A 48 MiB memmapped float32 dataset is processed with far less extra memory."""
    import tracemalloc

    shape = (48, 64, 64, 64)
    mm = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32,
                                   shape=shape)
    rng = np.random.default_rng(0)
    for y in range(shape[0]):
        mm[y] = rng.random(shape[1:], dtype=np.float32)
    mm.flush()
    del mm
    data = np.load(tmp_path / "big.npy", mmap_mode="r")
    tmpl = make_template(shape[:2], k=4)
    core.pcc_mask(data[:2], tmpl[:, :2])  # warm-up (compilation)
    tracemalloc.start()
    mask, img = core.template_mask_image(data, tmpl, chunk_bytes=4 * 2**20)
    core.virtual_images(data, np.ones((16, 64, 64)), chunk_bytes=4 * 2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mask.shape == (4, 64, 64) and img.shape == (4, 48, 64)
    assert peak < 12 * 2**20, peak


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tiny_data):
    t = make_template()
    with pytest.raises(ValueError, match="4D"):
        core.pcc_mask(tiny_data[0], t)
    with pytest.raises(TypeError):
        core.pcc_mask(object(), t)
    with pytest.raises(ValueError, match="template shape"):
        core.pcc_mask(tiny_data, t.T)
    with pytest.raises(ValueError, match="zero variance"):
        core.pcc_mask(tiny_data, np.ones(TINY_SHAPE[:2]))
    bad = t.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        core.pcc_mask(tiny_data, bad)
    with pytest.raises(ValueError, match="region shape"):
        core.pcc_mask(tiny_data, t, region=np.ones((5, 7), bool))
    with pytest.raises(ValueError, match="empty"):
        core.pcc_mask(tiny_data, t, region=np.zeros(TINY_SHAPE[:2], bool))
    one = np.zeros(TINY_SHAPE[:2], bool)
    one[2, 2] = True
    with pytest.raises(ValueError, match="zero variance"):
        core.pcc_mask(tiny_data, t, region=one)
    with pytest.raises(ValueError, match="normalisation"):
        core.pcc_mask(tiny_data, t, normalisation="zscore")
    with pytest.raises(ValueError, match="normalisation"):
        core.apply_mask(tiny_data, np.ones((4, 6)), normalisation="bogus")
    with pytest.raises(ValueError, match="mask shape"):
        core.apply_mask(tiny_data, np.ones((6, 4)))
    m = np.ones((4, 6))
    m[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        core.apply_mask(tiny_data, m)
    with pytest.raises(ValueError, match="mask shape"):
        core.virtual_images(tiny_data, {"a": np.ones((3, 3))})
    with pytest.raises(TypeError):
        core.pcc_mask(tiny_data.astype(complex), t)
    with pytest.raises(ValueError, match="detector shape"):
        st = core.column_stats(tiny_data[..., :3, :])
        core.apply_mask(tiny_data, np.ones((4, 6)), stats=st)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_data_detected_during_pass(bad, backend):
    data = make_tiny_data(np.float32)
    data[3, 2, 1, 4] = bad
    t = make_template()
    calls = [
        lambda: core.pcc_mask(data, t),
        lambda: core.column_stats(data),
        lambda: core.apply_mask(data, np.ones((4, 6)), normalised=False),
        lambda: core.apply_mask(data, np.ones((4, 6))),
        lambda: core.virtual_images(data, {"a": np.ones((4, 6))}),
        lambda: core.center_of_mass(data),
        lambda: core.template_mask_image(data, t),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="NaN or Inf.*streaming pass"):
            call()


# ----------------------------------------------------------------------------- eigen-image
@pytest.mark.parametrize("method", ["gram", "power"])
@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_eigen_image_matches_eigh(method, normalisation):
    data = make_tiny_data(np.float32, shape=(6, 7, 5, 4), seed=4)
    Dh = ref_Dhat(ref_D(data), normalisation)
    evals, evecs = np.linalg.eigh(Dh @ Dh.T)
    img, mask, lam = core.eigen_image(data, normalisation=normalisation, method=method,
                                      n_iter=2000, tol=1e-14, chunk_bytes=100)
    assert lam == pytest.approx(evals[-1], rel=1e-8)
    s = img.ravel()
    assert np.linalg.norm(s) == pytest.approx(1.0)
    assert abs(s @ evecs[:, -1]) == pytest.approx(1.0, abs=1e-6)
    # duality: the mask is sᵀD̂ and applying it (Eq. 7) returns λ s
    np.testing.assert_allclose(mask.ravel(), s @ Dh, atol=1e-6 * np.abs(mask).max())
    back = core.apply_mask(data, mask, normalisation=normalisation)
    np.testing.assert_allclose(back, lam * img, atol=1e-5 * lam)
    assert mask.sum() >= 0


def test_eigen_image_init_and_errors(tiny_data):
    with pytest.raises(ValueError, match="method"):
        core.eigen_image(tiny_data, method="svd")
    with pytest.raises(ValueError, match="init shape"):
        core.eigen_image(tiny_data, method="power", init=np.ones((2, 2)))
    img, _, lam = core.eigen_image(tiny_data, method="power", init=make_template(), n_iter=3000,
                                   tol=1e-15)
    img2, _, lam2 = core.eigen_image(tiny_data, method="gram")
    assert lam == pytest.approx(lam2, rel=1e-7)
    assert abs(np.sum(img * img2)) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- detectors
def test_scattering_angle_and_annular_mask():
    theta = core.scattering_angle_mrad((5, 8), center_px=(2, 3), mrad_per_px=(2.0, 0.5))
    assert theta.shape == (5, 8)
    assert theta[2, 3] == 0
    assert theta[4, 3] == pytest.approx(4.0)
    assert theta[2, 7] == pytest.approx(2.0)
    assert theta[0, 0] == pytest.approx(np.hypot(4.0, 1.5))
    ring = core.annular_mask((5, 8), inner_mrad=1.0, outer_mrad=2.5, center_px=(2, 3),
                             mrad_per_px=(2.0, 0.5))
    np.testing.assert_array_equal(ring, (theta >= 1.0) & (theta < 2.5))
    disc = core.annular_mask((9, 9), inner_mrad=0, outer_mrad=np.inf)  # default center 4,4
    assert disc.all()
    with pytest.raises(ValueError):
        core.annular_mask((5, 8), inner_mrad=3, outer_mrad=2)


def test_virtual_detector_masks_and_images(tiny_data):
    from tmask_validate.calibration import Calibration

    cal = Calibration(mrad_per_px=(3.0, 2.0), center_px=(1.5, 2.5))
    dets = {"BF": (0, 4), "ABF": (2, 4), "ADF": (4, np.inf)}
    masks = core.virtual_detector_masks((4, 6), dets, calibration=cal)
    theta = core.scattering_angle_mrad((4, 6), center_px=(1.5, 2.5), mrad_per_px=(3.0, 2.0))
    np.testing.assert_array_equal(masks["ADF"], theta >= 4)
    np.testing.assert_array_equal(masks["ABF"], (theta >= 2) & (theta < 4))
    imgs = core.virtual_images(tiny_data, masks)
    assert list(imgs) == ["BF", "ABF", "ADF"]
    for name, m in masks.items():
        want = (tiny_data * m).sum(axis=(2, 3))
        np.testing.assert_allclose(imgs[name], want, rtol=1e-13)
    default = core.virtual_detector_masks((16, 16), semiangle_mrad=4.0, center_px=(8, 8))
    assert set(default) == {"BF", "ABF", "ADF"}
    assert default["BF"].sum() > default["ABF"].sum() > 0
    with pytest.raises(ValueError, match="semiangle"):
        core.virtual_detector_masks((16, 16))


# ----------------------------------------------------------------------------- figure helpers
def test_sorted_d_matrix(tiny_data):
    mat, ang = core.sorted_d_matrix(tiny_data, center_px=(1.5, 2.5), mrad_per_px=1.0,
                                    high_angle_mrad=2.0, max_rows=None, max_cols=None)
    D = ref_D(tiny_data)
    Dh = ref_Dhat(D)
    theta = core.scattering_angle_mrad((4, 6), center_px=(1.5, 2.5)).ravel()
    hi = D[:, theta >= 2.0].sum(axis=1)
    assert mat.shape == D.shape
    assert np.all(np.diff(ang) >= 0)
    want = Dh[np.argsort(hi, kind="stable")][:, np.argsort(theta, kind="stable")]
    np.testing.assert_allclose(mat, want, atol=1e-10)
    small, ang_s = core.sorted_d_matrix(tiny_data, center_px=(1.5, 2.5), high_angle_mrad=2.0,
                                        max_rows=10, max_cols=7)
    assert small.shape == (10, 7) and ang_s.shape == (7,)


def test_angular_profiles(tiny_data):
    t = make_template()
    prof = core.angular_profiles(tiny_data, t, center_px=(1.5, 2.5), mrad_per_px=2.0)
    r = core.pcc_mask(tiny_data, t)
    order = prof["index"]
    np.testing.assert_allclose(prof["pcc"], r.ravel()[order])
    np.testing.assert_allclose(prof["mean_intensity"], ref_D(tiny_data).mean(0)[order])
    assert np.all(np.diff(prof["angle_mrad"]) >= 0)
    assert prof["angle_mrad"].shape == (24,)


def test_concurrent_calls_from_threads_agree():
    from concurrent.futures import ThreadPoolExecutor

    data = make_tiny_data(np.float32, shape=(9, 8, 6, 5))
    tmpl = make_template((9, 8), k=2)
    want = core.template_mask_image(data, tmpl)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: core.template_mask_image(data, tmpl, chunk_bytes=500),
                          range(8)))
    for mask, img in got:
        np.testing.assert_allclose(mask, want[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(img, want[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_binary_virtual_detectors_run_path(dtype, backend):
    """Few-valued masks take the column-run kernel; same sums as the dense reference."""
    from tmask_validate.core._pcc import _run_plan

    data = make_tiny_data(dtype, shape=(5, 4, 48, 96), seed=6)
    masks = core.virtual_detector_masks((48, 96), {"bf": (0, 10), "abf": (5, 10),
                                                   "adf": (14, 99), "ring": (8, 16)},
                                        center_px=(23.5, 40.2))
    w = np.stack([m.reshape(-1) for m in masks.values()]).astype(float)
    w = np.concatenate([w, w[::-1]])  # 8 masks: enough for the run path
    assert _run_plan(w) is not None
    assert _run_plan(w[:4]) is None  # few masks: dense kernel
    assert _run_plan(np.random.default_rng(0).random(w.shape)) is None
    masks = {**masks, **{f"{k}2": v for k, v in masks.items()}}
    got = core.virtual_images(data, masks)
    for name, m in masks.items():
        want = (data.astype(np.float64) * m).sum(axis=(2, 3))
        np.testing.assert_allclose(got[name], want, rtol=1e-13, err_msg=name)
    weighted = np.stack([2.5 * masks["abf"] - masks["bf"], 0.5 * masks["adf"]] * 4)
    np.testing.assert_allclose(core.apply_mask(data, weighted, normalised=False),
                               ref_apply(data, weighted, normalised=False), rtol=1e-12,
                               atol=1e-12)
    if np.dtype(dtype).kind == "f":
        bad = data.copy()
        bad[2, 1, 0, 0] = np.nan  # one bad pixel in one pattern
        with pytest.raises(ValueError, match="NaN or Inf"):
            core.virtual_images(bad, masks)
        with pytest.raises(ValueError, match="NaN or Inf"):
            core.center_of_mass(bad)
    com = core.center_of_mass(data, chunk_bytes=3000)
    use = core.use_numba()
    core.use_numba(not use)
    try:
        np.testing.assert_allclose(core.center_of_mass(data), com, rtol=1e-12, atol=1e-12)
    finally:
        core.use_numba(use)


@pytest.mark.parametrize("k", [1, 2, 4, 5, 6, 9])
def test_template_counts_cover_every_kernel_tile(k):
    """k templates/masks exercise the fused, paired and single sweeps of both kernels."""
    data = make_tiny_data(np.float32, shape=(9, 7, 8, 70), seed=k)
    tmpl = make_template((9, 7), k=k, seed=k)
    mask, img = core.template_mask_image(data, tmpl, chunk_bytes=8 * 70 * 4 * 10)
    want = ref_pcc(data, tmpl)
    np.testing.assert_allclose(mask, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(img, ref_apply(data, want), rtol=1e-9, atol=1e-9)
