"""Shared tiny synthetic fixtures (asymmetric shapes so that axis mix-ups fail loudly)."""

from __future__ import annotations

import numpy as np
import pytest

#: (scan_y, scan_x, ky, kx) of the tiny random datasets -- all different on purpose
TINY_SHAPE = (7, 5, 4, 6)
DTYPES = (np.uint8, np.uint16, np.uint32, np.float32, np.float64)


def make_tiny_data(dtype=np.float64, shape=TINY_SHAPE, seed: int = 0, dead: bool = True):
    """Random Poisson-ish 4D data with a structured signal, optionally with dead columns.

    Column (0, 0) is constant (zero variance) and column (0, 1) all zero when ``dead``.
    """
    rng = np.random.default_rng(seed)
    sy, sx, ky, kx = shape
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    signal = 1 + np.cos(2 * np.pi * yy / 3.1) * np.sin(2 * np.pi * xx / 2.3 + 0.4)
    base = rng.uniform(2, 30, size=(ky, kx))
    lam = base[None, None] * (1 + 0.5 * signal[..., None, None] * rng.uniform(-1, 1, (ky, kx)))
    d = rng.poisson(np.clip(lam, 0, None)).astype(np.float64)
    if np.dtype(dtype).kind == "f":
        d = d + rng.normal(0, 0.3, d.shape)
    if dead:
        d[..., 0, 0] = 7
        d[..., 0, 1] = 0
    if np.dtype(dtype).kind == "u":
        d = np.clip(np.round(d), 0, None)
    return d.astype(dtype)


def make_template(scan_shape=TINY_SHAPE[:2], seed: int = 1, k: int | None = None):
    """Random real template(s) (scan_y, scan_x) or (k, scan_y, scan_x)."""
    rng = np.random.default_rng(seed)
    shape = scan_shape if k is None else (k, *scan_shape)
    return rng.normal(size=shape)


def make_region(scan_shape=TINY_SHAPE[:2]):
    """An irregular partial-template region with ~half the positions."""
    sy, sx = scan_shape
    yy, xx = np.meshgrid(np.arange(sy), np.arange(sx), indexing="ij")
    return ((yy * 3 + xx * 5) % 7 < 4) & ~((yy == 0) & (xx == 0))


class CountingArray:
    """Array-like (zarr-style) wrapper that counts full passes by counting row reads."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.rows_read = 0

    def __getitem__(self, key):
        out = self._arr[key]
        if isinstance(key, slice):
            self.rows_read += len(range(*key.indices(self.shape[0]))) * self.shape[1]
        elif isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], slice):
            self.rows_read += len(range(*key[1].indices(self.shape[1])))
        else:
            self.rows_read += int(np.prod(out.shape[:-2])) if out.ndim > 2 else 1
        return out

    @property
    def passes(self) -> float:
        return self.rows_read / (self.shape[0] * self.shape[1])


@pytest.fixture
def tiny_data():
    return make_tiny_data(np.float64)


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def tiny_data_any_dtype(request):
    return make_tiny_data(request.param)


def weak_phase_dataset(
    n_px: int = 64,
    step_px: tuple[int, int] = (2, 3),
    atoms=((20.3, 30.1, 1.0, 2.0, 2.0), (44.0, 12.5, 0.5, 1.5, 3.0)),
    sigma: float = 0.2,
    aperture_frac: float = 0.25,
):
    """Weak-phase-object 4D data made with numpy FFTs only.

    The object is ``exp(i σ V)`` with ``V`` a sum of positive gaussians ``(y, x, height,
    sigma_y, sigma_x)`` in real-space pixels on an ``n_px`` square periodic grid.  The probe
    is a circular aperture in reciprocal space; patterns are ``|fftshift(fft2(ψ))|²`` so the
    detector index increases with +k along each axis (ky ↔ y, kx ↔ x).

    Returns ``data (sy, sx, n_px, n_px)``, ``V`` (n_px, n_px), the scan positions in pixels
    ``(ys, xs)`` and the probe intensity ``|P|²`` centred at (0, 0).
    """
    yy, xx = np.meshgrid(np.arange(n_px), np.arange(n_px), indexing="ij")
    V = np.zeros((n_px, n_px))
    for y0, x0, h, sgy, sgx in atoms:
        V += h * np.exp(-((yy - y0) ** 2) / (2 * sgy**2) - ((xx - x0) ** 2) / (2 * sgx**2))
    trans = np.exp(1j * sigma * V)
    q = np.fft.fftfreq(n_px)
    qq = np.sqrt(q[:, None] ** 2 + q[None, :] ** 2)
    probe = np.fft.ifft2((qq < aperture_frac * 0.5).astype(complex))  # centred at pixel (0,0)
    probe /= np.sqrt((np.abs(probe) ** 2).sum())
    ys = np.arange(0, n_px, step_px[0])
    xs = np.arange(0, n_px, step_px[1])
    if n_px % step_px[1]:
        xs = xs[: n_px // step_px[1]]
    data = np.empty((ys.size, xs.size, n_px, n_px))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            p = np.roll(probe, (y, x), axis=(0, 1))
            data[i, j] = np.abs(np.fft.fftshift(np.fft.fft2(p * trans))) ** 2
    return data, V, (ys, xs), np.abs(probe) ** 2
