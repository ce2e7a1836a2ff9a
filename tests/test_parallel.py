"""tmask_validate.parallel on a local distributed cluster, data in chunked zarr.

References: a naive numpy implementation written here from the paper's equations (column by
column, np.mean/np.std), and tmask_validate.core (skipped if it cannot be imported).
"""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from tmask_validate import parallel  # noqa: E402

RTOL = 1e-10
SCAN = (12, 10)
DET = (9, 11)


# ----------------------------------------------------------------------------- naive reference
def naive_stats(d2: np.ndarray, rows: np.ndarray):
    sub = d2[rows].astype(np.float64)
    return sub.mean(axis=0), sub.std(axis=0)


def naive_pcc(data: np.ndarray, template: np.ndarray, normalisation="pcc", region=None):
    """Pearson r of the template with each pixel-STEM image, column by column (Eqs. 4-6, 8)."""
    m = SCAN[0] * SCAN[1]
    d2 = data.reshape(m, -1).astype(np.float64)
    rows = np.arange(m) if region is None else np.flatnonzero(region.reshape(-1))
    t = template.reshape(-1)[rows].astype(np.float64)
    t = (t - t.mean()) / t.std()
    out = np.zeros(d2.shape[1])
    for k in range(d2.shape[1]):
        s = d2[rows, k]
        if s.std() == 0:
            continue
        r = np.mean(t * (s - s.mean()) / s.std())
        if normalisation == "mean":
            r = r / s.mean() if s.mean() != 0 else 0.0
        out[k] = r
    return out.reshape(DET)


def naive_apply(data, mask, normalisation="pcc", threshold=None):
    """Eq. 7: image = D̂ r with all-position column normalisation (zero-variance -> 0)."""
    m = SCAN[0] * SCAN[1]
    d2 = data.reshape(m, -1).astype(np.float64)
    mean, std = naive_stats(d2, np.arange(m))
    w = mask.reshape(-1).astype(np.float64)
    if threshold is not None:
        w = np.where(w > threshold, w, 0.0)
    dhat = np.zeros_like(d2)
    for k in range(d2.shape[1]):
        if std[k] > 0 and (normalisation == "pcc" or mean[k] != 0):
            dhat[:, k] = (d2[:, k] - mean[k]) / std[k]
            if normalisation == "mean":
                dhat[:, k] /= mean[k]
    return (dhat @ w).reshape(SCAN)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """Random asymmetric uint16 data with a large offset, a dead and a hot-constant pixel."""
    rng = np.random.default_rng(7)
    yy, xx = np.meshgrid(np.arange(SCAN[0]), np.arange(SCAN[1]), indexing="ij")
    lattice = np.cos(2 * np.pi * yy / 4.0) * np.sin(2 * np.pi * (xx + 0.3) / 5.0)
    det = rng.random(DET)
    data = 30000 + 2000 * lattice[:, :, None, None] * det[None, None] + rng.integers(
        0, 500, size=(*SCAN, *DET))
    data[:, :, 0, 0] = 0          # dead pixel: zero variance, zero mean
    data[:, :, 3, 7] = 40000      # constant pixel: zero variance
    return data.astype(np.uint16)


@pytest.fixture(scope="module")
def zarr_data(raw, tmp_path_factory):
    """The data stored as chunked zarr (chunks cut both scan and detector axes)."""
    path = tmp_path_factory.mktemp("par") / "data.zarr"
    z = zarr.open_array(str(path), mode="w", shape=raw.shape, chunks=(5, 4, 5, 6),
                        dtype=raw.dtype)
    z[...] = raw
    return da.from_zarr(str(path))


@pytest.fixture(scope="module")
def templates() -> np.ndarray:
    rng = np.random.default_rng(11)
    t_bin = np.zeros(SCAN)
    t_bin[1::4, ::5] = 1.0
    t_gauss = rng.random(SCAN)
    return np.stack([t_bin, t_gauss])


REGION = np.zeros(SCAN, bool)
REGION[2:9, 1:8] = True


# ----------------------------------------------------------------------------- tests
def test_data_really_chunked(zarr_data):
    assert zarr_data.npartitions > 10
    assert len(zarr_data.chunks[2]) > 1 and len(zarr_data.chunks[3]) > 1


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("region", [None, REGION], ids=["all", "region"])
def test_pcc_mask_matches_naive(client, zarr_data, raw, templates, normalisation, region):
    got = parallel.pcc_mask(zarr_data, templates, normalisation=normalisation, region=region)
    assert got.shape == (2, *DET) and got.dtype == np.float64
    for i in range(2):
        want = naive_pcc(raw, templates[i], normalisation, region)
        np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=1e-13)
    # zero-variance columns give exactly 0, never NaN
    assert got[:, 0, 0].tolist() == [0.0, 0.0] and got[:, 3, 7].tolist() == [0.0, 0.0]
    single = parallel.pcc_mask(zarr_data, templates[0], normalisation=normalisation,
                               region=region)
    np.testing.assert_allclose(single, got[0], rtol=RTOL, atol=1e-15)


def test_pcc_mask_is_a_correlation(client, zarr_data, raw, templates):
    """Physics-style check: the data correlated with its own pixel image k gives r_k = 1."""
    tmpl = raw[:, :, 4, 2].astype(float)
    r = parallel.pcc_mask(zarr_data, tmpl)
    assert r[4, 2] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.abs(r) <= 1.0)


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_apply_mask_matches_naive(client, zarr_data, raw, templates, normalisation):
    masks = naive_pcc(raw, templates[0]), naive_pcc(raw, templates[1])
    got = parallel.apply_mask(zarr_data, np.stack(masks), normalisation=normalisation,
                              threshold=0.0)
    for i in range(2):
        want = naive_apply(raw, masks[i], normalisation, threshold=0.0)
        np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=1e-9 * np.abs(want).max())
    raw_img = parallel.apply_mask(zarr_data, masks[0], normalised=False)
    want_raw = raw.reshape(-1, np.prod(DET)).astype(np.float64) @ masks[0].reshape(-1)
    np.testing.assert_allclose(raw_img, want_raw.reshape(SCAN), rtol=RTOL)


def test_column_stats_and_template_mask_image(client, zarr_data, raw, templates):
    st = parallel.column_stats(zarr_data, region=REGION)
    mean, std = naive_stats(raw.reshape(-1, np.prod(DET)), np.flatnonzero(REGION))
    np.testing.assert_allclose(st.mean.reshape(-1), mean, rtol=RTOL)
    np.testing.assert_allclose(st.std.reshape(-1), std, rtol=RTOL, atol=1e-12)
    assert st.count == REGION.sum()
    mask, img = parallel.template_mask_image(zarr_data, templates[0], region=REGION)
    want_mask = naive_pcc(raw, templates[0], "pcc", REGION)
    np.testing.assert_allclose(mask, want_mask, rtol=RTOL, atol=1e-13)
    want_img = naive_apply(raw, want_mask)
    np.testing.assert_allclose(img, want_img, rtol=RTOL, atol=1e-9 * np.abs(want_img).max())


def test_work_ran_on_the_cluster(client, zarr_data, templates):
    """The pass really is a distributed graph: both workers ran tasks reading zarr chunks."""
    with distributed.get_task_stream(client) as ts:
        parallel.pcc_mask(zarr_data, templates)
    workers = {rec["worker"] for rec in ts.data}
    assert len(ts.data) >= zarr_data.npartitions
    assert len(workers) == 2


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("region", [None, REGION], ids=["all", "region"])
def test_matches_core(client, zarr_data, raw, templates, normalisation, region):
    core = pytest.importorskip("tmask_validate.core")
    got_mask, got_img = parallel.template_mask_image(zarr_data, templates,
                                                     normalisation=normalisation, region=region,
                                                     threshold=0.0)
    want_mask, want_img = core.template_mask_image(raw, templates, normalisation=normalisation,
                                                   region=region, threshold=0.0)
    np.testing.assert_allclose(got_mask, want_mask, rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(got_img, want_img, rtol=RTOL,
                               atol=1e-9 * np.abs(want_img).max())
    np.testing.assert_allclose(parallel.pcc_mask(zarr_data, templates, region=region,
                                                 normalisation=normalisation),
                               core.pcc_mask(raw, templates, region=region,
                                             normalisation=normalisation),
                               rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
def test_valid_pixels_match_core(client, zarr_data, raw, templates, normalisation):
    """The ``valid`` detector-pixel keyword behaves exactly as in the core (0 outside)."""
    core = pytest.importorskip("tmask_validate.core")
    valid = np.ones(DET, bool)
    valid[0, :3] = False
    valid[5, 7] = False
    got_mask, got_img = parallel.template_mask_image(zarr_data, templates, region=REGION,
                                                     normalisation=normalisation, valid=valid)
    want_mask, want_img = core.template_mask_image(raw, templates, region=REGION,
                                                   normalisation=normalisation, valid=valid)
    assert np.all(got_mask[:, ~valid] == 0)
    np.testing.assert_allclose(got_mask, want_mask, rtol=RTOL, atol=1e-13)
    np.testing.assert_allclose(got_img, want_img, rtol=RTOL,
                               atol=1e-9 * np.abs(want_img).max())
    st = parallel.column_stats(zarr_data, valid=valid)
    ref = core.column_stats(raw)
    assert np.all(st.std[~valid] == 0) and np.any(ref.std[~valid] > 0)
    np.testing.assert_allclose(st.std[valid], ref.std[valid], rtol=1e-9, atol=1e-12)
    w = np.random.default_rng(1).standard_normal(DET)
    np.testing.assert_allclose(parallel.apply_mask(zarr_data, w, valid=valid),
                               core.apply_mask(raw, w, valid=valid), rtol=1e-9, atol=1e-9)


def test_float_data_and_numpy_input(raw, templates):
    """Plain numpy float32 input (converted to dask here), default threaded scheduler."""
    f = raw.astype(np.float32) / 7.0
    got = parallel.pcc_mask(f, templates[1], scheduler="threads")
    np.testing.assert_allclose(got, naive_pcc(f, templates[1]), rtol=RTOL, atol=1e-13)
    x = parallel.as_dask(f, rows_per_chunk=5)
    assert x.chunks[0] == (5, 5, 2)


def test_bad_input(zarr_data, templates):
    with pytest.raises(ValueError, match="region"):
        parallel.pcc_mask(zarr_data, templates, region=np.zeros(SCAN, bool))
    with pytest.raises(ValueError, match="template"):
        parallel.pcc_mask(zarr_data, np.ones((3, 3)))
    with pytest.raises(ValueError, match="zero variance"):
        parallel.pcc_mask(zarr_data, np.ones(SCAN), scheduler="sync")
    with pytest.raises(ValueError, match="normalisation"):
        parallel.apply_mask(zarr_data, np.ones(DET), normalisation="l2")
    with pytest.raises(TypeError, match="ColumnStats"):
        parallel.apply_mask(zarr_data, np.ones(DET), stats={"mean": 0})
    bad = np.ones((*SCAN, *DET))
    bad[3, 3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        parallel.pcc_mask(bad, templates[0], scheduler="sync")
