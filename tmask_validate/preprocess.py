"""Preprocessing of experimental 4D-STEM data: bad pixels, BF-disc centres, descan, binning.

All functions accept the DataArray of :func:`tmask_validate.io.load` (lazy, dask-backed) and keep
it lazy where the operation allows (shifts, masking, binning, cropping); statistics that need a
pass over the data (disc centres, bad-pixel statistics) stream over scan rows in float64.
Calibration changes (centre, binning, cropping) are written back into ``attrs["calibration"]``
and the ``ky``/``kx`` coordinates.

Descan correction
-----------------
The bright-field disc centre of every pattern is its thresholded centroid (intensity-weighted
centroid of the pixels above ``threshold_rel`` × the pattern maximum). Descan moves the disc
*linearly* with probe position, so a plane ``c(y, x) = c0 + gy·y + gx·x`` (per component, least
squares with one round of 3-MAD outlier rejection, so atomic-contrast CoM wiggles and bad
patterns do not bias it) is fitted to the centre map, and every pattern is shifted by
``target − c(y, x)`` (target = the plane's mean), which removes the descan but keeps the real
beam deflections (the CoM signal) intact. Two shift methods:

- ``"integer"`` (default): whole-pixel shifts (rounded), zero-filled at the edges; exact counts,
  dtype kept, residual error ≤ 0.5 px.
- ``"fourier"``: sub-pixel shift by a Fourier phase ramp; float32 output, periodic wrap-around at
  the detector edges and slight ringing at sharp disc edges (keep the disc away from the edges).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from tmask_validate.calibration import Calibration

__all__ = [
    "disc_center",
    "disc_centers",
    "fit_descan",
    "shift_patterns",
    "descan_correct",
    "set_center",
    "bin_detector",
    "crop_detector",
    "pixel_statistics",
    "find_bad_pixels",
    "bad_pixel_report",
    "exclude_pixels",
]


def _raw(data):
    return data.data if isinstance(data, xr.DataArray) else data


def _check4d(data) -> tuple[int, int, int, int]:
    if len(data.shape) != 4:
        raise ValueError(f"expected 4D data (scan_y, scan_x, ky, kx), got shape {data.shape}")
    return tuple(int(v) for v in data.shape)


def _calibration(arr: xr.DataArray) -> Calibration:
    c = arr.attrs.get("calibration")
    if c is None:
        return Calibration(extra={"uncalibrated": True})
    return Calibration.from_dict(json.loads(c) if isinstance(c, str) else c)


def _with_calibration(arr: xr.DataArray, cal: Calibration) -> xr.DataArray:
    """Write a calibration into attrs and recompute the ky/kx coordinates from it."""
    ny, nx = arr.sizes["ky"], arr.sizes["kx"]
    c = cal.center_px if cal.center_px is not None else ((ny - 1) / 2, (nx - 1) / 2)
    mrad = cal.mrad_per_px if cal.mrad_per_px is not None else (1.0, 1.0)  # else pixel units
    out = arr.assign_coords(
        ky=("ky", (np.arange(ny) - c[0]) * mrad[0], arr["ky"].attrs),
        kx=("kx", (np.arange(nx) - c[1]) * mrad[1], arr["kx"].attrs),
    )
    out.attrs = dict(arr.attrs)
    out.attrs["calibration"] = json.dumps(cal.to_dict())
    out.attrs["center_px"] = [float(c[0]), float(c[1])]
    return out


def _replace(cal: Calibration, **kw) -> Calibration:
    d = cal.to_dict()
    d.update(kw)
    return Calibration.from_dict(d)


# ----------------------------------------------------------------------------------------------
# disc centres, descan
# ----------------------------------------------------------------------------------------------
def _centroids(block: np.ndarray, threshold_rel: float) -> np.ndarray:
    """Thresholded centroids (2, ...) of a stack (..., ky, kx); NaN for empty patterns."""
    b = np.asarray(block, dtype=np.float64)
    ny, nx = b.shape[-2:]
    peak = b.max(axis=(-2, -1), keepdims=True)
    w = np.where(b >= threshold_rel * peak, b, 0.0)
    w[np.broadcast_to(peak <= 0, w.shape)] = 0.0
    tot = w.sum(axis=(-2, -1))
    cy = (w.sum(axis=-1) * np.arange(ny)).sum(axis=-1)
    cx = (w.sum(axis=-2) * np.arange(nx)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.where(tot > 0, cy / tot, np.nan), np.where(tot > 0, cx / tot, np.nan)])


def disc_center(pattern: np.ndarray, *, threshold_rel: float = 0.5) -> tuple[float, float]:
    """Bright-field disc centre ``(ky, kx)`` in pixels: centroid of pixels >= threshold × max.

    Raises
    ------
    ValueError
        For an empty (all-zero) pattern or a threshold outside (0, 1].
    """
    if not 0 < threshold_rel <= 1:
        raise ValueError(f"threshold_rel must be in (0, 1], got {threshold_rel}")
    p = np.asarray(pattern)
    if p.ndim != 2:
        raise ValueError(f"expected a 2D pattern, got shape {p.shape}")
    c = _centroids(p, threshold_rel)
    if not np.all(np.isfinite(c)):
        raise ValueError("pattern has no positive intensity")
    return float(c[0]), float(c[1])


def disc_centers(data, *, threshold_rel: float = 0.5, rows_per_chunk: int = 8) -> np.ndarray:
    """Bright-field disc centre of every pattern (one streaming pass).

    Returns
    -------
    ndarray (2, sy, sx) float64
        ``[0]`` = ky, ``[1]`` = kx centre in detector pixels. Empty patterns get the centre of
        the position-averaged pattern (never NaN).
    """
    if not 0 < threshold_rel <= 1:
        raise ValueError(f"threshold_rel must be in (0, 1], got {threshold_rel}")
    raw = _raw(data)
    sy, sx, ny, nx = _check4d(raw)
    out = np.empty((2, sy, sx))
    total = np.zeros((ny, nx))
    for r0 in range(0, sy, rows_per_chunk):
        blk = np.asarray(raw[r0:r0 + rows_per_chunk], dtype=np.float64)
        out[:, r0:r0 + len(blk)] = _centroids(blk, threshold_rel)
        total += blk.sum(axis=(0, 1))
    bad = ~np.isfinite(out)
    if bad.any():
        if total.max() <= 0:
            raise ValueError("all patterns are empty")
        c = _centroids(total, threshold_rel)
        out[0][bad[0]] = c[0]
        out[1][bad[1]] = c[1]
    return out


def fit_descan(centers: np.ndarray) -> dict:
    """Fit a plane to each component of a disc-centre map (robust least squares).

    Parameters
    ----------
    centers : ndarray (2, sy, sx)
        From :func:`disc_centers` (pixels).

    Returns
    -------
    dict
        ``coef`` (2, 3): ``[c0, d/d(scan row), d/d(scan column)]`` per component (px per probe
        step), ``fitted`` (2, sy, sx), ``residual_rms_px`` (2,), ``n_outliers``.
    """
    c = np.asarray(centers, dtype=np.float64)
    if c.ndim != 3 or c.shape[0] != 2 or not np.all(np.isfinite(c)):
        raise ValueError("centers must be a finite (2, sy, sx) array")
    _, sy, sx = c.shape
    yy, xx = np.mgrid[:sy, :sx]
    design = np.column_stack([np.ones(sy * sx), yy.ravel(), xx.ravel()]).astype(float)
    coef = np.zeros((2, 3))
    fitted = np.zeros_like(c)
    rms = np.zeros(2)
    n_out = 0
    for k in range(2):
        v = c[k].ravel()
        use = np.ones(v.size, bool)
        for _ in range(20):  # iterate to a self-consistent inlier set
            sol, *_ = np.linalg.lstsq(design[use], v[use], rcond=None)
            r = v - design @ sol
            mad = 1.4826 * np.median(np.abs(r[use] - np.median(r[use])))
            new_use = np.abs(r) <= max(3.5 * mad, 1e-9)
            if new_use.sum() < 3 or np.array_equal(new_use, use):
                break
            use = new_use
        sol, *_ = np.linalg.lstsq(design[use], v[use], rcond=None)
        coef[k] = sol
        fitted[k] = (design @ sol).reshape(sy, sx)
        rms[k] = float(np.sqrt(np.mean((v - design @ sol)[use] ** 2)))
        n_out += int((~use).sum())
    return {"coef": coef, "fitted": fitted, "residual_rms_px": rms, "n_outliers": n_out}


def _shift_block(block: np.ndarray, dy: np.ndarray, dx: np.ndarray, method: str) -> np.ndarray:
    ny, nx = block.shape[-2:]
    dy = dy[..., 0, 0]
    dx = dx[..., 0, 0]
    if method == "fourier":
        fy = np.fft.fftfreq(ny)[:, None]
        fx = np.fft.fftfreq(nx)[None, :]
        spec = np.fft.fft2(block.astype(np.float64), axes=(-2, -1))
        ramp = np.exp(-2j * np.pi * (fy * dy[..., None, None] + fx * dx[..., None, None]))
        return np.fft.ifft2(spec * ramp, axes=(-2, -1)).real.astype(np.float32)
    out = np.zeros_like(block)
    iy = np.rint(dy).astype(int)
    ix = np.rint(dx).astype(int)
    for idx in np.ndindex(block.shape[:-2]):
        sy_, sx_ = iy[idx], ix[idx]
        if abs(sy_) >= ny or abs(sx_) >= nx:
            continue
        src_y = slice(max(0, -sy_), ny - max(0, sy_))
        dst_y = slice(max(0, sy_), ny - max(0, -sy_))
        src_x = slice(max(0, -sx_), nx - max(0, sx_))
        dst_x = slice(max(0, sx_), nx - max(0, -sx_))
        out[idx + (dst_y, dst_x)] = block[idx + (src_y, src_x)]
    return out


def shift_patterns(data, shifts_px: np.ndarray, *, method: str = "integer") -> da.Array:
    """Shift every pattern by ``shifts_px[:, y, x]`` (ky, kx) pixels, lazily.

    A positive shift moves the content to larger indices. ``method="integer"`` rounds and
    zero-fills (dtype kept); ``"fourier"`` shifts by a phase ramp (float32, periodic wrap).

    Returns
    -------
    dask.array.Array (sy, sx, ky, kx)
    """
    if method not in ("integer", "fourier"):
        raise ValueError(f"method must be 'integer' or 'fourier', got {method!r}")
    raw = _raw(data)
    sy, sx, ny, nx = _check4d(raw)
    s = np.asarray(shifts_px, dtype=np.float64)
    if s.shape != (2, sy, sx) or not np.all(np.isfinite(s)):
        raise ValueError(f"shifts_px must be a finite (2, {sy}, {sx}) array, got {s.shape}")
    arr = raw if isinstance(raw, da.Array) else da.from_array(raw, chunks=(8, -1, -1, -1))
    arr = arr.rechunk({2: -1, 3: -1})
    chunks = (arr.chunks[0], arr.chunks[1], (1,), (1,))
    dy = da.from_array(s[0][:, :, None, None], chunks=chunks)
    dx = da.from_array(s[1][:, :, None, None], chunks=chunks)
    dtype = np.float32 if method == "fourier" else arr.dtype
    return da.map_blocks(_shift_block, arr, dy, dx, method, dtype=dtype)


def descan_correct(
    data: xr.DataArray, *, method: str = "integer", threshold_rel: float = 0.5,
    centers: np.ndarray | None = None,
) -> xr.DataArray:
    """Remove the descan (linear drift of the BF disc with probe position).

    Computes the disc centres (one pass; or pass ``centers``), fits a plane (:func:`fit_descan`),
    shifts every pattern by ``target − plane(y, x)`` with ``target`` the plane's mean, and sets
    the calibration centre to ``target``. See the module notes for the two shift methods.

    Returns
    -------
    xarray.DataArray
        Lazy; ``attrs["descan"]`` (JSON: plane coefficients, residual rms, method, target).
    """
    if not isinstance(data, xr.DataArray):
        raise ValueError("descan_correct needs the DataArray of tmask_validate.io.load")
    c = disc_centers(data, threshold_rel=threshold_rel) if centers is None else centers
    fit = fit_descan(c)
    target = fit["fitted"].mean(axis=(1, 2))
    shifts = target[:, None, None] - fit["fitted"]
    shifted = shift_patterns(data, shifts, method=method)
    out = xr.DataArray(shifted, dims=data.dims, coords=data.coords, attrs=dict(data.attrs),
                       name=data.name)
    out.attrs["descan"] = json.dumps({
        "method": method, "coef_px": fit["coef"].tolist(), "target_px": target.tolist(),
        "residual_rms_px": fit["residual_rms_px"].tolist(), "n_outliers": fit["n_outliers"],
    })
    return set_center(out, tuple(target))


def set_center(data: xr.DataArray, center_px: Sequence[float]) -> xr.DataArray:
    """Set the zero-angle pixel (e.g. the measured disc centre): calibration + coordinates."""
    cal = _calibration(data)
    out = _with_calibration(data, _replace(cal, center_px=[float(v) for v in center_px]))
    out.attrs["center_px_source"] = "set_center"
    return out


def bin_detector(data: xr.DataArray, factor: int) -> xr.DataArray:
    """Sum ``factor × factor`` detector pixels (trailing pixels trimmed); mrad_per_px × factor.

    Integer data are summed in a wide integer type (no overflow).
    """
    f = int(factor)
    if f < 1 or f != factor:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if f == 1:
        return data
    cal = _calibration(data)
    ny, nx = data.sizes["ky"], data.sizes["kx"]
    if ny < f or nx < f:
        raise ValueError(f"detector {ny}x{nx} smaller than the binning factor {f}")
    raw = data.data[..., : ny // f * f, : nx // f * f]
    wide = np.uint64 if np.issubdtype(raw.dtype, np.unsignedinteger) else (
        np.int64 if np.issubdtype(raw.dtype, np.integer) else raw.dtype)
    sy, sx = raw.shape[:2]
    summed = raw.astype(wide).reshape(sy, sx, ny // f, f, nx // f, f).sum(axis=(3, 5))
    out = xr.DataArray(summed, dims=data.dims, coords={"scan_y": data["scan_y"],
                       "scan_x": data["scan_x"], "ky": np.arange(ny // f),
                       "kx": np.arange(nx // f)}, attrs=dict(data.attrs), name=data.name)
    out["ky"].attrs = data["ky"].attrs
    out["kx"].attrs = data["kx"].attrs
    c = cal.center_px if cal.center_px is not None else tuple(data.attrs.get(
        "center_px", ((ny - 1) / 2, (nx - 1) / 2)))
    new = _replace(cal, mrad_per_px=(None if cal.mrad_per_px is None
                                     else [v * f for v in cal.mrad_per_px]),
                   center_px=[(c[0] + 0.5) / f - 0.5, (c[1] + 0.5) / f - 0.5])
    out.attrs["binning"] = int(data.attrs.get("binning", 1)) * f
    return _with_calibration(out, new)


def crop_detector(
    data: xr.DataArray, *, ky: tuple[int, int] | None = None, kx: tuple[int, int] | None = None
) -> xr.DataArray:
    """Keep detector rows ``ky[0]:ky[1]`` and columns ``kx[0]:kx[1]`` (pixel indices)."""
    cal = _calibration(data)
    ny, nx = data.sizes["ky"], data.sizes["kx"]
    y0, y1 = (0, ny) if ky is None else (int(ky[0]), int(ky[1]))
    x0, x1 = (0, nx) if kx is None else (int(kx[0]), int(kx[1]))
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise ValueError(f"crop ky={ky}, kx={kx} outside the {ny}x{nx} detector")
    out = data.isel(ky=slice(y0, y1), kx=slice(x0, x1))
    c = cal.center_px if cal.center_px is not None else tuple(data.attrs.get(
        "center_px", ((ny - 1) / 2, (nx - 1) / 2)))
    return _with_calibration(out, _replace(cal, center_px=[c[0] - y0, c[1] - x0]))


# ----------------------------------------------------------------------------------------------
# bad pixels
# ----------------------------------------------------------------------------------------------
def pixel_statistics(
    data, *, max_frames: int | None = 4096, saturation_value: int | None = None,
    rows_per_chunk: int = 8,
) -> dict:
    """Per-pixel mean, max and saturated-value count over (a subset of) the frames.

    ``max_frames`` limits the pass to every k-th scan row (None = all frames).

    Returns
    -------
    dict
        ``mean``, ``max`` (ky, kx) float64, ``n_saturated`` (ky, kx) int64, ``n_frames``.
    """
    raw = _raw(data)
    sy, sx, ny, nx = _check4d(raw)
    step = 1 if max_frames is None else max(1, int(np.ceil(sy * sx / max_frames)))
    rows = np.arange(0, sy, step)
    total = np.zeros((ny, nx))
    vmax = np.zeros((ny, nx))
    nsat = np.zeros((ny, nx), np.int64)
    n = 0
    for i in range(0, len(rows), rows_per_chunk):
        r = rows[i:i + rows_per_chunk]
        blk = np.asarray(raw[r[0]:r[-1] + 1:step]) if step > 1 else np.asarray(raw[r[0]:r[-1] + 1])
        f = blk.reshape(-1, ny, nx)
        total += f.sum(axis=0, dtype=np.float64)
        vmax = np.maximum(vmax, f.max(axis=0))
        if saturation_value is not None:
            nsat += (f >= saturation_value).sum(axis=0)
        n += f.shape[0]
    return {"mean": total / n, "max": vmax, "n_saturated": nsat, "n_frames": n}


def _local_median(img: np.ndarray, size: int) -> np.ndarray:
    fp = np.ones((size, size), bool)
    fp[size // 2, size // 2] = False  # exclude the pixel itself
    return ndimage.median_filter(img, footprint=fp, mode="reflect")


def _local_percentile(img: np.ndarray, size: int, q: float) -> np.ndarray:
    fp = np.ones((size, size), bool)
    fp[size // 2, size // 2] = False
    return ndimage.percentile_filter(img, q, footprint=fp, mode="reflect")


def _second_brightest_neighbour(img: np.ndarray) -> np.ndarray:
    """Second-largest value among the 8 nearest neighbours of every pixel (edges reflected)."""
    pad = np.pad(img, 1, mode="reflect")
    ny, nx = img.shape
    nb = np.stack([pad[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    return np.partition(nb, 6, axis=0)[6]


def bad_pixel_report(
    data, *, hot_ratio: float = 3.0, hot_sigma: float = 8.0, dead_expected_counts: float = 20.0,
    window_px: int = 5, max_frames: int | None = 4096, saturation_value: int | None = None,
) -> dict:
    """Dead, hot and saturated pixels of a dataset.

    - dead: zero in every frame examined although the lower quartile of its neighbours' mean
      counts predicts more than ``dead_expected_counts`` counts over those frames (Poisson
      chance of a live pixel reading 0 throughout < e^-20; dark areas and their edges are not
      flagged);
    - hot: mean exceeds ``hot_ratio`` × the reference ``max(local median, second-brightest of
      the 8 nearest neighbours)`` (median over the ``window_px`` neighbourhood, pixel excluded)
      *and* the reference by more than ``hot_sigma`` Poisson standard deviations of the mean
      (``sqrt(reference / n_frames)``, at least ``1 / n_frames``). An isolated hot pixel stands
      above all its neighbours; a pixel on a sharp bright-field disc edge (or a corner of the
      pixelated disc sticking out into the dark field) is bracketed by brighter neighbours
      inside the disc although the median of its window lies in the dark field, so edges are
      not flagged at any dose; dark-field noise is not flagged either. (A hot pixel adjacent
      to one other hot pixel is still found; one touching the disc is found only when it
      exceeds the disc by ``hot_ratio``.)
    - saturated: values at the counter maximum (``saturation_value``; default from
      ``attrs["saturation_value"]`` of a loaded DataArray); pixels saturated in more than half
      the frames are also flagged bad.

    Returns
    -------
    dict
        ``bad``, ``dead``, ``hot``, ``saturated`` (bool (ky, kx)), ``n_dead``, ``n_hot``,
        ``n_saturated_pixels``, ``saturated_value_fraction``, ``n_frames``, ``saturation_value``.
    """
    if saturation_value is None and isinstance(data, xr.DataArray):
        saturation_value = data.attrs.get("saturation_value")
    st = pixel_statistics(data, max_frames=max_frames, saturation_value=saturation_value)
    mean, n = st["mean"], st["n_frames"]
    med = _local_median(mean, int(window_px))
    low = _local_percentile(mean, int(window_px), 25.0)
    dead = (st["max"] == 0) & (low * n > dead_expected_counts)
    ref = np.maximum(med, _second_brightest_neighbour(mean))
    noise = np.sqrt(np.maximum(ref, 1.0 / n) / n)
    hot = (mean > hot_ratio * ref) & (mean - ref > hot_sigma * noise)
    sat_frac = st["n_saturated"] / max(n, 1)
    saturated = sat_frac > 0.5
    bad = dead | hot | saturated
    return {
        "bad": bad, "dead": dead, "hot": hot, "saturated": saturated,
        "n_dead": int(dead.sum()), "n_hot": int(hot.sum()),
        "n_saturated_pixels": int(saturated.sum()),
        "saturated_value_fraction": float(st["n_saturated"].sum() / max(n * mean.size, 1)),
        "n_frames": int(n), "saturation_value": saturation_value,
    }


def find_bad_pixels(data, **kwargs) -> np.ndarray:
    """Boolean (ky, kx) mask of dead, hot and always-saturated pixels.

    Keyword arguments as :func:`bad_pixel_report`.
    """
    return bad_pixel_report(data, **kwargs)["bad"]


def exclude_pixels(data, mask: np.ndarray, *, value: float = 0):
    """Set the masked detector pixels to a constant in every pattern (lazy for dask/xarray).

    A constant column has zero variance, so the PCC core gives it zero weight. The dtype is
    kept (``value`` must fit it).
    """
    m = np.asarray(mask, bool)
    raw = _raw(data)
    if m.shape != tuple(raw.shape[-2:]):
        raise ValueError(f"mask shape {m.shape} != detector shape {tuple(raw.shape[-2:])}")
    dt = raw.dtype
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        if not (info.min <= value <= info.max) or value != int(value):
            raise ValueError(f"value {value} does not fit {dt}")
    fill = np.asarray(value, dtype=dt)
    if isinstance(raw, da.Array):
        out = da.where(m, fill, raw)
    else:
        out = np.where(m, fill, np.asarray(raw))
    if isinstance(data, xr.DataArray):
        res = data.copy(data=out)
        res.attrs["excluded_pixels"] = int(m.sum())
        return res
    return out
