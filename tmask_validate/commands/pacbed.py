"""``tmask-validate pacbed-thickness FILE --library STORE.zarr --out result.json``: thickness.

The position-averaged CBED (PACBED) of the scan (optionally of a ``--bin N`` binned detector,
streamed over scan rows; the variance of the average from counting statistics for integer data)
is compared with a simulated thickness series — a simulation store of
``tmask-validate simulate`` (``intensity`` with dims ``thickness, scan_y, scan_x, ky, kx``,
averaged over its scan) — resampled onto the data's angular grid (mrad/px from the calibration,
zero-angle pixel = the calibration centre or the measured BF-disc centre). Best thickness:
minimum of the misfit curve refined by a parabola; interval: where the curve stays within the
noise-induced misfit of the minimum (see :mod:`tmask_validate.pacbed`).

Writes ``result.json`` (``thickness_nm``, ``uncertainty_nm``, ``interval_nm``, ``at_edge``,
the match curve ``thicknesses_nm``/``misfit``, and what was compared) and, with ``--plot``, a
PNG of the match curve. Correct the descan first (``tmask-validate descan``) when the disc moves
by more than a pixel or so across the scan: a moving disc blurs the PACBED.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tmask_validate.commands.inspect import (
    add_data_arguments,
    load_from_arguments,
    warn_if_saturated,
)


def register(subparsers) -> None:
    p = subparsers.add_parser("pacbed-thickness",
                              help="sample thickness from PACBED vs a simulated series",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--library", required=True,
                   help="simulation store with a thickness series (tmask-validate simulate)")
    p.add_argument("--bin", type=int, default=1, help="bin the detector N x N first")
    p.add_argument("--max-angle-mrad", type=float, default=None,
                   help="compare within this angle (default: all angles both cover)")
    p.add_argument("--metric", choices=("sqdiff", "correlation"), default="sqdiff")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--plot", default=None, help="PNG of the match curve")
    p.set_defaults(func=run)


def plot_match(result: dict, path: str | Path) -> Path:
    """PNG of the misfit vs library thickness with the best value and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(result["thicknesses_nm"], float)
    m = np.asarray(result["misfit"], float)
    lo, hi = result["interval_nm"]
    fig, ax = plt.subplots(figsize=(5.0, 3.4), constrained_layout=True)
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.25, lw=0,
               label=f"interval {lo:.1f}-{hi:.1f} nm")
    ax.plot(t, m, "o-", color="tab:blue", ms=4, label="library")
    ax.axvline(result["thickness_nm"], color="tab:red", lw=1.2,
               label=f"best {result['thickness_nm']:.1f} ± {result['uncertainty_nm']:.1f} nm"
                     + (" (library edge)" if result["at_edge"] else ""))
    ax.set_xlabel("thickness (nm)")
    ax.set_ylabel(f"misfit ({result['metric']})")
    ax.set_title("PACBED thickness match", fontsize=10)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from tmask_validate import pacbed, simulate
    from tmask_validate.calibration import Calibration
    from tmask_validate.preprocess import bin_detector, disc_center

    simulate.load_store(args.library).close()  # exists, readable, complete
    import zarr

    from tmask_validate.io import check_zarr_chunks

    check_zarr_chunks(args.library, zarr.open_group(str(args.library), mode="r")["intensity"],
                      fill=args.fill_missing_chunks)
    library = pacbed.library_from_store(args.library)
    arr = load_from_arguments(args)
    if not arr.attrs.get("detector_calibrated", False):
        raise ValueError("pacbed-thickness needs the detector calibration (mrad/px): "
                         "--calibration YAML, a sidecar, or --mrad-per-px")
    warn_if_saturated(arr)
    if args.bin < 1:
        raise ValueError(f"--bin must be >= 1, got {args.bin}")
    if args.bin > 1:
        arr = bin_detector(arr, args.bin)
    cal = Calibration.from_dict(json.loads(arr.attrs["calibration"]))
    mean, var = pacbed.pacbed(arr)
    center = cal.center_px
    center_source = "calibration"
    if center is None:
        center, center_source = disc_center(mean), "measured BF-disc centre"
    match = pacbed.match_thickness(mean, library, pattern_mrad_per_px=cal.mrad_per_px,
                                   pattern_center_px=center, pattern_var=var,
                                   max_angle_mrad=args.max_angle_mrad, metric=args.metric)
    result = match.to_dict()
    result.update({
        "file": str(args.file), "library": str(args.library), "binning": int(args.bin),
        "n_patterns": int(arr.shape[0] * arr.shape[1]),
        "pattern_mrad_per_px": [float(v) for v in cal.mrad_per_px],
        "pattern_center_px": [float(v) for v in center], "center_source": center_source,
    })
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot_match(result, args.plot)
    lo, hi = result["interval_nm"]
    edge = "  (at the edge of the library: extend it)" if result["at_edge"] else ""
    print(f"thickness {result['thickness_nm']:.2f} ± {result['uncertainty_nm']:.2f} nm "
          f"(interval {lo:.2f}-{hi:.2f} nm; library {library['thickness'].values.min():.1f}-"
          f"{library['thickness'].values.max():.1f} nm){edge}")
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
