"""Cost of a thickness series read from abTEM exit planes vs separate runs.

One multislice pass with ``exit_planes`` at every thickness of the series (pixelated +
annular detectors at each plane) against separate runs at each thickness; the series must
cost <= 1.2x the deepest single run (the separate runs together cost ~ the sum).

Usage::

    python benchmarks/bench_thickness_series.py [--config config/smoke.yaml]
        [--structure LiFePO4_001] [--thicknesses 2 4 6 8] [--repeat 3]

Prints the timings (best of ``--repeat``, wall and CPU) and the ratio series / deepest.
"""

from __future__ import annotations

import argparse
import copy
import time

from tmask_validate import simulate as S
from tmask_validate import structures
from tmask_validate.config import load_config


def _time(fn, repeat: int) -> tuple[float, float]:
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/smoke.yaml")
    ap.add_argument("--structure", default="LiFePO4_001")
    ap.add_argument("--thicknesses", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    cfg = copy.deepcopy(load_config(args.config))
    cfg["structures"][args.structure]["thicknesses_nm"] = list(args.thicknesses)
    sim = cfg["simulation"]
    sim["phonons"]["rms_displacement_A"] = {k: 0.0 for k in sim["phonons"]["rms_displacement_A"]}
    setup = S._structure_setup(cfg, args.structure)
    scan = setup["scan"]
    entry = cfg["structures"][args.structure]
    per = len(setup["slices"]) // setup["atoms"].info["n_repeats_z"]

    def run(atoms, planes, slices):
        return S.run_configuration(atoms, sim, scan_start_A=scan["start_A"],
                                   scan_step_A=scan["step_A"], scan_shape=scan["shape"],
                                   exit_planes=planes, slices_A=slices)

    run(setup["atoms"], setup["planes"][-1:], setup["slices"])  # warm-up (imports, JIT)
    series = _time(lambda: run(setup["atoms"], setup["planes"], setup["slices"]), args.repeat)
    singles = []
    for t_nm in setup["thickness_nm"]:
        atoms = structures.build(entry["builder"], thickness_nm=float(t_nm),
                                 repeats=tuple(entry.get("repeats", (1, 1))))
        n = atoms.info["n_repeats_z"]
        singles.append(_time(lambda a=atoms, n=n: run(a, (n * per - 1,),
                                                       setup["slices"][: n * per]),
                             args.repeat))
    gy, gx = S.grid_gpts((setup["atoms"].cell[1, 1], setup["atoms"].cell[0, 0]),
                         sim["sampling_A"])
    print(f"structure {args.structure}; grid {gy}x{gx}; scan {scan['shape']}; "
          f"{len(setup['slices'])} slices of {setup['slices'][0]:.3f} Å; detectors: pixelated "
          f"to {sim['max_angle_mrad']} mrad + {len(sim['detectors'])} annular")
    print(f"thicknesses (nm): {[round(float(t), 3) for t in setup['thickness_nm']]}")
    for t_nm, (w, c) in zip(setup["thickness_nm"], singles, strict=True):
        print(f"  single run {t_nm:7.3f} nm: wall {w:7.2f} s  cpu {c:7.2f} s")
    print(f"  series ({len(singles)} exit planes): wall {series[0]:7.2f} s  cpu {series[1]:7.2f} s")
    total = sum(w for w, _ in singles)
    print(f"  separate runs together: wall {total:7.2f} s")
    ratio_wall = series[0] / singles[-1][0]
    ratio_cpu = series[1] / singles[-1][1]
    print(f"ratio series / deepest single run: wall {ratio_wall:.3f}, cpu {ratio_cpu:.3f} "
          f"(requirement <= 1.2); series / all separate runs: {series[0] / total:.3f}")
    return 0 if max(ratio_wall, ratio_cpu) <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
