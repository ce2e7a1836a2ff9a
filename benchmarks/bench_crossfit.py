"""Cross-fitted template-mask images against the in-sample ones and a reference read, one run.

Usage::

    python benchmarks/bench_crossfit.py                    # 0.25 GiB float32, K = 16 and 64
    python benchmarks/bench_crossfit.py --size-gib 1 --reps 3 --out benchmarks/results-crossfit.txt

Both ``core.template_mask_image`` and ``core.crossfit_template_image`` make two passes, so each
time is given as a ratio to two reference reads (BLAS float32 ``D @ v`` over the same array,
timed right before, min of the repeats) and as a ratio to ``template_mask_image`` with the same
templates.  Folds are square blocks of scan positions (cells), K = 16 and K = 64.  Peak extra
memory is measured with tracemalloc.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from tmask_validate import core


def _best(fn, reps: int) -> float:
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=0.25)
    ap.add_argument("--det", type=int, default=64, help="detector side (pixels)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    n = args.det * args.det
    m = int(args.size_gib * 2**30 / (4 * n))
    side = max(64, int(np.sqrt(m)) // 64 * 64)  # square scan, a multiple of 64 positions
    shape = (side, side, args.det, args.det)
    rng = np.random.default_rng(0)
    data = np.empty(shape, np.float32)
    for y in range(side):
        data[y] = rng.poisson(3.0, size=shape[1:]).astype(np.float32)
    d2 = data.reshape(side * side, n)
    v = rng.random(n, dtype=np.float32)
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    lines = [f"# bench_crossfit: data {shape} float32 ({data.nbytes / 2**30:.2f} GiB), "
             f"reps {args.reps}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}",
             "# k  K   ref_read_s  in_sample_s  crossfit_s  crossfit/(2 reads)  "
             "crossfit/in_sample  peak_MiB"]
    for k in (1, 4, 16):
        t = rng.normal(size=(k, side, side))
        core.template_mask_image(data[:4], t[:, :4])  # compile outside the timings
        core.crossfit_template_image(data[:4], t[:, :4], (yy[:4] // 2) % 2)
        for n_side in (4, 8):
            cell = side // n_side
            folds = (yy // cell) * n_side + xx // cell
            ref = _best(lambda: d2 @ v, args.reps)
            t_in = _best(lambda t=t: core.template_mask_image(data, t), args.reps)
            t_cf = _best(lambda t=t, f=folds: core.crossfit_template_image(data, t, f),
                         args.reps)
            peak = _peak_mib(lambda t=t, f=folds: core.crossfit_template_image(data, t, f))
            lines.append(f"{k:3d} {n_side * n_side:3d} {ref:11.3f} {t_in:12.3f} {t_cf:11.3f} "
                         f"{t_cf / (2 * ref):19.2f} {t_cf / t_in:19.2f} {peak:9.1f}")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
