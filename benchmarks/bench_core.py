"""Benchmark of the streaming core against a reference streaming read, measured side by side.

Usage::

    python benchmarks/bench_core.py            # 1 GiB float32 + the same shape in uint16
    python benchmarks/bench_core.py --small    # 64 MiB, quick
    python benchmarks/bench_core.py --size-gib 0.5 --reps 5 --out benchmarks/results-core.txt

The reference is one streaming read of the float32 array by BLAS, ``D @ v`` (m x n times n),
timed right before every operation in the same run (min of the repeats) because the load of a
shared machine drifts.  Every ratio is to that reference (for the template mask -- two passes
-- to two reference reads); wall-time and process-CPU-time ratios are both printed (the CPU
ratio is less sensitive to other processes).  The uint16 dataset has the same shape (half the
bytes); its ratios are also to the float32 reference read, as a uint16 array has no BLAS read.
Peak extra memory is measured with tracemalloc on a memmapped copy of the float32 dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from tmask_validate import core


def _best(fn, reps: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (s) over ``reps`` calls."""
    best = np.inf
    best_cpu = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _make(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=dtype)
    for y in range(shape[0]):
        if np.dtype(dtype).kind == "f":
            out[y] = rng.random(shape[1:], dtype=np.float32)
        else:
            out[y] = rng.integers(0, 4000, size=shape[1:], dtype=dtype)
    return out


def _segmented(det: int) -> dict[str, np.ndarray]:
    """16 binary detectors: 4 annuli x 4 azimuthal quadrants (a segmented detector)."""
    c = (det / 2 - 0.5, det / 2 - 0.5)
    theta = core.scattering_angle_mrad((det, det), center_px=c, mrad_per_px=1.0)
    yy, xx = np.meshgrid(np.arange(det) - c[0], np.arange(det) - c[1], indexing="ij")
    quadrant = ((np.arctan2(yy, xx) + np.pi) // (np.pi / 2)).astype(int) % 4
    edges = np.linspace(0, det / 2, 5)
    return {f"r{i}q{q}": (theta >= edges[i]) & (theta < edges[i + 1]) & (quadrant == q)
            for i in range(4) for q in range(4)}


def _libertem_runner(data: np.ndarray):
    """Return a callable running LiberTEM's ApplyMasksUDF (inline executor), or None."""
    try:
        import libertem.api as lt
        from libertem.executor.inline import InlineJobExecutor
        from libertem.udf.masks import ApplyMasksUDF
    except Exception:  # pragma: no cover - optional
        return None
    ctx = lt.Context(executor=InlineJobExecutor())
    ds = ctx.load("memory", data=data, num_partitions=max(1, data.nbytes // (256 * 2**20)))
    masks = np.random.default_rng(1).random((16, *data.shape[2:])).astype(np.float32)
    copies = [np.array(mk) for mk in masks]  # each factory carries only its own mask
    udf = ApplyMasksUDF(mask_factories=[(lambda m_=mk: m_) for mk in copies])

    def run():
        ctx.run_udf(dataset=ds, udf=udf)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="float32 dataset size (GiB)")
    p.add_argument("--small", action="store_true", help="64 MiB datasets, quick run")
    p.add_argument("--det", type=int, default=128, help="detector side (pixels)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-memmap", action="store_true", help="skip the memmap/tracemalloc test")
    p.add_argument("--no-libertem", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = p.parse_args(argv)
    size = 1 / 16 if a.small else a.size_gib
    n = a.det * a.det
    m = max(4, int(size * 2**30) // (4 * n))
    sy = int(np.sqrt(m))
    sx = m // sy
    shape = (sy, sx, a.det, a.det)
    lines: list[str] = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    emit(f"# bench_core  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  host cpus={os.cpu_count()}"
         f"  load(1,5,15)={os.getloadavg()}")
    import numba

    emit(f"# numpy {np.__version__}, numba {numba.__version__} ({numba.get_num_threads()} "
         f"threads, layer {numba.config.THREADING_LAYER}), shape {shape}")
    f32 = _make(shape, np.float32)
    u16 = _make(shape, np.uint16, seed=1)
    rng = np.random.default_rng(2)
    D32 = f32.reshape(sy * sx, n)
    v = np.ones(n, np.float32)
    # warm-up / compile
    for d in (f32, u16):
        small = d[:1, :4]
        core.template_mask_image(small, rng.random((16, 1, 4)))
        core.virtual_images(small, rng.random((16, a.det, a.det)))
        core.center_of_mass(small)

    refs: list[tuple[float, float]] = []

    def ref():
        t = _best(lambda: D32 @ v, a.reps)
        refs.append(t)
        return t

    rows = []  # (dataset, label, (wall, cpu), passes, local reference (wall, cpu))

    def measure(ds, label, fn, npass):
        r_local = ref()  # a reference read right before each operation (load drifts)
        rows.append((ds, label, _best(fn, a.reps), npass, r_local))

    for name, d in (("float32", f32), ("uint16", u16)):
        st = core.column_stats(d)
        for k in (1, 4, 16):
            t = rng.random((k, sy, sx))
            msk = rng.normal(size=(k, a.det, a.det))
            measure(name, f"pcc_mask k={k} (pass 1)", lambda t=t, d=d: core.pcc_mask(d, t), 1)
            measure(name, f"apply_mask k={k} (pass 2, stats given)",
                    lambda m_=msk, d=d, s_=st: core.apply_mask(d, m_, stats=s_), 1)
            measure(name, f"template mask+image k={k} (2 passes)",
                    lambda t=t, d=d: core.template_mask_image(d, t), 2)
        measure(name, "column_stats (1 pass)", lambda d=d: core.column_stats(d), 1)
        vmasks = rng.random((16, a.det, a.det))
        measure(name, "virtual_images k=16 weighted (1 pass)",
                lambda d=d, w_=vmasks: core.virtual_images(d, w_), 1)
        seg = _segmented(a.det)
        measure(name, "virtual_images k=16 binary segmented (1 pass)",
                lambda d=d, w_=seg: core.virtual_images(d, w_), 1)
        measure(name, "center_of_mass (1 pass)", lambda d=d: core.center_of_mass(d), 1)
        if not a.no_libertem:
            run = _libertem_runner(d)
            if run is not None:
                run()
                measure(name, "LiberTEM ApplyMasksUDF k=16 inline (f32)", run, 1)
            elif name == "float32":
                emit("# LiberTEM not importable: ApplyMasksUDF comparison skipped")
    r = min(x[0] for x in refs)
    rc = min(x[1] for x in refs)
    emit(f"# reference read (BLAS float32 D@v on {D32.nbytes / 2**30:.3f} GiB): best "
         f"{r * 1e3:.1f} ms wall / {rc * 1e3:.1f} ms CPU; spread of the per-operation "
         f"reference reads {r * 1e3:.1f}-{max(x[0] for x in refs) * 1e3:.1f} ms"
         f" (best = {D32.nbytes / r / 1e9:.1f} GB/s)")
    emit("# ratio = time / (passes x reference read measured right before the operation);")
    emit("# CPU ratio = process CPU time / (passes x CPU time of that reference read)")
    emit(f"{'dataset':8s} {'operation':42s} {'wall ms':>8s} {'ref ms':>7s} {'ratio':>6s} "
         f"{'CPU ms':>8s} {'CPU ratio':>9s}")
    for ds, label, (tw, tc), npass, (rw, rcpu) in rows:
        emit(f"{ds:8s} {label:42s} {tw * 1e3:8.1f} {rw * 1e3:7.1f} {tw / (npass * rw):6.2f} "
             f"{tc * 1e3:8.1f} {tc / (npass * rcpu):9.2f}")
    if not a.no_memmap:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            path = Path(tmp) / "f32.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            mm[...] = f32
            mm.flush()
            del mm
            data = np.load(path, mmap_mode="r")
            t16 = rng.random((16, sy, sx))
            vm = rng.random((16, a.det, a.det))  # weighted (dense kernel)
            tracemalloc.start()
            t0 = time.perf_counter()
            core.template_mask_image(data, t16)
            core.virtual_images(data, vm)
            core.center_of_mass(data)
            el = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            emit(f"# memmap {data.nbytes / 2**30:.3f} GiB: template mask+image k=16, 16 virtual"
                 f" detectors, CoM: {el:.2f} s, tracemalloc peak {peak / 2**20:.1f} MiB "
                 f"(limit 256 MiB)")
    emit(f"# load at end (1,5,15)={os.getloadavg()}")
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
