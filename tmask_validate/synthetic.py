"""Synthetic "experiments" from a one-cell periodic simulation (numpy/scipy only).

A perfect crystal's 4D-STEM data are periodic with the projected cell (frozen phonons aside), so a
noiseless simulation of one cell, ``I(y, x, ky, kx)`` on a periodic probe grid
``y = i·Ly/ny, x = j·Lx/nx``, defines the pattern at *any* probe position. :func:`make_experiment`
uses that to build a larger, imperfect field of view the way a microscope records it:

1. **Scan drift.** The probe of scan pixel ``(i, j)`` (nominal position ``(i·sy, j·sx)``) actually
   sits at ``(i·sy, j·sx) + d(i, j)`` on the sample. ``drift_A_per_row=(dy, dx)`` is a constant
   drift velocity per scan row (``d = i·(dy, dx)``, the usual slow-scan drift: the lattice comes
   out sheared/stretched but stays affine); a full displacement field ``(2, sy, sx)`` [Å] is also
   accepted.
2. **Sampling.** The pattern at the drifted position is interpolated from the one-cell data with
   periodic wrap-around over the two scan axes: ``"linear"`` = bilinear between the four nearest
   simulated probe positions (no negative values, no ringing).
3. **Descan.** Every pattern is shifted on the detector by
   ``offset_px + M @ (y_nominal, x_nominal)`` pixels (``M = descan_px_per_A``, 2x2, rows
   ``(ky, kx)``, columns ``(y, x)`` in px per Å): the descan follows the *scan coils*, i.e. the
   nominal probe position, not the drifted one. Sub-pixel shifts use cubic-spline interpolation
   (``scipy.ndimage.shift``, ``order=3``, zeros enter at the edges, negative overshoot clipped;
   ``descan_order=1`` for linear).
4. **Dose.** Poisson counts with expectation ``dose · sy · sx · I`` per pixel (abTEM intensities
   are fractions of the probe; electrons per probe = dose × scan-step area, as in
   :mod:`tmask_validate.noise`), clipped to ``2**bit_depth − 1`` (the saturated fraction is
   reported). ``dose_e_per_A2=None`` (infinite dose) returns the noiseless float intensities.

The truth (site table in the nominal scan frame after drift, shifts, electrons per probe,
saturation) comes back as a dict for checking an analysis against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["make_experiment", "sample_periodic", "descan_shifts_px", "drift_field_A",
           "truth_sites"]


def _pair(value: Any, name: str, *, positive: bool = True) -> tuple[float, float]:
    v = np.atleast_1d(np.asarray(value, dtype=float))
    if v.size == 1:
        v = np.repeat(v, 2)
    if v.shape != (2,) or not np.all(np.isfinite(v)) or (positive and np.any(v <= 0)):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}number or (y, x) "
                         f"pair, got {value!r}")
    return float(v[0]), float(v[1])


def drift_field_A(scan_shape: tuple[int, int], drift_A_per_row: Any) -> np.ndarray:
    """Probe displacement ``(2, sy, sx)`` [Å] from a per-row drift pair or a full field.

    ``(dy, dx)``: displacement of row ``i`` is ``i·(dy, dx)`` (constant drift velocity, the first
    row undisplaced). An array ``(2, sy, sx)`` is returned as is (checked).
    """
    sy, sx = scan_shape
    d = np.asarray(drift_A_per_row, dtype=float)
    if d.shape == (2, sy, sx):
        if not np.all(np.isfinite(d)):
            raise ValueError("drift field must be finite")
        return d.copy()
    dy, dx = _pair(d, "drift_A_per_row", positive=False)
    rows = np.arange(sy, dtype=float)[:, None] * np.ones((1, sx))
    return np.stack([rows * dy, rows * dx])


def descan_shifts_px(
    scan_shape: tuple[int, int],
    step_A: Sequence[float],
    descan_px_per_A: Any = None,
    offset_px: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """Detector shift ``(2, sy, sx)`` [px] of every pattern: ``offset + M @ (y_nom, x_nom)``.

    Parameters
    ----------
    scan_shape : (sy, sx)
    step_A : (y, x) scan step [Å]
    descan_px_per_A : (2, 2) array or None
        ``M[k, s]``: shift of detector axis ``k`` (0 = ky, 1 = kx) per Å of scan axis ``s``
        (0 = y, 1 = x). ``None`` = no descan.
    offset_px : (ky, kx)
        Shift of the first pattern.
    """
    sy, sx = scan_shape
    st_y, st_x = _pair(step_A, "step_A")
    m = np.zeros((2, 2)) if descan_px_per_A is None else np.asarray(descan_px_per_A, float)
    if m.shape != (2, 2) or not np.all(np.isfinite(m)):
        raise ValueError(f"descan_px_per_A must be a finite 2x2 matrix, got {descan_px_per_A!r}")
    off = np.asarray(offset_px, float)
    if off.shape != (2,) or not np.all(np.isfinite(off)):
        raise ValueError(f"offset_px must be a finite (ky, kx) pair, got {offset_px!r}")
    yy, xx = np.meshgrid(np.arange(sy) * st_y, np.arange(sx) * st_x, indexing="ij")
    return np.stack([off[k] + m[k, 0] * yy + m[k, 1] * xx for k in range(2)])


def sample_periodic(
    intensity4d: np.ndarray, cell_A: Sequence[float], y_A: np.ndarray, x_A: np.ndarray
) -> np.ndarray:
    """Bilinear, periodic interpolation of one-cell 4D data at probe positions ``(y_A, x_A)``.

    Parameters
    ----------
    intensity4d : ndarray (ny, nx, ky, kx)
        One projected cell on the grid ``y = i·Ly/ny``, ``x = j·Lx/nx`` (far edge excluded).
    cell_A : (Ly, Lx)
    y_A, x_A : ndarray, same shape ``S``
        Probe positions [Å] (any values; wrapped into the cell).

    Returns
    -------
    ndarray ``S + (ky, kx)`` float64. At grid positions the stored patterns exactly.
    """
    src = np.asarray(intensity4d)
    if src.ndim != 4:
        raise ValueError(f"intensity4d must be (ny, nx, ky, kx), got shape {src.shape}")
    ly, lx = _pair(cell_A, "cell_A")
    ny, nx = src.shape[:2]
    y = np.asarray(y_A, float)
    x = np.asarray(x_A, float)
    if y.shape != x.shape or not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise ValueError("y_A and x_A must be finite arrays of the same shape")
    fy = np.mod(y / ly * ny, ny)
    fx = np.mod(x / lx * nx, nx)
    # snap values within 1e-9 px of a grid point, so exact tiling reproduces the data exactly
    fy = np.where(np.abs(fy - np.rint(fy)) < 1e-9, np.rint(fy), fy) % ny
    fx = np.where(np.abs(fx - np.rint(fx)) < 1e-9, np.rint(fx), fx) % nx
    i0 = np.floor(fy).astype(int)
    j0 = np.floor(fx).astype(int)
    wy = (fy - i0)[..., None, None]
    wx = (fx - j0)[..., None, None]
    i1 = (i0 + 1) % ny
    j1 = (j0 + 1) % nx
    s = src.astype(np.float64, copy=False)
    out = (1 - wy) * (1 - wx) * s[i0, j0]
    for ii, jj, w in ((i0, j1, (1 - wy) * wx), (i1, j0, wy * (1 - wx)), (i1, j1, wy * wx)):
        if np.any(w):
            out = out + w * s[ii, jj]
    return out


def truth_sites(
    sites_one_cell: pd.DataFrame,
    cell_A: Sequence[float],
    scan_shape: tuple[int, int],
    step_A: Sequence[float],
    drift_A_per_row: Any = (0.0, 0.0),
    *,
    margin_px: float = 0.5,
) -> pd.DataFrame:
    """Site table of the drifted field of view in the *nominal* scan frame (what images show).

    A column at sample position ``P`` appears at the scan pixel whose drifted probe position is
    ``P``. For a per-row drift ``(dy, dx)`` that is the affine map ``i = Py/(sy+dy)``,
    ``y_nom = i·sy``, ``x_nom = Px − i·dx``; a full drift field is inverted numerically
    (fixed-point iteration with bilinear interpolation of the field). Columns whose image lies
    within ``margin_px`` pixels outside the scanned area are kept (they affect edge pixels).

    Returns
    -------
    DataFrame with the columns of ``sites_one_cell`` plus ``cell_i, cell_j`` (tile indices) and
    ``sample_y_A, sample_x_A`` (position on the sample).
    """
    ly, lx = _pair(cell_A, "cell_A")
    st_y, st_x = _pair(step_A, "step_A")
    sy, sx = scan_shape
    table = sites_one_cell.reset_index(drop=True)
    field = drift_field_A(scan_shape, drift_A_per_row)
    # sample area covered (with margin): extremes of the drifted probe positions
    yy, xx = np.meshgrid(np.arange(sy) * st_y, np.arange(sx) * st_x, indexing="ij")
    py, px = yy + field[0], xx + field[1]
    ci = range(int(np.floor(py.min() / ly)) - 1, int(np.ceil(py.max() / ly)) + 1)
    cj = range(int(np.floor(px.min() / lx)) - 1, int(np.ceil(px.max() / lx)) + 1)
    rows = []
    for i in ci:
        for j in cj:
            t = table.copy()
            t["cell_i"], t["cell_j"] = i, j
            t["sample_y_A"] = t["y_A"].to_numpy(float) + i * ly
            t["sample_x_A"] = t["x_A"].to_numpy(float) + j * lx
            rows.append(t)
    df = pd.concat(rows, ignore_index=True)
    Py, Px = df["sample_y_A"].to_numpy(), df["sample_x_A"].to_numpy()
    # invert P = nominal + d(nominal): fixed point nominal = P - d(nominal)
    ny_, nx_ = Py.copy(), Px.copy()
    for _ in range(50):
        coords = [np.clip(ny_ / st_y, 0, sy - 1), np.clip(nx_ / st_x, 0, sx - 1)]
        dy = ndimage.map_coordinates(field[0], coords, order=1, mode="nearest")
        dx = ndimage.map_coordinates(field[1], coords, order=1, mode="nearest")
        new_y, new_x = Py - dy, Px - dx
        done = np.max(np.abs(new_y - ny_)) + np.max(np.abs(new_x - nx_)) < 1e-10
        ny_, nx_ = new_y, new_x
        if done:
            break
    df["y_A"], df["x_A"] = ny_, nx_
    lo_y, hi_y = -margin_px * st_y, (sy - 1 + margin_px) * st_y
    lo_x, hi_x = -margin_px * st_x, (sx - 1 + margin_px) * st_x
    keep = (ny_ >= lo_y) & (ny_ <= hi_y) & (nx_ >= lo_x) & (nx_ <= hi_x)
    return df[keep].reset_index(drop=True)


def make_experiment(
    intensity4d_periodic: np.ndarray,
    *,
    cell_A: Sequence[float],
    fov_cells: Sequence[float],
    step_A: Sequence[float] | float | None = None,
    dose_e_per_A2: float | None,
    drift_A_per_row: Any = (0.0, 0.0),
    descan_px_per_A: Any = None,
    descan_offset_px: Sequence[float] = (0.0, 0.0),
    seed: int = 0,
    bit_depth: int = 12,
    sites_one_cell: pd.DataFrame | None = None,
    rows_per_block: int = 8,
    descan_order: int = 3,
) -> tuple[np.ndarray, dict]:
    """A noisy, drifted, descanned multi-cell 4D-STEM "experiment" from one-cell simulated data.

    Parameters
    ----------
    intensity4d_periodic : ndarray (ny, nx, ky, kx)
        Noiseless intensities of one projected cell on a periodic probe grid (a simulation
        store's ``intensity`` at one thickness), as fractions of the probe intensity.
    cell_A : (Ly, Lx)
        Projected cell [Å]; the simulated probe step is ``cell_A / (ny, nx)``.
    fov_cells : (cy, cx)
        Field of view in cells (need not be integers); the scan has
        ``round(c·L/step)`` positions per axis.
    step_A : (y, x) or float, optional
        Experimental scan step [Å]; default: the simulation's step.
    dose_e_per_A2 : float or None
        Electron dose [e-/Å²]; ``None`` or ``inf`` = infinite dose: the noiseless float32
        intensities are returned (no Poisson noise, no clipping).
    drift_A_per_row : (dy, dx) or ndarray (2, sy, sx)
        Scan drift: Å per scan row, or a displacement field (see :func:`drift_field_A`).
    descan_px_per_A : (2, 2) array, optional
        Descan matrix (see :func:`descan_shifts_px`); ``descan_offset_px`` the first pattern's
        shift.
    seed : int
        Seed of the Poisson noise (one stream per block of rows: reproducible).
    bit_depth : int
        Detector counter depth: counts are clipped to ``2**bit_depth − 1``.
    sites_one_cell : DataFrame, optional
        One-cell site table (``label, y_A, x_A, ...``, cell frame); gives ``truth["sites"]``.
    rows_per_block : int
        Scan rows built at a time (memory: block × sx × ky × kx float64).
    descan_order : int
        Spline order of the sub-pixel descan shift (``scipy.ndimage.shift``): 3 (default) keeps
        the pattern sharp (a linear shift by half a pixel averages neighbouring pixels, a blur a
        real descan does not cause); 1 = linear (no overshoot at the disc edge). Negative
        overshoots are clipped to 0.

    Returns
    -------
    counts : ndarray (sy, sx, ky, kx)
        uint16 (bit depth ≤ 16) or uint32 counts; float32 intensities for infinite dose.
    truth : dict
        ``step_A``, ``scan_shape``, ``drift_A`` (2, sy, sx), ``descan_px`` (2, sy, sx),
        ``descan_px_per_A``, ``electrons_per_probe``, ``expected_counts_per_pattern``
        (sy, sx) (before clipping), ``saturation_value``, ``saturated_fraction`` (of pixels),
        ``n_saturated``, ``dose_e_per_A2``, ``seed``, ``sites`` (DataFrame or None).
    """
    src = np.asarray(intensity4d_periodic)
    if src.ndim != 4:
        raise ValueError(f"intensity4d_periodic must be (ny, nx, ky, kx), got {src.shape}")
    if not np.all(np.isfinite(src)) or src.min() < -1e-6:
        raise ValueError("intensity4d_periodic must be finite and non-negative")
    ly, lx = _pair(cell_A, "cell_A")
    ny, nx, kdy, kdx = src.shape
    sim_step = (ly / ny, lx / nx)
    st_y, st_x = sim_step if step_A is None else _pair(step_A, "step_A")
    cy, cx = _pair(fov_cells, "fov_cells")
    sy, sx = max(1, int(round(cy * ly / st_y))), max(1, int(round(cx * lx / st_x)))
    if bit_depth not in (1, 6, 8, 12, 16, 24, 32):
        raise ValueError(f"bit_depth must be one of 1, 6, 8, 12, 16, 24, 32, got {bit_depth}")
    noiseless = dose_e_per_A2 is None or np.isinf(float(dose_e_per_A2))
    if not noiseless and not (np.isfinite(dose_e_per_A2) and dose_e_per_A2 > 0):
        raise ValueError(f"dose_e_per_A2 must be positive (or None), got {dose_e_per_A2!r}")
    electrons = None if noiseless else float(dose_e_per_A2) * st_y * st_x
    vmax = 2**bit_depth - 1
    out_dtype = np.float32 if noiseless else (np.uint16 if bit_depth <= 16 else np.uint32)
    drift = drift_field_A((sy, sx), drift_A_per_row)
    shifts = descan_shifts_px((sy, sx), (st_y, st_x), descan_px_per_A, descan_offset_px)
    out = np.empty((sy, sx, kdy, kdx), dtype=out_dtype)
    expected_sum = np.zeros((sy, sx))
    n_sat = 0
    yy, xx = np.meshgrid(np.arange(sy) * st_y, np.arange(sx) * st_x, indexing="ij")
    for r0 in range(0, sy, rows_per_block):
        r1 = min(sy, r0 + rows_per_block)
        blk = sample_periodic(src, (ly, lx), yy[r0:r1] + drift[0, r0:r1],
                              xx[r0:r1] + drift[1, r0:r1])
        for i in range(r1 - r0):
            for j in range(sx):
                dky, dkx = shifts[0, r0 + i, j], shifts[1, r0 + i, j]
                if dky != 0 or dkx != 0:
                    blk[i, j] = np.clip(ndimage.shift(blk[i, j], (dky, dkx), order=descan_order,
                                                      mode="constant", cval=0.0), 0, None)
        if noiseless:
            out[r0:r1] = blk
            expected_sum[r0:r1] = blk.sum(axis=(2, 3))
            continue
        lam = blk * electrons
        expected_sum[r0:r1] = lam.sum(axis=(2, 3))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(r0)]))
        cnt = rng.poisson(lam)
        sat = cnt > vmax
        n_sat += int(sat.sum())
        out[r0:r1] = np.minimum(cnt, vmax).astype(out_dtype)
    truth = {
        "step_A": (st_y, st_x), "scan_shape": (sy, sx), "simulation_step_A": sim_step,
        "cell_A": (ly, lx), "drift_A": drift, "descan_px": shifts,
        "descan_px_per_A": None if descan_px_per_A is None else np.asarray(descan_px_per_A,
                                                                           float),
        "electrons_per_probe": electrons, "expected_counts_per_pattern": expected_sum,
        "saturation_value": None if noiseless else vmax,
        "n_saturated": n_sat, "saturated_fraction": n_sat / out.size,
        "dose_e_per_A2": None if noiseless else float(dose_e_per_A2), "seed": int(seed),
        "sites": None if sites_one_cell is None else truth_sites(
            sites_one_cell, (ly, lx), (sy, sx), (st_y, st_x), drift),
    }
    return out, truth
