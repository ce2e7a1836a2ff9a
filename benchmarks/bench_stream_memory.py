"""Peak memory of `combine` and `simulate` on paper-size pieces (issue 13).

Two measurements, each of a separate process whose peak resident memory is read with
``getrusage(RUSAGE_CHILDREN)`` (max RSS of waited-for children):

``combine``
    writes ``--stores`` synthetic chunk stores of the paper LiFePO4 [001] shape
    ``(8, 21, 35, 424, 400)`` float32 (4.0 GB each uncompressed; the values are constant per
    store so they compress to almost nothing and cost seconds to write), then runs
    ``tmask-validate combine`` on them and checks a few output values against the exact
    weighted mean. No abTEM involved: combine only reads, averages and writes.

``simulate``
    runs ``tmask-validate simulate`` for one frozen-phonon configuration of
    ``config/paper.yaml``'s LiFePO4_001 at the full paper grid and the full one-cell 0.3 A
    scan (21 x 35 positions, detector to 64.2 mrad) but only ``--periods`` beam periods with
    an exit plane after each (4 periods: 4 thicknesses x 735 patterns = 2 GB of float32
    output), with ``--block-mb`` scan blocks. The potential of the full 192-slice crystal is
    extrapolated from its size (192 x grid x 4 B), not run.

Usage::

    python benchmarks/bench_stream_memory.py combine --stores 10 --workdir /tmp/bsm
    python benchmarks/bench_stream_memory.py simulate --periods 4 --block-mb 512 \\
        --workdir /tmp/bsm
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PAPER_LFP_SHAPE = (8, 21, 35, 424, 400)


def _child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _synthetic_store(path: Path, shape, value: float, index: int, config: dict) -> None:
    import dask.array as da
    import xarray as xr

    from tmask_validate import simulate as S
    from tmask_validate.calibration import Calibration

    nt, ny, nx, nky, nkx = shape
    chunks = S._store_chunks(shape, 4)
    inten = da.full(shape, value, dtype=np.float32, chunks=chunks)
    det = da.full((nt, ny, nx), value, dtype=np.float32, chunks=(1, ny, nx))
    cal = Calibration(step_A=(0.286, 0.295), mrad_per_px=(0.303, 0.321),
                      center_px=(nky // 2, nkx // 2), energy_keV=200.0,
                      scan_rotation_deg=0.0, extra={"source": "synthetic"})
    ds = xr.Dataset(
        {"intensity": (("thickness", "scan_y", "scan_x", "ky", "kx"), inten),
         "detector_ADF": (("thickness", "scan_y", "scan_x"), det),
         "site_y_A": ("site", np.zeros(3))},
        coords={"thickness": ("thickness", 20.0 + 10.0 * np.arange(nt), {"units": "nm"}),
                "scan_y": np.arange(ny) * 0.286, "scan_x": np.arange(nx) * 0.295,
                "ky": (np.arange(nky) - nky // 2) * 0.303,
                "kx": (np.arange(nkx) - nkx // 2) * 0.321},
        attrs={"structure": "LiFePO4_001", "calibration": json.dumps(cal.to_dict()),
               "config": json.dumps(config), "seeds": json.dumps([index]),
               "configurations": json.dumps([index]), "n_configurations": 1,
               "wall_time_s": 0.0, "cpu_time_s": 0.0, "dose_e_per_A2": None,
               "complete": False})
    S.write_store(ds, path)


def bench_combine(args) -> dict:
    from tmask_validate.config import load_config

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config("config/paper.yaml")
    shape = PAPER_LFP_SHAPE
    gb = np.prod(shape) * 4 / 1e9
    paths = []
    t0 = time.perf_counter()
    for i in range(args.stores):
        p = work / f"chunk{i}.zarr"
        if not p.exists():
            _synthetic_store(p, shape, float(i + 1), i, cfg)
        paths.append(p)
    t_gen = time.perf_counter() - t0
    out = work / "combined.zarr"
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).with_name("tmask-validate")), "combine",
                        *map(str, paths), "--out", str(out)], capture_output=True, text=True)
    t_comb = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    peak = _child_peak_mb()
    import zarr

    z = zarr.open_group(str(out), mode="r")["intensity"]
    expect = np.mean(np.arange(1, args.stores + 1, dtype=np.float64))
    got = np.asarray(z[7, 20, 34, 400:, 390:])
    ok = bool(np.all(got == np.float32(expect)))
    res = {"what": "combine", "shape": list(shape), "stores": args.stores,
           "store_GB_float32": round(float(gb), 2), "generate_s": round(t_gen, 1),
           "combine_wall_s": round(t_comb, 1), "peak_rss_MB": round(peak, 1),
           "values_exact": ok}
    if not args.keep:
        shutil.rmtree(work)
    return res


def bench_simulate(args) -> dict:
    import yaml

    from tmask_validate import simulate as S
    from tmask_validate.config import load_config

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(load_config("config/paper.yaml"))
    entry = cfg["structures"]["LiFePO4_001"]
    c_A = 4.6919
    entry["thicknesses_nm"] = [round(c_A * (k + 1) / 10.0, 4) for k in range(args.periods)]
    cfg["structures"] = {"LiFePO4_001": entry}
    cfg_path = work / "piece.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    setup = S._structure_setup(load_config(cfg_path), "LiFePO4_001")
    out = work / "piece.zarr"
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).with_name("tmask-validate")), "simulate", "--config",
           str(cfg_path), "--structure", "LiFePO4_001", "--configurations", "0:1",
           "--block-mb", str(args.block_mb), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr)
    peak = _child_peak_mb()
    ds = S.load_store(out)
    shape = ds.intensity.shape
    gpts = json.loads(ds.attrs["grid_gpts"])
    n_full_slices = 192
    res = {"what": "simulate", "grid_gpts": gpts, "slices": len(setup["slices"]),
           "intensity_shape": list(shape),
           "output_GB_float32": round(float(np.prod(shape)) * 4 / 1e9, 2),
           "block_MB": args.block_mb, "wall_s": round(wall, 1),
           "cpu_s": round(float(ds.attrs["cpu_time_s"]), 1), "peak_rss_MB": round(peak, 1),
           "potential_MB_piece": round(len(setup["slices"]) * np.prod(gpts) * 4 / 2**20, 1),
           "potential_MB_192_slices": round(n_full_slices * np.prod(gpts) * 4 / 2**20, 1)}
    if not args.keep:
        shutil.rmtree(work)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("combine")
    c.add_argument("--stores", type=int, default=10)
    s = sub.add_parser("simulate")
    s.add_argument("--periods", type=int, default=4)
    s.add_argument("--block-mb", type=float, default=512)
    for p in (c, s):
        p.add_argument("--workdir", default="/tmp/bench_stream_memory")
        p.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    res = bench_combine(args) if args.what == "combine" else bench_simulate(args)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
