"""Array helpers for the paper's visualisations (Figs. 1c, 2c, 5d); no plotting here."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._detectors import annular_mask, scattering_angle_mrad
from ._pcc import (
    _check_normalisation,
    _pcc_mask_and_stats,
    _weights_for,
    column_stats,
)
from ._stream import check_data


def _even_pick(count: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` evenly spaced elements of ``range(count)``."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise ValueError(f"max_rows/max_cols must be >= 1, got {limit}")
    return np.unique(np.linspace(0, count - 1, int(limit)).round().astype(np.int64))


def _read_rows(data: Any, info, rows: np.ndarray) -> np.ndarray:
    """Read selected rows of D (probe positions) as float64 (len(rows), n)."""
    sx = info.scan_shape[1]
    if isinstance(data, list | tuple):
        data = np.asarray(data)
    if isinstance(data, np.ndarray):
        out = data.reshape(info.m, info.n)[rows] if data.flags.c_contiguous else np.stack(
            [np.asarray(data[r // sx, r % sx]).reshape(-1) for r in rows])
    else:
        out = np.stack([np.asarray(data[int(r // sx), int(r % sx)]).reshape(-1) for r in rows])
    return out.astype(np.float64)


def sorted_d_matrix(
    data: Any,
    *,
    center_px: Any = None,
    mrad_per_px: Any = None,
    high_angle_mrad: float = 50.0,
    max_rows: int | None = 512,
    max_cols: int | None = 1024,
    normalisation: str = "pcc",
    chunk_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The normalised D̂ matrix arranged as in Fig. 1c.

    Columns (pixel-STEM images) are normalised by Eq. 4 (or Eq. 8) with all-position
    statistics and sorted by increasing scattering angle; rows (probe positions) are sorted
    by increasing intensity at angles ``>= high_angle_mrad`` (top row = least).  At most
    ``max_rows`` x ``max_cols`` evenly spaced rows/columns of the sorted order are returned.
    Two streaming passes plus a read of the selected rows.

    Returns
    -------
    matrix : ndarray (rows, cols) float64
    angles_mrad : ndarray (cols,) float64
        Scattering angle of each returned column.
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    from ._detectors import virtual_images  # local: avoids an import cycle at load time

    theta = scattering_angle_mrad(info.det_shape, center_px=center_px,
                                  mrad_per_px=mrad_per_px).reshape(-1)
    hi = annular_mask(info.det_shape, inner_mrad=high_angle_mrad, outer_mrad=np.inf,
                      center_px=center_px, mrad_per_px=mrad_per_px)
    st = column_stats(data, chunk_bytes=chunk_bytes)
    hi_img = virtual_images(data, hi, chunk_bytes=chunk_bytes).reshape(-1)
    row_order = np.argsort(hi_img, kind="stable")[_even_pick(info.m, max_rows)]
    col_order = np.argsort(theta, kind="stable")[_even_pick(info.n, max_cols)]
    scale = _weights_for(np.ones((1, info.n)), st, normalisation)[0]
    rows = _read_rows(data, info, row_order)
    mat = (rows[:, col_order] - st.mean.reshape(-1)[col_order]) * scale[col_order]
    return mat, theta[col_order]


def angular_profiles(
    data: Any,
    template_or_reference_image: Any,
    *,
    center_px: Any = None,
    mrad_per_px: Any = None,
    normalisation: str = "pcc",
    region: Any = None,
    chunk_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-detector-pixel scattering angle, mean intensity and PCC (Fig. 2c), one pass.

    Returns
    -------
    dict
        ``angle_mrad``, ``mean_intensity`` and ``pcc`` -- flat ``(ky*kx,)`` float64 arrays
        sorted by increasing angle -- and ``index`` (the flat detector pixel of each entry).
        ``pcc`` is the map of :func:`pcc_mask` with the given ``normalisation``;
        ``mean_intensity`` is the column mean over the positions used.
    """
    info = check_data(data)
    ref = np.asarray(template_or_reference_image)
    if ref.ndim != 2:
        raise ValueError(f"template_or_reference_image must be 2D (scan_y, scan_x), got "
                         f"shape {ref.shape}")
    r, st, _, _ = _pcc_mask_and_stats(data, ref, normalisation, region, chunk_bytes, False)
    theta = scattering_angle_mrad(info.det_shape, center_px=center_px,
                                  mrad_per_px=mrad_per_px).reshape(-1)
    order = np.argsort(theta, kind="stable")
    return {
        "angle_mrad": theta[order],
        "mean_intensity": st.mean.reshape(-1)[order],
        "pcc": r.reshape(-1)[order],
        "index": order,
    }


def binned_profile(
    angle_mrad: Any,
    values: Any,
    *,
    bin_mrad: float,
    quantiles: tuple[float, float] = (0.16, 0.84),
) -> dict[str, np.ndarray]:
    """Azimuthal mean of per-pixel ``values`` in rings of width ``bin_mrad`` (Fig. 2c).

    Parameters
    ----------
    angle_mrad, values : array-like, same size
        Scattering angle and value of each detector pixel (any shape; flattened). Pixels with
        a non-finite value are left out.
    bin_mrad : float
        Ring width in mrad (> 0); rings start at 0 mrad.
    quantiles : (low, high)
        The spread band: these quantiles of the values in each ring.

    Returns
    -------
    dict
        ``center_mrad`` (ring centres), ``mean``, ``low``, ``high`` and ``count`` (pixels per
        ring), for the non-empty rings only.
    """
    a = np.asarray(angle_mrad, np.float64).ravel()
    v = np.asarray(values, np.float64).ravel()
    if a.shape != v.shape:
        raise ValueError(f"angle_mrad and values differ in size: {a.size} vs {v.size}")
    if not (np.isfinite(bin_mrad) and bin_mrad > 0):
        raise ValueError(f"bin_mrad must be positive, got {bin_mrad!r}")
    ok = np.isfinite(a) & np.isfinite(v)
    a, v = a[ok], v[ok]
    idx = np.floor(a / bin_mrad).astype(np.int64)
    out = {k: [] for k in ("center_mrad", "mean", "low", "high", "count")}
    for i in np.unique(idx):
        sel = v[idx == i]
        out["center_mrad"].append((i + 0.5) * bin_mrad)
        out["mean"].append(sel.mean())
        lo, hi = np.quantile(sel, quantiles)
        out["low"].append(lo)
        out["high"].append(hi)
        out["count"].append(sel.size)
    return {k: np.asarray(x, np.int64 if k == "count" else np.float64) for k, x in out.items()}


def sites_near_line(
    y_A: Any,
    x_A: Any,
    *,
    y0_A: float,
    half_width_A: float,
    cell_A: Any = None,
    origin_A: Any = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Sites within ``half_width_A`` of the horizontal line ``y = y0_A`` (Fig. 5d markers).

    With a periodic ``cell_A = (Ly, Lx)`` distances wrap: a column at ``y0 + Ly - 0.1`` is
    0.1 Å from the line, and x positions are returned wrapped into ``[0, Lx)`` measured from
    ``origin_A[1]``. Without a cell: plain distances, x relative to the origin.

    Returns
    -------
    index : ndarray (k,) int
        Indices of the selected sites.
    x_along_A : ndarray (k,) float
        Their position along the line (Å from the origin).
    """
    y = np.asarray(y_A, np.float64).ravel()
    x = np.asarray(x_A, np.float64).ravel() - float(origin_A[1])
    dy = y - float(y0_A)
    if cell_A is not None:
        ly, lx = (float(c) for c in np.asarray(cell_A, np.float64).ravel()[:2])
        dy = (dy + ly / 2) % ly - ly / 2
        x = np.mod(x, lx)
    idx = np.flatnonzero(np.abs(dy) <= float(half_width_A))
    return idx, x[idx]
