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
                   calibration=cal, dataset=args.dataset, thickness_nm=args.thickness_nm, **kw)


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
            "scan_shape_source", "calibrated", "scan_units", "detector_units",
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


def run(args: argparse.Namespace) -> int:
    arr = load_from_arguments(args)
    s = inspect_summary(arr, max_frames=args.max_frames or None)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['source']}  [{s['format']}]")
    print(f"  shape      {tuple(s['shape'])}  (scan_y, scan_x, ky, kx); scan shape from "
          f"{s['scan_shape_source']}")
    print(f"  dtype      {s['dtype']} (stored {s['stored_dtype']}, {s['bit_depth']}-bit, "
          f"saturation at {s['saturation_value']}); {s['nbytes'] / 2**20:.1f} MiB")
    cal = s["calibration"]
    state = "calibrated" if s["calibrated"] else "UNCALIBRATED (pixel units)"
    print(f"  calibration {state}: step {cal['step_A']} Å, {cal['mrad_per_px']} mrad/px, "
          f"centre {cal['center_px']}, {cal['energy_keV']} keV, "
          f"scan rotation {cal['scan_rotation_deg']}°")
    print(f"  orientation {s['detector_orientation']}")
    m = s["mean_pattern"]
    print(f"  mean pattern: max {m['max']:.3g}, {m['total_counts_per_frame']:.4g} counts/frame, "
          f"BF-disc centre {m['disc_centre_px']} px")
    b = s["bad_pixels"]
    print(f"  bad pixels over {b['n_frames']} frames: {b['n_dead']} dead, {b['n_hot']} hot, "
          f"{b['n_saturated_pixels']} mostly saturated; saturated values "
          f"{100 * b['saturated_value_fraction']:.3f}%")
    return 0
