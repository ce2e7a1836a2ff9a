"""Array helpers for the paper's visualisations (Fig. 1c and Fig. 2c); no plotting here."""

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
