"""Live template-mask imaging: throughput and latency, side by side with LiberTEM-live.

Usage::

    python benchmarks/bench_live.py                      # all parts
    python benchmarks/bench_live.py --skip-sim --skip-libertem
    python benchmarks/bench_live.py --out benchmarks/results-live.txt

Parts (256 x 256 12-bit "binary" U16 frames, k = 4 float masks, float64 sums):

1. In-memory frame source (:class:`tmask_validate.live.BytesSource`, the exact Merlin framing
   in RAM): decode only, masks only, and the whole :class:`~tmask_validate.live.LiveImager`
   with and without the zarr row store -- frames/s (best of the repeats).
2. ``libertem-live-mib-sim --cached MEMFD`` on loopback (its fastest mode, sendfile from
   memory): a client that only drains the socket (the simulator's own ceiling), our
   imager (frames/s; latency = first byte of a scan row received -> that row in the zarr
   store), and LiberTEM-live's ``ApplyMasksUDF`` on the same stream (LiveContext, its
   default executor) when it runs here.

The machine is shared (load printed before and after); every number is the best of the
repeats. The target is >= 10,000 frames/s from memory on 2 cores and keeping up with the
simulator (we must not be the bottleneck).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# as the ``live`` command does (before numba's OpenMP pool starts): idle workers sleep instead
# of spinning while the receive path waits for data
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from tmask_validate import live  # noqa: E402
from tmask_validate.io import write_mib  # noqa: E402

DET = (256, 256)


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:  # pragma: no cover
        return "?"


def _stream(frames: np.ndarray, tmp: Path, scan) -> bytes:
    mib = write_mib(tmp / "b.mib", frames.reshape(scan + DET), bit_depth=12)
    hdr = mib.with_suffix(".hdr").read_bytes()
    raw = mib.read_bytes()
    n = scan[0] * scan[1]
    fb = len(raw) // n
    parts = [b"MPX,%010d," % (len(hdr) + 1), hdr]
    pre = b"MPX,%010d," % (fb + 1)
    mv = memoryview(raw)
    for i in range(n):
        parts += [pre, mv[i * fb:(i + 1) * fb]]
    return b"".join(parts)


def _best(fn, reps: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (s, all threads) over ``reps`` calls."""
    best = np.inf
    best_cpu = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _rate(n: int, t: tuple[float, float]) -> str:
    return f"{n / t[0]:8.0f} frames/s wall  {n / t[1]:8.0f} frames/CPU-s"


def part_memory(reps: int, scan, lines: list[str], tmp: Path) -> None:
    rng = np.random.default_rng(0)
    n = scan[0] * scan[1]
    base = rng.poisson(30, size=(64,) + DET).astype(np.uint16)
    frames = base[np.arange(n) % 64]
    masks = rng.normal(size=(4,) + DET)
    lm = live.LiveMasks(masks)
    data = _stream(frames, tmp, scan)
    fmt = live.FrameFormat(384, "U16", 12, 1, DET, DET[0] * DET[1] * 2)
    sx = scan[1]
    stride = 15 + fmt.frame_bytes
    blk = np.frombuffer(data, np.uint8, count=sx * stride,
                        offset=len(data) - n * stride).reshape(sx, stride)
    px = blk[:, 15 + 384:]
    cnt = np.empty((sx, DET[0] * DET[1]), np.uint16)
    out = np.empty((sx, 4))
    live.decode_frames(px, fmt, cnt)
    lm.apply(cnt, out)  # compile / warm

    def rows(fn):
        def go():
            for _ in range(scan[0]):
                fn()
        return go

    t_dec = _best(rows(lambda: live.decode_frames(px, fmt, cnt)), reps)
    t_app = _best(rows(lambda: lm.apply(cnt, out)), reps)

    def run(rpw, store):
        def go():
            st = live.ZarrRowStore(tmp / "s.zarr", lm.names, scan) if store else None
            res = live.LiveImager(lm, scan, store=st, rows_per_write=rpw).run(
                live.BytesSource(data))
            assert res.complete
            go.res = res
        return go

    lines.append(f"## in-memory source: {n} frames 256x256 U16 (12-bit), k = 4 float masks, "
                 f"scan {scan[0]} x {scan[1]}; numba threads = "
                 f"{os.environ.get('NUMBA_NUM_THREADS', 'default')}, load {_uptime()}")
    lines.append(f"decode only (big-endian -> native uint16)   {_rate(n, t_dec)}")
    lines.append(f"4 masks only (core apply_weights, float64)  {_rate(n, t_app)}")
    for rpw, store in [(1, None), (4, None), (1, "sync"), (4, "sync")]:
        g = run(rpw, store)
        g()
        t = _best(g, reps)
        lat = g.res.row_times
        lat_ms = (lat[:, 1] - lat[:, 0]) * 1e3
        what = {None: "none", "sync": "zarr"}[store]
        lines.append(f"LiveImager rows/block={rpw} store={what:16s} "
                     f"{_rate(n, t)}   row latency median {np.median(lat_ms):6.2f} ms"
                     f" (max {lat_ms.max():6.2f})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sim(hdr: Path, scan, log: Path):
    sim = shutil.which("libertem-live-mib-sim") or str(Path(sys.executable).parent
                                                       / "libertem-live-mib-sim")
    ports = [_free_port() for _ in range(3)]
    fh = open(log, "w")
    proc = subprocess.Popen([sim, str(hdr), "--nav-shape", str(scan[0]), str(scan[1]),
                             "--host", "127.0.0.1", "--data-port", str(ports[0]),
                             "--control-port", str(ports[1]), "--trigger-port", str(ports[2]),
                             "--cached", "MEMFD"], stdout=fh, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while "DataSocketServer listening" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            raise RuntimeError("simulator did not start: " + log.read_text()[-1500:])
        time.sleep(0.2)
    return proc, fh, ports


def _drain(port: int, total: int) -> float:
    s = live.connect("127.0.0.1", port, timeout_s=20)
    buf = bytearray(8 * 2**20)
    mv = memoryview(buf)
    got = 0
    t0 = None
    while got < total:
        r = s.recv_into(mv, min(len(buf), total - got))
        if r == 0:
            break
        if t0 is None:
            t0 = time.perf_counter()
        got += r
    dt = time.perf_counter() - t0
    s.close()
    return dt


def part_sim(reps: int, scan, lines: list[str], tmp: Path, libertem: bool) -> None:
    rng = np.random.default_rng(1)
    n = scan[0] * scan[1]
    base = rng.poisson(30, size=(64,) + DET).astype(np.uint16)
    frames = base[np.arange(n) % 64].reshape(scan + DET)
    mib = write_mib(tmp / "sim.mib", frames, bit_depth=12)
    masks = rng.normal(size=(4,) + DET)
    lm = live.LiveMasks(masks)
    proc, fh, ports = _sim(mib.with_suffix(".hdr"), scan, tmp / "sim.log")
    lines.append(f"## libertem-live-mib-sim --cached MEMFD, loopback: {n} frames 256x256 U16, "
                 f"scan {scan[0]} x {scan[1]}, k = 4; load {_uptime()}")
    try:
        hdr_len = 15 + len(mib.with_suffix(".hdr").read_bytes())
        total = hdr_len + n * (15 + 384 + DET[0] * DET[1] * 2)
        t = min(_drain(ports[0], total) for _ in range(reps))  # the client's CPU is ~idle
        lines.append(f"drain only (simulator ceiling)              {n / t:10.0f} frames/s "
                     f"({total / t / 2**30:.2f} GiB/s)")
        for rpw in (1, 4):
            best = None
            best_cpu = np.inf
            for _ in range(reps):
                st = live.ZarrRowStore(tmp / "live.zarr", lm.names, scan)
                s = live.connect("127.0.0.1", ports[0], timeout_s=20)
                c0 = time.process_time()
                res = live.LiveImager(lm, scan, store=st, rows_per_write=rpw).run(
                    live.SocketSource(s))
                best_cpu = min(best_cpu, time.process_time() - c0)
                s.close()
                assert res.complete, res.reason
                if best is None or res.elapsed_s < best.elapsed_s:
                    best = res
            lat_ms = (best.row_times[:, 1] - best.row_times[:, 0]) * 1e3
            lines.append(f"LiveImager rows/block={rpw} + zarr store "
                         f"{_rate(n, (best.elapsed_s, best_cpu))}   row latency median "
                         f"{np.median(lat_ms):6.2f} ms (95th {np.percentile(lat_ms, 95):6.2f}, "
                         f"max {lat_ms.max():6.2f})")
        if libertem:
            lines.extend(_libertem_live(ports, masks, scan, reps))
    finally:
        proc.kill()
        proc.wait(10)
        fh.close()


def _libertem_live(ports, masks, scan, reps) -> list[str]:
    try:
        from libertem.udf.masks import ApplyMasksUDF
        from libertem_live.api import LiveContext
    except ImportError as exc:  # pragma: no cover
        return [f"LiberTEM-live not importable: {exc}"]
    n = scan[0] * scan[1]
    out = []
    try:
        ctx = LiveContext()
    except Exception as exc:  # pragma: no cover
        return [f"LiberTEM-live LiveContext failed: {exc!r}"]
    try:
        m32 = [m.astype(np.float32) for m in masks]
        factories = [(lambda m_=m: m_) for m in m32]
        best = np.inf
        best_first = np.inf
        for _ in range(reps):
            with ctx.make_connection("merlin").open(
                    data_host="127.0.0.1", data_port=ports[0], api_host="127.0.0.1",
                    api_port=ports[1]) as conn:
                pending = conn.wait_for_acquisition(30.0)
                if pending is None:
                    return ["LiberTEM-live: no acquisition within 30 s"]
                aq = ctx.make_acquisition(conn=conn, pending_aq=pending, nav_shape=scan)
                udf = ApplyMasksUDF(mask_factories=factories)
                t0 = time.perf_counter()
                first = None
                last = None
                for part in ctx.run_udf_iter(dataset=aq, udf=udf):
                    if first is None:
                        first = time.perf_counter() - t0
                    last = part
                dt = time.perf_counter() - t0
                assert last is not None
                img = last.buffers[0]["intensity"].data
                assert img.shape == scan + (4,) and np.isfinite(img).all()
            best = min(best, dt)
            best_first = min(best_first, first)
        out.append(f"LiberTEM-live ApplyMasksUDF (LiveContext default executor, float32) "
                   f"{n / best:10.0f} frames/s   first partial result after "
                   f"{best_first * 1e3:6.0f} ms (incl. startup)")
    except Exception as exc:  # pragma: no cover - report, do not hide
        out.append(f"LiberTEM-live ApplyMasksUDF failed here: {exc!r}")
    finally:
        ctx.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mem-scan", type=int, nargs=2, default=(16, 256))
    p.add_argument("--sim-scan", type=int, nargs=2, default=(32, 128))
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-libertem", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lines = [f"# bench_live  {time.strftime('%Y-%m-%d %H:%M')}  cores={os.cpu_count()}  "
             f"load at start {_uptime()}  (shared machine: best of {a.reps})  "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if not a.skip_memory:
            part_memory(a.reps, tuple(a.mem_scan), lines, tmp)
        print("\n".join(lines), flush=True)
        if not a.skip_sim:
            part_sim(a.reps, tuple(a.sim_scan), lines, tmp, not a.skip_libertem)
    lines.append(f"# load at end {_uptime()}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
