"""``tmask-validate inspect FILE``: what a 4D-STEM file holds and how it will be read.

Prints the shape (scan_y, scan_x, ky, kx), stored and loaded dtype, counter depth and saturation
value, where the scan shape came from, the calibration (from --calibration, a
``<file>.calibration.yaml`` sidecar, the file, or flags), the bright-field disc centre and a
dead/hot/saturated pixel summary (over at most --max-frames frames). ``--json`` prints the same as
one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the commands that read one experimental data file."""
    p.add_argument("file", help="data file (.mib, .h5/.hdf5/.emd, .zarr, .npy, .raw/.bin)")
    p.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("SY", "SX"),
                   help="scan shape, for files that do not record it")
    p.add_argument("--calibration", default=None,
                   help="calibration YAML (default: <file>.calibration.yaml when present)")
    p.add_argument("--dataset", default=None, help="HDF5 dataset path / zarr variable")
    p.add_argument("--thickness-nm", type=float, default=None, help="simulation stores only")
    p.add_argument("--fill-missing-chunks", action="store_true",
                   help="zarr: read chunks missing from the store as the fill value (default: "
                        "a missing chunk is an error)")
    g = p.add_argument_group("calibration flags (override the YAML)")
    g.add_argument("--step-A", type=float, nargs="+", default=None, help="probe step (Å), 1 or 2")
    g.add_argument("--mrad-per-px", type=float, nargs="+", default=None)
    g.add_argument("--camera-length-mm", type=float, default=None)
    g.add_argument("--pixel-size-um", type=float, default=None, help="55 for Medipix3/Merlin")
    g.add_argument("--energy-keV", type=float, default=None)
    g.add_argument("--scan-rotation-deg", type=float, default=None)
    r = p.add_argument_group("raw binary layout (.raw/.bin/.dat)")
    r.add_argument("--dtype", default=None, help="element dtype, e.g. '>u2' or float32")
    r.add_argument("--frame-shape", type=int, nargs=2, default=None, metavar=("KY", "KX"))
    r.add_argument("--header-bytes", type=int, default=0)
    r.add_argument("--frame-header-bytes", type=int, default=0)
    r.add_argument("--frame-footer-bytes", type=int, default=0)


def load_from_arguments(args: argparse.Namespace):
    """``tmask_validate.io.load`` with the calibration from YAML/sidecar/flags."""
    from tmask_validate import io
    from tmask_validate.calibration import (
        calibration_from_flags,
        resolve_calibration,
        sidecar_path,
    )

    base = resolve_calibration(args.calibration) if args.calibration else None
    if base is None:
        side = sidecar_path(args.file)
        base = resolve_calibration(side) if side is not None else None
    cal = calibration_from_flags(
        base=base, step_A=args.step_A, mrad_per_px=args.mrad_per_px,
        camera_length_mm=args.camera_length_mm, pixel_size_um=args.pixel_size_um,
        energy_keV=args.energy_keV, scan_rotation_deg=args.scan_rotation_deg)
    kw = {}
    if args.dtype is not None or args.frame_shape is not None:
        kw = dict(dtype=args.dtype, frame_shape=args.frame_shape, header_bytes=args.header_bytes,
                  frame_header_bytes=args.frame_header_bytes,
                  frame_footer_bytes=args.frame_footer_bytes)
    return io.load(args.file, scan_shape=tuple(args.scan_shape) if args.scan_shape else None,
                   calibration=cal, dataset=args.dataset, thickness_nm=args.thickness_nm,
                   fill_missing_chunks=getattr(args, "fill_missing_chunks", False), **kw)


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="shape, dtype, calibration, bad pixels of a file",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--max-frames", type=int, default=4096,
                   help="frames examined for the pixel statistics (0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def inspect_summary(arr, *, max_frames: int | None = 4096) -> dict:
    """Summary dict of a loaded DataArray (shape, dtype, calibration, disc centre, bad pixels)."""
    from tmask_validate.preprocess import bad_pixel_report, disc_center, pixel_statistics

    rep = bad_pixel_report(arr, max_frames=max_frames)
    stats = pixel_statistics(arr, max_frames=max_frames)
    try:
        centre = [round(v, 2) for v in disc_center(stats["mean"])]
    except ValueError:
        centre = None
    keys = ("format", "source", "stored_dtype", "bit_depth", "saturation_value",
            "scan_shape_source", "calibrated", "scan_calibrated", "detector_calibrated",
            "scan_units", "detector_units",
            "center_px_source", "detector_orientation", "dataset")
    out = {"shape": [int(v) for v in arr.shape], "dims": list(arr.dims), "dtype": str(arr.dtype),
           "nbytes": int(np.prod(arr.shape)) * arr.dtype.itemsize}
    out.update({k: arr.attrs[k] for k in keys if k in arr.attrs})
    out["calibration"] = json.loads(arr.attrs["calibration"])
    out["mean_pattern"] = {"max": float(stats["mean"].max()),
                           "total_counts_per_frame": float(stats["mean"].sum()),
                           "disc_centre_px": centre}
    out["bad_pixels"] = {k: rep[k] for k in ("n_dead", "n_hot", "n_saturated_pixels",
                                             "saturated_value_fraction", "n_frames")}
    return out


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Inf)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


#: warn when more than this fraction of the examined detector values sit at the counter maximum
SATURATION_WARN_FRACTION = 0.01


def saturation_warning(fraction: float | None, saturation_value) -> str | None:
    """The warning line for a saturated-value fraction above SATURATION_WARN_FRACTION, or None."""
    if fraction is None or saturation_value is None or not fraction > SATURATION_WARN_FRACTION:
        return None
    return (f"warning: {100 * fraction:.1f}% of the detector values examined are at the counter "
            f"maximum {saturation_value} (threshold {100 * SATURATION_WARN_FRACTION:g}%): "
            f"saturated counts underestimate the intensity there; intensities and masks over "
            f"those pixels are biased")


def warn_if_saturated(arr, *, max_frames: int | None = 1024) -> str | None:
    """Print (stderr) and return the saturation warning of a loaded DataArray, if any."""
    import sys

    from tmask_validate.preprocess import pixel_statistics

    sat = arr.attrs.get("saturation_value")
    if sat is None or not np.issubdtype(arr.dtype, np.integer):
        return None
    st = pixel_statistics(arr, max_frames=max_frames, saturation_value=sat)
    frac = float(st["n_saturated"].sum() / max(st["n_frames"] * st["mean"].size, 1))
    msg = saturation_warning(frac, sat)
    if msg:
        print(msg, file=sys.stderr)
    return msg


def _calibration_line(cal: dict) -> str:
    scan = (f"step {cal['step_A']} Å" if cal.get("step_A") is not None
            else "scan UNCALIBRATED (no step_A: pixel units)")
    det = (f"{cal['mrad_per_px']} mrad/px" if cal.get("mrad_per_px") is not None
           else "detector UNCALIBRATED (no mrad_per_px: pixel units)")
    return (f"{scan}, {det}, centre {cal['center_px']}, {cal['energy_keV']} keV, "
            f"scan rotation {cal['scan_rotation_deg']}°")


def run(args: argparse.Namespace) -> int:
    import sys

    arr = load_from_arguments(args)
    s = _json_safe(inspect_summary(arr, max_frames=args.max_frames or None))
    b = s["bad_pixels"]
    warning = saturation_warning(b["saturated_value_fraction"], s.get("saturation_value"))
    if warning:
        s["warnings"] = [warning]
        print(warning, file=sys.stderr)
    if args.json:
        print(json.dumps(s, indent=1, allow_nan=False))
        return 0
    print(f"{s['source']}  [{s['format']}]")
    print(f"  shape      {tuple(s['shape'])}  (scan_y, scan_x, ky, kx); scan shape from "
          f"{s['scan_shape_source']}")
    if s.get("bit_depth") is not None:
        depth = (f"stored {s['stored_dtype']}, {s['bit_depth']}-bit, saturation at "
                 f"{s['saturation_value']}")
    else:
        depth = f"stored {s['stored_dtype']}, no counter depth (not integer counts)"
    print(f"  dtype      {s['dtype']} ({depth}); {s['nbytes'] / 2**20:.1f} MiB")
    cal = s["calibration"]
    state = "calibrated" if s["calibrated"] else (
        "partly calibrated" if s.get("scan_calibrated") or s.get("detector_calibrated")
        else "UNCALIBRATED (pixel units)")
    print(f"  calibration {state}: {_calibration_line(cal)}")
    print(f"  orientation {s['detector_orientation']}")
    m = s["mean_pattern"]
    def g(v, spec):  # NaN/Inf were made None for JSON
        return "NaN (non-finite values in the data)" if v is None else format(v, spec)

    print(f"  mean pattern: max {g(m['max'], '.3g')}, "
          f"{g(m['total_counts_per_frame'], '.4g')} counts/frame, "
          f"BF-disc centre {m['disc_centre_px']} px")
    print(f"  bad pixels over {b['n_frames']} frames: {b['n_dead']} dead, {b['n_hot']} hot, "
          f"{b['n_saturated_pixels']} mostly saturated; saturated values "
          f"{100 * b['saturated_value_fraction']:.3f}%")
    return 0
