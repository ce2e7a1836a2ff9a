"""Electron-dose (shot) noise for noiseless simulated 4D-STEM data (numpy only).

Model: a probe at one scan position carries ``N = dose_e_per_A2 * step_y_A * step_x_A``
electrons (the dose is spread uniformly over the scanned area). abTEM intensities are
normalised to 1 per probe, so a detector pixel holding the fraction ``I`` of the probe
intensity receives Poisson(``N * I``) counts; the expected counts of a pattern are ``N`` times
the fraction of the intensity that lands on the (stored) detector.

Random numbers are drawn per (thickness index, scan row) from a seed sequence keyed by
``(seed, dose, variable, thickness index, row)``: results are reproducible for a seed and do
not depend on how the data are chunked or processed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

#: counts are stored as uint32; expected values must stay far below its range
_MAX_EXPECTED = 2.0**31


def electrons_per_probe(dose_e_per_A2: float, step_A: Sequence[float]) -> float:
    """Electrons per probe position for a dose [e-/Å²] and scan step ``(y, x)`` [Å]."""
    dose = float(dose_e_per_A2)
    if not (np.isfinite(dose) and dose > 0):
        raise ValueError(f"dose_e_per_A2 must be a positive number, got {dose_e_per_A2!r}")
    sy, sx = (float(s) for s in step_A)
    if not (sy > 0 and sx > 0 and np.isfinite(sy) and np.isfinite(sx)):
        raise ValueError(f"step_A must be two positive numbers, got {step_A!r}")
    return dose * sy * sx


def dose_key(dose_e_per_A2: float) -> str:
    """A file-name friendly key for a dose, e.g. ``1e+05`` -> ``"dose_1e+05"``."""
    return f"dose_{float(dose_e_per_A2):.3g}"


def stream_id(name: str) -> int:
    """Integer id of a named random stream (e.g. a detector), 0 for ``"intensity"``."""
    return 0 if name == "intensity" else zlib.crc32(name.encode()) | 1


def _row_rng(seed: int, dose_e_per_A2: float, thickness_index: int, row: int, stream: int):
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    dose_tag = zlib.crc32(repr(float(dose_e_per_A2)).encode())
    ss = np.random.SeedSequence(
        [int(seed), dose_tag, int(stream), int(thickness_index), int(row)])
    return np.random.default_rng(ss)


def poisson_counts(
    intensity: np.ndarray,
    electrons: float,
    *,
    seed: int,
    dose_e_per_A2: float,
    thickness_index: int = 0,
    row0: int = 0,
    stream: int = 0,
) -> np.ndarray:
    """Poisson counts for a block of rows of one thickness.

    Parameters
    ----------
    intensity : ndarray (rows, ...)
        Non-negative noiseless intensities (fraction of the probe per pixel or per image).
        Axis 0 are scan rows; row ``r`` of the block is global row ``row0 + r``.
    electrons : float
        Electrons per probe position (:func:`electrons_per_probe`).
    seed, dose_e_per_A2, thickness_index, row0, stream : int, float, int, int, int
        Select the random stream of each row (see module docstring); ``stream`` separates
        variables of one store (:func:`stream_id`), so that e.g. a detector image does not
        reuse the random numbers of the 4D data.

    Returns
    -------
    ndarray of uint32, same shape.
    """
    x = np.asarray(intensity)
    if x.ndim < 1:
        raise ValueError("intensity must have a leading row axis")
    if not np.all(np.isfinite(x)):
        raise ValueError("intensity contains NaN or inf")
    if x.size and x.min() < -1e-6:
        raise ValueError(f"intensity must be non-negative (min {x.min():.3g})")
    lam = np.clip(x.astype(np.float64), 0.0, None) * float(electrons)
    if lam.size and lam.max() >= _MAX_EXPECTED:
        raise ValueError(
            f"expected counts up to {lam.max():.3g} per pixel overflow the uint32 counts; "
            "lower the dose"
        )
    out = np.empty(x.shape, dtype=np.uint32)
    for r in range(x.shape[0]):
        rng = _row_rng(seed, dose_e_per_A2, thickness_index, row0 + r, stream)
        out[r] = rng.poisson(lam[r])
    return out


def add_dose_noise(
    intensity: np.ndarray,
    *,
    dose_e_per_A2: float,
    step_A: Sequence[float],
    seed: int,
    rows_per_block: int = 8,
    stream: int = 0,
) -> np.ndarray:
    """Poisson-noisy counts for data shaped ``(thickness, scan_y, scan_x, ...)``.

    Works on any array-like supporting slicing (numpy, zarr, dask); reads ``rows_per_block``
    scan rows at a time. Returns uint32 counts of the same shape (in memory).
    """
    shape = tuple(intensity.shape)
    if len(shape) < 3:
        raise ValueError(f"expected (thickness, scan_y, scan_x, ...) data, got shape {shape}")
    electrons = electrons_per_probe(dose_e_per_A2, step_A)
    out = np.empty(shape, dtype=np.uint32)
    for t in range(shape[0]):
        for r0 in range(0, shape[1], rows_per_block):
            block = np.asarray(intensity[t, r0:r0 + rows_per_block])
            out[t, r0:r0 + rows_per_block] = poisson_counts(
                block, electrons, seed=seed, dose_e_per_A2=dose_e_per_A2,
                thickness_index=t, row0=r0, stream=stream)
    return out
