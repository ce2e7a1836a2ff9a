"""Measure a scaled-down piece of the paper configuration and extrapolate its cost.

Runs one frozen-phonon configuration of a structure of ``config/paper.yaml`` at the full
paper grid (0.073 Å sampling, ~80 Å slab, 4.692 Å slices, all detectors) but only
``--periods`` beam periods and ``--positions`` probe positions, twice: with one exit plane
and with an exit plane after every period (to separate the propagation cost from the
detection cost per exit plane). It then extrapolates linearly to the full thickness
series and the full scan:

    cost/config = build_per_slice * n_slices
                  + n_pos * (per_slice * n_slices + per_plane * n_planes)

Usage::

    python benchmarks/bench_paper_piece.py --structure LiFePO4_001 --periods 16 \\
        --positions 2 2
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from tmask_validate import simulate as S
from tmask_validate import structures
from tmask_validate.config import load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/paper.yaml")
    ap.add_argument("--structure", default="LiFePO4_001")
    ap.add_argument("--periods", type=int, default=6)
    ap.add_argument("--positions", type=int, nargs=2, default=(2, 2))
    args = ap.parse_args(argv)
    cfg = copy.deepcopy(load_config(args.config))
    sim = cfg["simulation"]
    full = S._structure_setup(cfg, args.structure)
    entry = cfg["structures"][args.structure]
    atoms = structures.build(entry["builder"], thickness_nm=None,
                             repeats=tuple(entry.get("repeats", (1, 1))),
                             **dict(entry.get("builder_options") or {}))
    atoms = atoms.repeat((1, 1, args.periods))
    per = len(full["slices"]) // full["atoms"].info["n_repeats_z"]
    slices = full["slices"][: per * args.periods]
    planes = tuple(range(per - 1, len(slices), per))[-min(len(full["planes"]), args.periods):]
    atoms = S.displaced_atoms(atoms, sim["phonons"]["rms_displacement_A"], 0)
    gpts = S.grid_gpts((atoms.cell[0, 0], atoms.cell[1, 1]), sim["sampling_A"])

    scan = full["scan"]
    ny, nx = args.positions
    timings, builds = {}, []
    for label, pl in (("one plane", planes[-1:]), ("all planes", planes)):
        res = S.run_configuration(atoms, sim, scan_start_A=scan["start_A"],
                                  scan_step_A=scan["step_A"], scan_shape=(ny, nx),
                                  exit_planes=pl, slices_A=slices)
        t = res["timing_s"]  # build wall, cpu, multislice wall, cpu
        builds.append(t[:2])
        timings[label] = (t[2], t[3])
    build_wall, build_cpu = np.min(builds, axis=0)
    npos = ny * nx
    per_slice = [v / (npos * len(slices)) for v in timings["one plane"]]
    if len(planes) > 1:
        per_plane = [max(0.0, (b - a) / (npos * (len(planes) - 1)))
                     for a, b in zip(timings["one plane"], timings["all planes"], strict=True)]
    else:  # a single thickness: no extra exit planes to time
        per_plane = [0.0, 0.0]

    n_slices = len(full["slices"])
    n_planes = len(full["planes"])
    n_pos = int(np.prod(full["scan"]["shape"]))
    det = res["intensity"].shape[-2:]
    ext = [b / len(slices) * n_slices + n_pos * (ps * n_slices + pp * n_planes)
           for b, ps, pp in zip((build_wall, build_cpu), per_slice, per_plane, strict=True)]
    n_cfg = sim["phonons"]["configurations"]
    out_gb = n_planes * n_pos * det[0] * det[1] * 4 / 1e9
    print(f"{args.structure}: grid {gpts}, piece = {len(slices)} slices x {npos} positions, "
          f"detector {det[0]}x{det[1]} px")
    print(f"  potential build: {build_wall:.1f} s wall / {build_cpu:.1f} s cpu "
          f"({build_wall / len(slices):.2f} s per slice)")
    print(f"  propagation: {1e3 * per_slice[0]:.1f} ms wall / {1e3 * per_slice[1]:.1f} ms cpu "
          f"per position per slice")
    print(f"  detection (pixelated + {len(sim['detectors'])} annular): "
          f"{1e3 * per_plane[0]:.1f} ms wall / {1e3 * per_plane[1]:.1f} ms cpu per position "
          f"per exit plane")
    print(f"  full: {n_slices} slices x {n_pos} positions, {n_planes} exit planes")
    print(f"  extrapolated per configuration: {ext[0] / 3600:.2f} h wall / "
          f"{ext[1] / 3600:.2f} h cpu; x{n_cfg} configurations: {n_cfg * ext[0] / 3600:.1f} h "
          f"wall / {n_cfg * ext[1] / 3600:.1f} h cpu")
    print(f"  4D output per configuration: {out_gb:.1f} GB float32 "
          f"(+{2 * out_gb:.1f} GB float64 running mean in memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
