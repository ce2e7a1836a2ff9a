"""Live imaging from a Merlin stream (tmask_validate.live, ``tmask-validate live``).

The counterpart is LiberTEM-live's ``libertem-live-mib-sim`` (written by others) replaying MIB
files written by :func:`tmask_validate.io.write_mib`; the reference is the offline
:func:`tmask_validate.core.apply_mask` of the same data. Fault cases (dropped connection,
wrong frame size, Ctrl-C, the mid-scan view screenshot) use a small in-test server that sends
the same byte stream as the simulator but stops where the test says. Everything on
127.0.0.1 with free ports and bounded timeouts; every process is killed in teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tmask_validate import core
from tmask_validate.cli import main as cli_main
from tmask_validate.io import load, write_mib
from tmask_validate.live import (
    BytesSource,
    LiveImager,
    LiveMasks,
    MerlinProtocolError,
    load_masks,
    read_live_store,
)

SIM = shutil.which("libertem-live-mib-sim") or str(Path(sys.executable).parent
                                                   / "libertem-live-mib-sim")
HAVE_SIM = Path(SIM).exists()
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="libertem-live-mib-sim not installed "
                                                    "(pip install libertem-live)")
SCAN = (5, 7)  # non-square on purpose
CLI = [sys.executable, "-m", "tmask_validate.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dyadic_masks(k: int, shape, seed: int = 3) -> np.ndarray:
    """Masks on a 1/4 grid: every float64 partial sum of integer counts is exact."""
    return np.random.default_rng(seed).integers(-8, 9, size=(k, *shape)) / 4.0


def counts(bits: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**bits, size=shape)


def stream_bytes(mib: Path) -> tuple[bytes, list[bytes]]:
    """(acquisition message, frame messages) exactly as the Merlin / the simulator frame them."""
    hdr = mib.with_suffix(".hdr").read_bytes()
    head = b"MPX,%010d," % (len(hdr) + 1) + hdr
    raw = mib.read_bytes()
    fields = raw[:64].split(b",")
    hb = int(fields[2])
    # frame size: from the file length and the frame count in the .hdr
    n = int([ln for ln in hdr.decode().splitlines() if ln.startswith("Frames in Acq")][0]
            .split("\t")[1])
    fb = len(raw) // n
    assert fb * n == len(raw) and fb > hb
    frames = [b"MPX,%010d," % (fb + 1) + raw[i * fb:(i + 1) * fb] for i in range(n)]
    return head, frames


class StagedServer:
    """One-connection Merlin-like data server on 127.0.0.1 that sends in stages.

    ``stages`` is a list of byte strings; after each stage but the last it waits for
    ``release`` (an Event) -- or closes the connection there when ``drop_after`` says so.
    """

    def __init__(self, stages: list[bytes], *, drop_after: int | None = None,
                 pause_s: float = 0.0) -> None:
        self.stages = stages
        self.drop_after = drop_after
        self.pause_s = pause_s
        self.release = threading.Event()
        self.sent_stage = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            for i, stage in enumerate(self.stages):
                try:
                    conn.sendall(stage)
                except OSError:
                    return
                self.sent_stage.set()
                if self.drop_after is not None and i == self.drop_after:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if i < len(self.stages) - 1:
                    self.release.wait(30)
                    if self.pause_s:
                        time.sleep(self.pause_s)
            time.sleep(0.2)

    def close(self) -> None:
        self.release.set()
        self.sock.close()
        self.thread.join(5)


# ----------------------------------------------------------------------------------------------
# the simulator
# ----------------------------------------------------------------------------------------------
class Sim:
    def __init__(self, hdr: Path, scan, extra=(), log: Path | None = None) -> None:
        self.data_port, self.control_port, self.trigger_port = (free_port() for _ in range(3))
        self.log = log or hdr.with_suffix(f".sim{self.data_port}.log")
        self.fh = open(self.log, "w")
        self.proc = subprocess.Popen(
            [SIM, str(hdr), "--nav-shape", str(scan[0]), str(scan[1]), "--host", "127.0.0.1",
             "--data-port", str(self.data_port), "--control-port", str(self.control_port),
             "--trigger-port", str(self.trigger_port), *extra],
            stdout=self.fh, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout_s: float = 180.0) -> None:
        # six simulators import the LiberTEM stack at once: ~45 s was too short on a busy 2-core box
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if "DataSocketServer listening" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"simulator not listening after {timeout_s} s")

    def control(self, *commands: str) -> None:
        """Send CMD,<name> messages on the control port (STARTACQUISITION, SOFTTRIGGER)."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as c:
            for cmd in commands:
                body = f"CMD,{cmd}".encode()
                c.sendall(b"MPX,%010d," % (len(body) + 1) + body)
                c.recv(1024)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.fh.close()


CASES = [(bits, raw) for bits in (1, 6, 12) for raw in (False, True)]


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """One simulator per (bit depth, raw/binary) case, all started at once."""
    if not HAVE_SIM:
        pytest.skip("libertem-live-mib-sim not installed (pip install libertem-live)")
    base = tmp_path_factory.mktemp("live_sims")
    out = {}
    try:
        for i, (bits, raw) in enumerate(CASES):
            det = (64, 64) if raw and bits == 1 else (24, 40)
            if raw and bits != 1:
                det = (24, 48)
            data = counts(bits, SCAN + det, seed=i)
            mib = write_mib(base / f"b{bits}_{'raw' if raw else 'bin'}.mib", data,
                            bit_depth=bits, raw=raw)
            out[(bits, raw)] = (Sim(mib.with_suffix(".hdr"), SCAN), mib, data)
        for sim, _, _ in out.values():
            sim.wait_listening()
        yield out
    finally:
        for sim, _, _ in out.values():
            sim.kill()


def _live_from_port(port: int, masks: LiveMasks, scan=SCAN):
    from tmask_validate.live import SocketSource, connect

    s = connect("127.0.0.1", port, timeout_s=20)
    try:
        return LiveImager(masks, scan).run(SocketSource(s, idle_timeout_s=30))
    finally:
        s.close()


@needs_sim
@pytest.mark.timeout(120)
@pytest.mark.parametrize("bits,raw", CASES, ids=[f"{b}bit-{'raw' if r else 'binary'}"
                                                 for b, r in CASES])
def test_live_equals_offline_apply_mask(sims, bits, raw):
    sim, mib, data = sims[(bits, raw)]
    det = data.shape[2:]
    m = dyadic_masks(4, det)
    res = _live_from_port(sim.data_port, LiveMasks(m, ["a", "b", "c", "d"]))
    assert res.complete and res.reason is None and res.frames == SCAN[0] * SCAN[1]
    assert res.frame_format.bits == bits and res.frame_format.raw == raw
    # offline: the project's reader for binary files; RAW is not read by io.load, so the
    # written counts (whose RAW encoding LiberTEM's reader decodes identically, see below)
    ref_data = np.asarray(load(mib, scan_shape=SCAN).data) if not raw else data
    off = core.apply_mask(ref_data, m, normalised=False)
    np.testing.assert_array_equal(res.images, off)
    assert np.ptp(off) > 0


@needs_sim
@pytest.mark.timeout(120)
def test_live_normalised_eq7_with_reference_stats(sims):
    sim, mib, data = sims[(12, False)]
    det = data.shape[2:]
    m = dyadic_masks(2, det, seed=9)
    st = core.column_stats(data)
    res = _live_from_port(sim.data_port, LiveMasks(m, stats=st, normalisation="pcc"))
    off = core.apply_mask(data, m, normalised=True, stats=st)
    np.testing.assert_allclose(res.images, off, rtol=1e-12, atol=1e-9 * np.abs(off).max())
    assert abs(res.images.mean()) < 1e-9 * np.abs(res.images).max()  # Eq. 7 has zero mean


@pytest.mark.timeout(120)
def test_write_mib_raw_is_read_identically_by_libertem(tmp_path):
    """Our RAW encoder against LiberTEM's independent MIB decoder (1/6/12-bit, single + quad)."""
    pytest.importorskip("libertem")
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.io.dataset.base import BufferedBackend
    from libertem.udf.base import UDF

    class Frames(UDF):
        def get_result_buffers(self):
            sig = tuple(self.meta.dataset_shape.sig)
            return {"f": self.buffer(kind="nav", extra_shape=sig, dtype=np.int64)}

        def process_frame(self, frame):
            self.results.f[:] = frame

    ctx = Context(executor=InlineJobExecutor())
    for bits, det in [(1, (16, 64)), (6, (8, 16)), (12, (8, 24)), (12, (512, 512))]:
        data = counts(bits, (2, 3) + det, seed=bits)
        mib = write_mib(tmp_path / f"r{bits}_{det[0]}.mib", data, bit_depth=bits, raw=True)
        ds = ctx.load("mib", path=str(mib.with_suffix(".hdr")), nav_shape=(2, 3),
                      io_backend=BufferedBackend())
        got = ctx.run_udf(ds, Frames())["f"].data
        np.testing.assert_array_equal(got, data, err_msg=f"{bits}-bit {det}")


@pytest.mark.parametrize("bits,raw,det", [(24, False, (8, 16)), (24, True, (8, 16)),
                                          (1, True, (512, 512)), (6, True, (512, 512)),
                                          (12, True, (512, 512)), (12, False, (512, 512))])
def test_decode_all_depths_and_quads_in_memory(tmp_path, bits, raw, det):
    """24-bit and quad frames through the same parser from an in-memory stream."""
    scan = (2, 3)
    data = counts(bits, scan + det, seed=bits + 7)
    mib = write_mib(tmp_path / "x.mib", data, bit_depth=bits, raw=raw)
    head, frames = stream_bytes(mib)
    m = dyadic_masks(3, det)
    res = LiveImager(LiveMasks(m), scan).run(BytesSource(head + b"".join(frames)))
    assert res.complete and res.frame_format.quad == (det[0] > 256)
    np.testing.assert_array_equal(res.images, core.apply_mask(data, m, normalised=False))


def test_garbage_skipped_and_size_mismatch_is_clear(tmp_path):
    data = counts(12, SCAN + (8, 16))
    mib = write_mib(tmp_path / "g.mib", data, bit_depth=12)
    head, frames = stream_bytes(mib)
    m = dyadic_masks(1, (8, 16))
    res = LiveImager(LiveMasks(m), SCAN).run(
        BytesSource(b"GARBAGEGARBAGE" * 333 + b"MPX" + head + b"".join(frames)))
    assert res.complete and res.garbage_bytes == 14 * 333 + 3
    np.testing.assert_array_equal(res.images, core.apply_mask(data, m, normalised=False))
    # frame 9 two bytes short of what its header says -> one clear error, rows before saved
    bad = list(frames)
    bad[9] = b"MPX,%010d," % (len(frames[9]) - 15 + 1 - 2) + frames[9][15:-2]
    store = tmp_path / "bad.zarr"
    from tmask_validate.live import ZarrRowStore

    imager = LiveImager(LiveMasks(m), SCAN, store=ZarrRowStore(store, ["m"], SCAN))
    with pytest.raises(MerlinProtocolError, match=r"frame 9: size disagrees"):
        imager.run(BytesSource(head + b"".join(bad)))
    st = read_live_store(store)
    assert st.attrs["complete"] is False and st.attrs["rows_done"] == 1
    assert "protocol error" in st.attrs["incomplete_reason"]
    np.testing.assert_array_equal(st.values[0, 0], core.apply_mask(data, m[0],
                                                                  normalised=False)[0])
    assert np.isnan(st.values[0, 1:]).all()


def test_masks_from_analyse_output_and_library_resampling(tmp_path):
    import xarray as xr

    det = (12, 16)
    paths = []
    for t_nm, val in [(10.0, 1.0), (20.0, 2.0)]:
        m = np.zeros((3, *det))
        m[0] = val
        m[1, 2:5, 3:9] = val
        ds = xr.Dataset({"masks": (("name", "ky", "kx"), m)},
                        coords={"name": ["adf_pcc", "Li", "none"],
                                "has_mask": ("name", [True, True, False]),
                                "ky": (np.arange(det[0]) - 6.0) * 2.0,
                                "kx": (np.arange(det[1]) - 8.0) * 2.0})
        ds.attrs["meta"] = json.dumps({"thickness_nm": t_nm})
        p = tmp_path / f"a{int(t_nm)}.nc"
        ds.to_netcdf(p, engine="h5netcdf")
        paths.append(p)
    ms = load_masks(paths[0])
    assert ms.names == ["adf_pcc", "Li"] and ms.masks.shape == (2, *det)
    assert ms.mrad_per_px == (2.0, 2.0) and ms.center_px == (6.0, 8.0)
    lib = load_masks(paths, thickness_nm=18.0, names=["Li"])
    assert lib.thickness_nm == 20.0 and lib.names == ["Li"] and lib.masks.max() == 2.0
    # onto a detector with 1 mrad/px, centre (10, 12), 20 x 24 px: the Li box (ky -8..-4
    # mrad, kx -10..0 mrad) lands on pixels 2..6 x 2..12; bilinear edges half weight
    rs = load_masks(paths, thickness_nm=12.0, names=["Li"], det_shape=(20, 24),
                    mrad_per_px=(1.0, 1.0), center_px=(10.0, 12.0))
    assert rs.resampled and rs.masks.shape == (1, 20, 24)
    np.testing.assert_allclose(rs.masks[0, 2:7, 2:13], 1.0)
    np.testing.assert_allclose(rs.masks[0, [1, 7], 2:13], 0.5)
    np.testing.assert_allclose(rs.masks[0, 2:7, [1, 13]], 0.5)
    assert rs.masks[0, 8:, :].max() == 0.0 and rs.masks[0, :, 14:].max() == 0.0
    with pytest.raises(ValueError, match="--thickness-nm"):
        load_masks(paths)
    with pytest.raises(ValueError, match="no mask named"):
        load_masks(paths[0], names=["O"])


# ----------------------------------------------------------------------------------------------
# the command, against the simulator and the staged server
# ----------------------------------------------------------------------------------------------
@needs_sim
@pytest.mark.timeout(120)
def test_cli_client_first_garbage_and_trigger(tmp_path, capfd):
    """Client started before the simulator retries; --garbage/--wait-trigger mode; store."""
    data = counts(12, SCAN + (16, 32), seed=5)
    mib = write_mib(tmp_path / "s.mib", data, bit_depth=12)
    m = dyadic_masks(2, (16, 32))
    np.savez(tmp_path / "m.npz", Li=m[0], O=m[1])
    dp, cp, tp = free_port(), free_port(), free_port()
    box = {}

    # start the simulator ourselves on chosen ports, late
    def late():
        time.sleep(1.5)
        fh = open(tmp_path / "sim.log", "w")
        box["fh"] = fh
        box["proc"] = subprocess.Popen(
            [SIM, str(mib.with_suffix(".hdr")), "--nav-shape", *map(str, SCAN), "--host",
             "127.0.0.1", "--data-port", str(dp), "--control-port", str(cp), "--trigger-port",
             str(tp), "--garbage"], stdout=fh, stderr=subprocess.STDOUT)
        # the client is connected once the sim accepted; then arm and trigger
        t0 = time.monotonic()
        while time.monotonic() - t0 < 45:
            if "DataSocketServer: accepted" in (tmp_path / "sim.log").read_text():
                break
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", cp), timeout=10) as c:
            for cmd in ("STARTACQUISITION", "SOFTTRIGGER"):
                body = f"CMD,{cmd}".encode()
                c.sendall(b"MPX,%010d," % (len(body) + 1) + body)
                c.recv(1024)
                time.sleep(0.3)

    th = threading.Thread(target=late, daemon=True)
    th.start()
    out = tmp_path / "live.zarr"
    try:
        rc = cli_main(["live", "--host", "127.0.0.1", "--data-port", str(dp), "--scan-shape",
                       *map(str, SCAN), "--masks", str(tmp_path / "m.npz"), "--out", str(out),
                       "--connect-timeout-s", "40", "--idle-timeout-s", "40", "--no-progress"])
    finally:
        th.join(60)
        if "proc" in box:
            box["proc"].kill()
            box["proc"].wait(10)
            box["fh"].close()
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "waiting for the Merlin data server at 127.0.0.1:" in err
    assert "skipped" in err and "bytes before the header" in err
    st = read_live_store(out)
    assert st.attrs["complete"] is True and list(st["name"].values) == ["Li", "O"]
    np.testing.assert_array_equal(st.values, core.apply_mask(data, m, normalised=False))


def test_cli_no_server_gives_up_with_clear_message(tmp_path, capfd):
    np.save(tmp_path / "m.npy", np.ones((1, 4, 4)))
    t0 = time.monotonic()
    rc = cli_main(["live", "--data-port", str(free_port()), "--scan-shape", "2", "3",
                   "--masks", str(tmp_path / "m.npy"), "--out", str(tmp_path / "o.zarr"),
                   "--connect-timeout-s", "1.5", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 4 and time.monotonic() - t0 < 15
    assert "no Merlin data server at 127.0.0.1:" in err and "attempts" in err


def _staged(tmp_path, rows_first: float, *, bits=12, det=(16, 24), scan=(6, 5), seed=2):
    data = counts(bits, scan + det, seed=seed)
    mib = write_mib(tmp_path / "st.mib", data, bit_depth=bits)
    head, frames = stream_bytes(mib)
    cut = int(rows_first * scan[1])
    return data, head + b"".join(frames[:cut]), b"".join(frames[cut:])


def test_cli_dropped_connection_keeps_rows_and_says_so(tmp_path, capfd):
    scan, det = (6, 5), (16, 24)
    data, first, _ = _staged(tmp_path, 2.6, det=det, scan=scan)
    srv = StagedServer([first, b""], drop_after=0)
    m = dyadic_masks(2, det)
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "o.zarr"
    try:
        rc = cli_main(["live", "--data-port", str(srv.port), "--scan-shape", *map(str, scan),
                       "--masks", str(tmp_path / "m.npy"), "--out", str(out), "--no-progress",
                       "--idle-timeout-s", "20"])
    finally:
        srv.close()
    err = capfd.readouterr().err
    assert rc == 3
    assert "INCOMPLETE: connection dropped after 2 of 6 rows" in err and "rows 0-1 saved" in err
    st = read_live_store(out)
    assert st.attrs["complete"] is False and st.attrs["rows_done"] == 2
    off = core.apply_mask(data, m, normalised=False)
    np.testing.assert_array_equal(st.values[:, :2], off[:, :2])
    assert np.isnan(st.values[:, 2:]).all()


@pytest.mark.timeout(90)
def test_cli_ctrl_c_finishes_the_current_row(tmp_path):
    """SIGINT while row 3 is half received: row 3 is completed and saved, then exit 130."""
    scan, det = (6, 5), (16, 24)
    data, first, rest = _staged(tmp_path, 2.5, det=det, scan=scan)
    srv = StagedServer([first, rest], pause_s=0.0)
    m = dyadic_masks(1, det)
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "o.zarr"
    proc = subprocess.Popen(CLI + ["live", "--data-port", str(srv.port), "--scan-shape",
                                   *map(str, scan), "--masks", str(tmp_path / "m.npy"),
                                   "--out", str(out), "--no-progress", "--idle-timeout-s",
                                   "30"], stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if (out / "zarr.json").exists():
                try:
                    if json.loads((out / "zarr.json").read_text())["attributes"][
                            "rows_done"] >= 2:
                        break
                except (ValueError, KeyError):
                    pass
            time.sleep(0.05)
        time.sleep(0.6)  # the client now waits inside row 3 (half of it received)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.6)
        srv.release.set()  # the rest of the scan arrives; the client stops after row 3
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    assert proc.returncode == 130, err
    assert "finishing the current row" in err and "stopped by the user" in err
    st = read_live_store(out)
    assert st.attrs["complete"] is False and st.attrs["rows_done"] == 3
    np.testing.assert_array_equal(st.values[:, :3],
                                  core.apply_mask(data, m, normalised=False)[:, :3])
    assert np.isnan(st.values[:, 3:]).all()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.mark.timeout(120)
def test_live_view_screenshot_mid_scan(tmp_path):
    """Headless Chromium screenshot while half the rows have arrived: partly filled images."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium (Debian: apt-get install -y chromium)")
    scan, det = (16, 12), (16, 24)
    sy, sx = scan
    yy, xx = np.mgrid[0:sy, 0:sx]
    # counts whose total rises along the scan: a visible gradient in the image
    data = np.zeros(scan + det, np.int64)
    data[..., :8, :] = (yy * 200 + xx * 20)[..., None, None]
    data[..., 8:, :] = 50
    mib = write_mib(tmp_path / "v.mib", data, bit_depth=12)
    head, frames = stream_bytes(mib)
    half = sy // 2 * sx
    srv = StagedServer([head + b"".join(frames[:half]), b"".join(frames[half:])])
    m = np.stack([np.ones(det), np.pad(np.ones((8, 24)), ((0, 8), (0, 0)))])
    np.savez(tmp_path / "m.npz", total=m[0], top=m[1])
    vport = free_port()
    out = tmp_path / "o.zarr"
    proc = subprocess.Popen(CLI + ["live", "--data-port", str(srv.port), "--scan-shape",
                                   *map(str, scan), "--masks", str(tmp_path / "m.npz"), "--out",
                                   str(out), "--view", str(vport), "--no-progress",
                                   "--view-linger-s", "1"],
                            stderr=subprocess.PIPE, text=True)
    shot = tmp_path / "mid_scan.png"
    try:
        t0 = time.monotonic()
        state = None
        while time.monotonic() - t0 < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{vport}/state.json",
                                            timeout=2) as r:
                    state = json.loads(r.read())
                if state["rows_done"] >= sy // 2:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert state is not None and state["rows_done"] == sy // 2 and not state["finished"]
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", "--window-size=640,420",
                        "--virtual-time-budget=1500", f"--screenshot={shot}",
                        f"http://127.0.0.1:{vport}/"], capture_output=True, timeout=60,
                       env={**os.environ, "HOME": str(tmp_path)})
        srv.release.set()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    assert proc.returncode == 0, err
    keep = os.environ.get("TMASK_LIVE_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    import matplotlib.image as mpimg

    px = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    checker = np.all(np.abs(px - [0x3a, 0x4a, 0x66]) <= 3, -1) | np.all(
        np.abs(px - [0x2c, 0x38, 0x50]) <= 3, -1)
    grey = (px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2]) & (px[..., 0] > 40)
    assert checker.sum() > 5000, "no unfilled (transparent) rows visible"
    assert grey.sum() > 5000, "no filled image rows visible"
    # filled rows above the unfilled ones in the first image's column
    cols = np.flatnonzero(checker.sum(0) > 20)
    c = int(cols[len(cols) // 4])
    rows_grey = np.flatnonzero(grey[:, c])
    rows_chk = np.flatnonzero(checker[:, c])
    assert rows_grey.size and rows_chk.size and rows_grey.mean() < rows_chk.mean()
    st = read_live_store(out)
    assert st.attrs["complete"] is True
    np.testing.assert_array_equal(st.values, core.apply_mask(data, m, normalised=False))


def test_cli_normalised_stats_and_library_masks_resampled(tmp_path, capfd):
    """--stats from a reference scan file (Eq. 7) and --masks library + --calibration."""
    import xarray as xr

    scan, det = (4, 6), (16, 24)
    data = counts(12, scan + det, seed=11)
    mib = write_mib(tmp_path / "d.mib", data, bit_depth=12)
    ref = write_mib(tmp_path / "ref.mib", counts(12, (3, 5) + det, seed=12), bit_depth=12)
    head, frames = stream_bytes(mib)
    # a 2-thickness "library" of analyse outputs on a coarser grid (2 mrad/px)
    lib = []
    for t_nm in (30.0, 50.0):
        m = np.random.default_rng(int(t_nm)).normal(size=(2, 10, 14))
        ds = xr.Dataset({"masks": (("name", "ky", "kx"), m)},
                        coords={"name": ["Li", "O"], "has_mask": ("name", [True, True]),
                                "ky": (np.arange(10) - 5.0) * 2.0,
                                "kx": (np.arange(14) - 7.0) * 2.0})
        ds.attrs["meta"] = json.dumps({"thickness_nm": t_nm})
        ds.to_netcdf(tmp_path / f"lib{int(t_nm)}.nc", engine="h5netcdf")
        lib.append(tmp_path / f"lib{int(t_nm)}.nc")
    (tmp_path / "cal.yaml").write_text("mrad_per_px: [1.0, 1.0]\ncenter_px: [8.0, 12.0]\n")
    srv = StagedServer([head + b"".join(frames)])
    out = tmp_path / "o.zarr"
    try:
        rc = cli_main(["live", "--data-port", str(srv.port), "--scan-shape", *map(str, scan),
                       "--masks", *map(str, lib), "--thickness-nm", "45", "--names", "O",
                       "--calibration", str(tmp_path / "cal.yaml"), "--detector-shape",
                       *map(str, det), "--stats", str(ref), "--out", str(out),
                       "--no-progress"])
    finally:
        srv.close()
    assert rc == 0, capfd.readouterr().err
    ms = load_masks(lib, thickness_nm=45, names=["O"], det_shape=det, mrad_per_px=(1, 1),
                    center_px=(8, 12))
    assert ms.thickness_nm == 50.0
    st_ref = core.column_stats(np.asarray(load(ref, scan_shape=(3, 5)).data))
    want = core.apply_mask(data, ms.masks, normalised=True, stats=st_ref)
    st = read_live_store(out)
    assert st.attrs["complete"] is True and st.attrs["normalised"] is True
    assert st.attrs["thickness_nm"] == 50.0 and st.attrs["masks_resampled"] is True
    np.testing.assert_allclose(st.values, want, rtol=1e-12, atol=1e-9 * np.abs(want).max())


def test_cli_view_port_in_use_is_one_clear_line(tmp_path, capfd):
    np.save(tmp_path / "m.npy", np.ones((1, 4, 4)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc = cli_main(["live", "--data-port", str(free_port()), "--scan-shape", "2", "3",
                       "--masks", str(tmp_path / "m.npy"), "--out", str(tmp_path / "o.zarr"),
                       "--view", str(port), "--connect-timeout-s", "1", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and f"cannot serve the live view on 127.0.0.1:{port}" in err
    assert not (tmp_path / "o.zarr").exists()
