"""Atomic output files for the commands: write a temporary sibling, rename it over the target.

Whatever goes wrong while writing (disk full, Ctrl-C, a bug) the temporary file is removed and
the target is left as it was. HDF5 (h5netcdf) reports a full disk as a RuntimeError from inside
its C library and can crash on it, so NetCDF files are serialised in memory first and written
with plain Python I/O, which raises ``OSError(ENOSPC)`` cleanly.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["temporary_sibling", "write_atomic", "write_bytes_atomic", "write_netcdf_atomic"]


def temporary_sibling(path: Path) -> Path:
    """Hidden temporary name next to ``path`` that keeps its suffix (``.a.nc.tmp-123.nc``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp)`` then rename ``tmp`` to ``path``; on any error remove ``tmp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        writer(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename)."""
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return write_atomic(path, writer)


def write_netcdf_atomic(ds, path: str | os.PathLike) -> Path:
    """Write an xarray Dataset as NetCDF4 (h5netcdf) to ``path`` atomically.

    Raises
    ------
    OSError
        ``errno.ENOSPC`` with the target's name when the disk is full.
    """
    data = ds.to_netcdf(engine="h5netcdf")  # in memory: HDF5 never touches the full disk
    try:
        return write_bytes_atomic(path, data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC and not exc.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
