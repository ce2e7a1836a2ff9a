"""``tmask-validate descan FILE --out OUT.zarr``: fit and remove the descan, write a zarr store.

The bright-field disc centre of every pattern is measured (one streamed pass over scan rows), a
plane ``c(y, x) = c0 + gy·y + gx·x`` is fitted to the centre map with outlier rejection, and every
pattern is shifted so the plane becomes flat (the real beam deflections, the CoM signal, stay).
``--method integer`` (default) shifts by whole pixels (exact counts, dtype kept, ≤ 0.5 px
residual); ``--method fourier`` shifts by sub-pixels (float32, wrap-around at the detector edge).
See :func:`tmask_validate.preprocess.descan_correct`.

The corrected data are written chunk by chunk (whole scan rows per chunk, nothing held in
memory), so files larger than memory work. The store holds one variable ``data``
``(scan_y, scan_x, ky, kx)`` and the calibration (centre = the corrected disc position) in its
attributes: ``tmask-validate inspect/find-sites/analyse/pacbed-thickness OUT.zarr`` and
``tmask_validate.io.load`` read it with the calibration preserved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from tmask_validate.commands.inspect import add_data_arguments, load_from_arguments

#: target bytes of one zarr chunk (whole scan rows)
CHUNK_BYTES = 32 * 2**20


def register(subparsers) -> None:
    p = subparsers.add_parser("descan", help="fit + remove the descan, write a zarr store",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="output zarr store (directory, *.zarr)")
    p.add_argument("--method", choices=("integer", "fourier"), default="integer",
                   help="whole-pixel (exact counts) or sub-pixel Fourier shifts")
    p.add_argument("--threshold-rel", type=float, default=0.5,
                   help="disc = pixels above this fraction of the pattern maximum")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def rows_per_chunk(scan_x: int, frame_bytes: int, target_bytes: int | None = None) -> int:
    """Whole scan rows per chunk of about ``target_bytes`` (default :data:`CHUNK_BYTES`)."""
    target = CHUNK_BYTES if target_bytes is None else int(target_bytes)
    return max(1, int(target // max(1, scan_x * frame_bytes)))


def write_corrected(corrected, out: Path) -> Path:
    """Write a descan-corrected DataArray as a zarr store (atomic: temp dir, then rename).

    The root attributes carry ``calibration`` (JSON), ``descan`` (JSON) and ``source``; the data
    go in variable ``data`` with uniform chunks of whole scan rows.
    """
    import xarray as xr

    sy, sx, ny, nx = corrected.shape
    rows = min(sy, rows_per_chunk(sx, ny * nx * corrected.dtype.itemsize))
    data = corrected.chunk({"scan_y": rows, "scan_x": -1, "ky": -1, "kx": -1})
    keep = {k: v for k, v in data.attrs.items()
            if isinstance(v, (str, int, float, bool)) and not isinstance(v, np.generic)}
    data = data.copy()
    data.attrs = {k: v for k, v in keep.items() if k not in ("calibration", "descan")}
    ds = xr.Dataset({"data": data})
    ds.attrs = {"calibration": keep["calibration"], "descan": keep.get("descan", "{}"),
                "source": str(keep.get("source", "")), "content": "descan-corrected 4D-STEM"}
    if np.issubdtype(data.dtype, np.integer) and "bit_depth" in keep:
        ds.attrs["bit_depth"] = int(keep["bit_depth"])  # the detector's counter depth
    for name in ("scan_y", "scan_x", "ky", "kx"):
        ds[name].attrs = {k: v for k, v in ds[name].attrs.items()
                          if isinstance(v, (str, int, float))}
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        ds.to_zarr(str(tmp), mode="w", consolidated=False, write_empty_chunks=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def run(args: argparse.Namespace) -> int:
    from tmask_validate.preprocess import descan_correct

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == Path(args.file).resolve():
        raise ValueError("--out must differ from the input file")
    arr = load_from_arguments(args)
    corrected = descan_correct(arr, method=args.method, threshold_rel=args.threshold_rel)
    write_corrected(corrected, out)
    d = json.loads(corrected.attrs["descan"])
    coef = np.asarray(d["coef_px"], float)
    sy, sx = arr.shape[:2]
    # disc travel across the scan predicted by the fitted plane (ky, kx components)
    travel = np.abs(coef[:, 1]) * (sy - 1) + np.abs(coef[:, 2]) * (sx - 1)
    print(f"descan: disc moves {travel[0]:.2f} px (ky), {travel[1]:.2f} px (kx) across the "
          f"scan; plane residual rms {np.round(d['residual_rms_px'], 3).tolist()} px, "
          f"{d['n_outliers']} outlier patterns; corrected centre "
          f"{np.round(d['target_px'], 2).tolist()} px ({args.method} shifts)")
    print(f"wrote {out}  {tuple(int(v) for v in corrected.shape)} {corrected.dtype}")
    return 0
