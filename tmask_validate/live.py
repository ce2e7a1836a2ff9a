"""Live template-mask imaging from a Quantum Detectors Merlin data stream.

The Merlin server streams over TCP (data port, 6342 by default). Every message is framed as
``MPX,<10-digit length>,<payload>`` where the length counts the payload plus one (the comma
after the length field, as the Merlin and LiberTEM-live's simulator send it):

- the acquisition header, payload ``HDR,<key>:\\t<value> lines...End``;
- then one message per frame, payload ``MQ1,<seq>,<header bytes>,<chips>,<width>,<height>,
  <U08|U16|U32|R64>,<layout>,...,<counter depth>,`` padded to the header size, then pixels.

"Binary" frames (``U08/U16/U32``) hold big-endian counts row by row; RAW frames (``R64``) hold
the counters as read out of the chips (64-bit words with reversed element order; quads as
four chips side by side, the bottom two rotated) -- decoded here exactly as
:func:`tmask_validate.io.write_mib` encodes them (and as LiberTEM's MIB reader decodes them).

:class:`LiveImager` reads whole scan rows into one preallocated buffer
(``socket.recv_into``), checks every frame's framing, decodes the row into a native integer
``(scan_x, ky*kx)`` block and applies ``k`` masks with the core's compiled kernel
(:func:`tmask_validate.core._kernels.apply_weights`, float64 sums): raw (Eq. 2) or
normalised (Eq. 7) with column statistics taken beforehand from a reference scan or a
simulation. A live image therefore equals :func:`tmask_validate.core.apply_mask` of the same
data: exactly when every partial sum is exact in float64 (integer counts and masks on a
coarse binary grid), otherwise up to summation order (~1e-15 relative).

Images go, row by row, to a zarr store (:class:`ZarrRowStore`) readable while the scan runs
(``rows_done`` attribute; ``complete`` written last) and optionally to a loopback web page
(:class:`LiveView`).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from tmask_validate.core._kernels import apply_weights
from tmask_validate.core._pcc import NORMALISATIONS, ColumnStats, _weights_for

__all__ = [
    "MerlinProtocolError",
    "ConnectionDropped",
    "FrameFormat",
    "parse_acquisition_header",
    "parse_frame_header",
    "decode_frames",
    "LiveMasks",
    "connect",
    "SocketSource",
    "BytesSource",
    "ZarrRowStore",
    "LiveImager",
    "LiveResult",
    "LiveView",
    "read_live_store",
    "png_bytes",
    "MaskSet",
    "load_masks",
    "load_stats",
]

MPX_PREFIX_BYTES = 15  # b"MPX," + 10 digits + b","


class MerlinProtocolError(ValueError):
    """The stream does not follow the Merlin framing (or disagrees with itself)."""


class ConnectionDropped(ConnectionError):
    """The detector closed the connection before the scan was complete."""


# ----------------------------------------------------------------------------------------------
# headers
# ----------------------------------------------------------------------------------------------
def parse_acquisition_header(payload: bytes) -> dict[str, str]:
    """``{key: value}`` of an acquisition header payload (``HDR,`` ... ``End``)."""
    text = payload.decode("latin1")
    if not text.startswith("HDR"):
        raise MerlinProtocolError(f"acquisition header does not start with 'HDR': {text[:20]!r}")
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("HDR") or line.startswith("End"):
            continue
        key, sep, value = line.partition("\t")
        if sep:
            out[key.strip().rstrip(":").strip()] = value.strip()
    return out


@dataclass(frozen=True)
class FrameFormat:
    """Layout of one Merlin frame as announced by its ``MQ1`` header.

    Attributes
    ----------
    header_bytes : int
        Frame header size (field 3).
    code : str
        Pixel type: ``U08``/``U16``/``U32`` ("binary") or ``R64`` (RAW).
    bits : int
        Counter depth (1, 6, 12 or 24).
    nchips : int
        Number of chips (1, or 4 for a quad).
    shape : (int, int)
        Decoded frame shape ``(ky, kx)``.
    pixel_bytes : int
        Bytes of pixel data after the header.
    """

    header_bytes: int
    code: str
    bits: int
    nchips: int
    shape: tuple[int, int]
    pixel_bytes: int

    @property
    def raw(self) -> bool:
        return self.code.startswith("R")

    @property
    def quad(self) -> bool:
        return self.nchips == 4

    @property
    def frame_bytes(self) -> int:
        """Header plus pixels (the MPX payload)."""
        return self.header_bytes + self.pixel_bytes

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the decoded counts: one the core kernels read natively (as offline).

        uint16 up to 12 bits (1/6-bit counts widened, as :mod:`tmask_validate.core` widens
        uint8), float64 for 24-bit (exact; the core reads uint32 data as float64).
        """
        return np.dtype(np.uint16 if self.bits <= 16 else np.float64)


_BINARY_BYTES = {"U08": 1, "U16": 2, "U32": 4}


def parse_frame_header(head: bytes) -> FrameFormat:
    """:class:`FrameFormat` from the start of an ``MQ1`` frame (at least its header bytes)."""
    text = head.decode("latin1")
    fields = text.split(",")
    if len(fields) < 8 or fields[0] != "MQ1":
        raise MerlinProtocolError(f"frame does not start with an 'MQ1' header: {text[:30]!r}")
    try:
        header_bytes = int(fields[2])
        nchips = int(fields[3])
        width, height = int(fields[4]), int(fields[5])
    except ValueError:
        raise MerlinProtocolError(f"malformed MQ1 header {text[:60]!r}") from None
    code = fields[6].strip().upper()
    parts = [p for p in text[:header_bytes].split(",") if "\x00" not in p and p.strip()]
    try:
        bits = int(parts[-1])
    except (IndexError, ValueError):
        raise MerlinProtocolError(f"no counter depth at the end of the MQ1 header "
                                  f"{text[:header_bytes].rstrip(chr(0))[-40:]!r}") from None
    if code in _BINARY_BYTES:
        shape = (height, width)
        pixel_bytes = height * width * _BINARY_BYTES[code]
        if bits not in (1, 6, 8, 12, 16, 24, 32):
            raise MerlinProtocolError(f"counter depth {bits} is not a Merlin depth")
    elif code == "R64":
        if bits not in (1, 6, 12, 24):
            raise MerlinProtocolError(f"RAW counter depth {bits} not supported (1/6/12/24)")
        if nchips == 4:
            if bits == 24:
                raise MerlinProtocolError("24-bit RAW quads are not supported")
            shape = (2 * height, width // 2)  # chips side by side -> 2 x 2
        else:
            shape = (height, width // 2 if bits == 24 else width)
        npx = shape[0] * shape[1]
        pixel_bytes = {1: npx // 8, 6: npx, 12: 2 * npx, 24: 4 * npx}[bits]
        group = 64 if bits == 1 else 8
        if (width if nchips == 4 else shape[1]) % group:
            raise MerlinProtocolError(f"RAW frame width {width} is not a multiple of {group}")
    else:
        raise MerlinProtocolError(f"unknown Merlin pixel type {code!r}")
    if nchips not in (1, 4):
        raise MerlinProtocolError(f"{nchips} chips: only single chips and quads are supported")
    return FrameFormat(header_bytes, code, bits, nchips, shape, pixel_bytes)


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
def _unswap(a: np.ndarray, group: int) -> np.ndarray:
    s = a.shape
    return a.reshape(s[:-1] + (s[-1] // group, group))[..., ::-1].reshape(s)


def _raw_rows(px: np.ndarray, fmt: FrameFormat, rows: int, width: int) -> np.ndarray:
    """(f, rows, width) counts from RAW pixel bytes ``px`` (f, pixel_bytes)."""
    f = px.shape[0]
    if fmt.bits == 1:
        b = _unswap(px.reshape(f, rows, width // 8), 8)
        return np.unpackbits(b, axis=-1, bitorder="little")
    if fmt.bits == 6:
        return _unswap(px.reshape(f, rows, width), 8)
    if fmt.bits == 12:
        return _unswap(px.view(">u2").reshape(f, rows, width), 4)
    v = px.view(">u2").reshape(f, 2, rows, width)
    return (_unswap(v[:, 0], 4).astype(np.uint32) << 12) | _unswap(v[:, 1], 4)


def decode_frames(px: np.ndarray, fmt: FrameFormat, out: np.ndarray) -> None:
    """Decode pixel bytes of ``f`` frames into ``out`` (f, ky*kx) native integers.

    Parameters
    ----------
    px : ndarray of uint8, (f, fmt.pixel_bytes)
        The pixel part of each frame (may be a strided view into the receive buffer).
    fmt : FrameFormat
    out : ndarray (f, ky*kx)
        Destination, dtype ``fmt.dtype`` (C-contiguous).
    """
    f = px.shape[0]
    ky, kx = fmt.shape
    o = out.reshape(f, ky, kx)
    if not fmt.raw:
        stored = {"U08": ">u1", "U16": ">u2", "U32": ">u4"}[fmt.code]
        np.copyto(o, px.view(stored).reshape(f, ky, kx), casting="unsafe")
        return
    if not fmt.quad:
        np.copyto(o, _raw_rows(px, fmt, ky, kx), casting="unsafe")
        return
    h, w = ky // 2, kx // 2
    r = _raw_rows(px, fmt, h, 4 * w)  # chips [4 | 3 | 2 | 1]
    o[:, :h, :w] = r[:, :, 3 * w:]
    o[:, :h, w:] = r[:, :, 2 * w:3 * w]
    o[:, h:, :w] = r[:, ::-1, w:2 * w][:, :, ::-1]
    o[:, h:, w:] = r[:, ::-1, :w][:, :, ::-1]


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
@dataclass
class LiveMasks:
    """``k`` masks ready for per-frame application.

    Parameters
    ----------
    masks : ndarray (k, ky, kx)
        Detector masks (float; NaN not allowed).
    names : sequence of str, optional
        One name per mask (default ``mask0..``).
    stats : ColumnStats, optional
        Column statistics of a reference scan or simulation on THIS detector grid: given,
        the images are normalised (Eq. 7, ``normalisation`` "pcc" = Eq. 4 or "mean" = Eq. 8);
        absent, raw (Eq. 2).
    normalisation : {"pcc", "mean"}
    """

    masks: np.ndarray
    names: Sequence[str] | None = None
    stats: ColumnStats | None = None
    normalisation: str = "pcc"
    weights: np.ndarray = field(init=False, repr=False)
    mu: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = np.asarray(self.masks, dtype=np.float64)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] < 1:
            raise ValueError(f"masks must be a (k, ky, kx) stack, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("masks contain NaN or Inf")
        self.masks = m
        names = [f"mask{i}" for i in range(m.shape[0])] if self.names is None else \
            [str(n) for n in self.names]
        if len(names) != m.shape[0] or len(set(names)) != len(names):
            raise ValueError(f"need {m.shape[0]} distinct mask names, got {names}")
        self.names = names
        n = m.shape[1] * m.shape[2]
        w = m.reshape(m.shape[0], n)
        if self.stats is None:
            self.weights = np.ascontiguousarray(w)
            self.mu = np.zeros(n)
        else:
            if self.normalisation not in NORMALISATIONS:
                raise ValueError(f"normalisation must be one of {NORMALISATIONS}")
            if self.stats.mean.shape != m.shape[1:]:
                raise ValueError(f"column statistics are for a {self.stats.mean.shape} detector,"
                                 f" the masks for {m.shape[1:]}")
            self.weights = _weights_for(w, self.stats, self.normalisation)
            self.mu = np.ascontiguousarray(self.stats.mean.reshape(-1), dtype=np.float64)

    @property
    def k(self) -> int:
        return self.masks.shape[0]

    @property
    def det_shape(self) -> tuple[int, int]:
        return self.masks.shape[1], self.masks.shape[2]

    @property
    def normalised(self) -> bool:
        return self.stats is not None

    def warm_up(self, dtypes: Sequence[Any] = (np.uint16, np.float64)) -> float:
        """Load the compiled kernel for these count dtypes now (not on the first scan row).

        Returns the seconds it took (~1 s the first time in a process: numba's cache load and
        thread-pool start).
        """
        t0 = time.perf_counter()
        n = self.weights.shape[1]
        out = np.empty((2, self.k))
        for dt in dtypes:
            self.apply(np.zeros((2, n), dtype=dt), out)
        return time.perf_counter() - t0

    def apply(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out[j, i] = Σ_c (x[j, c] - mu[c]) w[i, c]`` for a block of frames ``x`` (f, n)."""
        apply_weights(x, self.mu, self.weights, out)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
def connect(host: str, port: int, *, timeout_s: float = 30.0, retry_s: float = 0.5,
            log: Callable[[str], None] | None = None) -> socket.socket:
    """Connect to the detector's data port, retrying until ``timeout_s`` has passed.

    Each failed attempt is reported once through ``log`` (first failure, then every ~5 s).

    Raises
    ------
    ConnectionError
        No server accepted within ``timeout_s`` (the message says where and how long).
    """
    t0 = time.monotonic()
    attempt = 0
    last_msg = -1e9
    while True:
        attempt += 1
        try:
            s = socket.create_connection((host, port), timeout=max(0.1, min(5.0, timeout_s)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 2**20)
            except OSError:  # pragma: no cover - platform limit
                pass
            return s
        except OSError as exc:
            waited = time.monotonic() - t0
            if waited + retry_s > timeout_s:
                raise ConnectionError(
                    f"no Merlin data server at {host}:{port} after {attempt} attempts in "
                    f"{waited:.1f} s ({exc.strerror or exc}); is the detector (or "
                    f"libertem-live-mib-sim) running and is the port right?") from None
            if log is not None and waited - last_msg >= 5.0:
                log(f"waiting for the Merlin data server at {host}:{port} "
                    f"({exc.strerror or exc}); retrying for up to {timeout_s:.0f} s")
                last_msg = waited
            time.sleep(retry_s)


class SocketSource:
    """Byte source over a connected socket: ``read_into(view)`` fills the view or raises.

    A socket timeout of ``poll_s`` lets :class:`LiveImager` notice a stop request while the
    stream is idle; ``idle_timeout_s`` bounds how long a silent stream is waited for.
    """

    def __init__(self, sock: socket.socket, *, poll_s: float = 0.25,
                 idle_timeout_s: float | None = None) -> None:
        self.sock = sock
        # a blocking socket with a kernel receive timeout: one recv(MSG_WAITALL) fills a whole
        # scan row (a Python-level timeout would poll() before every partial recv)
        self.sock.settimeout(None)
        us = int(round(poll_s * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", us // 1_000_000, us % 1_000_000))
        self.idle_timeout_s = idle_timeout_s
        self._pending = b""
        self.stop_check: Callable[[], bool] = lambda: False
        self.first_byte_t: float | None = None

    def unread(self, data: bytes) -> None:
        self._pending = bytes(data) + self._pending

    def read_into(self, view: memoryview, *, interruptible: bool = True) -> None:
        n = len(view)
        got = 0
        if self._pending:
            take = min(n, len(self._pending))
            view[:take] = self._pending[:take]
            self._pending = self._pending[take:]
            got = take
        idle0 = time.monotonic()
        first = True
        while got < n:
            try:
                r = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO passed with no data
                if interruptible and self.stop_check() and got == 0:
                    raise KeyboardInterrupt from None
                if (self.idle_timeout_s is not None
                        and time.monotonic() - idle0 > self.idle_timeout_s):
                    raise ConnectionDropped(
                        f"no data for {self.idle_timeout_s:.0f} s (stream stalled)") from None
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise ConnectionDropped(f"connection lost ({exc})") from None
            if r == 0:
                raise ConnectionDropped("the detector closed the connection")
            if first:
                self.first_byte_t = time.perf_counter()
                first = False
            got += r
            if got < n and interruptible and self.stop_check() and got == 0:
                raise KeyboardInterrupt
            idle0 = time.monotonic()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


class BytesSource:
    """In-memory byte source with the :class:`SocketSource` interface (benchmarks, tests)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._mv = memoryview(data)
        self._pos = 0
        self.stop_check: Callable[[], bool] = lambda: False
        self.first_byte_t: float | None = None

    def unread(self, data: bytes) -> None:
        self._pos -= len(data)

    def read_into(self, view: memoryview, *, interruptible: bool = True) -> None:
        n = len(view)
        if self._pos + n > len(self._mv):
            self._pos = len(self._mv)
            raise ConnectionDropped("end of the in-memory stream")
        self.first_byte_t = time.perf_counter()
        view[:] = self._mv[self._pos:self._pos + n]
        self._pos += n

    def close(self) -> None:
        pass


def _read_message_prefix(src, *, skip_garbage: bool) -> tuple[int, int]:
    """Read up to and including the next ``MPX,<len>,``; returns (payload bytes, skipped)."""
    buf = bytearray(MPX_PREFIX_BYTES)
    mv = memoryview(buf)
    src.read_into(mv)
    skipped = 0
    while not buf.startswith(b"MPX,"):
        if not skip_garbage:
            raise MerlinProtocolError(f"expected 'MPX,' but got {bytes(buf[:15])!r}")
        # garbage before the header: slide to the next possible 'M'
        i = buf.find(b"M", 1)
        drop = i if i > 0 else len(buf)
        skipped += drop
        if skipped > 64 * 2**20:
            raise MerlinProtocolError("no 'MPX,' message start in the first 64 MiB")
        keep = bytes(buf[drop:])
        buf[:len(keep)] = keep
        src.read_into(mv[len(keep):])
    try:
        length = int(bytes(buf[4:14]))
    except ValueError:
        raise MerlinProtocolError(f"malformed MPX length field {bytes(buf)!r}") from None
    if buf[14:15] != b",":
        raise MerlinProtocolError(f"malformed MPX prefix {bytes(buf)!r}")
    return length - 1, skipped


# ----------------------------------------------------------------------------------------------
# zarr store
# ----------------------------------------------------------------------------------------------
class ZarrRowStore:
    """Images ``(name, scan_y, scan_x)`` float64 in a zarr store, one chunk per scan row.

    Rows not yet acquired are NaN. Attributes: ``names``, ``scan_shape``, ``rows_done``
    (updated after each written row), ``complete`` (False until the scan ends; True written
    last), ``incomplete_reason`` when it ended early, and whatever ``attrs`` the caller adds.
    """

    def __init__(self, path: str | Path, names: Sequence[str], scan_shape: tuple[int, int],
                 attrs: dict | None = None) -> None:
        import zarr

        self.path = Path(path)
        sy, sx = scan_shape
        self.group = zarr.open_group(str(self.path), mode="w")
        self.arr = self.group.create_array(
            "images", shape=(len(names), sy, sx), chunks=(len(names), 1, sx),
            dtype="float64", fill_value=np.nan, dimension_names=("name", "scan_y", "scan_x"))
        self.group.attrs.update({
            "names": list(names), "scan_shape": [int(sy), int(sx)], "rows_done": 0,
            "complete": False, **(attrs or {})})

    def write_rows(self, y0: int, block: np.ndarray,
                   on_written: Callable[[int, int], None] | None = None) -> None:
        """Write rows ``y0 .. y0 + block.shape[1]`` (block ``(k, rows, sx)``), synchronously.

        ``on_written(y0, y1)`` is called once they are in the store.
        """
        y1 = y0 + block.shape[1]
        self.arr[:, y0:y1, :] = block
        self.group.attrs["rows_done"] = int(y1)
        if on_written is not None:
            on_written(y0, y1)

    def finish(self, complete: bool, **attrs) -> None:
        """Write the final attributes; ``complete`` last."""
        self.group.attrs.update(attrs)
        self.group.attrs["complete"] = bool(complete)


def read_live_store(path: str | Path):
    """The images of a live store as an xarray DataArray ``(name, scan_y, scan_x)``.

    Readable while the scan runs (unacquired rows NaN); ``attrs`` carry ``complete``,
    ``rows_done`` and the acquisition details.
    """
    import xarray as xr
    import zarr

    g = zarr.open_group(str(path), mode="r")
    attrs = dict(g.attrs)
    imgs = np.asarray(g["images"][...])
    return xr.DataArray(imgs, dims=("name", "scan_y", "scan_x"),
                        coords={"name": list(attrs.get("names", []))}, attrs=attrs,
                        name="images")


# ----------------------------------------------------------------------------------------------
# the imager
# ----------------------------------------------------------------------------------------------
@dataclass
class LiveResult:
    """Outcome of one live acquisition."""

    images: np.ndarray
    names: list[str]
    rows_done: int
    complete: bool
    reason: str | None
    frame_format: FrameFormat | None
    acquisition_header: dict
    frames: int
    elapsed_s: float
    garbage_bytes: int
    #: per row: (perf_counter of the row's first received byte, of its pixels in the store)
    row_times: np.ndarray

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else float("nan")


class LiveImager:
    """Read one Merlin acquisition and build ``k`` images row by row.

    Parameters
    ----------
    masks : LiveMasks
    scan_shape : (int, int)
        ``(scan_y, scan_x)`` probe positions; frames arrive row by row.
    store : ZarrRowStore, optional
        Rows are written there as they complete.
    on_row : callable(y, images), optional
        Called after every row (progress bars, the live view).
    rows_per_write : int
        Rows decoded and applied per block (1 = lowest latency).
    """

    def __init__(self, masks: LiveMasks, scan_shape: Sequence[int], *,
                 store: ZarrRowStore | None = None,
                 on_row: Callable[[int, np.ndarray], None] | None = None,
                 rows_per_write: int = 1) -> None:
        sy, sx = (int(v) for v in scan_shape)
        if sy < 1 or sx < 1:
            raise ValueError(f"scan_shape must be positive, got {tuple(scan_shape)}")
        self.masks = masks
        self.scan_shape = (sy, sx)
        self.store = store
        self.on_row = on_row
        self.rows_per_write = max(1, int(rows_per_write))
        self.images = np.full((masks.k, sy, sx), np.nan)
        self.stop_requested = False
        self.rows_done = 0

    def request_stop(self) -> None:
        """Finish the row in progress, then stop (what Ctrl-C does)."""
        self.stop_requested = True

    # -- stream parsing -------------------------------------------------------------------
    def _read_acquisition_header(self, src) -> tuple[dict, int]:
        skipped_total = 0
        while True:
            length, skipped = _read_message_prefix(src, skip_garbage=True)
            skipped_total += skipped
            if length < 0 or length > 16 * 2**20:
                raise MerlinProtocolError(f"implausible MPX message length {length + 1}")
            payload = bytearray(length)
            src.read_into(memoryview(payload))
            if payload.startswith(b"HDR"):
                return parse_acquisition_header(bytes(payload)), skipped_total
            if payload.startswith(b"MQ1"):
                raise MerlinProtocolError(
                    "frames arrived before an acquisition header: connect before the scan "
                    "starts")
            # any other message (e.g. a status reply): skip it
            skipped_total += MPX_PREFIX_BYTES + length

    def run(self, src) -> LiveResult:
        """Receive the acquisition from ``src`` and fill the images; never raises on a drop.

        Protocol errors (bad framing, a frame whose size disagrees with its header, frames
        for another detector) raise :class:`MerlinProtocolError` after the rows so far are
        saved (store marked incomplete).
        """
        sy, sx = self.scan_shape
        k = self.masks.k
        n = self.masks.det_shape[0] * self.masks.det_shape[1]
        src.stop_check = lambda: self.stop_requested
        fmt: FrameFormat | None = None
        acq: dict = {}
        garbage = 0
        reason: str | None = None
        frames = 0
        row_times = np.full((sy, 2), np.nan)
        t0 = None
        error: BaseException | None = None

        def stamp(y0: int, y1: int) -> None:
            row_times[y0:y1, 1] = time.perf_counter()

        try:
            acq, garbage = self._read_acquisition_header(src)
            n_acq = acq.get("Frames in Acquisition (Number)")
            if n_acq not in (None, "", "0") and int(n_acq) != sy * sx:
                raise MerlinProtocolError(
                    f"the acquisition header announces {n_acq} frames but the scan shape "
                    f"{sy} x {sx} needs {sy * sx}")
            # first frame: learn the layout from its header
            length, _ = _read_message_prefix(src, skip_garbage=False)
            t0 = time.perf_counter()
            first = bytearray(length)
            src.read_into(memoryview(first))
            fmt = parse_frame_header(bytes(first[:max(64, min(length, 2048))]))
            if fmt.frame_bytes != length:
                raise MerlinProtocolError(
                    f"frame 0: the MPX length says {length} bytes but its MQ1 header "
                    f"({fmt.shape[1]} x {fmt.shape[0]} {fmt.code}, {fmt.bits}-bit, "
                    f"{fmt.header_bytes}-byte header) needs {fmt.frame_bytes}")
            if fmt.shape != self.masks.det_shape:
                raise MerlinProtocolError(
                    f"the detector sends {fmt.shape[0]} x {fmt.shape[1]} frames but the masks "
                    f"are {self.masks.det_shape[0]} x {self.masks.det_shape[1]}")
            stride = MPX_PREFIX_BYTES + length
            rpw = self.rows_per_write
            buf = np.empty(rpw * sx * stride, dtype=np.uint8)
            # the first frame goes in slot 0 of the first block
            prefix = b"MPX,%010d," % (length + 1)
            buf[:MPX_PREFIX_BYTES] = np.frombuffer(prefix, np.uint8)
            buf[MPX_PREFIX_BYTES:stride] = np.frombuffer(first, np.uint8)
            head_ref = bytes(first[:fmt.header_bytes]).split(b",", 8)[2:7]
            counts = np.empty((rpw * sx, n), dtype=fmt.dtype)
            out = np.empty((rpw * sx, k))
            mv = memoryview(buf)
            have_first = True
            y = 0
            while y < sy:
                rows = min(rpw, sy - y)
                nb = rows * sx * stride
                t_row = time.perf_counter()
                if have_first:
                    src.read_into(mv[stride:nb], interruptible=False)
                    have_first = False
                    t_row = t0
                else:
                    try:
                        src.read_into(mv[:nb], interruptible=True)
                    except KeyboardInterrupt:
                        reason = "stopped by the user (Ctrl-C) after a complete row"
                        break
                    t_row = src.first_byte_t or t_row
                frames_blk = buf[:nb].reshape(rows * sx, stride)
                self._check_block(frames_blk, prefix, fmt, head_ref, frames)
                px = frames_blk[:, MPX_PREFIX_BYTES + fmt.header_bytes:]
                c = counts[:rows * sx]
                decode_frames(px, fmt, c)
                o = out[:rows * sx]
                self.masks.apply(c, o)
                block = o.T.reshape(k, rows, sx)
                self.images[:, y:y + rows, :] = block
                row_times[y:y + rows, 0] = t_row
                if self.store is not None:
                    self.store.write_rows(y, self.images[:, y:y + rows, :], on_written=stamp)
                else:
                    row_times[y:y + rows, 1] = time.perf_counter()
                frames += rows * sx
                y += rows
                self.rows_done = y
                if self.on_row is not None:
                    self.on_row(y, self.images)
                if self.stop_requested and y < sy:
                    reason = "stopped by the user (Ctrl-C) after a complete row"
                    break
        except ConnectionDropped as exc:
            reason = (f"connection dropped after {self.rows_done} of {sy} rows "
                      f"({frames} frames): {exc}")
        except KeyboardInterrupt:
            reason = f"stopped by the user (Ctrl-C) after {self.rows_done} of {sy} rows"
        except MerlinProtocolError as exc:
            reason = f"protocol error after {self.rows_done} of {sy} rows: {exc}"
            error = exc
        elapsed = (time.perf_counter() - t0) if t0 is not None else 0.0
        complete = self.rows_done == sy
        if complete:
            reason = None
        if self.store is not None:
            extra = {"frames": int(frames), "elapsed_s": float(elapsed)}
            if fmt is not None:
                extra["frame_format"] = {"code": fmt.code, "bits": fmt.bits,
                                         "nchips": fmt.nchips, "shape": list(fmt.shape)}
            if reason:
                extra["incomplete_reason"] = reason
            self.store.finish(complete, **extra)
        if error is not None:
            raise error
        return LiveResult(self.images, list(self.masks.names), self.rows_done, complete, reason,
                          fmt, acq, frames, elapsed, garbage, row_times)

    @staticmethod
    def _check_block(frames_blk: np.ndarray, prefix: bytes, fmt: FrameFormat,
                     head_ref: list[bytes], done: int) -> None:
        """Every frame of a block must carry the same MPX length and MQ1 layout."""
        pre = np.frombuffer(prefix, np.uint8)
        bad = np.flatnonzero(np.any(frames_blk[:, :MPX_PREFIX_BYTES] != pre, axis=1))
        if bad.size:
            i = int(bad[0])
            got = bytes(frames_blk[i, :MPX_PREFIX_BYTES])
            if got.startswith(b"MPX,"):
                raise MerlinProtocolError(
                    f"frame {done + i}: size disagrees: its MPX prefix {got!r} announces "
                    f"{int(got[4:14]) - 1} bytes, the stream's frames have {fmt.frame_bytes} "
                    f"({fmt.shape[1]} x {fmt.shape[0]} {fmt.code} + {fmt.header_bytes}-byte "
                    f"header)")
            raise MerlinProtocolError(
                f"frame {done + i}: no 'MPX,' where a frame should start ({got!r}): a frame "
                f"before it was longer or shorter than its header says")
        mq = frames_blk[:, MPX_PREFIX_BYTES:MPX_PREFIX_BYTES + 3]
        bad = np.flatnonzero(np.any(mq != np.frombuffer(b"MQ1", np.uint8), axis=1))
        if bad.size:
            raise MerlinProtocolError(f"frame {done + int(bad[0])}: no 'MQ1' frame header")
        # the layout fields of the first and last frame of the block must match frame 0
        for i in (0, frames_blk.shape[0] - 1):
            h = bytes(frames_blk[i, MPX_PREFIX_BYTES:MPX_PREFIX_BYTES + fmt.header_bytes])
            if h.split(b",", 8)[2:7] != head_ref:
                raise MerlinProtocolError(
                    f"frame {done + i}: its header {h[:48]!r} disagrees with frame 0's layout "
                    f"{b','.join(head_ref)!r}")


# ----------------------------------------------------------------------------------------------
# live view
# ----------------------------------------------------------------------------------------------
def png_bytes(img: np.ndarray) -> bytes:
    """Grey + alpha PNG of a 2D float image: NaN (not yet acquired) transparent.

    The finite values are scaled from their 0.5th to 99.5th percentile to 0..255.
    """
    a = np.asarray(img, dtype=np.float64)
    fin = np.isfinite(a)
    grey = np.zeros(a.shape, np.uint8)
    if fin.any():
        lo, hi = np.percentile(a[fin], [0.5, 99.5])
        if hi <= lo:
            hi = lo + 1.0
        grey[fin] = np.clip((a[fin] - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    alpha = np.where(fin, 255, 0).astype(np.uint8)
    la = np.stack([grey, alpha], axis=-1).reshape(a.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in la)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 4, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tmask-validate live</title>
<style>
body {{ font-family: sans-serif; background: #1d2430; color: #e8e8e8; margin: 16px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure {{ margin: 0; }}
img {{ width: {px}px; image-rendering: pixelated; border: 1px solid #888;
       background: repeating-conic-gradient(#3a4a66 0 25%, #2c3850 0 50%) 0 0 / 16px 16px; }}
figcaption {{ text-align: center; font-size: 14px; }}
#status {{ font-size: 16px; margin-bottom: 12px; }}
</style></head>
<body><div id="status">waiting for the scan...</div><div class="grid" id="grid"></div>
<script>
let names = [];
function build(n) {{
  const g = document.getElementById('grid'); g.innerHTML = '';
  n.forEach((name, i) => {{
    const f = document.createElement('figure');
    f.innerHTML = '<img id="img' + i + '" alt="' + name + '"><figcaption>' + name +
                  '</figcaption>';
    g.appendChild(f);
  }});
}}
async function tick() {{
  try {{
    const s = await (await fetch('state.json?t=' + Date.now())).json();
    if (JSON.stringify(s.names) !== JSON.stringify(names)) {{ names = s.names; build(names); }}
    document.getElementById('status').textContent =
      (s.complete ? 'complete: ' : (s.finished ? 'stopped: ' : 'scanning: ')) +
      s.rows_done + ' / ' + s.scan_shape[0] + ' rows, ' + s.frames_per_s.toFixed(0) +
      ' frames/s' + (s.reason ? ' (' + s.reason + ')' : '');
    names.forEach((_, i) => {{
      document.getElementById('img' + i).src = 'image/' + i + '.png?v=' + s.version;
    }});
  }} catch (e) {{ document.getElementById('status').textContent = 'view server gone'; }}
  setTimeout(tick, {refresh_ms});
}}
tick();
</script></body></html>
"""


class LiveView:
    """A loopback web page showing every image, refreshed during the scan.

    ``http://127.0.0.1:PORT/`` serves the page; ``state.json`` the progress and
    ``image/<i>.png`` the current images (NaN rows transparent over a checkerboard).
    Serves from a daemon thread (stdlib ``http.server``); bound to 127.0.0.1 only.
    """

    def __init__(self, port: int, names: Sequence[str], scan_shape: tuple[int, int], *,
                 refresh_ms: int = 300, display_px: int = 256) -> None:
        self.names = list(names)
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.images = np.full((len(self.names),) + self.scan_shape, np.nan)
        self.rows_done = 0
        self.version = 0
        self.finished = False
        self.complete = False
        self.reason: str | None = None
        self.frames_per_s = 0.0
        self._lock = threading.Lock()
        self._png_cache: dict[int, tuple[int, bytes]] = {}
        page = _PAGE.format(px=display_px, refresh_ms=int(refresh_ms)).encode()
        view = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, body: bytes, ctype: str, code: int = 200) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(page, "text/html; charset=utf-8")
                elif path == "/state.json":
                    self._send(json.dumps(view.state()).encode(), "application/json")
                elif path.startswith("/image/") and path.endswith(".png"):
                    try:
                        i = int(path[len("/image/"):-4])
                        body = view.png(i)
                    except (ValueError, IndexError):
                        self._send(b"no such image", "text/plain", 404)
                        return
                    self._send(body, "image/png")
                else:
                    self._send(b"not found", "text/plain", 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="live-view",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def update(self, rows_done: int, images: np.ndarray, frames_per_s: float = 0.0) -> None:
        with self._lock:
            self.images[:, :rows_done] = images[:, :rows_done]
            self.rows_done = rows_done
            self.frames_per_s = float(frames_per_s)
            self.version += 1

    def finish(self, complete: bool, reason: str | None = None) -> None:
        with self._lock:
            self.finished = True
            self.complete = bool(complete)
            self.reason = reason
            self.version += 1

    def state(self) -> dict:
        with self._lock:
            return {"names": self.names, "scan_shape": list(self.scan_shape),
                    "rows_done": self.rows_done, "version": self.version,
                    "finished": self.finished, "complete": self.complete,
                    "reason": self.reason, "frames_per_s": self.frames_per_s}

    def png(self, i: int) -> bytes:
        if not 0 <= i < len(self.names):
            raise IndexError(i)
        with self._lock:
            cached = self._png_cache.get(i)
            if cached is not None and cached[0] == self.version:
                return cached[1]
            img = self.images[i].copy()
            version = self.version
        body = png_bytes(img)
        with self._lock:
            self._png_cache[i] = (version, body)
        return body

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# masks and statistics from files
# ----------------------------------------------------------------------------------------------
def _grid_of(coord: np.ndarray) -> tuple[float, float]:
    """(mrad_per_px, centre px) of a regular, increasing mrad coordinate."""
    c = np.asarray(coord, float)
    step = float(c[1] - c[0])
    if step <= 0 or not np.allclose(np.diff(c), step, rtol=1e-6, atol=1e-9):
        raise ValueError("mask detector coordinates (mrad) must be regular and increasing")
    return step, float(-c[0] / step)


def _analysis_thickness_nm(path: Path) -> float | None:
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        meta = json.loads(ds.attrs.get("meta", "{}") or "{}")
    t = meta.get("thickness_nm")
    return None if t is None else float(t)


@dataclass
class MaskSet:
    """Masks read from a file: ``(k, ky, kx)`` plus names, source and detector grid (mrad)."""

    masks: np.ndarray
    names: list[str]
    source: str
    mrad_per_px: tuple[float, float] | None = None
    center_px: tuple[float, float] | None = None
    thickness_nm: float | None = None
    resampled: bool = False


def load_masks(
    paths: str | Path | Sequence[str | Path],
    *,
    names: Sequence[str] | None = None,
    thickness_nm: float | None = None,
    det_shape: tuple[int, int] | None = None,
    mrad_per_px: Sequence[float] | None = None,
    center_px: Sequence[float] | None = None,
) -> MaskSet:
    """Read a mask stack for live imaging.

    Parameters
    ----------
    paths : path or sequence of paths
        ``.npy`` ``(k, ky, kx)`` or ``(ky, kx)``; ``.npz`` (array ``masks`` + optional
        ``names``, or one array per mask named by its key); a zarr group/array (array
        ``masks``, names in its ``names`` attribute); or an ``analyse`` output ``.nc`` (its
        ``masks`` by ``name``, only those with ``has_mask``). Several ``.nc`` files form a
        library over thickness: ``thickness_nm`` picks the one whose analysed thickness
        (``meta.thickness_nm``) is nearest.
    names : sequence of str, optional
        Keep only these masks, in this order.
    thickness_nm : float, optional
        Library thickness to use (required with several ``.nc`` files).
    det_shape, mrad_per_px, center_px : optional
        The live detector's grid. Given (all three) for ``.nc`` masks (whose ky/kx coordinates
        are in mrad), the masks are resampled onto it with
        :func:`tmask_validate.pacbed.resample_library` (area-weighted; zero outside the
        library's detector).
    """
    import xarray as xr

    plist = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not plist:
        raise ValueError("no mask file given")
    for p in plist:
        if not p.exists():
            raise FileNotFoundError(f"mask file {p} does not exist")
    grid = None
    thick = None
    if len(plist) > 1:
        if not all(p.suffix == ".nc" for p in plist):
            raise ValueError("several mask files are only accepted as a library of analyse "
                             "outputs (.nc)")
        if thickness_nm is None:
            raise ValueError(f"{len(plist)} analyse outputs given: choose one with "
                             f"--thickness-nm")
        th = [_analysis_thickness_nm(p) for p in plist]
        if any(t is None for t in th):
            bad = [str(p) for p, t in zip(plist, th, strict=True) if t is None]
            raise ValueError(f"no thickness recorded in {bad} (meta.thickness_nm)")
        i = int(np.argmin(np.abs(np.asarray(th) - thickness_nm)))
        plist, thick = [plist[i]], th[i]
    p = plist[0]
    suffix = p.suffix.lower()
    if suffix == ".npy":
        m = np.load(p)
        m = m[None] if m.ndim == 2 else m
        nm = [f"mask{i}" for i in range(m.shape[0])]
    elif suffix == ".npz":
        with np.load(p) as z:
            if "masks" in z:
                m = z["masks"]
                m = m[None] if m.ndim == 2 else m
                nm = ([str(v) for v in z["names"]] if "names" in z
                      else [f"mask{i}" for i in range(m.shape[0])])
            else:
                nm = list(z.keys())
                m = np.stack([z[key] for key in nm])
    elif suffix == ".nc":
        with xr.open_dataset(p, engine="h5netcdf") as ds:
            if "masks" not in ds:
                raise ValueError(f"{p}: no 'masks' variable (not an analyse output?)")
            sel = ds["masks"]
            if "has_mask" in ds.coords:
                sel = sel.isel(name=np.flatnonzero(ds["has_mask"].values.astype(bool)))
            m = np.asarray(sel.values, dtype=np.float64)
            nm = [str(v) for v in sel["name"].values]
            gy, gx = _grid_of(ds["ky"].values), _grid_of(ds["kx"].values)
            grid = ((gy[0], gx[0]), (gy[1], gx[1]))
            if thick is None:
                meta = json.loads(ds.attrs.get("meta", "{}") or "{}")
                thick = meta.get("thickness_nm")
    elif p.is_dir() or suffix == ".zarr":
        import zarr

        node = zarr.open(str(p), mode="r")
        if isinstance(node, zarr.Group):
            if "masks" not in node:
                raise ValueError(f"{p}: zarr group without a 'masks' array")
            arr = node["masks"]
        else:
            arr = node
        m = np.asarray(arr[...])
        m = m[None] if m.ndim == 2 else m
        nm = [str(v) for v in arr.attrs.get("names", [f"mask{i}" for i in range(m.shape[0])])]
    else:
        raise ValueError(f"{p}: masks must be .npy, .npz, zarr or an analyse .nc")
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"{p}: masks must be (k, ky, kx), got shape {m.shape}")
    if len(nm) != m.shape[0]:
        raise ValueError(f"{p}: {len(nm)} names for {m.shape[0]} masks")
    if names is not None:
        missing = [n for n in names if n not in nm]
        if missing:
            raise ValueError(f"{p}: no mask named {missing}; available: {nm}")
        idx = [nm.index(n) for n in names]
        m, nm = m[idx], [nm[i] for i in idx]
    out = MaskSet(m, nm, str(p), thickness_nm=None if thick is None else float(thick))
    if grid is not None:
        out.mrad_per_px, out.center_px = grid
    want = (det_shape, mrad_per_px, center_px)
    if any(v is not None for v in want):
        if any(v is None for v in want):
            raise ValueError("resampling needs the detector shape, mrad/px and centre together")
        if grid is None:
            raise ValueError(f"{p}: these masks carry no mrad grid; only analyse outputs (.nc) "
                             f"can be resampled onto a detector calibration")
        from tmask_validate.pacbed import resample_library

        res, covered = resample_library(
            m, library_mrad_per_px=grid[0], library_center_px=grid[1],
            out_shape=tuple(int(v) for v in det_shape), out_mrad_per_px=mrad_per_px,
            out_center_px=center_px)
        res[:, ~covered] = 0.0
        out.masks = res
        out.mrad_per_px = tuple(float(v) for v in np.broadcast_to(mrad_per_px, 2))
        out.center_px = tuple(float(v) for v in center_px)
        out.resampled = True
    return out


def load_stats(path: str | Path, *, scan_shape: tuple[int, int] | None = None) -> ColumnStats:
    """Column statistics for normalised (Eq. 7) live images.

    ``path``: an ``.npz`` with ``mean``, ``std`` (``(ky, kx)``) and ``count``, or any 4D data
    file :func:`tmask_validate.io.load` reads (a reference scan; one streaming pass).
    """
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            for key in ("mean", "std"):
                if key not in z:
                    raise ValueError(f"{p}: statistics .npz needs 'mean' and 'std'")
            st = ColumnStats(np.asarray(z["mean"], float), np.asarray(z["std"], float),
                             int(z["count"]) if "count" in z else 0)
        if st.mean.shape != st.std.shape or st.mean.ndim != 2:
            raise ValueError(f"{p}: mean and std must both be (ky, kx)")
        return st
    from tmask_validate import core, io

    data = io.load(p, scan_shape=scan_shape)
    return core.column_stats(data.data)
