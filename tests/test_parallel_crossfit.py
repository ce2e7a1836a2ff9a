"""parallel.crossfit_template_image (dask) against core.crossfit_template_image and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CountingArray, make_template, make_tiny_data

da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

from test_core_crossfit import naive_crossfit  # noqa: E402

from tmask_validate import core, parallel  # noqa: E402

SHAPE = (9, 7, 5, 6)  # scan and detector both asymmetric


class _Counting(CountingArray):
    ndim = 4  # what dask.array.from_array asks of an array-like


def _folds(seed=4, nfold=4):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, nfold, size=SHAPE[:2])
    lab[rng.random(SHAPE[:2]) < 0.15] = -1
    for f in range(nfold):
        lab.flat[3 * f + 2] = f
    return lab


@pytest.fixture(scope="module")
def zdata(tmp_path_factory):
    raw = make_tiny_data(np.uint16, shape=SHAPE, seed=5)
    path = tmp_path_factory.mktemp("cf") / "d.zarr"
    z = zarr.open_array(str(path), mode="w", shape=raw.shape, chunks=(4, 3, 3, 4),
                        dtype=raw.dtype)  # chunks cut scan AND detector axes
    z[...] = raw
    return raw, da.from_zarr(str(path))


@pytest.mark.parametrize("normalisation", ["pcc", "mean"])
@pytest.mark.parametrize("k", [None, 3], ids=["single", "stack3"])
@pytest.mark.parametrize("use_valid", [False, True], ids=["all_px", "valid"])
def test_parallel_crossfit_matches_core_and_naive(zdata, normalisation, k, use_valid):
    raw, x = zdata
    tmpl = make_template(SHAPE[:2], seed=8, k=k)
    folds = _folds()
    valid = None
    if use_valid:
        valid = np.ones(SHAPE[2:], bool)
        valid[1, 2:5] = False
    got = parallel.crossfit_template_image(x, tmpl, folds, normalisation=normalisation,
                                           valid=valid, in_sample=True, scheduler="sync")
    want = core.crossfit_template_image(raw, tmpl, folds, normalisation=normalisation,
                                        valid=valid, in_sample=True)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    nm, ni = naive_crossfit(raw, tmpl, folds, normalisation, valid)
    np.testing.assert_allclose(got[0], nm, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[1], ni, rtol=1e-9, atol=1e-9)


def test_parallel_crossfit_two_passes_and_threads():
    raw = make_tiny_data(np.uint16, shape=SHAPE, seed=6)
    counting = _Counting(raw)
    x = da.from_array(counting, chunks=(3, 4, -1, -1))
    folds = np.arange(63).reshape(SHAPE[:2]) % 5
    tmpl = make_template(SHAPE[:2], seed=2, k=2)
    masks, img = parallel.crossfit_template_image(x, tmpl, folds, scheduler="threads")
    # two passes over the blocks (+ at most one block for the shift pattern)
    assert 2 <= counting.passes <= 2 + 12 / 63
    want_m, want_i = core.crossfit_template_image(raw, tmpl, folds)
    np.testing.assert_allclose(masks, want_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(img, want_i, rtol=1e-10, atol=1e-10)


def test_parallel_crossfit_bad_input(zdata):
    raw, x = zdata
    t = make_template(SHAPE[:2], seed=8)
    with pytest.raises(ValueError, match="folds shape"):
        parallel.crossfit_template_image(x, t, _folds().T, scheduler="sync")
    with pytest.raises(ValueError, match="holds every used probe position"):
        parallel.crossfit_template_image(x, t, np.zeros(SHAPE[:2], int), scheduler="sync")
    bad = raw.astype(np.float32)
    bad[2, 3, 1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        parallel.crossfit_template_image(da.from_array(bad, chunks=(4, 3, -1, -1)), t,
                                         _folds(), scheduler="sync")


def test_parallel_crossfit_on_a_distributed_cluster(zdata):
    distributed = pytest.importorskip("distributed")
    raw, x = zdata
    tmpl = make_template(SHAPE[:2], seed=8, k=2)
    folds = _folds()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    try:
        with distributed.Client(cluster) as client:
            with distributed.get_task_stream(client) as ts:
                masks, img = parallel.crossfit_template_image(x, tmpl, folds)
    finally:
        cluster.close()
    names = {rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"] for rec in ts.data}
    assert any("_crossfit_block_sums" in str(nm) for nm in names)
    assert any("_crossfit_block_apply" in str(nm) for nm in names)
    assert len({rec["worker"] for rec in ts.data}) == 2  # both workers ran tasks
    want_m, want_i = core.crossfit_template_image(raw, tmpl, folds)
    np.testing.assert_allclose(masks, want_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(img, want_i, rtol=1e-10, atol=1e-10)
