"""Cold-file A/B tests of the MIB memmap path: a read-ahead first or not, one thread or two.

Usage (from the repository root; needs about 1 GiB of free disk in ``TMPDIR``)::

    .venv/bin/python benchmarks/bench_mib_cold.py [--gib 1.0] [--trials 3]

Writes a 12-bit MIB file of uint16 counts (scan (256, 128), 128 x 128 frames at 1 GiB) and
times 16 virtual detectors on it, each run after evicting the file from the (guest) page
cache, with the scan shape given.  Variants, interleaved in the order A, B, B, A in every
trial so that drift and the virtual disk's own caching favour neither:

* read-ahead: an asynchronous ``POSIX_FADV_WILLNEED`` of the whole file (``io._read_ahead``,
  what the frame-header scan does) right before the pass, against the pass alone (as
  ``io.mib_memmap`` with a scan shape ships: the kernel's fault-driven read-ahead only);
* threads: numba on 2 threads against 1 (no read-ahead).

A plain cold ``readinto`` of the file is timed once per trial for reference.  Every time is
printed: on a shared VM the spread between runs is part of the result.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as bc  # noqa: E402

from tmask_validate import core, io  # noqa: E402


def _write(path: Path, gib: float, det: int = 128) -> tuple[int, int]:
    sx = 128
    sy = max(1, int(gib * 2**30) // (2 * det * det * sx))
    rs = np.random.default_rng(3)
    data = np.empty((sy, sx, det, det), np.uint16)
    for y in range(sy):
        data[y] = rs.integers(0, 4096, size=(sx, det, det), dtype=np.uint16)
    io.write_mib(path, data, bit_depth=12)
    return sy, sx


def main(argv=None) -> int:
    import numba

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--trials", type=int, default=3)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "scan.mib"
        sy, sx = _write(path, a.gib)
        w16 = np.random.default_rng(0).random((16, 128, 128))
        state = {"ahead": False}

        def run():
            if state["ahead"]:
                io._read_ahead(path, path.stat().st_size)
            return core.virtual_images(io.mib_memmap(path, scan_shape=(sy, sx)), w16)

        def cold(setup) -> float:
            setup()
            gc.collect()  # (an open mapping would keep the file in the page cache)
            if not bc._evict([path]):
                raise SystemExit("could not evict the file from the page cache")
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0

        def readahead(on: bool):
            def setup():
                numba.set_num_threads(2)
                state["ahead"] = on
            return setup

        def threads(nt: int):
            def setup():
                state["ahead"] = False
                numba.set_num_threads(nt)
            return setup

        run()
        buf = np.empty(8 * 2**20, np.uint8)
        print(f"# bench_mib_cold {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: "
              f"{path.stat().st_size / 2**30:.2f} GiB 12-bit MIB, scan ({sy}, {sx}), 16 virtual "
              f"detectors, cold = evicted from the guest page cache before each run (s)")
        res: dict[str, list[float]] = {}
        pairs = [("read-ahead first", readahead(True), "pass alone", readahead(False)),
                 ("2 threads", threads(2), "1 thread", threads(1))]
        for trial in range(a.trials):
            for na, sa, nb, sb in pairs:
                for name, setup in ((na, sa), (nb, sb), (nb, sb), (na, sa)):
                    res.setdefault(name, []).append(cold(setup))
            threads(2)()
            bc._evict([path])
            t0 = time.perf_counter()
            bc._read_file(path, buf)
            res.setdefault("plain cold readinto", []).append(time.perf_counter() - t0)
            print(f"# after trial {trial + 1}", flush=True)
        for name, ts in res.items():
            print(f"{name:22s} min {min(ts):6.3f}  median {float(np.median(ts)):6.3f}  all "
                  + " ".join(f"{t:.3f}" for t in ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
