"""Reading 4D-STEM data files into one lazy, calibrated :class:`xarray.DataArray`.

One entry point, :func:`load`, for every supported format:

========================  =========================================================================
format                    notes
========================  =========================================================================
Merlin ``.mib`` (+.hdr)   Quantum Detectors Merlin/Medipix3, read lazily through rosettasciio.
HDF5 (``.h5``, ``.hdf5``,  a 4D dataset: ``dataset=`` path, or autodetected (fpd ``fpd_expt/fpd_data
``.emd``, ``.hdf``)       /data``, py4DSTEM/EMD datacubes, or the only 4D dataset in the file).
zarr (directory)          our simulation store (``intensity`` variable, thickness chosen with
                          ``thickness_nm=`` / ``select=``), any xarray zarr with a 4D variable, or a
                          raw abTEM ``to_zarr`` store (``array0``).
``.npy``                  memory-mapped.
raw (``.raw``/``.bin``/   flat binary: ``dtype=``, ``frame_shape=``, ``header_bytes=`` (file
``.dat``)                 header) and ``frame_header_bytes=``/``frame_footer_bytes=`` (per frame).
========================  =========================================================================

Output convention (all formats): dims ``("scan_y", "scan_x", "ky", "kx")``; scan coordinates in Å
(first probe at 0), detector coordinates in mrad with 0 at ``calibration.center_px`` (or, when the
centre is not known, at the geometric detector centre; see attrs ``center_px_source``). Without a
calibration the coordinates are pixel indices and ``attrs["calibrated"]`` is 0; an axis whose
calibration is not given (no ``step_A``: ``attrs["scan_calibrated"]`` 0; no ``mrad_per_px``:
``attrs["detector_calibrated"]`` 0) stays in pixels -- never a default of 1 Å or 1 mrad.

Detector orientation: ``ky`` is the row index of the frame *as stored in the file* (row 0 = the
first row written) and ``kx`` the column index, for every format. rosettasciio flips Merlin
frames upside down (``np.flip(axis=-2)``) for display; :func:`load` undoes that flip so a MIB file
and its fpd/HDF5 conversion give the same array. Data are returned in native byte order with the
stored integer type (values unchanged); ``attrs["stored_dtype"]`` keeps the on-disk dtype (e.g.
``>u2``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from tmask_validate.calibration import Calibration, resolve_calibration, sidecar_path

__all__ = [
    "load",
    "write_mib",
    "mib_memmap",
    "read_mib_header",
    "infer_mib_scan_shape",
    "check_zarr_chunks",
    "DataWarning",
    "DIMS",
    "MIB_FORMATS",
]

DIMS = ("scan_y", "scan_x", "ky", "kx")


class DataWarning(UserWarning):
    """Something about the data looks wrong but reading it as asked is still possible."""


HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".emd", ".nxs"}
RAW_SUFFIXES = {".raw", ".bin", ".dat"}
#: Merlin pixel type code -> (numpy dtype as stored, default counter depth in bits)
MIB_FORMATS = {"U01": (">u1", 1), "U08": (">u1", 6), "U16": (">u2", 12), "U32": (">u4", 24)}
_BITS_TO_CODE = {1: "U08", 6: "U08", 12: "U16", 24: "U32"}
#: HDF5 paths tried, in order, when ``dataset`` is not given
KNOWN_HDF5_PATHS = (
    "fpd_expt/fpd_data/data",
    "4DSTEM_experiment/data/datacubes/datacube_0/data",
    "4DSTEM/datacube/data",
    "datacube/data",
    "data/data",
)
#: target size of one dask chunk (whole scan rows)
CHUNK_BYTES = 64 * 2**20



# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike,
    *,
    scan_shape: tuple[int, int] | None = None,
    calibration: Calibration | dict | str | os.PathLike | None = None,
    dataset: str | None = None,
    thickness_nm: float | None = None,
    select: dict | None = None,
    dtype: str | np.dtype | None = None,
    frame_shape: tuple[int, int] | None = None,
    header_bytes: int = 0,
    frame_header_bytes: int = 0,
    frame_footer_bytes: int = 0,
    fill_missing_chunks: bool = False,
) -> xr.DataArray:
    """Open a 4D-STEM dataset lazily as a calibrated DataArray.

    Parameters
    ----------
    path : path-like
        Data file (``.mib``, HDF5, ``.npy``, raw binary) or zarr directory.
    scan_shape : (int, int), optional
        ``(scan_y, scan_x)``. Required when the file does not say it (e.g. a MIB file recorded
        with a pixel trigger and no regular flyback gaps, a raw file, a frame stack).
    calibration : Calibration, dict, path or None
        Calibration object, mapping (sidecar keys accepted, see
        :func:`tmask_validate.calibration.calibration_from_mapping`) or YAML path. ``None``: use
        ``<file>.calibration.yaml`` if present, else the calibration stored in the file (our
        zarr store), else none (pixel coordinates).
    dataset : str, optional
        HDF5 dataset path (or zarr variable name) holding the 4D data.
    thickness_nm, select : optional
        For stores with extra dimensions (our simulation store has ``thickness``): pick one
        thickness or ``select={dim: value}``: the nearest stored value (within half the
        spacing of the stored values; simulated thicknesses snap to whole periods), recorded
        in ``attrs["selected_<dim>"]``.
    dtype, frame_shape, header_bytes, frame_header_bytes, frame_footer_bytes : optional
        Raw binary layout (``.raw``/``.bin``/``.dat``): element dtype (e.g. ``">u2"``), frame
        shape ``(ky, kx)``, bytes before the first frame, and bytes before/after every frame.
    fill_missing_chunks : bool
        zarr stores only. A chunk file missing from the store is an error (zarr would silently
        read it as the fill value, e.g. zeros); True reads it as the fill value instead and
        records the count in ``attrs["missing_chunks"]``.

    Returns
    -------
    xarray.DataArray
        Dask-backed, dims ``("scan_y", "scan_x", "ky", "kx")``, attrs ``calibration`` (JSON),
        ``calibrated`` (0/1: both axes), ``scan_calibrated``, ``detector_calibrated``,
        ``source``, ``format``, ``stored_dtype``, ``bit_depth``, ``saturation_value``,
        ``scan_shape_source``, ``detector_orientation``, ``center_px_source``, ``scan_units``,
        ``detector_units``.

    Raises
    ------
    ValueError
        Unknown format, missing/incompatible ``scan_shape``, truncated file (the message says how
        many complete frames were readable), ambiguous HDF5 dataset.
    FileNotFoundError
        The path does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if scan_shape is not None:
        scan_shape = _check_scan_shape(scan_shape)
    cal = resolve_calibration(calibration)
    if cal is None:
        side = sidecar_path(p)
        if side is not None:
            cal = resolve_calibration(side)

    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".zarr":
        arr, info = _open_zarr(p, dataset=dataset, thickness_nm=thickness_nm, select=select,
                               fill_missing_chunks=fill_missing_chunks)
    elif suffix == ".mib":
        arr, info = _open_mib(p, scan_shape)
    elif suffix in HDF5_SUFFIXES:
        arr, info = _open_hdf5(p, dataset)
    elif suffix == ".npy":
        arr, info = _open_npy(p)
    elif suffix in RAW_SUFFIXES:
        arr, info = _open_raw(p, dtype=dtype, frame_shape=frame_shape, header_bytes=header_bytes,
                              frame_header_bytes=frame_header_bytes,
                              frame_footer_bytes=frame_footer_bytes)
    else:
        raise ValueError(
            f"{p}: unknown 4D-STEM file format {suffix!r}; supported: .mib, "
            f"{', '.join(sorted(HDF5_SUFFIXES))}, .zarr (directory), .npy, "
            f"{', '.join(sorted(RAW_SUFFIXES))}"
        )

    arr, shape_source = _to_4d(arr, scan_shape, info.pop("scan_shape", None), p)
    if cal is None and info.get("calibration") is not None:
        cal = info["calibration"]
    info.pop("calibration", None)
    return _wrap(arr, cal, p, shape_source, info)


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def _check_scan_shape(scan_shape: Any) -> tuple[int, int]:
    try:
        sy, sx = (int(v) for v in scan_shape)
    except (TypeError, ValueError):
        msg = f"scan_shape must be a (scan_y, scan_x) pair, got {scan_shape!r}"
        raise ValueError(msg) from None
    if sy < 1 or sx < 1 or (sy, sx) != tuple(scan_shape):
        raise ValueError(f"scan_shape must hold two positive integers, got {scan_shape!r}")
    return sy, sx


def _rows_per_chunk(scan_x: int, frame_bytes: int) -> int:
    return max(1, int(CHUNK_BYTES // max(1, scan_x * frame_bytes)))


def _to_4d(
    arr: da.Array, scan_shape: tuple[int, int] | None, file_shape: Any, path: Path
) -> tuple[da.Array, str]:
    """Reshape a (frames, ky, kx) / (sy, sx, ky, kx) / (ky, kx) array to 4D; check the count."""
    if arr.ndim == 4:
        have = arr.shape[:2]
        if scan_shape is not None and tuple(scan_shape) != tuple(have):
            if int(np.prod(scan_shape)) != int(np.prod(have)):
                raise ValueError(
                    f"{path}: scan_shape {tuple(scan_shape)} needs {int(np.prod(scan_shape))} "
                    f"frames but the file holds {have[0]}x{have[1]} = {int(np.prod(have))}"
                )
            return arr.reshape(tuple(scan_shape) + arr.shape[2:]), "argument (reshaped)"
        if scan_shape is not None:
            return arr, "argument"
        return arr, (file_shape[1] if file_shape is not None else "file")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected 2-4 dimensions of data, found shape {arr.shape}")
    n = arr.shape[0]
    if scan_shape is not None:
        source = "argument"
    elif file_shape is not None:
        scan_shape, source = file_shape
    elif n == 1:
        scan_shape, source = (1, 1), "single frame"
    else:
        raise ValueError(
            f"{path}: the file holds {n} frames of {arr.shape[1]}x{arr.shape[2]} but does not say "
            f"the scan shape; pass scan_shape=(scan_y, scan_x) (CLI: --scan-shape Y X)"
        )
    need = int(np.prod(scan_shape))
    if need > n:
        raise ValueError(
            f"{path}: scan_shape {tuple(scan_shape)} needs {need} frames but the file holds only "
            f"{n} complete frames (truncated acquisition?)"
        )
    if need < n:
        raise ValueError(
            f"{path}: scan_shape {tuple(scan_shape)} needs {need} frames but the file holds {n}; "
            f"give the scan shape that uses every frame"
        )
    return arr.reshape(tuple(scan_shape) + arr.shape[1:]), source


def _native(arr: da.Array) -> da.Array:
    """Same values in native byte order (lazy)."""
    if arr.dtype.byteorder in ("=", "|") or arr.dtype.isnative:
        return arr
    return arr.astype(arr.dtype.newbyteorder("="))


def _wrap(
    arr: da.Array, cal: Calibration | None, path: Path, shape_source: str, info: dict
) -> xr.DataArray:
    sy, sx, ny, nx = arr.shape
    stored = info.pop("stored_dtype", arr.dtype.str)
    arr = _native(arr)
    if arr.chunks[1][0] != sx or arr.chunks[2][0] != ny or arr.chunks[3][0] != nx:
        arr = arr.rechunk((_rows_per_chunk(sx, ny * nx * arr.dtype.itemsize), -1, -1, -1))
    if cal is None:
        cal = Calibration(extra={"uncalibrated": True})
    # each axis is calibrated only when the calibration gives it (never a default of 1)
    scan_cal, det_cal = cal.scan_calibrated, cal.detector_calibrated
    calibrated = scan_cal and det_cal
    if cal.center_px is not None:
        cy, cx = cal.center_px
        if not (-0.5 <= cy <= ny - 0.5 and -0.5 <= cx <= nx - 0.5):
            raise ValueError(f"{path}: calibration center_px {list(cal.center_px)} lies outside "
                             f"the {ny}x{nx} detector (ky in [0, {ny - 1}], kx in [0, {nx - 1}])")
        center, center_source = cal.center_px, "calibration"
    else:
        center, center_source = ((ny - 1) / 2.0, (nx - 1) / 2.0), "detector centre (not measured)"
    step = cal.step_A if scan_cal else (1.0, 1.0)
    mrad = cal.mrad_per_px if det_cal else (1.0, 1.0)
    scan_units, det_units = ("A" if scan_cal else "px"), ("mrad" if det_cal else "px")
    coords = {
        "scan_y": ("scan_y", np.arange(sy) * step[0], {"units": scan_units}),
        "scan_x": ("scan_x", np.arange(sx) * step[1], {"units": scan_units}),
        "ky": ("ky", (np.arange(ny) - center[0]) * mrad[0], {"units": det_units}),
        "kx": ("kx", (np.arange(nx) - center[1]) * mrad[1], {"units": det_units}),
    }
    bits = info.pop("bit_depth", None)
    if bits is None and np.issubdtype(arr.dtype, np.integer):
        bits = int(np.iinfo(arr.dtype).bits)
    attrs = {
        "calibration": json.dumps(cal.to_dict()),
        "calibrated": calibrated,
        "scan_calibrated": scan_cal,
        "detector_calibrated": det_cal,
        "source": str(path),
        "format": info.pop("format"),
        "stored_dtype": str(stored),
        "bit_depth": bits,
        "saturation_value": (int(2**bits - 1) if bits is not None else None),
        "scan_shape_source": shape_source,
        "center_px": list(center),
        "center_px_source": center_source,
        "scan_units": scan_units,
        "detector_units": det_units,
        "detector_orientation": info.pop(
            "detector_orientation",
            "ky = frame row as stored in the file (row 0 first), kx = frame column as stored",
        ),
    }
    for key, value in info.items():
        attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    # netCDF-friendly: no None, booleans as 0/1
    attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in attrs.items() if v is not None}
    return xr.DataArray(arr, dims=DIMS, coords=coords, attrs=attrs, name="intensity")


# ----------------------------------------------------------------------------------------------
# Merlin MIB
# ----------------------------------------------------------------------------------------------
def read_mib_header(path: str | os.PathLike) -> dict:
    """Parse the first frame header of a Merlin ``.mib`` file and the file's frame count.

    Returns
    -------
    dict
        ``header_bytes``, ``frame_shape`` (rows, cols), ``code`` (``U08``/``U16``/``U32``),
        ``stored_dtype``, ``bit_depth`` (counter depth from the extended header when present),
        ``frame_bytes``, ``n_complete`` (complete frames in the file), ``remainder_bytes``.

    Raises
    ------
    ValueError
        The file does not start with a Merlin ``MQ1`` header, or uses RAW (``R64``) mode.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        first = fh.read(384)
    fields = first.decode("ascii", errors="replace").split(",")
    if len(fields) < 7 or fields[0] != "MQ1":
        raise ValueError(f"{p}: not a Merlin MIB file (no 'MQ1' frame header at the start)")
    try:
        header_bytes = int(fields[2])
        cols, rows = int(fields[4]), int(fields[5])
    except ValueError:
        raise ValueError(f"{p}: malformed MIB header {first[:60]!r}") from None
    code = fields[6].strip()
    if code not in MIB_FORMATS:
        raise ValueError(f"{p}: MIB pixel type {code!r} not supported (RAW mode?); "
                         f"supported: {sorted(MIB_FORMATS)}")
    stored, bits = MIB_FORMATS[code]
    with open(p, "rb") as fh:
        full = fh.read(header_bytes).decode("ascii", errors="replace").split(",")
    if "MQ1A" in full:  # extended header: ..., MQ1A, timestamp, exposure, counter depth, pad
        i = full.index("MQ1A")
        try:
            bits = int(full[i + 3])
        except (IndexError, ValueError):
            pass
    frame_bytes = header_bytes + rows * cols * np.dtype(stored).itemsize
    return {
        "header_bytes": header_bytes,
        "frame_shape": (rows, cols),
        "code": code,
        "stored_dtype": stored,
        "bit_depth": bits,
        "frame_bytes": frame_bytes,
        "n_complete": size // frame_bytes,
        "remainder_bytes": size % frame_bytes,
    }


def _parse_hdr(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a Merlin .hdr file (binary content, byte {exc.start} is "
                         f"not text); fix or remove it, and give --scan-shape") from None
    if not text.lstrip().startswith("HDR"):
        raise ValueError(f"{path}: not a Merlin .hdr file (it does not start with 'HDR'); "
                         f"fix or remove it, and give --scan-shape")
    out = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def _readahead_budget_bytes() -> int:
    """Half the machine's free memory: files up to this size may be read ahead whole."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _frame_times_s(path: Path, head: dict, n: int) -> np.ndarray | None:
    """Per-frame timestamps (s, relative) from the extended headers, or None if absent."""
    times = []
    # one header per frame means a seek and a small read per frame; on a cold file each waits
    # for the disk (32768 frames of 32 KiB: 3.0 s). Reading the whole file ahead turns that
    # into one streamed read (1.4 s) and leaves the frames in the page cache for the pass.
    _read_ahead(path, n * head["frame_bytes"])
    with open(path, "rb") as fh:
        for i in range(n):
            fh.seek(i * head["frame_bytes"])
            fields = fh.read(head["header_bytes"]).decode("ascii", errors="replace").split(",")
            if "MQ1A" not in fields:
                return None
            stamp = fields[fields.index("MQ1A") + 1].strip().rstrip("Z")
            try:
                times.append(np.datetime64(stamp, "ns"))
            except ValueError:
                return None
    t = np.asarray(times)
    return (t - t[0]).astype("timedelta64[ns]").astype(np.float64) * 1e-9


def infer_mib_scan_shape(times_s: np.ndarray) -> tuple[int, int] | None:
    """Scan shape from frame timestamps: flyback pauses at every line end.

    A frame-to-frame interval counts as a flyback gap when it exceeds the median interval by
    more than ``max(1e-4 * median, 10 * MAD)``. The shape ``(n / p, p)`` is returned only if the
    gaps occur after exactly every ``p``-th frame (``p > 1``) and nowhere else; otherwise None
    (then the caller must ask for ``scan_shape``).
    """
    n = len(times_s)
    if n < 3:
        return None
    dt = np.diff(times_s)
    med = float(np.median(dt))
    mad = float(np.median(np.abs(dt - med)))
    gaps = np.flatnonzero(dt - med > max(1e-4 * abs(med), 10 * mad)) + 1  # index of line start
    if gaps.size == 0:
        return None
    p = int(gaps[0])
    if p < 2 or n % p:
        return None
    if not np.array_equal(gaps, np.arange(p, n, p)):
        return None
    return n // p, p


def _check_frame_size(path: Path, head: dict) -> None:
    """Raise when the second frame header is not where the first header's dimensions put it.

    The frame size comes from the first header (rows x cols x bytes per pixel + header bytes);
    if the next ``MQ1`` header starts elsewhere, the header's dimensions (or pixel type)
    disagree with the data: that is what is reported, not a truncated file.
    """
    with open(path, "rb") as fh:
        chunk = fh.read(4 * head["frame_bytes"] + head["header_bytes"])
    nxt = chunk.find(b"MQ1,", max(head["header_bytes"], 1))
    if nxt < 0 or nxt == head["frame_bytes"]:
        return
    rows, cols = head["frame_shape"]
    data_bytes = nxt - head["header_bytes"]
    itemsize = np.dtype(head["stored_dtype"]).itemsize
    per_px = data_bytes / (rows * cols)
    hint = (f"{data_bytes // itemsize} pixels of {itemsize} byte(s)"
            if data_bytes % itemsize == 0 else f"{data_bytes} bytes")
    raise ValueError(
        f"{path}: the frame header says {rows}x{cols} pixels of type {head['code']} "
        f"({head['frame_bytes']} bytes per frame with its header) but the next frame header "
        f"starts at byte {nxt}: each frame holds {hint} ({per_px:.3g} bytes per header pixel); "
        f"the header's frame dimensions or pixel type disagree with the data"
    )


def _open_mib(path: Path, scan_shape: tuple[int, int] | None) -> tuple[da.Array, dict]:
    from rsciio.quantumdetector import file_reader

    head = read_mib_header(path)
    n = head["n_complete"]
    hdr_path = path.with_suffix(".hdr")
    hdr = _parse_hdr(hdr_path) if hdr_path.is_file() else {}
    n_expected = None
    if "Frames in Acquisition (Number)" in hdr:
        try:
            n_expected = int(hdr["Frames in Acquisition (Number)"])
        except ValueError:
            n_expected = None
    if head["remainder_bytes"] or n == 0:
        _check_frame_size(path, head)
    if head["remainder_bytes"]:
        raise ValueError(
            f"{path}: truncated MIB file: {n} complete frames readable, then "
            f"{head['remainder_bytes']} of {head['frame_bytes']} bytes of a partial frame"
            + (f" (the .hdr announces {n_expected} frames)" if n_expected else "")
        )
    if n_expected and n < n_expected:
        raise ValueError(
            f"{path}: truncated MIB file: the .hdr announces {n_expected} frames but only {n} "
            f"complete frames are readable"
        )
    if n == 0:
        raise ValueError(f"{path}: MIB file holds no complete frame")
    # the last frame must also start with a header (catches garbled / mixed-size files)
    with open(path, "rb") as fh:
        fh.seek((n - 1) * head["frame_bytes"])
        if fh.read(3) != b"MQ1":
            _check_frame_size(path, head)
            raise ValueError(f"{path}: frame {n - 1} has no 'MQ1' header; frames differ in size?")

    file_shape = None
    if n > 1:
        fpt = int(hdr.get("Frames per Trigger (Number)", "1") or 1)
        if fpt > 1 and n % fpt == 0:
            file_shape = ((n // fpt, fpt), "hdr (frames per trigger = line trigger)")
        else:
            times = _frame_times_s(path, head, n)
            shape = infer_mib_scan_shape(times) if times is not None else None
            if shape is not None:
                file_shape = (shape, "frame timestamps (flyback gaps)")
    conflict = None
    if scan_shape is not None:
        if int(np.prod(scan_shape)) != n:
            what = "only " if int(np.prod(scan_shape)) > n else ""
            raise ValueError(
                f"{path}: scan_shape {scan_shape} needs {int(np.prod(scan_shape))} frames but the "
                f"file holds {what}{n} complete frames"
            )
        if file_shape is not None and tuple(file_shape[0]) != tuple(scan_shape):
            conflict = (f"{path}: the given scan shape {tuple(scan_shape)} disagrees with the "
                        f"{tuple(file_shape[0])} of the {file_shape[1]}; using "
                        f"{tuple(scan_shape)} as asked (check it: a wrong scan shape shears "
                        f"every image)")
            warnings.warn(conflict, DataWarning, stacklevel=3)
        file_shape = None
        nav = scan_shape
    elif file_shape is not None:
        nav = file_shape[0]
    else:
        nav = (n, 1)  # frame stack; _to_4d asks for the scan shape
    rows, cols = head["frame_shape"]
    itemsize = np.dtype(head["stored_dtype"]).itemsize
    rpc = min(nav[0], _rows_per_chunk(nav[1], rows * cols * itemsize))
    rs_log = logging.getLogger("rsciio")
    level = rs_log.level
    rs_log.setLevel(logging.ERROR)  # its "hdr not found" warning: we report the scan shape source
    try:
        d = file_reader(str(path), lazy=True, navigation_shape=(nav[1], nav[0]),
                        chunks=(rpc, nav[1], rows, cols))[0]
    finally:
        rs_log.setLevel(level)
    arr = d["data"]
    if not isinstance(arr, da.Array):
        arr = da.from_array(arr)
    arr = arr.reshape(tuple(nav) + (rows, cols))
    arr = arr[..., ::-1, :]  # undo rosettasciio's display flip -> rows as stored
    if nav == (n, 1) and scan_shape is None and file_shape is None:
        arr = arr.reshape((n, rows, cols))
    info = {
        "format": "merlin-mib",
        "stored_dtype": head["stored_dtype"],
        "bit_depth": head["bit_depth"],
        "scan_shape": file_shape,
        "mib_header_bytes": head["header_bytes"],
        "detector_orientation": (
            "ky = frame row as stored in the MIB file (row 0 first; rosettasciio's display flip "
            "undone), kx = frame column as stored"
        ),
    }
    if hdr:
        info["mib_hdr"] = {k: hdr[k] for k in list(hdr)[:40]}
    if conflict:
        info["scan_shape_warning"] = conflict
    return arr, info


def mib_memmap(path: str | os.PathLike, scan_shape: tuple[int, int] | None = None
               ) -> np.ndarray:
    """The frame payloads of a Merlin ``.mib`` file as a read-only memory-mapped array.

    A ``(scan_y, scan_x, ky, kx)`` numpy view of the file itself, strided over the frame
    headers, in the stored dtype and byte order (``>u1``/``>u2``/``>u4`` for 1/6-, 12-, 24-bit
    counts), rows as stored (``ky`` = row 0 first, as :func:`load`).  Nothing is read up
    front and no dask graph is built: the :mod:`tmask_validate.core` functions stream it in
    cache-sized blocks straight from the page cache.  Checks as :func:`load`: the file must
    hold only complete frames (and as many as its ``.hdr`` announces); the scan shape comes
    from ``scan_shape``, else the ``.hdr`` (frames per trigger), else the flyback gaps of the
    frame timestamps.
    """
    p = Path(path)
    head = read_mib_header(p)
    n = head["n_complete"]
    hdr_path = p.with_suffix(".hdr")
    hdr = _parse_hdr(hdr_path) if hdr_path.is_file() else {}
    if head["remainder_bytes"]:
        raise ValueError(
            f"{p}: truncated MIB file: {n} complete frames readable, then "
            f"{head['remainder_bytes']} of {head['frame_bytes']} bytes of a partial frame")
    announced = hdr.get("Frames in Acquisition (Number)", "")
    if announced.isdigit() and n < int(announced):
        raise ValueError(f"{p}: truncated MIB file: the .hdr announces {announced} frames but "
                         f"only {n} complete frames are readable")
    if scan_shape is None:
        fpt = hdr.get("Frames per Trigger (Number)", "1")
        fpt = int(fpt) if fpt.isdigit() else 1
        if fpt > 1 and n % fpt == 0:
            scan_shape = (n // fpt, fpt)
        else:
            times = _frame_times_s(p, head, n)
            scan_shape = infer_mib_scan_shape(times) if times is not None else None
        if scan_shape is None:
            raise ValueError(f"{p}: the file holds {n} frames but does not say the scan "
                             f"shape; pass scan_shape=(scan_y, scan_x)")
    sy, sx = _check_scan_shape(scan_shape)
    if sy * sx != n:
        raise ValueError(f"{p}: scan_shape {(sy, sx)} needs {sy * sx} frames but the file "
                         f"holds {n} complete frames")
    rows, cols = head["frame_shape"]
    dt = np.dtype(head["stored_dtype"])
    fb = head["frame_bytes"]
    mm = np.memmap(p, dtype=np.uint8, mode="r")
    return np.ndarray((sy, sx, rows, cols), dtype=dt, buffer=mm, offset=head["header_bytes"],
                      strides=(sx * fb, fb, cols * dt.itemsize, dt.itemsize))


def _read_ahead(path: Path, nbytes: int) -> bool:
    """Ask the kernel to read a file that fits in half the free memory ahead, asynchronously.

    The call returns at once (measured: 1 ms for 1 GiB); a plain cold read of 1 GiB took
    0.54 s after it against 0.78-0.83 s without.  Used before the frame-header scan.  Not
    used before a pass over the memmap: there the kernel's own read-ahead on page faults was
    as fast (``benchmarks/bench_mib_cold.py``: 16 detectors on an evicted 1 GiB file, median
    0.74 s with it, 0.71 s without).  Returns whether it was issued.
    """
    if not hasattr(os, "posix_fadvise") or nbytes > _readahead_budget_bytes():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    return True


def _mib_header(
    seq: int, rows: int, cols: int, code: str, bits: int, header_bytes: int, nchips: int,
    stamp: _dt.datetime, exposure_s: float,
) -> bytes:
    layout = "   1x1" if nchips == 1 else "   2x2"
    dacs = "3RX," + ",".join(["000"] * 27)
    fields = [
        "MQ1", f"{seq:06d}", f"{header_bytes:05d}", f"{nchips:02d}", f"{cols:04d}", f"{rows:04d}",
        code, layout, "01" if nchips == 1 else "0F",
        stamp.strftime("%Y-%m-%d %H:%M:%S.%f"), f"{exposure_s:.6f}", "0", "0", "0",
        *(["0.000000E+0"] * 8), *([dacs] * nchips),
        "MQ1A", stamp.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z",
        f"{round(exposure_s * 1e9)}ns", str(bits), "",
    ]
    text = ",".join(fields).encode("ascii")
    if len(text) > header_bytes:
        raise ValueError(f"MIB header needs {len(text)} bytes, more than {header_bytes}")
    return text + b"\x00" * (header_bytes - len(text))


def _raw_swap(row_bytes: np.ndarray, group: int) -> np.ndarray:
    """Reverse the order of ``group``-element blocks along the last axis (RAW 64-bit words)."""
    shape = row_bytes.shape
    return row_bytes.reshape(shape[:-1] + (shape[-1] // group, group))[..., ::-1].reshape(shape)


def _quad_to_raw(img: np.ndarray) -> np.ndarray:
    """(512, 512) quad image -> (256, 1024) RAW rows: chips [4 | 3 | 2 | 1], bottom chips flipped.

    Chip 1 = top left, 2 = top right, 3 = bottom left, 4 = bottom right of the assembled
    image; chips 3 and 4 are read out rotated by 180° (row 511 of the image first).
    """
    h = img.shape[0] // 2
    w = img.shape[1] // 2
    raw = np.empty((h, 4 * w), dtype=img.dtype)
    raw[:, 3 * w:] = img[:h, :w]
    raw[:, 2 * w:3 * w] = img[:h, w:]
    raw[:, w:2 * w] = img[h:, :w][::-1, ::-1]
    raw[:, :w] = img[h:, w:][::-1, ::-1]
    return raw


def _encode_raw_frame(img: np.ndarray, bits: int, quad: bool) -> bytes:
    """Pixel bytes of one frame in Merlin RAW (``R64``) mode.

    Pixels are counter words packed into 64-bit words whose element order is reversed:
    1-bit packs 64 pixels per word (bit ``b`` of byte ``j`` counted from the word's END is pixel
    ``8 j + b``), 6-bit holds 8 one-byte pixels, 12-bit 4 big-endian two-byte pixels; 24-bit
    is two 12-bit frames, the high 12 bits first. Quads are read out chip row by chip row
    (:func:`_quad_to_raw`).
    """
    a = _quad_to_raw(img) if quad else img
    if bits == 1:
        packed = np.packbits(a.astype(np.uint8).reshape(a.shape[0], -1, 64), axis=-1,
                             bitorder="little").reshape(a.shape[0], -1)
        return _raw_swap(packed, 8).tobytes()
    if bits == 6:
        return _raw_swap(a.astype(np.uint8), 8).tobytes()
    if bits == 12:
        return _raw_swap(a.astype(">u2"), 4).tobytes()
    hi = _raw_swap((a >> 12).astype(">u2"), 4)
    lo = _raw_swap((a & 0xFFF).astype(">u2"), 4)
    return hi.tobytes() + lo.tobytes()


def write_mib(
    path: str | os.PathLike,
    data4d: np.ndarray,
    *,
    bit_depth: int = 12,
    raw: bool = False,
    header: bool = True,
    frames_per_trigger: int | None = 1,
    exposure_s: float = 1e-3,
    flyback_s: float = 5e-4,
    header_bytes: int | None = None,
    start: _dt.datetime | None = None,
) -> Path:
    """Write data as a Quantum Detectors Merlin ``.mib`` file (for tests and examples).

    Layout (Merlin manual): every frame is an ASCII header padded with NULs to ``header_bytes``
    (384 for a single chip, 768 for a quad; field 3 states it) — ``MQ1,<seq>,<offset>,<nchips>,
    <width>,<height>,<U08|U16|U32>,<layout>,<chip select>,<time>,<shutter s>,<counter>,<colour>,
    <gain>,<8 thresholds>,<DACs per chip>,MQ1A,<ISO time ns>,<shutter ns>ns,<counter depth>,`` —
    followed by the pixel values, big-endian, row by row. Frame rows are written in ``ky`` order,
    so :func:`load` gives ``data4d`` back exactly.

    Parameters
    ----------
    path : path-like
        Output ``.mib`` path; the ``.hdr`` goes next to it.
    data4d : ndarray
        ``(scan_y, scan_x, ky, kx)``, ``(frames, ky, kx)`` or ``(ky, kx)`` non-negative integers.
    bit_depth : {1, 6, 12, 24}
        Counter depth; 1/6-bit are stored as U08, 12-bit as U16, 24-bit as U32. Values must fit.
    raw : bool
        Write Merlin RAW mode (pixel type ``R64``, counters as read out of the chips; see
        :func:`_encode_raw_frame`) instead of "binary" ``U08/U16/U32``. RAW needs a frame width
        that is a multiple of 64 pixels (1-bit) or 8; quads (512 x 512) support 1/6/12-bit.
        :func:`load` does not read RAW files (LiberTEM's MIB reader and
        :mod:`tmask_validate.live` do).
    header : bool
        Also write the acquisition ``.hdr`` file.
    frames_per_trigger : int or None
        Written to the .hdr: 1 = pixel trigger (the scan shape then comes from the flyback gaps
        in the timestamps), ``None`` = line trigger (``scan_x`` frames per trigger, the .hdr
        then states the scan width).
    exposure_s, flyback_s : float
        Frame time and the extra pause at the start of every scan line (timestamps).
    header_bytes : int, optional
        Frame header size (default 384 for one chip, 768 for a quad = width or height > 256).
    start : datetime, optional
        Acquisition start time (default: a fixed date, so files are reproducible).

    Returns
    -------
    pathlib.Path
        The ``.mib`` path.
    """
    if bit_depth not in _BITS_TO_CODE:
        raise ValueError(f"bit_depth must be one of {sorted(_BITS_TO_CODE)}, got {bit_depth!r}")
    arr = np.asarray(data4d)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"data4d must have 2-4 dimensions, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("MIB data must be integer counts")
    vmax = 2**bit_depth - 1
    if arr.size and (arr.min() < 0 or arr.max() > vmax):
        raise ValueError(f"values must lie in [0, {vmax}] for {bit_depth}-bit data, "
                         f"found [{arr.min()}, {arr.max()}]")
    sy, sx, rows, cols = arr.shape
    code = _BITS_TO_CODE[bit_depth]
    stored = np.dtype(MIB_FORMATS[code][0])
    nchips = 1 if max(rows, cols) <= 256 else 4
    hb = header_bytes or (384 if nchips == 1 else 768)
    head_rows, head_cols = rows, cols
    if raw:
        code = "R64"
        quad = nchips == 4
        if quad and ((rows, cols) != (512, 512) or bit_depth == 24):
            raise ValueError("RAW quads are written as 512 x 512 frames of 1, 6 or 12 bits, "
                             f"got {rows} x {cols} at {bit_depth} bits")
        if cols % (64 if bit_depth == 1 else 8):
            raise ValueError(f"RAW {bit_depth}-bit frames need a width that is a multiple of "
                             f"{64 if bit_depth == 1 else 8} pixels, got {cols}")
        if quad:  # the header describes the chip rows as read out: 4 chips side by side
            head_rows, head_cols = rows // 2, cols * 2
        elif bit_depth == 24:  # two 12-bit frames per frame, stated as double width
            head_cols = 2 * cols
    t0 = start or _dt.datetime(2024, 1, 1, 12, 0, 0)
    p = Path(path)
    with open(p, "wb") as fh:
        t = 0.0
        for i in range(sy * sx):
            if i and i % sx == 0:
                t += flyback_s
            stamp = t0 + _dt.timedelta(seconds=t)
            fh.write(_mib_header(i + 1, head_rows, head_cols, code, bit_depth, hb, nchips,
                                 stamp, exposure_s))
            if raw:
                fh.write(_encode_raw_frame(np.asarray(arr[i // sx, i % sx], dtype=np.int64),
                                           bit_depth, nchips == 4))
            else:
                fh.write(np.ascontiguousarray(arr[i // sx, i % sx], dtype=stored).tobytes())
            t += exposure_s
    if header:
        fpt = sx if frames_per_trigger is None else int(frames_per_trigger)
        lines = [
            "HDR,",
            f"Time and Date Stamp (day, mnth, yr, hr, min, s):\t{t0:%d/%m/%Y %H:%M:%S}",
            "Chip ID:\tW000_A0, - , - , - ",
            "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
            f"Assembly Size (NX1, 2X2):\t{'   1x1' if nchips == 1 else '   2x2'}",
            "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
            f"Counter Depth (number):\t{bit_depth}",
            "Acquisition Type (Normal, Th_scan, Config):\tNormal",
            f"Frames in Acquisition (Number):\t{sy * sx}",
            f"Frames per Trigger (Number):\t{fpt}",
            "Readout System:\tMerlin Quad",
            "Software Version:\ttmask_validate.io.write_mib",
            "End\t",
        ]
        p.with_suffix(".hdr").write_bytes("\r\n".join(lines).encode("ascii").ljust(2048, b" "))
    return p


# ----------------------------------------------------------------------------------------------
# HDF5
# ----------------------------------------------------------------------------------------------
def _find_hdf5_dataset(f, path: Path) -> str:
    import h5py

    for name in KNOWN_HDF5_PATHS:
        if name in f and isinstance(f[name], h5py.Dataset) and f[name].ndim >= 3:
            return name
    found: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 4 and obj.dtype.kind in "uif":
            found.append(name)

    f.visititems(visit)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path}: no 4D dataset found; pass dataset='<path in the file>'")
    raise ValueError(f"{path}: several 4D datasets {found}; choose one with dataset=")


def _open_hdf5(path: Path, dataset: str | None) -> tuple[da.Array, dict]:
    import h5py

    f = h5py.File(path, "r")  # stays open while the lazy array lives
    try:
        name = dataset or _find_hdf5_dataset(f, path)
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise ValueError(f"{path}: no dataset {name!r} in the file")
        dset = f[name]
        if dset.ndim not in (2, 3, 4):
            raise ValueError(f"{path}:{name} has shape {dset.shape}; expected 2-4 dimensions")
    except Exception:
        f.close()
        raise
    if dset.ndim == 4:
        sx, ny, nx = dset.shape[1:]
        rows = min(dset.shape[0], _rows_per_chunk(sx, ny * nx * dset.dtype.itemsize))
        if dset.chunks is not None:  # align to the file's chunking along scan_y
            rows = max(dset.chunks[0], rows // dset.chunks[0] * dset.chunks[0])
        arr = da.from_array(dset, chunks=(rows, -1, -1, -1), lock=True)
    else:
        arr = da.from_array(dset, chunks=(1,) * (dset.ndim - 2) + (-1, -1), lock=True)
    info: dict[str, Any] = {"format": "hdf5", "dataset": name, "stored_dtype": dset.dtype.str}
    bits = _hdf5_counter_depth(f, name)
    if bits:
        info["bit_depth"] = bits
    dim_names = [dset.parent[f"dim{i + 1}"].attrs.get("name") for i in range(dset.ndim)
                 if f"dim{i + 1}" in dset.parent]
    if dim_names:
        info["hdf5_dims"] = [str(d) for d in dim_names]
    return arr, info


def _hdf5_counter_depth(f, name: str) -> int | None:
    """Merlin counter depth stored by fpd (``.../merlin_hdr`` 'Counter Depth'), if any."""
    root = name.split("/")[0]
    grp = f.get(f"{root}/merlin_hdr")
    if grp is None:
        return None
    text = grp.attrs.get("string", "")
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for line in str(text).splitlines():
        if line.startswith("Counter Depth"):
            try:
                return int(line.split(":")[1].strip())
            except (IndexError, ValueError):
                return None
    return None


# ----------------------------------------------------------------------------------------------
# zarr (our simulation store, xarray zarr, raw abTEM)
# ----------------------------------------------------------------------------------------------
def check_zarr_chunks(path: str | os.PathLike, array, *, fill: bool = False) -> int:
    """Check that every chunk of a zarr array is stored; return how many are missing.

    zarr reads a chunk that is not in the store as the array's fill value (zeros, usually),
    so a store that lost a file would analyse as if those probe positions saw nothing. Our
    writers store every chunk (``write_empty_chunks=True``).

    Parameters
    ----------
    path : path-like
        The store (for the message).
    array : zarr.Array
        The array to check.
    fill : bool
        False: raise on a missing chunk. True: return the count (the caller reads the fill
        value there).

    Raises
    ------
    ValueError
        One line naming the store, the array, the first missing chunk (its grid index and key)
        and how many are missing.
    """
    import itertools

    n_total = int(array.nchunks)
    n_have = int(array.nchunks_initialized)
    missing = n_total - n_have
    if missing <= 0 or fill:
        return max(missing, 0)
    first = None
    local = Path(path) / str(array.path)
    if local.is_dir():
        for idx in itertools.product(*(range(n) for n in array.cdata_shape)):
            key = array.metadata.encode_chunk_key(idx)
            if not (local / key).exists():
                first = f"chunk {list(idx)} ({local / key})"
                break
    where = first or f"{missing} of {n_total} chunks"
    raise ValueError(
        f"{path}: array {array.path!r} is missing {where}; {missing} of {n_total} chunks are "
        f"not in the store (incomplete copy or deleted file?). Reading them as the fill value "
        f"{array.fill_value!r} would give wrong results; pass fill_missing_chunks=True "
        f"(CLI: --fill-missing-chunks) to do it anyway"
    )


def _open_zarr(
    path: Path, *, dataset: str | None, thickness_nm: float | None, select: dict | None,
    fill_missing_chunks: bool = False,
) -> tuple[da.Array, dict]:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any zarr failure means "not a store we can read"
        # a plain array store (dask.array.to_zarr, zarr.save_array): no group at the root
        try:
            zarr_arr = zarr.open_array(str(path), mode="r")
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable zarr store ({exc})") from exc
        n_missing = check_zarr_chunks(path, zarr_arr, fill=fill_missing_chunks)
        arr, info = _open_zarr_array(path, zarr_arr, dataset=dataset,
                                     thickness_nm=thickness_nm, select=select)
        if n_missing:
            info["missing_chunks"] = n_missing
        return arr, info
    attrs = dict(root.attrs)
    if "array0" in list(root.array_keys()) and "metadata0" in attrs:
        n_missing = check_zarr_chunks(path, root["array0"], fill=fill_missing_chunks)
        arr, info = _open_abtem_zarr(path, root, attrs["metadata0"], select=select,
                                     thickness_nm=thickness_nm)
        if n_missing:
            info["missing_chunks"] = n_missing
        return arr, info
    ds = xr.open_zarr(str(path), consolidated=False)
    var = dataset or ("intensity" if "intensity" in ds else None)
    if var is None:
        four = [k for k, v in ds.data_vars.items()
                if set(DIMS) <= set(v.dims) or {"x", "y", "kx", "ky"} <= set(v.dims)]
        if len(four) != 1:
            raise ValueError(f"{path}: cannot tell which variable holds the 4D data "
                             f"(candidates {four}); pass dataset=")
        var = four[0]
    if var not in ds:
        raise ValueError(f"{path}: no variable {var!r}; variables: {list(ds.data_vars)}")
    v = ds[var]
    n_missing = check_zarr_chunks(path, root[var], fill=fill_missing_chunks)
    if {"x", "y", "kx", "ky"} <= set(v.dims) and not {"scan_y", "scan_x"} & set(v.dims):
        # abTEM's to_data_array() naming (x first); coordinates Å and 1/Å or mrad
        data, info = _abtem_xarray(path, v, select=select, thickness_nm=thickness_nm)
        if n_missing:
            info["missing_chunks"] = n_missing
        return data, info
    sel = dict(select or {})
    if thickness_nm is not None:
        sel["thickness"] = thickness_nm
    for dim, value in sel.items():
        if dim not in v.dims:
            raise ValueError(f"{path}: {var} has no dimension {dim!r} (dims {v.dims})")
        vals = np.asarray(v[dim].values)
        if vals.dtype.kind in "fiu":  # nearest stored value (thicknesses snap to whole periods)
            idx = int(np.argmin(np.abs(vals - value)))
            tol = 0.5 * float(np.min(np.diff(np.sort(vals)))) if len(vals) > 1 else np.inf
            if abs(vals[idx] - value) > max(tol, 1e-9 * abs(value)):
                raise ValueError(f"{path}: {dim}={value!r} not in the store; available: "
                                 f"{vals.tolist()}")
        else:
            matches = np.flatnonzero(vals == value)
            if matches.size == 0:
                raise ValueError(f"{path}: {dim}={value!r} not in the store; available: "
                                 f"{vals.tolist()}")
            idx = int(matches[0])
        sel[dim] = vals[idx].item()
        v = v.isel({dim: idx})
    extra_dims = [d for d in v.dims if d not in DIMS]
    for d in extra_dims:
        if v.sizes[d] != 1:
            raise ValueError(
                f"{path}: {var} has dimension {d!r} of size {v.sizes[d]} "
                f"({np.asarray(v[d].values).tolist()}); choose one with "
                + ("thickness_nm=" if d == "thickness" else f"select={{{d!r}: value}}")
            )
        v = v.isel({d: 0})
    missing = [d for d in DIMS if d not in v.dims]
    if missing:
        raise ValueError(f"{path}: {var} lacks dimensions {missing} (has {v.dims})")
    v = v.transpose(*DIMS)
    info: dict[str, Any] = {"format": "zarr", "variable": var}
    if n_missing:
        info["missing_chunks"] = n_missing
    if "calibration" in attrs:
        c = attrs["calibration"]
        info["calibration"] = Calibration.from_dict(json.loads(c) if isinstance(c, str) else c)
    for key in ("structure", "dose_e_per_A2", "cell_A", "periodic"):
        if key in attrs:
            info[key] = attrs[key]
    if "bit_depth" in attrs and np.issubdtype(v.dtype, np.integer):
        info["bit_depth"] = int(attrs["bit_depth"])  # counter depth of the original recording
    for dim, value in sel.items():
        info[f"selected_{dim}"] = value
    data = v.data if isinstance(v.data, da.Array) else da.from_array(v.data)
    return data, info


def _open_zarr_array(
    path: Path, zarr_arr, *, dataset: str | None, thickness_nm: float | None,
    select: dict | None,
) -> tuple[da.Array, dict]:
    """A bare zarr array: ``(sy, sx, ky, kx)``, ``(frames, ky, kx)`` or one ``(ky, kx)`` frame.

    Array attributes ``calibration`` (JSON or mapping) and ``scan_shape`` are used when present.
    """
    if dataset is not None or thickness_nm is not None or select:
        raise ValueError(f"{path}: a plain zarr array has no variables or extra dimensions; "
                         f"dataset=/thickness_nm=/select= do not apply")
    arr = da.from_zarr(zarr_arr)
    if arr.ndim not in (2, 3, 4):
        raise ValueError(f"{path}: expected a 2-4 dimensional zarr array, found shape "
                         f"{arr.shape}")
    attrs = dict(zarr_arr.attrs)
    info: dict[str, Any] = {"format": "zarr-array"}
    if "calibration" in attrs:
        c = attrs["calibration"]
        info["calibration"] = Calibration.from_dict(json.loads(c) if isinstance(c, str) else c)
    if "scan_shape" in attrs and arr.ndim == 3:
        info["scan_shape"] = (_check_scan_shape(attrs["scan_shape"]), "file attributes")
    return arr, info


def electron_wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength (Å) at a beam energy in eV."""
    e = float(energy_eV)
    return 12.264259 / np.sqrt(e * (1.0 + 0.97846e-6 * e))


def _k_to_mrad(sampling: float, offset: float, units: str, energy_eV: float | None):
    """(mrad_per_px, center_px) of a reciprocal axis given in 1/Å (needs energy) or mrad."""
    if units == "mrad":
        return float(sampling), float(-offset / sampling)
    if energy_eV is None:
        raise ValueError("abTEM store without energy: cannot convert 1/Å to mrad; pass "
                         "calibration=")
    lam = electron_wavelength_A(energy_eV)
    return float(sampling) * lam * 1e3, float(-offset / sampling)


def _pick_axis(values, wanted, label: str, path: Path) -> int:
    vals = np.asarray(values, dtype=float)
    idx = int(np.argmin(np.abs(vals - float(wanted))))
    if not np.isclose(vals[idx], float(wanted), rtol=1e-6, atol=1e-9):
        raise ValueError(f"{path}: {label}={wanted!r} not stored; available {vals.tolist()}")
    return idx


def _open_abtem_zarr(path: Path, root, meta: dict, *, select, thickness_nm):
    """abTEM ``to_zarr`` store: ``array0`` + ``metadata0`` (axes: ensemble..., x, y, kx, ky)."""
    arr = da.from_zarr(root["array0"])
    axes = [meta["axes"][f"axis_{i}"] for i in range(arr.ndim)] if "axes" in meta else None
    if axes is None or arr.ndim < 4:
        raise ValueError(f"{path}: abTEM store without axis metadata or with < 4 dimensions")
    labels = [str(a.get("label", "")) for a in axes]
    scan = [i for i, a in enumerate(axes) if a.get("type") == "ScanAxis"]
    recip = [i for i, a in enumerate(axes) if "Reciprocal" in str(a.get("type", ""))]
    if len(scan) != 2 or len(recip) != 2:
        raise ValueError(f"{path}: expected two scan and two reciprocal axes, got {labels}")
    sel = dict(select or {})
    if thickness_nm is not None:
        sel["thickness"] = thickness_nm
    index: list[Any] = [slice(None)] * arr.ndim
    chosen = {}
    for i, a in enumerate(axes):
        if i in scan or i in recip:
            continue
        lab = labels[i]
        key = lab if lab in sel else None
        if key is None and "thickness" in sel and ("thick" in lab.lower() or lab == "z"):
            key = "thickness"
        if key is not None and "values" in a:
            vals = np.asarray(a["values"], dtype=float)
            if key == "thickness" and str(a.get("units", "Å")) in ("Å", "A"):
                vals = vals / 10.0  # abTEM thickness axes are in Å
            index[i] = _pick_axis(vals, sel[key], labels[i], path)
            chosen[labels[i]] = float(sel[key])
        elif arr.shape[i] == 1:
            index[i] = 0
        else:
            raise ValueError(f"{path}: ensemble axis {labels[i]!r} has {arr.shape[i]} entries; "
                             f"choose one with select={{{labels[i]!r}: value}} or thickness_nm=")
    arr = arr[tuple(index)]
    remaining = [i for i in range(len(axes)) if not isinstance(index[i], int)]
    order = [remaining.index(i) for i in (scan[1], scan[0], recip[1], recip[0])]  # y, x, ky, kx
    arr = arr.transpose(order)
    energy = meta.get("energy")
    ay, ax = axes[scan[1]], axes[scan[0]]
    ky_, kx_ = axes[recip[1]], axes[recip[0]]
    my, cy = _k_to_mrad(ky_["sampling"], ky_.get("offset", 0.0), ky_.get("units", "1/Å"), energy)
    mx, cx = _k_to_mrad(kx_["sampling"], kx_.get("offset", 0.0), kx_.get("units", "1/Å"), energy)
    cal = Calibration(step_A=(ay["sampling"], ax["sampling"]), mrad_per_px=(my, mx),
                      center_px=(cy, cx), energy_keV=(energy or 200e3) / 1e3,
                      extra={"source": "abTEM zarr metadata"})
    info: dict[str, Any] = {"format": "abtem-zarr", "calibration": cal,
                            "detector_orientation": "abTEM (x, y, kx, ky) transposed: ky = "
                            "abTEM ky axis, kx = abTEM kx axis; scan_y = abTEM y"}
    for k, v in chosen.items():
        info[f"selected_{k}"] = v
    return arr, info


def _abtem_xarray(path: Path, v: xr.DataArray, *, select, thickness_nm):
    """xarray written from abTEM's ``to_data_array()`` (dims ..., x, y, kx, ky)."""
    sel = dict(select or {})
    if thickness_nm is not None:
        sel["thickness"] = thickness_nm
    for dim in [d for d in v.dims if d not in ("x", "y", "kx", "ky")]:
        if dim in sel:
            v = v.isel({dim: _pick_axis(v[dim].values, sel[dim], dim, path)})
        elif v.sizes[dim] == 1:
            v = v.isel({dim: 0})
        else:
            raise ValueError(f"{path}: dimension {dim!r} has {v.sizes[dim]} entries; choose one "
                             f"with select={{{dim!r}: value}}")
    v = v.transpose("y", "x", "ky", "kx")
    energy = v.attrs.get("energy")
    steps, mrad, centre = [], [], []
    for dim in ("y", "x"):
        c = np.asarray(v[dim].values, dtype=float)
        steps.append(float(c[1] - c[0]) if len(c) > 1 else 1.0)
    for dim in ("ky", "kx"):
        c = np.asarray(v[dim].values, dtype=float)
        units = str(v[dim].attrs.get("units", "1/Å"))
        step = float(c[1] - c[0])
        # to_data_array() drops the axis offset (coordinates start at 0): then assume abTEM's
        # fftshifted layout, zero angle at index n // 2
        offset = float(c[0]) if c[0] < 0 else -(len(c) // 2) * step
        m, ctr = _k_to_mrad(step, offset, units, energy)
        mrad.append(m)
        centre.append(ctr)
    cal = Calibration(step_A=steps, mrad_per_px=mrad, center_px=centre,
                      energy_keV=(energy or 200e3) / 1e3, extra={"source": "abTEM xarray"})
    data = v.data if isinstance(v.data, da.Array) else da.from_array(v.data)
    return data, {"format": "abtem-xarray-zarr", "calibration": cal}


# ----------------------------------------------------------------------------------------------
# npy / raw
# ----------------------------------------------------------------------------------------------
def _open_npy(path: Path) -> tuple[da.Array, dict]:
    mm = np.load(path, mmap_mode="r")
    return da.from_array(mm, chunks=(1,) * (mm.ndim - 2) + (-1, -1)), {
        "format": "npy", "stored_dtype": mm.dtype.str}


def _open_raw(
    path: Path, *, dtype, frame_shape, header_bytes: int, frame_header_bytes: int,
    frame_footer_bytes: int,
) -> tuple[da.Array, dict]:
    if dtype is None or frame_shape is None:
        raise ValueError(f"{path}: a raw binary file needs dtype= and frame_shape=(ky, kx)")
    dt = np.dtype(dtype)
    rows, cols = (int(v) for v in frame_shape)
    if min(header_bytes, frame_header_bytes, frame_footer_bytes) < 0:
        raise ValueError("header/frame byte counts must be non-negative")
    rec = None
    if frame_header_bytes or frame_footer_bytes:
        rec = np.dtype([("h", f"V{frame_header_bytes}"), ("d", dt, (rows, cols)),
                        ("f", f"V{frame_footer_bytes}")])
    frame_bytes = frame_header_bytes + rows * cols * dt.itemsize + frame_footer_bytes
    size = path.stat().st_size - header_bytes
    n, rem = divmod(size, frame_bytes)
    if size < 0 or rem:
        raise ValueError(
            f"{path}: file size does not fit whole frames: {max(n, 0)} complete frames of "
            f"{frame_bytes} bytes readable, {rem} bytes left over (truncated file or wrong "
            f"dtype/frame_shape/header_bytes?)"
        )
    if rec is None:
        mm = np.memmap(path, dtype=dt, mode="r", offset=header_bytes, shape=(n, rows, cols))
    else:
        mm = np.memmap(path, dtype=rec, mode="r", offset=header_bytes, shape=(n,))["d"]
    return da.from_array(mm, chunks=(max(1, CHUNK_BYTES // frame_bytes), -1, -1)), {
        "format": "raw", "stored_dtype": dt.str}
