"""Sample thickness from position-averaged CBED (PACBED) against a simulated thickness series.

Method
------
1. :func:`pacbed` averages the diffraction patterns over all (or a region of) probe positions,
   streaming over scan rows, and also returns the variance of that mean estimated from ``K`` row
   blocks (shot noise *and* sample variation across the field of view).
2. The library — a thickness series ``(thickness, ky, kx)`` with its own mrad calibration (e.g.
   :func:`library_from_store` on a simulation store: the scan-averaged ``intensity``) — is
   resampled onto the data's angular grid by :func:`resample_library` (both patterns centred on
   their zero-angle pixel; each data pixel gets the library averaged over its footprint —
   bilinear interpolation at ``ceil(ratio)²`` sub-positions — so a coarser data grid integrates
   the library the way binning integrates counts).
3. Both are normalised to unit sum inside the compared disc (``max_angle_mrad``, default: the
   largest angle both cover) and compared with the misfit
   ``m(t) = Σ (p − l_t)² / Σ p²`` (``metric="sqdiff"``) or ``1 − Pearson(p, l_t)``
   (``metric="correlation"``).
4. Best thickness: the library minimum refined by the vertex of the parabola through it and its
   two neighbours (at the ends of the library: the end value, ``at_edge=True``).
5. Uncertainty: the noise alone would raise the misfit of a perfect model by about
   ``Δ = Σ var(p) / Σ p²`` (variance of the normalised PACBED from the block estimate); the
   interval is the thickness range where the (linearly interpolated) misfit curve stays below
   ``m_min + Δ``, widened to at least the parabola vertex ± a tenth of the local library step
   (the library resolution). ``uncertainty_nm`` is half its width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import xarray as xr
from scipy import ndimage

__all__ = [
    "pacbed",
    "library_from_store",
    "resample_library",
    "match_thickness",
    "PacbedMatch",
]


def _rows(data) -> int:
    return int(data.shape[0])


def pacbed(
    data, *, region: np.ndarray | None = None, variance: str = "auto", n_blocks: int = 8,
    rows_per_chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Position-averaged CBED and the variance of that average.

    Parameters
    ----------
    data : array-like (sy, sx, ky, kx)
        numpy, memmap, dask, zarr or xarray; read in row chunks, accumulated in float64.
    region : bool ndarray (sy, sx), optional
        Average only these probe positions.
    variance : {"auto", "poisson", "blocks"}
        How the variance of the mean is estimated: ``"poisson"`` = counting statistics,
        ``mean / n_patterns`` (data in detector counts); ``"blocks"`` = spread of the means of
        ``n_blocks`` row blocks (includes sample variation; only meaningful when every block
        spans many unit cells — for a one-cell scan it measures the atomic contrast, not noise);
        ``"auto"`` = poisson for integer data, blocks otherwise.
    n_blocks : int
        Row blocks for ``variance="blocks"``.
    rows_per_chunk : int

    Returns
    -------
    mean : ndarray (ky, kx) float64
    var_of_mean : ndarray (ky, kx) float64
        Variance of ``mean`` estimated from the spread of the block means (0 with one block).
    """
    if isinstance(data, xr.DataArray):
        data = data.data
    if len(data.shape) != 4:
        raise ValueError(f"expected 4D data (scan_y, scan_x, ky, kx), got shape {data.shape}")
    sy, sx, ny, nx = (int(v) for v in data.shape)
    if region is not None:
        region = np.asarray(region, bool)
        if region.shape != (sy, sx):
            raise ValueError(f"region shape {region.shape} != scan shape {(sy, sx)}")
        if not region.any():
            raise ValueError("region selects no probe position")
    nb = max(1, min(int(n_blocks), sy))
    edges = np.linspace(0, sy, nb + 1).round().astype(int)
    sums = np.zeros((nb, ny, nx))
    counts = np.zeros(nb)
    for b in range(nb):
        for r0 in range(edges[b], edges[b + 1], rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, edges[b + 1])
            block = np.asarray(data[r0:r1], dtype=np.float64)
            if region is not None:
                sel = region[r0:r1]
                sums[b] += block[sel].sum(axis=0)
                counts[b] += sel.sum()
            else:
                sums[b] += block.sum(axis=(0, 1))
                counts[b] += (r1 - r0) * sx
    total = counts.sum()
    mean = sums.sum(axis=0) / total
    if variance not in ("auto", "poisson", "blocks"):
        raise ValueError(f"variance must be 'auto', 'poisson' or 'blocks', got {variance!r}")
    if variance == "auto":
        variance = "poisson" if np.issubdtype(np.dtype(data.dtype), np.integer) else "blocks"
    if variance == "poisson":
        return mean, np.clip(mean, 0, None) / total
    used = counts > 0
    if used.sum() >= 2:
        bm = sums[used] / counts[used][:, None, None]
        w = counts[used] / counts[used].sum()
        var_blocks = (w[:, None, None] * (bm - mean) ** 2).sum(axis=0) / (1 - (w**2).sum())
        var_of_mean = var_blocks * (w**2).sum()
    else:
        var_of_mean = np.zeros_like(mean)
    return mean, var_of_mean


def library_from_store(path, *, variable: str = "intensity") -> xr.DataArray:
    """Thickness series ``(thickness, ky, kx)`` from a simulation store: mean over the scan.

    The store (see contracts: dims ``thickness, scan_y, scan_x, ky, kx``, ky/kx in mrad) is read
    with xarray; for a one-cell periodic scan this average is the PACBED.
    """
    ds = xr.open_zarr(str(path), consolidated=False)
    if variable not in ds:
        raise ValueError(f"{path}: no variable {variable!r}")
    lib = ds[variable].mean(("scan_y", "scan_x")).astype(np.float64).compute()
    return lib.transpose("thickness", "ky", "kx")


def _grid(n: int, coords) -> tuple[float, float]:
    """(mrad_per_px, center_px) of a regular 1D mrad coordinate."""
    c = np.asarray(coords, dtype=float)
    if n < 2:
        raise ValueError("detector axes need at least 2 pixels")
    step = float(c[1] - c[0])
    if step <= 0 or not np.allclose(np.diff(c), step, rtol=1e-6, atol=1e-9):
        raise ValueError("detector coordinates must be regular and increasing")
    return step, float(-c[0] / step)


def resample_library(
    library: np.ndarray,
    *,
    library_mrad_per_px: Sequence[float],
    library_center_px: Sequence[float],
    out_shape: tuple[int, int],
    out_mrad_per_px: Sequence[float],
    out_center_px: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate library patterns onto another detector grid (same scattering angles).

    Returns
    -------
    resampled : ndarray (n, out_ky, out_kx)
    covered : bool ndarray (out_ky, out_kx)
        Output pixels whose angle lies inside the library's detector.
    """
    lib = np.asarray(library, dtype=np.float64)
    if lib.ndim == 2:
        lib = lib[None]
    if lib.ndim != 3:
        raise ValueError(f"library must be (thickness, ky, kx), got shape {lib.shape}")
    lm = np.asarray(library_mrad_per_px, float) * np.ones(2)
    lc = np.asarray(library_center_px, float)
    om = np.asarray(out_mrad_per_px, float) * np.ones(2)
    oc = np.asarray(out_center_px, float)
    ratio = om / lm  # library pixels per output pixel
    # area-weighted sampling: average over s x s sub-positions spread over each output pixel's
    # footprint (s = ceil(ratio)), so downsampling integrates like detector pixels / binning do;
    # for ratio <= 1 this is plain bilinear interpolation at the pixel centre
    sub = [max(1, int(np.ceil(r - 1e-9))) for r in ratio]
    offs_y = ((np.arange(sub[0]) + 0.5) / sub[0] - 0.5) * ratio[0]
    offs_x = ((np.arange(sub[1]) + 0.5) / sub[1] - 0.5) * ratio[1]
    iy = (np.arange(out_shape[0]) - oc[0]) * ratio[0] + lc[0]
    ix = (np.arange(out_shape[1]) - oc[1]) * ratio[1] + lc[1]
    yy, xx = np.meshgrid(iy, ix, indexing="ij")
    covered = (yy >= 0) & (yy <= lib.shape[1] - 1) & (xx >= 0) & (xx <= lib.shape[2] - 1)
    out = np.zeros((lib.shape[0],) + tuple(out_shape))
    for t in range(lib.shape[0]):
        for dy in offs_y:
            for dx in offs_x:
                out[t] += ndimage.map_coordinates(lib[t], [yy + dy, xx + dx], order=1,
                                                  mode="constant", cval=0.0)
    out /= len(offs_y) * len(offs_x)
    return out, covered


@dataclass
class PacbedMatch:
    """Result of :func:`match_thickness` (all thicknesses in nm)."""

    thickness_nm: float
    uncertainty_nm: float
    interval_nm: tuple[float, float]
    best_index: int
    at_edge: bool
    metric: str
    misfit_min: float
    noise_misfit: float
    max_angle_mrad: float
    thicknesses_nm: np.ndarray = field(repr=False)
    misfit: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly dict (curve included)."""
        d = asdict(self)
        d["thicknesses_nm"] = [float(v) for v in self.thicknesses_nm]
        d["misfit"] = [float(v) for v in self.misfit]
        d["interval_nm"] = [float(v) for v in self.interval_nm]
        return json.loads(json.dumps(d))


def _misfit(p: np.ndarray, lib: np.ndarray, metric: str) -> np.ndarray:
    if metric == "sqdiff":
        return ((lib - p) ** 2).sum(axis=1) / (p**2).sum()
    if metric == "correlation":
        pc = p - p.mean()
        lc = lib - lib.mean(axis=1, keepdims=True)
        den = np.sqrt((pc**2).sum() * (lc**2).sum(axis=1))
        return 1.0 - np.where(den > 0, (lc * pc).sum(axis=1) / np.where(den > 0, den, 1), 0.0)
    raise ValueError(f"metric must be 'sqdiff' or 'correlation', got {metric!r}")


def _parabola_vertex(t: np.ndarray, m: np.ndarray, i: int) -> float:
    t0, t1, t2 = t[i - 1], t[i], t[i + 1]
    m0, m1, m2 = m[i - 1], m[i], m[i + 1]
    den = (t0 - t1) * (t0 - t2) * (t1 - t2)
    a = (t2 * (m1 - m0) + t1 * (m0 - m2) + t0 * (m2 - m1)) / den
    b = (t2**2 * (m0 - m1) + t1**2 * (m2 - m0) + t0**2 * (m1 - m2)) / den
    if a <= 0:
        return float(t1)
    return float(np.clip(-b / (2 * a), t0, t2))


def _crossing(t: np.ndarray, m: np.ndarray, i: int, level: float, direction: int) -> float:
    """Thickness where the linearly interpolated curve first exceeds ``level`` walking from i."""
    j = i
    while 0 <= j + direction < len(t) and m[j + direction] <= level:
        j += direction
    k = j + direction
    if k < 0 or k >= len(t):
        return float(t[j])
    return float(t[j] + (level - m[j]) / (m[k] - m[j]) * (t[k] - t[j]))


def match_thickness(
    pattern: np.ndarray,
    library,
    *,
    pattern_mrad_per_px: Sequence[float] | float,
    pattern_center_px: Sequence[float] | None = None,
    thicknesses_nm: Sequence[float] | None = None,
    library_mrad_per_px: Sequence[float] | float | None = None,
    library_center_px: Sequence[float] | None = None,
    pattern_var: np.ndarray | None = None,
    max_angle_mrad: float | None = None,
    metric: str = "sqdiff",
) -> PacbedMatch:
    """Best-matching library thickness for a measured PACBED.

    Parameters
    ----------
    pattern : ndarray (ky, kx)
        Measured PACBED (e.g. from :func:`pacbed`).
    library : xarray.DataArray (thickness, ky, kx) or ndarray
        A DataArray carries ``thickness`` (nm) and ``ky``/``kx`` (mrad, 0 at the central beam)
        coordinates; an ndarray needs ``thicknesses_nm``, ``library_mrad_per_px`` and
        ``library_center_px``.
    pattern_mrad_per_px, pattern_center_px :
        Calibration of the measured pattern (centre = zero-angle pixel; default: the BF-disc
        centre of ``pattern``, :func:`tmask_validate.preprocess.disc_center`).
    pattern_var : ndarray (ky, kx), optional
        Variance of ``pattern`` (second output of :func:`pacbed`) for the uncertainty; without it
        only the library-resolution floor applies.
    max_angle_mrad : float, optional
        Compare within this scattering angle (default: everything both detectors cover).
    metric : {"sqdiff", "correlation"}

    Returns
    -------
    PacbedMatch
        ``thickness_nm``, ``uncertainty_nm``, ``interval_nm``, the curve ``thicknesses_nm`` /
        ``misfit`` (for plotting), ``at_edge``, ``noise_misfit`` (Δ), ...
    """
    p = np.asarray(pattern, dtype=np.float64)
    if p.ndim != 2 or not np.all(np.isfinite(p)):
        raise ValueError("pattern must be a finite 2D array")
    if isinstance(library, xr.DataArray):
        lib_da = library.transpose("thickness", "ky", "kx")
        t = np.asarray(lib_da["thickness"].values, dtype=float)
        my, cy = _grid(lib_da.sizes["ky"], lib_da["ky"].values)
        mx, cx = _grid(lib_da.sizes["kx"], lib_da["kx"].values)
        lib = np.asarray(lib_da.values, dtype=np.float64)
        lmp, lcp = (my, mx), (cy, cx)
    else:
        lib = np.asarray(library, dtype=np.float64)
        if thicknesses_nm is None or library_mrad_per_px is None or library_center_px is None:
            raise ValueError("an ndarray library needs thicknesses_nm, library_mrad_per_px and "
                             "library_center_px")
        t = np.asarray(thicknesses_nm, dtype=float)
        lmp, lcp = library_mrad_per_px, library_center_px
    if lib.ndim != 3 or lib.shape[0] != len(t) or len(t) < 2:
        raise ValueError(f"library must be (thickness, ky, kx) with >= 2 thicknesses, got "
                         f"{lib.shape} and {len(t)} thicknesses")
    if not np.all(np.diff(t) > 0):
        raise ValueError("library thicknesses must increase")
    pm = np.asarray(pattern_mrad_per_px, float) * np.ones(2)
    if pattern_center_px is None:
        from tmask_validate.preprocess import disc_center

        pattern_center_px = disc_center(p)
    pc = np.asarray(pattern_center_px, float)
    res, covered = resample_library(lib, library_mrad_per_px=lmp, library_center_px=lcp,
                                    out_shape=p.shape, out_mrad_per_px=pm, out_center_px=pc)
    ky = (np.arange(p.shape[0]) - pc[0]) * pm[0]
    kx = (np.arange(p.shape[1]) - pc[1]) * pm[1]
    theta = np.hypot(ky[:, None], kx[None, :])
    if max_angle_mrad is None:
        max_angle_mrad = float(theta[covered].max()) if covered.any() else 0.0
        # the largest disc fully inside the covered area
        outside = theta[~covered]
        if outside.size:
            max_angle_mrad = min(max_angle_mrad, float(outside.min()))
    sel = covered & (theta <= max_angle_mrad)
    if sel.sum() < 4:
        raise ValueError("the measured pattern and the library share (almost) no angles")
    pv = p[sel]
    if pv.sum() <= 0:
        raise ValueError("the measured pattern has no intensity in the compared region")
    norm_p = pv.sum()
    pv = pv / norm_p
    lv = res[:, sel]
    lsum = lv.sum(axis=1, keepdims=True)
    if np.any(lsum <= 0):
        raise ValueError("a library pattern has no intensity in the compared region")
    lv = lv / lsum
    m = _misfit(pv, lv, metric)
    i = int(np.argmin(m))
    at_edge = i in (0, len(t) - 1)
    t_best = float(t[i]) if at_edge else _parabola_vertex(t, m, i)
    if pattern_var is not None:
        var = np.asarray(pattern_var, dtype=np.float64)[sel] / norm_p**2
        if metric == "sqdiff":
            delta = float(var.sum() / (pv**2).sum())
        else:
            delta = float(var.sum() / ((pv - pv.mean()) ** 2).sum())
    else:
        delta = 0.0
    # interval where the linearly interpolated curve stays below m_min + delta
    m_min = float(m[i])
    level = m_min + delta
    lo = _crossing(t, m, i, level, -1)
    hi = _crossing(t, m, i, level, +1)
    step_lo = t[i] - t[i - 1] if i > 0 else t[1] - t[0]
    step_hi = t[i + 1] - t[i] if i < len(t) - 1 else t[-1] - t[-2]
    lo = min(lo, t_best - 0.1 * step_lo)
    hi = max(hi, t_best + 0.1 * step_hi)
    return PacbedMatch(
        thickness_nm=t_best, uncertainty_nm=0.5 * (hi - lo), interval_nm=(lo, hi),
        best_index=i, at_edge=at_edge, metric=metric, misfit_min=m_min, noise_misfit=delta,
        max_angle_mrad=float(max_angle_mrad), thicknesses_nm=t, misfit=m,
    )
