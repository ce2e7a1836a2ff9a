"""Compute ceilings of the streaming kernels: one thread, data resident in the last-level cache.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_kernel_rates.py

``bench_core.py`` compares each operation with its roofline max(bytes / B, multiply-adds / F).
When an operation misses it, the question is whether the kernel's own instruction throughput
is the limit.  This script times the production kernels (the float32-tile paths that
``bench_core`` exercises, called through ``core._kernels``) with numba and BLAS on one
thread, on 32 MiB of data (rows of 16384 columns: a 128 x 128 detector) that stays in the
last-level cache between repeats (480 MiB of L3 on the machine measured in the README; where
the L3 is smaller the data come from DRAM and the rates are lower bounds), so DRAM bandwidth
plays no part.  At 1-2 MiB (L2) the statistics kernels' per-call costs (per-thread partials
and their flush) dominate and understate the streaming rate.

It prints each kernel's element rate per core; for the template and mask products also its
float32 multiply-add rate next to a one-thread 1024^2 sgemm measured in the same run; and the
time that rate implies for the 1 GiB float32 shape of ``bench_core`` (16384 x 16384 values)
on all cores: the compute floor, to be compared with the memory roofline there.  Best of
:data:`REPS` back-to-back calls.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as bc  # noqa: E402

from tmask_validate.core import _kernels as K  # noqa: E402

REPS = 15
#: columns of every test array (a 128 x 128 detector) and bytes of data per test
N_COLS = 128 * 128
DATA_BYTES = 32 * 2**20
#: the 1 GiB float32 shape of bench_core: elements per pass
BIG_ELEMENTS = 16384 * 16384


def _best(fn, reps: int = REPS) -> float:
    """Best of ``reps`` back-to-back calls after a warm-up call.

    No pause between them (unlike ``bench_core``): BLAS runs on one thread here, so nothing
    spins, and after a 0.25 s sleep the 32 MiB were no longer in this shared machine's L3
    (measured: float32 apply with 1 mask 3.5 instead of 6.9 G elements/s).
    """
    fn()
    time.sleep(0.25)
    return min(bc._time(fn, pause=False) for _ in range(reps))


def _sgemm_rate() -> float:
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    return 1024**3 / _best(lambda: a @ a, 20)


def _data(dtype: np.dtype, rows: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 200, size=(rows, N_COLS)).astype(dtype)


def _cases(x: np.ndarray) -> list:
    """(label, multiply-adds per element, call) for every kernel timed on ``x``."""
    rows = x.shape[0]
    shift = x[:4].mean(axis=0).round()
    s1, s2 = np.zeros(N_COLS), np.zeros(N_COLS)
    idx = np.arange(rows, dtype=np.int64)
    cases = []
    for k in (0, 1, 4, 16):
        t = np.random.default_rng(2).standard_normal((k, rows))
        acc = np.zeros((k, N_COLS))
        cases.append((f"statistics + {k} template products", k,
                      lambda t=t, acc=acc: K.stats_tprod(x, idx, t, shift, s1, s2, acc,
                                                         fast=True)))
    mu = x.mean(axis=0)
    for k in (1, 16):
        w = np.random.default_rng(3).random((k, N_COLS))
        plan = K.ApplyPlan(mu, w, x.dtype)
        out = np.zeros((rows, k))
        cases.append((f"apply {k} masks", k,
                      lambda w=w, out=out, plan=plan: K.apply_weights(x, mu, w, out,
                                                                       plan=plan)))
    mom = np.zeros((rows, 3))
    cases.append(("centre-of-mass moments", 0, lambda: K.moments(x, (128, 128), mom, fast=True)))
    return cases


def main() -> int:
    import numba

    cores = os.cpu_count() or 1
    f1 = _sgemm_rate()
    print(f"# bench_kernel_rates {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: numba "
          f"{numba.get_num_threads()} thread, {DATA_BYTES >> 20} MiB per test (in cache), "
          f"one-thread sgemm {f1 / 1e9:.0f} G FMA/s; floor = 16384 x 16384 elements on "
          f"{cores} cores at this rate")
    print(f"{'dtype':8s} {'kernel':34s} {'G el/s':>7s} {'G FMA/s':>8s} {'of sgemm':>8s} "
          f"{'floor ms':>8s}")
    for dname in ("float32", "uint16", "uint8"):
        dt = np.dtype(dname)
        rows = max(8, DATA_BYTES // (dt.itemsize * N_COLS))
        x = _data(dt, rows)
        el = x.size
        cases = _cases(x)
        for label, k, fn in cases:
            t_s = _best(fn)
            rate = el / t_s
            fma = k * rate
            floor_ms = BIG_ELEMENTS / (rate * cores) * 1e3
            print(f"{dname:8s} {label:34s} {rate / 1e9:7.2f} "
                  + (f"{fma / 1e9:8.1f} {fma / f1:8.2f}" if k else f"{'-':>8s} {'-':>8s}")
                  + f" {floor_ms:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
