"""``tmask-validate live``: template-mask images while the scan runs (Merlin data port).

Connects to a Quantum Detectors Merlin (or ``libertem-live-mib-sim``) data port, waits for the
next acquisition and applies the masks of ``--masks`` to every frame as it arrives (raw, Eq. 2;
or normalised, Eq. 7, with ``--stats`` from a reference scan or simulation), writing the
images row by row to ``--out`` (zarr; readable during the scan: ``rows_done`` attribute,
``complete`` written last). ``--view PORT`` serves a page on http://127.0.0.1:PORT/ showing
every image refreshing during the scan.

Masks: ``.npy``/``.npz``/zarr stacks ``(k, ky, kx)`` or a previous ``analyse`` output (.nc,
names kept; ``--names`` picks some). Several analyse outputs form a simulated library:
``--thickness-nm`` picks the nearest thickness and ``--calibration`` (mrad/px, centre,
``--detector-shape``) resamples its masks onto this detector.

Ctrl-C finishes the current row, saves, marks the store incomplete and exits 130; a dropped
connection saves the rows so far and exits 3.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("live", help="live template-mask images from a Merlin stream",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="detector (data server) host")
    p.add_argument("--data-port", type=int, default=6342, help="Merlin data port")
    p.add_argument("--scan-shape", type=int, nargs=2, required=True, metavar=("SY", "SX"))
    p.add_argument("--masks", required=True, nargs="+",
                   help=".npy/.npz/zarr mask stack, or analyse output(s) .nc")
    p.add_argument("--names", nargs="+", default=None, help="use only these masks")
    p.add_argument("--thickness-nm", type=float, default=None,
                   help="library thickness (nearest of several analyse outputs)")
    p.add_argument("--calibration", default=None,
                   help="detector calibration YAML (mrad_per_px, center_px): resample the "
                        "masks of an analyse output onto this detector")
    p.add_argument("--detector-shape", type=int, nargs=2, default=None, metavar=("KY", "KX"),
                   help="detector shape for --calibration (default: the masks' shape)")
    p.add_argument("--stats", default=None,
                   help="column statistics for normalised images (Eq. 7): .npz mean/std/count "
                        "or a reference scan file")
    p.add_argument("--normalisation", choices=("pcc", "mean"), default="pcc")
    p.add_argument("--out", required=True, help="output zarr store (images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--view", type=int, default=None, metavar="PORT",
                   help="serve a live page on http://127.0.0.1:PORT/ (0 = any free port)")
    p.add_argument("--view-linger-s", type=float, default=0.0,
                   help="keep the page up this long after the scan ends")
    p.add_argument("--connect-timeout-s", type=float, default=30.0,
                   help="keep retrying the connection this long")
    p.add_argument("--idle-timeout-s", type=float, default=600.0,
                   help="give up when the stream is silent this long")
    p.add_argument("--rows-per-write", type=int, default=1,
                   help="scan rows per processing block and store write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


#: idle OpenMP workers of the compiled kernels sleep instead of spinning while the main
#: thread waits for the next scan row: spinning took ~80 us of CPU per 256 x 256 frame away
#: from the receive path (measured: 146 -> 60-73 us user CPU per frame, 1.4-2x frames/s
#: against libertem-live-mib-sim on the loaded 2-core machine). Read by libgomp when numba's
#: thread pool starts, i.e. before the first compiled kernel runs in this process.
OMP_WAIT_POLICY = "PASSIVE"


def run(args) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    import numpy as np

    from tmask_validate import __version__, live
    from tmask_validate.calibration import Calibration

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: choose another --out or pass --overwrite")
    resample = {}
    if args.calibration is not None:
        cal = Calibration.from_yaml(args.calibration)
        if cal.center_px is None:
            raise ValueError(f"{args.calibration}: center_px is needed to resample masks")
        resample = {"mrad_per_px": cal.mrad_per_px, "center_px": cal.center_px}
    ms = live.load_masks(args.masks, names=args.names, thickness_nm=args.thickness_nm)
    if resample:
        shape = tuple(args.detector_shape) if args.detector_shape else ms.masks.shape[1:]
        ms = live.load_masks(args.masks, names=args.names, thickness_nm=args.thickness_nm,
                             det_shape=shape, **resample)
    elif args.detector_shape is not None:
        raise ValueError("--detector-shape only goes with --calibration")
    stats = live.load_stats(args.stats) if args.stats else None
    lm = live.LiveMasks(ms.masks, ms.names, stats=stats, normalisation=args.normalisation)
    sy, sx = args.scan_shape
    attrs = {
        "masks_source": ms.source, "normalised": lm.normalised,
        "normalisation": args.normalisation if lm.normalised else None,
        "stats_source": args.stats, "host": args.host, "data_port": int(args.data_port),
        "thickness_nm": ms.thickness_nm, "masks_resampled": ms.resampled,
        "mask_mrad_per_px": None if ms.mrad_per_px is None else list(ms.mrad_per_px),
        "mask_center_px": None if ms.center_px is None else list(ms.center_px),
        "tmask_validate_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"live: {lm.k} masks {lm.names} on a {lm.det_shape[0]} x {lm.det_shape[1]} detector"
          f" ({'normalised, Eq. 7' if lm.normalised else 'raw, Eq. 2'}); scan {sy} x {sx}",
          file=sys.stderr)
    lm.warm_up()  # compiled kernels loaded before the first frame arrives
    view = None
    if args.view is not None:
        try:
            view = live.LiveView(args.view, lm.names, (sy, sx))
        except OSError as exc:
            raise ValueError(f"cannot serve the live view on 127.0.0.1:{args.view}: "
                             f"{exc.strerror or exc}") from None
        print(f"live view: {view.url}", file=sys.stderr, flush=True)
    try:
        sock = live.connect(args.host, args.data_port, timeout_s=args.connect_timeout_s,
                            log=live.log_stderr)
    except ConnectionError as exc:
        if view is not None:
            view.close()
        print(f"tmask-validate live: error: {exc}", file=sys.stderr)
        return 4
    print(f"connected to {args.host}:{args.data_port}; waiting for the acquisition",
          file=sys.stderr, flush=True)
    store = live.ZarrRowStore(out, lm.names, (sy, sx), attrs=attrs)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sy * sx, unit="frame", unit_scale=False, desc="live", file=sys.stderr,
                   smoothing=0.1, mininterval=0.25)
    t_start = [None]

    def on_row(y, images):
        if t_start[0] is None:
            t_start[0] = time.perf_counter()
        if bar is not None:
            bar.update(y * sx - bar.n)
        if view is not None:
            dt = time.perf_counter() - t_start[0]
            view.update(y, images, (y - 1) * sx / dt if dt > 0 and y > 1 else 0.0)

    imager = live.LiveImager(lm, (sy, sx), store=store, on_row=on_row,
                             rows_per_write=args.rows_per_write)

    def on_sigint(signum, frame):
        if imager.stop_requested:
            raise KeyboardInterrupt
        imager.request_stop()
        print("\nCtrl-C: finishing the current row (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        res = imager.run(live.SocketSource(sock, idle_timeout_s=args.idle_timeout_s))
    except OSError as exc:  # the store could not be written (disk full, permissions)
        print(f"tmask-validate live: error: writing {out} failed: {exc}; rows_done in its "
              f"attributes says how far it got", file=sys.stderr)
        return 5
    finally:
        signal.signal(signal.SIGINT, old)
        sock.close()
        if bar is not None:
            bar.close()
    if view is not None:
        view.update(res.rows_done, res.images, res.frames_per_s)
        view.finish(res.complete, res.reason)
    lat = res.row_times[:res.rows_done]
    lat_ms = (lat[:, 1] - lat[:, 0]) * 1e3 if res.rows_done else np.array([np.nan])
    fmt = res.frame_format
    desc = "" if fmt is None else f" ({fmt.code} {fmt.bits}-bit, {fmt.nchips} chip(s))"
    print(f"live: {res.frames} frames{desc} in {res.elapsed_s:.2f} s = "
          f"{res.frames_per_s:.0f} frames/s; row latency (first byte -> in store) median "
          f"{np.nanmedian(lat_ms):.1f} ms; {res.rows_done}/{sy} rows -> {out}"
          + (f"; skipped {res.garbage_bytes} bytes before the header" if res.garbage_bytes
             else ""), file=sys.stderr, flush=True)
    if view is not None and args.view_linger_s > 0:
        time.sleep(args.view_linger_s)
    if view is not None:
        view.close()
    if not res.complete:
        print(f"live: INCOMPLETE: {res.reason}; rows 0-{res.rows_done - 1} saved in {out} "
              f"(complete = False)" if res.rows_done else
              f"live: INCOMPLETE: {res.reason}; no complete row (complete = False)",
              file=sys.stderr, flush=True)
        return 130 if "user" in (res.reason or "") else 3
    return 0
