"""Realism check, standalone: the pipeline of tests/test_realism.py at several doses.

Simulates once (abTEM, ~1 min on 2 cores), then builds and analyses the synthetic experiment at
each dose and writes the numbers to ``benchmarks/results-realism.txt`` (and a JSON next to it).

Usage::

    python benchmarks/realism_report.py [--doses 1e4 1e5 1e6] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from tmask_validate import realism

ROOT = Path(__file__).resolve().parents[1]


def _jsonable(res: dict) -> dict:
    skip = {"sites", "truth_sites"}
    return json.loads(json.dumps({k: v for k, v in res.items() if k not in skip},
                                 default=lambda o: o.tolist() if isinstance(o, np.ndarray)
                                 else str(o)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doses", type=float, nargs="+", default=[1e4, 1e5, 1e6],
                    help="doses in e-/Å² (the test uses 1e6)")
    ap.add_argument("--workdir", default=None, help="keep the stores and files here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-realism.txt"))
    args = ap.parse_args(argv)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="realism-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
    t0 = time.perf_counter()
    s = realism.settings()
    stores = realism.simulate_inputs(work, s, root=ROOT)
    blocks, results = [], []
    for dose in args.doses:
        res = realism.run(work / f"dose_{dose:.0e}", {"dose_e_per_A2": float(dose)}, root=ROOT,
                          stores=stores)
        res["simulation_wall_s"] = {k: float(v) for k, v in stores.items()
                                    if k.endswith("wall_s")}
        ok_masks = res["mask_pcc"]["O"] >= 0.8 and res["mask_pcc"]["Li"] >= 0.8
        ok_t = abs(res["thickness_error_nm"]) <= 5.0
        text = realism.format_report(res)
        text += (f"\n  criteria: mask PCC O, Li >= 0.8: {'PASS' if ok_masks else 'FAIL'}; "
                 f"|thickness error| <= 5 nm: {'PASS' if ok_t else 'FAIL'}")
        print(text + "\n", flush=True)
        blocks.append(text)
        results.append(_jsonable(res))
    total = time.perf_counter() - t0
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = platform.processor() or platform.machine()
    header = (f"# tmask_validate realism check ({stamp}, {cpu}); "
              f"total {total:.0f} s\n# produced by benchmarks/realism_report.py; the test "
              f"(tests/test_realism.py) runs the same pipeline at 1e6 e/Å²\n")
    out = Path(args.out)
    out.write_text(header + "\n" + "\n\n".join(blocks) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"-> {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
