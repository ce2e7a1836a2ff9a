"""Input validation and row-chunk streaming over 4D-STEM data.

Every routine in :mod:`tmask_validate.core` sees the data as the matrix ``D`` of Eq. 1 in the
paper: ``m = scan_y * scan_x`` rows (diffraction patterns) by ``n = ky * kx`` columns
(pixel-STEM images).  The data are never loaded whole; :func:`iter_row_chunks` yields
contiguous blocks of rows whose size follows from a byte budget.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._kernels import gather_rows, use_numba

#: Default number of bytes of raw data handed to a kernel at once.  Extra memory of a pass is
#: at most a few such chunks (a copy for non-numpy inputs, a conversion for unusual dtypes)
#: plus the float64 accumulators, well under 256 MiB.
DEFAULT_CHUNK_BYTES = 32 * 2**20

#: Rows handed to a kernel at once when the input is a zero-copy view (C-contiguous numpy or
#: memmap of a native dtype) and no ``chunk_bytes`` is given: no memory is allocated for such
#: a chunk, and each parallel kernel launch costs a thread barrier that on a busy machine can
#: take a scheduler time slice (measured: 32 MiB chunks made a CoM pass 4x slower than one
#: call).  Capped so that a memmapped file is still streamed through the page cache once.
VIEW_CHUNK_BYTES = 512 * 2**20

#: dtypes the compiled kernels read directly (no conversion copy); other real dtypes
#: (int*, uint64, float16, bool) are converted per chunk to float64 (exact for 32-bit
#: integers).
NATIVE_DTYPES = (np.uint8, np.uint16, np.uint32, np.float32, np.float64)


@dataclass(frozen=True)
class DataInfo:
    """Shape information of a 4D dataset."""

    scan_shape: tuple[int, int]
    det_shape: tuple[int, int]
    dtype: np.dtype

    @property
    def m(self) -> int:
        """Number of probe positions (rows of D)."""
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n(self) -> int:
        """Number of detector pixels (columns of D)."""
        return self.det_shape[0] * self.det_shape[1]


def check_data(data: Any) -> DataInfo:
    """Validate a 4D dataset ``[scan_y, scan_x, ky, kx]`` and return its shape information.

    Raises
    ------
    TypeError
        If ``data`` has no ``shape``/``dtype`` or a non-real dtype.
    ValueError
        If ``data`` is not 4D or has an empty axis.
    """
    if isinstance(data, list | tuple):
        data = np.asarray(data)
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise TypeError(
            "data must be an array-like with shape and dtype (numpy, np.memmap, zarr, dask), "
            f"got {type(data).__name__}"
        )
    shape = tuple(int(s) for s in data.shape)
    if len(shape) != 4:
        raise ValueError(
            f"data must be 4D [scan_y, scan_x, ky, kx], got shape {shape} ({len(shape)}D)"
        )
    if min(shape) < 1:
        raise ValueError(f"data has an empty axis: shape {shape}")
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uifb":
        raise TypeError(f"data dtype must be an integer or float type, got {dtype}")
    return DataInfo(scan_shape=shape[:2], det_shape=shape[2:], dtype=dtype)


def _as_2d_view(data: Any, info: DataInfo) -> np.ndarray | None:
    """The (m, n) view of an in-memory/memmapped C-contiguous numpy array, else None."""
    if (isinstance(data, np.ndarray) and data.flags.c_contiguous and data.dtype.isnative):
        return data.reshape(info.m, info.n)
    return None


#: bytes of one staging block for strided or byte-swapped numpy views (e.g. the frame
#: payloads of a memory-mapped MIB file, which sit between frame headers and are stored
#: big-endian): the block is gathered into a reused native buffer that stays in cache for
#: the kernel that reads it next
STAGE_BYTES = 16 * 2**20


def _frames_view(data: Any, info: DataInfo) -> np.ndarray | None:
    """``data`` as an ``(m, ky, kx)`` numpy view (no copy) if it is a strided ndarray."""
    if not isinstance(data, np.ndarray) or data.dtype.type not in NATIVE_DTYPES:
        return None
    if data.strides[2] != data.shape[3] * data.itemsize or data.strides[3] != data.itemsize:
        return None  # frames themselves not contiguous: generic path
    sy, sx = info.scan_shape
    if sy > 1 and data.strides[0] != sx * data.strides[1]:
        return None  # scan rows not evenly spaced
    return np.lib.stride_tricks.as_strided(
        data, shape=(info.m, *info.det_shape),
        strides=(data.strides[1], data.strides[2], data.strides[3]), writeable=False)


def _iter_staged(frames: np.ndarray, info: DataInfo, chunk_bytes: int | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks of a strided/byte-swapped frame view, gathered into one reused native buffer.

    Each yielded block is valid until the next one is requested (every pass in this package
    consumes a block before asking for the next).
    """
    native = frames.dtype.newbyteorder("=")
    per = rows_per_chunk(info, STAGE_BYTES if chunk_bytes is None else chunk_bytes)
    buf = np.empty((min(per, info.m), info.n), dtype=native)
    src = _byte_source(frames)
    for r0 in range(0, info.m, per):
        r1 = min(info.m, r0 + per)
        out = buf[: r1 - r0]
        if src is not None and (frames.dtype.isnative or frames.dtype.kind == "u"):
            flat, off, stride = src
            gather_rows(flat, off + r0 * stride, stride, frames.dtype, out)
        else:
            np.copyto(out.reshape(r1 - r0, *info.det_shape), frames[r0:r1], casting="equiv")
        yield r0, out


def _byte_source(frames: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """``(flat uint8 buffer, byte offset of frame 0, frame stride)`` behind a frame view."""
    root = frames
    while getattr(root, "base", None) is not None and not (
            isinstance(root, np.ndarray) and root.flags.c_contiguous):
        root = root.base  # (as_strided puts a plain holder object in the chain)
    if not isinstance(root, np.ndarray) or frames.strides[0] <= 0:
        return None
    flat = root.reshape(-1).view(np.uint8)
    off = frames.ctypes.data - flat.ctypes.data
    end = off + (frames.shape[0] - 1) * frames.strides[0] + frames[0].nbytes
    if off < 0 or end > flat.size:
        return None
    return flat, off, frames.strides[0]


def rows_per_chunk(info: DataInfo, chunk_bytes: int | None, itemsize: int | None = None) -> int:
    """Number of D rows per chunk for a byte budget (at least one row)."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    item = info.dtype.itemsize if itemsize is None else itemsize
    return max(1, budget // max(1, info.n * item))


def kernel_dtype_chunk(chunk: np.ndarray) -> np.ndarray:
    """Return ``chunk`` as a C-contiguous 2D array of a dtype the kernels read natively."""
    if chunk.dtype.type not in NATIVE_DTYPES or not chunk.dtype.isnative:
        if chunk.dtype.type in NATIVE_DTYPES:  # e.g. big-endian '>u2' (MIB): same values
            return np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("="))
        chunk = chunk.astype(np.float64)
    return np.ascontiguousarray(chunk)


def iter_row_chunks(
    data: Any, info: DataInfo, chunk_bytes: int | None = None, *, big_views: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)`` with ``block`` a C-contiguous ``(rows, n)`` array.

    Rows are rows of ``D`` (probe positions in C order).  C-contiguous numpy arrays and
    memmaps are sliced without copying (blocks of :data:`VIEW_CHUNK_BYTES` unless
    ``chunk_bytes`` is given or ``big_views`` is False, e.g. when the caller copies each block);
    other inputs (zarr, dask, strided numpy, converted dtypes) are read one block of at most
    ``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`) raw bytes at a time (one row minimum).
    """
    if isinstance(data, list | tuple):
        data = np.asarray(data)
    per = rows_per_chunk(info, chunk_bytes)
    view = _as_2d_view(data, info)
    m = info.m
    if view is not None:
        # (the numpy fallback kernels make float64 copies of a block: small blocks then)
        if (chunk_bytes is None and big_views and use_numba()
                and info.dtype.type in NATIVE_DTYPES):
            per = rows_per_chunk(info, VIEW_CHUNK_BYTES)
        for r0 in range(0, m, per):
            yield r0, kernel_dtype_chunk(view[r0 : min(m, r0 + per)])
        return
    frames = _frames_view(data, info)
    if frames is not None and use_numba():
        yield from _iter_staged(frames, info, chunk_bytes)
        return
    zplan = _zarr_plan(data, info, per, whole=chunk_bytes is None and use_numba())
    if zplan is not None:
        yield from _iter_prefetched(zplan.blocks, zplan.read, zplan.rows_max, info)
        return
    sy, sx = info.scan_shape
    if per >= sx:
        # whole scan rows per block; align with the storage chunking along scan_y if known
        ny = per // sx
        store_chunks = getattr(data, "chunks", None)
        cy = None
        if isinstance(store_chunks, tuple) and store_chunks:
            first = store_chunks[0]
            cy = int(first[0]) if isinstance(first, tuple) else int(first)
        if cy and cy <= ny:
            ny = (ny // cy) * cy
        blocks = [(y0 * sx, min(sy, y0 + ny) * sx) for y0 in range(0, sy, ny)]
    else:
        blocks = [(y * sx + x0, y * sx + min(sx, x0 + per))
                  for y in range(sy) for x0 in range(0, sx, per)]

    def read(r0: int, r1: int, out: np.ndarray | None) -> np.ndarray:
        y0, x0 = divmod(r0, sx)
        if per >= sx:
            block = np.asarray(data[y0 : r1 // sx])
        else:
            block = np.asarray(data[y0, x0 : x0 + r1 - r0])
        return kernel_dtype_chunk(block.reshape(r1 - r0, info.n))

    if _prefetch_ok(data):
        yield from _iter_prefetched(blocks, read, 0, info)
    else:
        for r0, r1 in blocks:
            yield r0, read(r0, r1, None)


# ----------------------------------------------------------------------------- prefetching
def _prefetch_ok(data: Any) -> bool:
    """Read the next block in a background thread for zarr and dask inputs.

    The kernels release the GIL (``nogil``), so the read of block ``i + 1`` (file I/O, zarr
    decode, a dask computation: all release the GIL for most of their time) overlaps the
    compute on block ``i``.  Other array-likes are read in the calling thread, as they may not
    tolerate being read from another thread.
    """
    mod = type(data).__module__ or ""
    return mod.startswith(("zarr.", "dask."))


def _iter_prefetched(blocks: list[tuple[int, int]],
                     read: Callable[[int, int, np.ndarray | None], np.ndarray],
                     rows_max: int, info: DataInfo) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(r0, read(r0, r1, buffer))`` with the next block read in a background thread.

    ``rows_max > 0``: two reused ``(rows_max, n)`` native buffers alternate (a block handed
    to the caller stays valid until the caller asks for the next one; every pass in this
    package consumes a block before that); ``read`` fills the buffer it is given and returns
    the rows it wrote.  ``rows_max == 0``: ``read`` allocates.  At most two blocks are held.
    An error while reading a block is raised when that block is due.
    """
    if not blocks:
        return
    bufs: list[np.ndarray | None] = [None, None]
    if rows_max > 0:
        dt = info.dtype.newbyteorder("=")
        bufs = [np.empty((rows_max, info.n), dt), np.empty((rows_max, info.n), dt)]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tmask-prefetch")
    try:
        pending = pool.submit(read, *blocks[0], bufs[0])
        for i, (r0, _) in enumerate(blocks):
            block = pending.result()
            if i + 1 < len(blocks):
                pending = pool.submit(read, *blocks[i + 1], bufs[(i + 1) % 2])
            yield r0, block
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- zarr
@dataclass(frozen=True)
class _ZarrPlan:
    """Blocks of whole storage chunks of a zarr array and how to read one into a buffer."""

    blocks: list[tuple[int, int]]
    read: Callable[[int, int, np.ndarray | None], np.ndarray]
    rows_max: int


#: a storage chunk larger than the byte budget is still read whole (decoded once) up to this
#: multiple of the budget; beyond it, blocks of the budget re-read the chunk (zarr semantics)
CHUNK_OVER_BUDGET = 2


def _zarr_plan(data: Any, info: DataInfo, per: int, whole: bool = False) -> _ZarrPlan | None:
    """A read plan for a zarr array chunked over whole scan rows ``(cy, scan_x, ky, kx)``.

    An uncompressed chunk of a local store in native byte order is memory-mapped (chunks of
    at least :data:`MAP_CHUNK_BYTES`; see :func:`_mapped_plan`) or read straight from its
    file into a reused buffer (``readinto``, no zarr decode); other chunks are decoded by
    zarr into a reused buffer (``get_basic_selection(out=)``).  Blocks hold whole storage
    chunks, so each chunk is decoded once per pass.  In a local store every chunk file must
    exist: zarr would read a missing one as the fill value (zeros), here it is an error.
    None for anything else (the generic path reads it).
    """
    mod = type(data).__module__ or ""
    if not mod.startswith("zarr.") or not hasattr(data, "metadata"):
        return None
    chunks = getattr(data, "chunks", None)
    shape = tuple(int(v) for v in data.shape)
    if not (isinstance(chunks, tuple) and len(chunks) == 4 and tuple(chunks[1:]) == shape[1:]):
        return None
    if np.dtype(data.dtype).type not in NATIVE_DTYPES or not np.dtype(data.dtype).isnative:
        return None
    sy, sx = info.scan_shape
    cy = int(chunks[0])
    row_items = sx * info.n
    chunk_nbytes = cy * row_items * info.dtype.itemsize
    root = _local_root(data)
    raw = root is not None and _raw_layout(data)
    if raw and chunk_nbytes >= MAP_CHUNK_BYTES:
        assert root is not None
        return _mapped_plan(data, info, root, cy, per, whole, chunk_nbytes)
    ny = (per // sx // cy) * cy
    if ny == 0:
        if chunk_nbytes > CHUNK_OVER_BUDGET * max(1, per * info.n * info.dtype.itemsize):
            return None
        ny = cy
    ny = min(ny, -(-sy // cy) * cy)
    blocks = [(y0 * sx, min(sy, y0 + ny) * sx) for y0 in range(0, sy, ny)]

    def read(r0: int, r1: int, out: np.ndarray | None) -> np.ndarray:
        assert out is not None
        y0, y1 = r0 // sx, r1 // sx
        dst = out[: r1 - r0]
        for iy in range(y0 // cy, -(-y1 // cy)) if root is not None else ():
            f = _existing_chunk(root, data, iy)
            if raw:
                a0, a1 = max(y0, iy * cy), min(y1, (iy + 1) * cy)
                _read_raw_chunk(f, dst[(a0 - y0) * sx : (a1 - y0) * sx], chunk_nbytes,
                                (a0 - iy * cy) * sx)
        if not raw:
            _zarr_read_into(data, y0, y1, dst.reshape(y1 - y0, *shape[1:]))
        return dst

    return _ZarrPlan(blocks=blocks, read=read, rows_max=ny * sx)


def _mapped_plan(data: Any, info: DataInfo, root: Path, cy: int, per: int, whole: bool,
                 chunk_nbytes: int) -> _ZarrPlan:
    """Blocks that are read-only maps of uncompressed chunk files: no copy at all.

    One block per chunk if ``whole`` (no byte budget asked for, compiled kernels), else
    blocks of ``per`` rows of the chunk's map (views: still no allocation).
    """
    sy, sx = info.scan_shape
    blocks = []
    for y0 in range(0, sy, cy):
        c0, c1 = y0 * sx, min(sy, y0 + cy) * sx
        step = c1 - c0 if whole else max(1, per)
        blocks += [(r, min(c1, r + step)) for r in range(c0, c1, step)]
    held: dict[int, np.ndarray] = {}

    def read(r0: int, r1: int, out: np.ndarray | None) -> np.ndarray:
        iy = r0 // (cy * sx)
        if iy not in held:  # (called from one thread at a time, in block order)
            held.clear()
            held[iy] = _map_raw_chunk(_existing_chunk(root, data, iy), chunk_nbytes, info)
        base = iy * cy * sx
        return held[iy][r0 - base : r1 - base]

    return _ZarrPlan(blocks=blocks, read=read, rows_max=0)


#: uncompressed zarr chunks of at least this many bytes are memory-mapped one per block
#: (smaller ones are read several to a block: each block costs a kernel launch)
MAP_CHUNK_BYTES = 8 * 2**20


def _existing_chunk(root: Path, data: Any, iy: int) -> Path:
    """Path of chunk ``(iy, 0, 0, 0)`` in a local store; an error if the file is missing."""
    f = root / data.metadata.encode_chunk_key((iy, 0, 0, 0))
    if not f.is_file():
        raise ValueError(
            f"{root}: zarr chunk {[iy, 0, 0, 0]} ({f}) is missing from the store; zarr would "
            f"read it as the fill value {data.fill_value!r} and give wrong results "
            f"(incomplete copy or deleted file?)")
    return f


def _map_raw_chunk(path: Path, chunk_nbytes: int, info: DataInfo) -> np.ndarray:
    """An uncompressed chunk file as a read-only ``(rows, n)`` array mapping the file.

    The pages are faulted in by the kernel up front (``MAP_POPULATE``, which also reads a cold
    file from the disk), so this runs in the prefetch thread while the previous block is
    being computed on.
    """
    import mmap

    size = os.path.getsize(path)
    if size != chunk_nbytes:
        raise ValueError(f"{path}: uncompressed zarr chunk holds {size} bytes, expected "
                         f"{chunk_nbytes} (truncated or corrupt chunk file)")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb", buffering=0) as fh:
        mp = mmap.mmap(fh.fileno(), size, flags=flags, prot=mmap.PROT_READ)
    arr = np.frombuffer(mp, dtype=info.dtype.newbyteorder("="))
    return arr.reshape(-1, info.n)


def _local_root(data: Any) -> Path | None:
    """Directory of a zarr array in a local (directory) store, else None."""
    root = getattr(getattr(data, "store", None), "root", None)
    if root is None:
        return None
    p = Path(root) / str(getattr(data, "path", "") or "")
    return p if p.is_dir() else None


def _raw_layout(data: Any) -> bool:
    """True if each chunk file of ``data`` is the chunk's C-order bytes in native order."""
    md = data.metadata
    item = np.dtype(data.dtype).itemsize
    little = sys.byteorder == "little"
    if getattr(md, "zarr_format", None) == 3:
        codecs = tuple(getattr(md, "codecs", ()) or ())
        if len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec":
            return False
        endian = getattr(codecs[0], "endian", None)
        endian = getattr(endian, "value", endian)
        return item == 1 or (endian == "little") == little and endian in ("little", "big")
    if getattr(md, "zarr_format", None) == 2:
        if md.compressor is not None or md.filters or md.order != "C":
            return False
        endian = getattr(md.dtype, "endianness", None)
        return item == 1 or (endian == "little") == little and endian in ("little", "big")
    return False


def _read_raw_chunk(path: Path, dst: np.ndarray, chunk_nbytes: int, first_row: int) -> None:
    """Read rows ``first_row ..`` of an uncompressed chunk file straight into ``dst``."""
    size = os.path.getsize(path)
    if size != chunk_nbytes:
        raise ValueError(f"{path}: uncompressed zarr chunk holds {size} bytes, expected "
                         f"{chunk_nbytes} (truncated or corrupt chunk file)")
    view = memoryview(dst.reshape(-1).view(np.uint8))
    offset = first_row * dst.shape[1] * dst.itemsize
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < view.nbytes:
            got = fh.readinto(view[done:])
            if not got:
                raise ValueError(f"{path}: zarr chunk file ended after {offset + done} of "
                                 f"{chunk_nbytes} bytes while being read")
            done += got


def _zarr_read_into(data: Any, y0: int, y1: int, out: np.ndarray) -> None:
    """``out[...] = data[y0:y1]`` decoded by zarr straight into ``out`` where it can."""
    try:
        from zarr.core.buffer import default_buffer_prototype
        nd = default_buffer_prototype().nd_buffer.from_numpy_array(out)
    except Exception:  # noqa: BLE001 - other zarr versions: a plain read and a copy
        out[...] = np.asarray(data[y0:y1])
        return
    data.get_basic_selection((slice(y0, y1),), out=nd)


def check_finite_result(*arrays: np.ndarray) -> None:
    """Raise if any accumulator of a pass is non-finite: the data held NaN or Inf."""
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise ValueError(
                "data contain NaN or Inf values (detected during the streaming pass); "
                "clean or mask them before computing masks/images"
            )
