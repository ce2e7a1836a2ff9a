"""Input validation and row-chunk streaming over 4D-STEM data.

Every routine in :mod:`tmask_validate.core` sees the data as the matrix ``D`` of Eq. 1 in the
paper: ``m = scan_y * scan_x`` rows (diffraction patterns) by ``n = ky * kx`` columns
(pixel-STEM images).  The data are never loaded whole; :func:`iter_row_chunks` yields
contiguous blocks of rows whose size follows from a byte budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
        for y0 in range(0, sy, ny):
            y1 = min(sy, y0 + ny)
            block = np.asarray(data[y0:y1])
            yield y0 * sx, kernel_dtype_chunk(block.reshape((y1 - y0) * sx, info.n))
        return
    for y in range(sy):
        for x0 in range(0, sx, per):
            x1 = min(sx, x0 + per)
            block = np.asarray(data[y, x0:x1])
            yield y * sx + x0, kernel_dtype_chunk(block.reshape(x1 - x0, info.n))


def check_finite_result(*arrays: np.ndarray) -> None:
    """Raise if any accumulator of a pass is non-finite: the data held NaN or Inf."""
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise ValueError(
                "data contain NaN or Inf values (detected during the streaming pass); "
                "clean or mask them before computing masks/images"
            )
