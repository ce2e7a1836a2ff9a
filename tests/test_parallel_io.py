"""The dask path reads each chunk once per pass and keeps numba to the worker's threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tmask_validate import core, parallel

da = pytest.importorskip("dask.array")


class _CountingArray:
    """A numpy array that counts how often each scan-row block is read."""

    def __init__(self, arr: np.ndarray, rows: int) -> None:
        self.arr = arr
        self.rows = rows
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.ndim = arr.ndim
        self.reads: list[int] = []
        self._lock = threading.Lock()

    def __getitem__(self, key):
        out = self.arr[key]
        if out.size:  # (dask reads empty slices for its metadata)
            first = key[0] if isinstance(key, tuple) else key
            start = (first.start or 0) if isinstance(first, slice) else int(first)
            with self._lock:
                self.reads.append(start // self.rows)
        return out


@pytest.mark.parametrize("fn", ["column_stats", "template_mask_image", "crossfit"])
def test_dask_pass_reads_each_block_once(fn):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 900, size=(6, 4, 5, 3)).astype(np.uint16)
    src = _CountingArray(arr, rows=2)
    x = da.from_array(src, chunks=(2, -1, -1, -1), asarray=True)
    tmpl = rng.random((6, 4))
    src.reads.clear()
    if fn == "column_stats":
        st = parallel.column_stats(x, scheduler="sync")
        np.testing.assert_allclose(st.std, core.column_stats(arr).std, rtol=1e-12)
        passes = 1
    elif fn == "template_mask_image":
        mask, img = parallel.template_mask_image(x, tmpl, scheduler="sync")
        want_m, want_i = core.template_mask_image(arr, tmpl)
        np.testing.assert_allclose(mask, want_m, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(img, want_i, rtol=1e-10, atol=1e-10)
        passes = 2
    else:
        folds = np.arange(24).reshape(6, 4) % 2
        got = parallel.crossfit_template_image(x, tmpl, folds, scheduler="sync")
        want = core.crossfit_template_image(arr, tmpl, folds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-10, equal_nan=True)
        passes = 2
    # each of the 3 blocks once per pass, plus one read of the block holding the shift
    counts = np.bincount(src.reads, minlength=3)
    assert counts.sum() == 3 * passes + 1, src.reads
    assert np.all(counts >= passes), src.reads


def test_block_tasks_follow_the_worker_thread_setting(monkeypatch):
    distributed = pytest.importorskip("distributed")
    numba = pytest.importorskip("numba")

    @parallel._on_worker_threads
    def inside():
        return numba.get_num_threads()

    assert parallel._worker_kernel_threads() is None  # not on a worker: untouched
    assert inside() == numba.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert client.submit(inside, pure=False).result() == 1
        # restored afterwards on the worker's thread
        assert client.submit(numba.get_num_threads, pure=False).result() == \
            numba.config.NUMBA_NUM_THREADS
