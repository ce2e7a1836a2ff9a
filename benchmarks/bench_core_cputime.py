"""bench_core's in-memory operations timed in CPU seconds on one thread, for busy machines.

Usage (from the repository root; compare two checkouts by running each one's copy)::

    .venv/bin/python benchmarks/bench_core_cputime.py OUT.json float32,uint16,uint8

On a shared machine wall-clock times of 2-thread kernels mostly measure the scheduler (a
static OpenMP split waits for its slowest thread).  This script runs numba and BLAS with one
thread and keeps the best of REPS (env, default 3) process-CPU times per operation, with the
same datasets (0.25 GiB float32 shape, memmapped) and operations as ``bench_core.py --quick``;
the single-core roofline = max(passes x bytes / B, multiply-adds / F), with B a one-thread
BLAS ``D @ v`` read and F a one-thread 1024^2 sgemm, both in CPU time.  Writes
``{"dtype|operation": [cpu_s, roofline_s], "dtype|_rates": [B, F]}``.  Cache and memory
bandwidth are still shared with the other load: compare runs made back to back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as bc  # noqa: E402

from tmask_validate import core  # noqa: E402


def _cpu_s(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _operations(data, rng):
    """(label, fn, passes, multiply-adds) as in bench_core._bench_dataset."""
    sy, sx, ky, kx = data.shape
    m, n = sy * sx, ky * kx
    ops = []
    for k in (1, 4, 16):
        t = rng.random((k, sy, sx))
        ops.append((f"template_mask_image k={k}",
                    lambda t=t: core.template_mask_image(data, t), 2, (2 * k + 2) * m * n))
    t1 = rng.random((sy, sx))
    ops.append(("apply_mask(pcc_mask) k=1",
                lambda: core.apply_mask(data, core.pcc_mask(data, t1)), 2, 4 * m * n))
    w16 = rng.random((16, ky, kx))
    ops.append(("virtual_images k=16 weighted", lambda: core.virtual_images(data, w16), 1,
                16 * m * n))
    seg = bc._segmented(ky)
    ops.append(("virtual_images k=16 binary", lambda: core.virtual_images(data, seg), 1,
                16 * m * n))
    ops.append(("center_of_mass", lambda: core.center_of_mass(data), 1, 3 * m * n))
    ops.append(("column_stats", lambda: core.column_stats(data), 1, 2 * m * n))
    return ops


def main(out_path: str, dtypes: str) -> int:
    reps = int(os.environ.get("REPS", "3"))
    shape = (64, 64, 128, 128)
    m, n = shape[0] * shape[1], shape[2] * shape[3]
    out = {}
    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    ref = np.random.default_rng(9).random((m, n), dtype=np.float32)
    v = np.ones(n, np.float32)
    a = np.random.default_rng(8).random((1024, 1024), dtype=np.float32)
    for dname in dtypes.split(","):
        path = tmp / f"{dname}.npy"
        data = bc._make_memmap(path, shape, np.dtype(dname), seed=1)
        ops = _operations(data, np.random.default_rng(2))
        for _, fn, _, _ in ops:  # warm-up (compilation, page cache)
            fn()
        best = {label: np.inf for label, *_ in ops}
        read_s = np.inf
        gemm_s = np.inf
        for _ in range(reps):  # interleaved: roofline read, operation, ...
            for label, fn, _, _ in ops:
                read_s = min(read_s, _cpu_s(lambda: ref @ v))
                best[label] = min(best[label], _cpu_s(fn))
            gemm_s = min(gemm_s, _cpu_s(lambda: a @ a))
        bw = ref.nbytes / read_s
        fma = 1024**3 / gemm_s
        for label, _, npass, fmas in ops:
            out[f"{dname}|{label}"] = (best[label], max(npass * data.nbytes / bw, fmas / fma))
        out[f"{dname}|_rates"] = (bw, fma)
        del data
        path.unlink()
    tmp.rmdir()
    Path(out_path).write_text(json.dumps(out))
    print("load", os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "float32"))
