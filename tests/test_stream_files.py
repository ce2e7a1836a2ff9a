"""The zarr read paths of the streaming core (mapped / read-into / decoded chunks, prefetch).

Every path must give what the same values give as an in-memory numpy array, and a chunk that
is missing from (or truncated in) a local store must be one clear error, never zeros.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tmask_validate import core
from tmask_validate.core import _stream

zarr = pytest.importorskip("zarr")

SHAPE = (7, 3, 6, 5)  # scan_y not a multiple of the chunk rows: a partial last chunk


def _data(dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(11)
    return rng.integers(0, 4000, size=SHAPE).astype(dtype)


def _store(tmp_path, arr, *, cy=2, compressed=False, fmt=3, chunks=None, name="s.zarr"):
    kw = {} if compressed else {"compressors": None}
    z = zarr.create_array(str(tmp_path / name), shape=arr.shape,
                          chunks=chunks or (cy, *arr.shape[1:]), dtype=arr.dtype,
                          zarr_format=fmt, config={"write_empty_chunks": True}, **kw)
    z[...] = arr
    return zarr.open_array(str(tmp_path / name), mode="r")


def _results(src, chunk_bytes=None):
    rng = np.random.default_rng(5)
    tmpl = rng.random((2, *SHAPE[:2]))
    masks = rng.normal(size=(3, *SHAPE[2:]))
    mask, img = core.template_mask_image(src, tmpl, chunk_bytes=chunk_bytes)
    return {"mask": mask, "img": img,
            "vi": core.virtual_images(src, masks, chunk_bytes=chunk_bytes),
            "com": np.asarray(core.center_of_mass(src, chunk_bytes=chunk_bytes)),
            "std": core.column_stats(src, chunk_bytes=chunk_bytes).std}


def _assert_same(got, want, what):
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-11, atol=1e-11,
                                   err_msg=f"{what}: {k}")


def _rows_seen(src, chunk_bytes=None):
    info = _stream.check_data(src)
    seen = []
    for r0, x in _stream.iter_row_chunks(src, info, chunk_bytes):
        assert x.flags.c_contiguous and x.dtype.isnative and x.shape[1] == info.n
        seen.append((r0, x.shape[0], x.copy()))
    return seen


@pytest.mark.parametrize("chunk_bytes", [None, 1, 3 * 30 * 2 * 3 + 1])
@pytest.mark.parametrize("kind", ["raw-mapped", "raw-read", "zstd", "raw-v2", "zstd-v2"])
def test_zarr_paths_agree_with_numpy(tmp_path, monkeypatch, kind, chunk_bytes):
    arr = _data()
    want = _results(arr)
    if kind == "raw-mapped":
        monkeypatch.setattr(_stream, "MAP_CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(_stream, "MAP_CHUNK_BYTES", 2**40)
    z = _store(tmp_path, arr, compressed=kind.startswith("zstd"),
               fmt=2 if kind.endswith("v2") else 3)
    info = _stream.check_data(z)
    per = _stream.rows_per_chunk(info, chunk_bytes)
    if chunk_bytes is None or kind == "raw-mapped":
        assert _stream._zarr_plan(z, info, per) is not None
    # every row exactly once, in order, with the stored values
    seen = _rows_seen(z, chunk_bytes)
    flat = arr.reshape(info.m, info.n)
    assert [r0 for r0, _, _ in seen] == sorted(r0 for r0, _, _ in seen)
    assert sum(r for _, r, _ in seen) == info.m
    for r0, r, x in seen:
        np.testing.assert_array_equal(x, flat[r0:r0 + r])
    _assert_same(_results(z, chunk_bytes), want, kind)


def test_raw_layout_detection(tmp_path):
    arr = _data()
    assert _stream._raw_layout(_store(tmp_path, arr, name="a.zarr"))
    assert _stream._raw_layout(_store(tmp_path, arr, fmt=2, name="b.zarr"))
    assert not _stream._raw_layout(_store(tmp_path, arr, compressed=True, name="c.zarr"))
    assert not _stream._raw_layout(_store(tmp_path, arr, compressed=True, fmt=2,
                                          name="d.zarr"))


@pytest.mark.parametrize("chunks", [(2, 1, 6, 5), (2, 3, 3, 5)])
def test_zarr_chunked_within_rows_uses_the_generic_path(tmp_path, chunks):
    arr = _data()
    z = _store(tmp_path, arr, chunks=chunks)
    info = _stream.check_data(z)
    assert _stream._zarr_plan(z, info, _stream.rows_per_chunk(info, None)) is None
    _assert_same(_results(z), _results(arr), str(chunks))


@pytest.mark.parametrize("kind", ["raw-mapped", "raw-read", "zstd"])
def test_missing_zarr_chunk_is_an_error_not_zeros(tmp_path, monkeypatch, kind):
    arr = _data() + 1  # no chunk is all fill value
    monkeypatch.setattr(_stream, "MAP_CHUNK_BYTES", 1 if kind == "raw-mapped" else 2**40)
    z = _store(tmp_path, arr, compressed=kind == "zstd")
    chunk = tmp_path / "s.zarr" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(ValueError, match=r"zarr chunk \[1, 0, 0, 0\] .* missing") as info:
        core.virtual_images(z, np.ones(SHAPE[2:]))
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ValueError, match="missing"):
        core.template_mask_image(z, np.ones(SHAPE[:2]) + np.arange(SHAPE[1]))


@pytest.mark.parametrize("mapped", [True, False])
def test_truncated_raw_zarr_chunk_is_an_error(tmp_path, monkeypatch, mapped):
    arr = _data()
    monkeypatch.setattr(_stream, "MAP_CHUNK_BYTES", 1 if mapped else 2**40)
    z = _store(tmp_path, arr)
    chunk = tmp_path / "s.zarr" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"holds \d+ bytes, expected \d+ \(truncated") as info:
        core.center_of_mass(z)
    assert len(str(info.value).splitlines()) == 1


def test_prefetch_reads_ahead_in_another_thread_and_stops_on_early_exit():
    info = _stream.DataInfo(scan_shape=(4, 1), det_shape=(1, 2), dtype=np.dtype(np.float64))
    blocks = [(0, 1), (1, 2), (2, 3), (3, 4)]
    calls = []

    def read(r0, r1, out):
        calls.append((r0, threading.current_thread().name))
        out[: r1 - r0] = r0
        return out[: r1 - r0]

    it = _stream._iter_prefetched(blocks, read, 1, info)
    r0, x = next(it)
    assert r0 == 0 and np.all(x == 0)
    assert all(name.startswith("tmask-prefetch") for _, name in calls)
    it.close()  # early exit: the pending read finishes, nothing is left running
    assert [c for c, _ in calls] in ([0, 1], [0])
    assert not any(t.name.startswith("tmask-prefetch") and t.is_alive()
                   for t in threading.enumerate() if t is not threading.current_thread())


def test_prefetch_error_raised_when_its_block_is_due():
    info = _stream.DataInfo(scan_shape=(3, 1), det_shape=(1, 1), dtype=np.dtype(np.float64))

    def read(r0, r1, out):
        if r0 == 2:
            raise ValueError("chunk 2 is broken")
        out[: r1 - r0] = r0
        return out[: r1 - r0]

    got = []
    with pytest.raises(ValueError, match="chunk 2 is broken"):
        for r0, _ in _stream._iter_prefetched([(0, 1), (1, 2), (2, 3)], read, 1, info):
            got.append(r0)
    assert got == [0, 1]


def test_dask_input_is_prefetched_and_agrees(tmp_path):
    da = pytest.importorskip("dask.array")
    arr = _data()
    x = da.from_array(arr, chunks=(2, -1, -1, -1))
    assert _stream._prefetch_ok(x) and not _stream._prefetch_ok(arr)
    _assert_same(_results(x, chunk_bytes=200), _results(arr), "dask")
