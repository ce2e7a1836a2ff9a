"""Atomic-column sites on measured images: peaks, gaussian refinement, lattice, basis mapping.

Pipeline for experimental data (no simulation ground truth):

1. an initial image (virtual ADF / inverted ABF / BF) → :func:`find_peaks` (local maxima);
2. :func:`refine_gaussian` → sub-pixel positions (2D gaussian + background least squares);
3. :func:`fit_lattice` → ``(origin, a_vec, b_vec)``: robust (nearest-neighbour vectors or the
   structure's cell as a guess, integer indexing grown outwards, least squares with per-basis
   offsets, outlier rejection);
4. :func:`map_basis` → the projected basis of the structure (one-cell site table) laid onto the
   fitted lattice over the whole field of view, *including columns invisible in that image*
   (e.g. O in ADF); the anchor is chosen so that the sites labelled ``match_label`` coincide with
   the detected peaks (e.g. the strongest ADF peaks are Fe).

:func:`sites_from_image` chains the four. Positions inside this module are in pixels ``(y, x)`` of
the scan grid unless a name says ``_A``; site tables (the output) follow the project convention:
``label, y_A, x_A, composition, n_atoms`` in scan coordinates (Å, first probe at 0).

Also: :func:`read_sites_csv` / :func:`write_sites_csv`, :func:`region_from_rectangle` (partial
templates), :func:`refine_sites` (site positions refined on an atom-specific image) and
:func:`ti_o_displacement` (PbTiO3, Ti column shift from the centre of its four O columns).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

__all__ = [
    "find_peaks",
    "refine_gaussian",
    "fit_lattice",
    "map_basis",
    "sites_from_image",
    "refine_sites",
    "read_sites_csv",
    "write_sites_csv",
    "region_from_rectangle",
    "ti_o_displacement",
    "ti_o_displacement_from_images",
    "SITE_COLUMNS",
]

SITE_COLUMNS = ("label", "y_A", "x_A", "composition", "n_atoms")


def _image2d(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ValueError(f"expected a 2D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or inf")
    return img


def _step_pair(step_A) -> np.ndarray:
    s = np.atleast_1d(np.asarray(step_A, dtype=float))
    if s.size == 1:
        s = np.repeat(s, 2)
    if s.shape != (2,) or np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"step_A must be a positive number or (y, x) pair, got {step_A!r}")
    return s


# ----------------------------------------------------------------------------------------------
# peaks
# ----------------------------------------------------------------------------------------------
def find_peaks(
    image: np.ndarray,
    *,
    min_distance_px: float,
    threshold: float | None = None,
    smooth_sigma_px: float = 0.0,
    exclude_border_px: int = 0,
) -> np.ndarray:
    """Local maxima of an image, strongest first, at least ``min_distance_px`` apart.

    Parameters
    ----------
    image : ndarray (sy, sx)
        Bright atoms (invert ABF-like images first).
    min_distance_px : float
        Minimum separation of two peaks (pixels); a pixel is a candidate when it is the maximum
        of the disc of this radius around it, then weaker peaks closer than this to a stronger
        one are dropped (greedy non-maximum suppression; breaks plateau ties).
    threshold : float, optional
        Absolute minimum peak value; default: the image median.
    smooth_sigma_px : float
        Gaussian smoothing before the search (0 = none); values are read from the smoothed image.
    exclude_border_px : int
        Drop peaks closer than this to the image edge.

    Returns
    -------
    ndarray (n, 2)
        Integer-valued ``(y, x)`` pixel positions (float array), strongest first.
    """
    img = _image2d(image)
    if not (np.isfinite(min_distance_px) and min_distance_px >= 1):
        raise ValueError(f"min_distance_px must be >= 1, got {min_distance_px!r}")
    if smooth_sigma_px > 0:
        img = ndimage.gaussian_filter(img, smooth_sigma_px, mode="nearest")
    r = int(np.floor(min_distance_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    footprint = yy**2 + xx**2 <= min_distance_px**2
    local_max = img == ndimage.maximum_filter(img, footprint=footprint, mode="nearest")
    thr = float(np.median(img)) if threshold is None else float(threshold)
    cand = np.argwhere(local_max & (img > thr))
    b = int(exclude_border_px)
    if b > 0:
        keep = ((cand[:, 0] >= b) & (cand[:, 0] < img.shape[0] - b)
                & (cand[:, 1] >= b) & (cand[:, 1] < img.shape[1] - b))
        cand = cand[keep]
    if len(cand) == 0:
        return np.zeros((0, 2))
    vals = img[cand[:, 0], cand[:, 1]]
    order = np.argsort(-vals, kind="stable")
    cand = cand[order]
    tree = cKDTree(cand)
    removed = np.zeros(len(cand), bool)
    for i in range(len(cand)):
        if removed[i]:
            continue
        for j in tree.query_ball_point(cand[i], min_distance_px - 1e-9):
            if j > i:
                removed[j] = True
    return cand[~removed].astype(float)


def _gauss2d(params: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    amp, y0, x0, sy, sx, bg = params
    return amp * np.exp(-0.5 * (((yy - y0) / sy) ** 2 + ((xx - x0) / sx) ** 2)) + bg


def _gauss_residual(params, yy, xx, win) -> np.ndarray:
    return (_gauss2d(params, yy, xx) - win).ravel()


def refine_gaussian(
    image: np.ndarray, peaks: np.ndarray, *, window_px: int, periodic: bool = False
) -> pd.DataFrame:
    """Sub-pixel peak positions by least-squares fits of an axis-aligned 2D gaussian + background.

    Each peak is fitted in the ``(2 w + 1)²`` window around its rounded position (clipped at the
    image edges, or wrapped when ``periodic``). The centre may move at most ``w`` pixels; a fit
    that fails or ends on a bound falls back to the background-subtracted intensity centroid of
    the window (``fit_ok`` False).

    Parameters
    ----------
    image : ndarray (sy, sx)
    peaks : ndarray (n, 2)
        Starting ``(y, x)`` positions in pixels.
    window_px : int
        Half width ``w`` of the fit window (pixels, >= 1).
    periodic : bool
        Wrap windows around the image edges (images of one periodic cell).

    Returns
    -------
    pandas.DataFrame
        ``y_px, x_px, amplitude, sigma_y_px, sigma_x_px, background, fit_ok`` (one row per peak).
    """
    img = _image2d(image)
    w = int(window_px)
    if w < 1:
        raise ValueError(f"window_px must be >= 1, got {window_px!r}")
    pk = np.asarray(peaks, dtype=float).reshape(-1, 2)
    ny, nx = img.shape
    rows = []
    for y, x in pk:
        cy, cx = int(round(y)), int(round(x))
        if periodic:
            ys = np.arange(cy - w, cy + w + 1)
            xs = np.arange(cx - w, cx + w + 1)
            win = img[np.ix_(ys % ny, xs % nx)]
        else:
            ys = np.arange(max(cy - w, 0), min(cy + w + 1, ny))
            xs = np.arange(max(cx - w, 0), min(cx + w + 1, nx))
            win = img[np.ix_(ys, xs)]
        if win.size == 0:  # outside the image: keep the position, flag it
            rows.append({"y_px": y, "x_px": x, "amplitude": 0.0, "sigma_y_px": float(w),
                         "sigma_x_px": float(w), "background": 0.0, "fit_ok": False})
            continue
        yy, xx = np.meshgrid(ys.astype(float), xs.astype(float), indexing="ij")
        bg0 = float(win.min())
        amp0 = max(float(win.max()) - bg0, 1e-12)
        p0 = np.array([amp0, y, x, max(w / 2, 0.6), max(w / 2, 0.6), bg0])
        lo = [0.0, y - w, x - w, 0.3, 0.3, -np.inf]
        hi = [np.inf, y + w, x + w, 2.0 * w + 1, 2.0 * w + 1, np.inf]
        p0 = np.clip(p0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
        ok = win.size >= 9
        if ok:
            try:
                res = optimize.least_squares(
                    _gauss_residual, p0, bounds=(lo, hi), x_scale="jac", max_nfev=200,
                    args=(yy, xx, win),
                )
                p = res.x
                at_bound = (abs(p[1] - y) > w - 1e-3) or (abs(p[2] - x) > w - 1e-3)
                ok = bool(res.success) and not at_bound and p[0] > 0
            except (ValueError, np.linalg.LinAlgError):
                ok = False
        if not ok:
            wt = np.clip(win - np.median(win), 0, None)
            if wt.sum() <= 0:
                wt = np.ones_like(win)
            p = np.array([amp0, (wt * yy).sum() / wt.sum(), (wt * xx).sum() / wt.sum(),
                          np.nan, np.nan, bg0])
            p[3] = p[4] = float(w)
        rows.append({"y_px": p[1] % ny if periodic else p[1],
                     "x_px": p[2] % nx if periodic else p[2],
                     "amplitude": p[0], "sigma_y_px": p[3], "sigma_x_px": p[4],
                     "background": p[5], "fit_ok": ok})
    cols = ["y_px", "x_px", "amplitude", "sigma_y_px", "sigma_x_px", "background", "fit_ok"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------------------------
# lattice
# ----------------------------------------------------------------------------------------------
def _reduce(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange-Gauss reduction: the shortest basis of the 2D lattice spanned by a, b."""
    a, b = a.copy(), b.copy()
    for _ in range(100):
        if a @ a > b @ b:
            a, b = b, a
        mu = round(float(a @ b) / float(a @ a))
        if mu == 0:
            break
        b = b - mu * a
    return a, b


def _nn_basis(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two shortest non-collinear, frequently occurring nearest-neighbour vectors."""
    n = len(pos)
    k = min(8, n - 1)
    _, idx = cKDTree(pos).query(pos, k + 1)
    vec = (pos[idx[:, 1:]] - pos[:, None, :]).reshape(-1, 2)
    flip = (vec[:, 0] < 0) | ((vec[:, 0] == 0) & (vec[:, 1] < 0))
    vec[flip] *= -1
    length = np.hypot(vec[:, 0], vec[:, 1])
    order = np.argsort(length)
    free = np.ones(len(vec), bool)
    clusters = []
    for i in order:
        if not free[i] or length[i] == 0:
            continue
        members = free & (np.hypot(*(vec - vec[i]).T) < 0.2 * length[i])
        clusters.append((np.median(vec[members], axis=0), int(members.sum())))
        free &= ~members
    min_count = max(2, 0.15 * n)
    good = [c for c, m in clusters if m >= min_count]
    if not good:
        raise ValueError("could not find repeated nearest-neighbour vectors; too few peaks?")
    a = good[0]
    for c in good[1:]:
        sin = abs(a[0] * c[1] - a[1] * c[0]) / (np.hypot(*a) * np.hypot(*c))
        if sin > 0.3:
            return _reduce(a, c)
    raise ValueError("the peaks do not span a 2D lattice (all nearest-neighbour vectors collinear)")


def _assign(pos, origin, basis_mat, offsets):
    """Integer cell indices and basis index of every position, with residuals (same units)."""
    inv = np.linalg.inv(basis_mat)
    best_r = np.full(len(pos), np.inf)
    best_ij = np.zeros((len(pos), 2), int)
    best_k = np.zeros(len(pos), int)
    for k, d in enumerate(offsets):
        f = (pos - origin - d) @ inv
        ij = np.round(f).astype(int)
        r = np.hypot(*((f - ij) @ basis_mat).T)
        better = r < best_r
        best_r[better], best_ij[better], best_k[better] = r[better], ij[better], k
    return best_ij, best_k, best_r


def _merge_offsets(centres: np.ndarray, counts: np.ndarray, basis_mat: np.ndarray, tol: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Merge fractional cell offsets closer than ``tol`` (Cartesian, modulo the lattice).

    Greedy single-seed clustering splits one spread-out cluster in two when the lattice guess
    is a few % off (fractional coordinates drift with the distance from the origin); the two
    centres then lie closer than ``tol``. Pairs are merged closest first into their
    count-weighted (periodic) mean until no two centres are within ``tol``.
    """
    centres = [c.copy() for c in centres]
    counts = [float(c) for c in counts]
    while len(centres) > 1:
        best = None
        for i in range(len(centres)):
            for j in range(i + 1, len(centres)):
                df = centres[j] - centres[i]
                df -= np.round(df)
                d = float(np.hypot(*(df @ basis_mat)))
                if d < tol and (best is None or d < best[0]):
                    best = (d, i, j, df)
        if best is None:
            break
        _, i, j, df = best
        w = counts[j] / (counts[i] + counts[j])
        merged = centres[i] + w * df
        centres[i] = merged - np.floor(merged)
        counts[i] += counts[j]
        del centres[j], counts[j]
    return np.array(centres), np.array(counts)


def _cluster_offsets(pos, origin, basis_mat, tol):
    """Distinct positions within one cell (periodic clustering of the fractional parts)."""
    inv = np.linalg.inv(basis_mat)
    f = (pos - origin) @ inv
    frac = f - np.floor(f)
    centres: list[np.ndarray] = []
    counts: list[int] = []
    for fr in frac:
        for c_i, c in enumerate(centres):
            df = fr - c
            df -= np.round(df)
            if np.hypot(*(df @ basis_mat)) < tol:
                counts[c_i] += 1
                break
        else:
            centres.append(fr.copy())
            counts.append(1)
    centres_arr, counts_arr = _merge_offsets(np.array(centres), np.array(counts, float),
                                             basis_mat, tol)
    keep = counts_arr >= max(1, 0.3 * counts_arr.max())
    offs = centres_arr[keep]
    # the origin peak has fractional position 0: its cluster goes first (offset 0)
    d0 = offs - np.round(offs)
    offs = np.roll(offs, -int(np.argmin(np.hypot(*(d0 @ basis_mat).T))), axis=0)
    # express offsets relative to the first (origin) one, in the nearest image, Cartesian
    d = offs - offs[0]
    d -= np.round(d)
    return d @ basis_mat


def fit_lattice(
    positions: np.ndarray,
    *,
    a_guess: Sequence[float] | None = None,
    b_guess: Sequence[float] | None = None,
    max_residual: float | None = None,
    max_basis: int | None = None,
    return_info: bool = False,
):
    """Fit a 2D lattice (with a basis, if needed) to peak positions.

    Model: ``p = origin + i a + j b + d_k`` with integers ``i, j`` and basis offsets ``d_k``
    (``d_0 = 0``; a single offset when the peaks form a Bravais lattice). Steps:

    1. starting vectors: ``a_guess``/``b_guess`` (e.g. the structure's projected cell in pixels),
       else the two shortest frequent nearest-neighbour vectors (Gauss-reduced);
    2. the peak nearest the centroid is the origin; peaks within a radius of 1.5 cells are
       indexed (basis offsets found by periodic clustering of fractional coordinates, offsets
       closer than the tolerance merged) and ``origin, a, b, d_k`` solved by linear least
       squares; the offsets are clustered once more with that first fitted lattice (a guess a
       few % off — strain, scan drift — can split one offset in two at first); the radius then
       doubles, re-indexing with the updated lattice, until every peak is included (so a small
       error in the guess does not mis-index distant peaks);
    3. peaks whose residual exceeds ``max_residual`` are outliers, excluded from the fit
       (default: 0.25 × the shorter vector while growing, then 5 × the median residual, at most
       that, for a final refit).

    Parameters
    ----------
    positions : ndarray (n, 2)
        ``(y, x)`` positions (any unit; the result is in the same unit).
    a_guess, b_guess : (2,) optional
        Approximate lattice vectors ``(dy, dx)``; both or neither.
    max_residual : float, optional
        Outlier threshold.
    max_basis : int, optional
        Largest acceptable number of basis positions per cell (e.g. the number of visible
        columns per cell), checked after the re-clustering with the first fitted lattice; more
        means the guess vectors are wrong (ValueError).
    return_info : bool
        Also return a dict with ``basis`` (k, 2) offsets, ``indices`` (n, 3) ``i, j, k`` (-1 for
        outliers), ``residuals`` (n,), ``rms``, ``n_inliers``.

    Returns
    -------
    origin, a_vec, b_vec : ndarray (2,)
        (plus ``info`` when ``return_info``).
    """
    pos = np.asarray(positions, dtype=float).reshape(-1, 2)
    if len(pos) < 3 or not np.all(np.isfinite(pos)):
        raise ValueError(f"need at least 3 finite positions to fit a lattice, got {len(pos)}")
    if (a_guess is None) != (b_guess is None):
        raise ValueError("give both a_guess and b_guess, or neither")
    if a_guess is not None:
        a = np.asarray(a_guess, dtype=float)
        b = np.asarray(b_guess, dtype=float)
        if a.shape != (2,) or b.shape != (2,) or abs(a[0] * b[1] - a[1] * b[0]) < 1e-12:
            raise ValueError("a_guess and b_guess must be non-collinear (dy, dx) vectors")
    else:
        a, b = _nn_basis(pos)
    scale = min(np.hypot(*a), np.hypot(*b))
    tol = 0.25 * scale if max_residual is None else float(max_residual)
    centre = pos.mean(axis=0)
    origin = pos[np.argmin(np.hypot(*(pos - centre).T))].copy()
    dist0 = np.hypot(*(pos - origin).T)
    radius = 1.5 * max(np.hypot(*a), np.hypot(*b))
    used = np.zeros(len(pos), bool)
    for n_fit in range(60):
        near = dist0 <= radius
        basis_mat = np.array([a, b])
        if n_fit <= 1:
            # cluster the in-cell positions with the guess, then once more with the first
            # least-squares lattice: with a guess a few % off (strain, drift) the first
            # clustering can split one column's offset in two, the refined lattice merges them
            offsets = _cluster_offsets(pos[near], origin, basis_mat, tol)
            if max_basis is not None and len(offsets) > max_basis and (
                    n_fit == 1 or len(offsets) > 2 * max_basis):
                raise ValueError(f"{len(offsets)} distinct positions per cell (> {max_basis}): "
                                 f"the lattice guess does not fit the peaks")
        ij, k, r = _assign(pos, origin, basis_mat, offsets)
        used = near & (r < tol)
        if used.sum() < 3 + len(offsets):
            raise ValueError("too few peaks agree with the lattice; check the guess vectors")
        design = np.column_stack([np.ones(used.sum()), ij[used]]
                                 + [(k[used] == q).astype(float) for q in range(1, len(offsets))])
        coef, *_ = np.linalg.lstsq(design, pos[used], rcond=None)
        origin, a, b = coef[0], coef[1], coef[2]
        offsets = np.vstack([np.zeros(2), coef[3:]]) if len(offsets) > 1 else np.zeros((1, 2))
        if near.all() and n_fit >= 1:
            break
        if not near.all():
            radius *= 2.0
    # final pass: tighter, noise-based outlier cut (5 x median residual ~ 4 sigma), refit
    basis_mat = np.array([a, b])
    ij, k, r = _assign(pos, origin, basis_mat, offsets)
    if max_residual is None:
        tol = min(tol, max(5.0 * float(np.median(r[r < tol])), 0.02 * scale))
    inl = r < tol
    if inl.sum() >= 3 + len(offsets):
        design = np.column_stack([np.ones(inl.sum()), ij[inl]]
                                 + [(k[inl] == q).astype(float) for q in range(1, len(offsets))])
        coef, *_ = np.linalg.lstsq(design, pos[inl], rcond=None)
        origin, a, b = coef[0], coef[1], coef[2]
        offsets = np.vstack([np.zeros(2), coef[3:]]) if len(offsets) > 1 else np.zeros((1, 2))
        ij, k, r = _assign(pos, origin, np.array([a, b]), offsets)
        inl = r < tol
    if not return_info:
        return origin, a, b
    idx = np.column_stack([ij, k])
    idx[~inl] = -1
    info = {"basis": offsets, "indices": idx, "residuals": r,
            "rms": float(np.sqrt(np.mean(r[inl] ** 2))) if inl.any() else float("inf"),
            "n_inliers": int(inl.sum())}
    return origin, a, b, info


def _cell_vectors_px(cell_A, step_A, rotation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """The structure's projected cell vectors (y-axis one, x-axis one) in scan pixels.

    ``rotation_deg`` = θ: the cell's x axis points along ``(dy, dx) = (sin θ, cos θ)`` (from
    scan x towards scan y) and its y axis along ``(cos θ, −sin θ)``.
    """
    ly, lx = (float(v) for v in cell_A)
    s = _step_pair(step_A)
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # (y, x) frame, CCW
    a = rot @ np.array([ly, 0.0]) / s
    b = rot @ np.array([0.0, lx]) / s
    return a, b


def _match_cell(a, b, a0, b0, tol=0.15):
    """Choose lattice vectors equivalent to (a, b) that best match the cell vectors (a0, b0)."""
    combos = []
    for i1, j1, i2, j2 in [(1, 0, 0, 1), (0, 1, 1, 0), (1, 1, 0, 1), (1, 0, 1, 1),
                           (1, -1, 0, 1), (1, 0, -1, 1), (1, 1, 1, 0), (0, 1, 1, 1)]:
        for s1 in (1, -1):
            for s2 in (1, -1):
                combos.append((s1 * (i1 * a + j1 * b), s2 * (i2 * a + j2 * b)))
    err = [np.hypot(*(A - a0)) / np.hypot(*a0) + np.hypot(*(B - b0)) / np.hypot(*b0)
           for A, B in combos]
    best = int(np.argmin(err))
    if err[best] > 2 * tol:
        raise ValueError(
            f"the fitted lattice ({a}, {b} px) does not match the structure's cell "
            f"({a0}, {b0} px); check step_A / cell_A / rotation or fit with a_guess/b_guess"
        )
    return combos[best]


def _same_pattern(shift: np.ndarray, site_px: np.ndarray, labels: np.ndarray, M: np.ndarray,
                  tol_px: float = 0.3) -> bool:
    """True when translating every site by ``shift`` lands on a site of the same label."""
    inv = np.linalg.inv(M)
    for s, lab in zip(site_px, labels, strict=True):
        same = site_px[labels == lab]
        f = (s + shift - same) @ inv
        if np.min(np.hypot(*((f - np.round(f)) @ M).T)) > tol_px:
            return False
    return True


def map_basis(
    lattice: tuple[np.ndarray, np.ndarray, np.ndarray],
    site_table_one_cell: pd.DataFrame,
    cell_A: Sequence[float],
    *,
    scan_shape: tuple[int, int],
    step_A: float | Sequence[float],
    match_label: str,
    peaks: np.ndarray | None = None,
    rotation_deg: float = 0.0,
    margin_px: float = 0.5,
) -> pd.DataFrame:
    """Lay the structure's projected basis onto a fitted lattice over the whole field of view.

    Parameters
    ----------
    lattice : (origin, a_vec, b_vec)
        From :func:`fit_lattice` on the peak positions, in scan pixels. The vectors are matched
        (sign/swap/unimodular combination) to the structure cell, ``a`` ↔ cell y (``Ly``) and
        ``b`` ↔ cell x (``Lx``).
    site_table_one_cell : DataFrame
        ``label, y_A, x_A[, composition, n_atoms, ...]`` of one projected cell
        (e.g. ``tmask_validate.structures.projected_columns``), positions in ``[0, L)``.
    cell_A : (Ly, Lx)
        Projected cell in Å.
    scan_shape : (sy, sx)
    step_A : float or (y, x)
        Probe step (Å) — converts pixels to the output's Å.
    match_label : str
        Label of the columns visible as the peaks (e.g. "Fe" in ADF of LiFePO4, "Pb" in PbTiO3).
    peaks : ndarray (n, 2), optional
        The detected peaks (pixels). The anchor (which ``match_label`` site of the cell sits on
        the lattice origin) is the one minimising the mean distance from every peak to its
        nearest predicted ``match_label`` site; without ``peaks`` only the origin is used.
    rotation_deg : float
        In-plane rotation θ of the crystal in the scan frame (the cell's x axis along
        ``(sin θ, cos θ)`` in (y, x)); only used to match the fitted vectors to the cell's.
        Not the detector-to-scan ``Calibration.scan_rotation_deg``.
    margin_px : float
        Keep sites within ``[-margin, size - 1 + margin]`` pixels.

    Returns
    -------
    DataFrame
        ``label, y_A, x_A, composition, n_atoms`` plus ``y_px, x_px, cell_i, cell_j, visible``
        (``label == match_label``) and any extra columns of the one-cell table; all species
        included.
    """
    table = _check_sites(site_table_one_cell)
    ly, lx = (float(v) for v in cell_A)
    if ly <= 0 or lx <= 0:
        raise ValueError(f"cell_A must be positive, got {cell_A!r}")
    if match_label not in set(table["label"]):
        raise ValueError(f"match_label {match_label!r} not among the labels "
                         f"{sorted(set(table['label']))}")
    sy, sx = (int(v) for v in scan_shape)
    step = _step_pair(step_A)
    origin, a, b = (np.asarray(v, dtype=float) for v in lattice)
    a0, b0 = _cell_vectors_px(cell_A, step, rotation_deg)
    A, B = _match_cell(a, b, a0, b0)
    M = np.array([A, B])
    frac = np.column_stack([table["y_A"].to_numpy() / ly, table["x_A"].to_numpy() / lx])
    site_px = frac @ M  # position of each site relative to the cell corner, pixels
    is_match = (table["label"] == match_label).to_numpy()
    pk = np.asarray(peaks, dtype=float).reshape(-1, 2) if peaks is not None else origin[None]
    inv = np.linalg.inv(M)
    cands, costs = [], []
    for k in np.flatnonzero(is_match):
        corner = origin - site_px[k]
        cost = np.full(len(pk), np.inf)
        for s in site_px[is_match]:
            f = (pk - corner - s) @ inv
            cost = np.minimum(cost, np.hypot(*((f - np.round(f)) @ M).T))
        cands.append(corner)
        costs.append(float(np.mean(cost)))
    best = int(np.argmin(costs))
    corner = cands[best]
    tie_tol = 0.1 * costs[best] + 0.02 * min(np.hypot(*A), np.hypot(*B))
    labels = table["label"].to_numpy()
    for c_i, c in enumerate(costs):
        if c_i != best and c <= costs[best] + tie_tol and not _same_pattern(
                cands[c_i] - corner, site_px, labels, M):
            raise ValueError(
                f"ambiguous anchor: the {match_label!r} columns fit the peaks equally well in two "
                f"placements that put the other columns in different places (the {match_label!r} "
                f"sublattice is more symmetric than the structure); use another match_label or "
                f"give the sites as CSV"
            )
    # cells covering the field of view
    corners = np.array([[-1, -1], [-1, sx], [sy, -1], [sy, sx]], float) - corner
    fc = corners @ inv
    i_rng = np.arange(int(np.floor(fc[:, 0].min())) - 1, int(np.ceil(fc[:, 0].max())) + 2)
    j_rng = np.arange(int(np.floor(fc[:, 1].min())) - 1, int(np.ceil(fc[:, 1].max())) + 2)
    ii, jj = np.meshgrid(i_rng, j_rng, indexing="ij")
    ij = np.column_stack([ii.ravel(), jj.ravel()])
    cell_pos = corner + ij @ M
    out = []
    for s_idx in range(len(table)):
        p = cell_pos + site_px[s_idx]
        inside = ((p[:, 0] >= -margin_px) & (p[:, 0] <= sy - 1 + margin_px)
                  & (p[:, 1] >= -margin_px) & (p[:, 1] <= sx - 1 + margin_px))
        if not inside.any():
            continue
        rows = pd.DataFrame({"y_px": p[inside, 0], "x_px": p[inside, 1],
                             "cell_i": ij[inside, 0], "cell_j": ij[inside, 1]})
        for col in table.columns:
            if col not in ("y_A", "x_A"):
                rows[col] = table[col].iloc[s_idx]
        out.append(rows)
    if not out:
        raise ValueError("no site of the structure falls inside the field of view")
    df = pd.concat(out, ignore_index=True)
    df["y_A"] = df["y_px"] * step[0]
    df["x_A"] = df["x_px"] * step[1]
    df["visible"] = df["label"] == match_label
    first = list(SITE_COLUMNS)
    rest = [c for c in df.columns if c not in first]
    df = df[first + rest].sort_values(["label", "y_A", "x_A"], kind="stable")
    return df.reset_index(drop=True)


#: rotation search: largest lattice-fit rms accepted, as a fraction of the shorter cell vector
_MAX_RMS_FRAC = 0.05


def _lengths_match(a, b, a0, b0, rel_tol: float = 0.08) -> bool:
    """Fitted vector lengths within ``rel_tol`` of the expected ones."""
    return bool(abs(np.hypot(*a) / np.hypot(*a0) - 1) <= rel_tol
                and abs(np.hypot(*b) / np.hypot(*b0) - 1) <= rel_tol)


def sites_from_image(
    image: np.ndarray,
    site_table_one_cell: pd.DataFrame,
    cell_A: Sequence[float],
    *,
    step_A: float | Sequence[float],
    match_label: str,
    invert: bool = False,
    min_distance_A: float | None = None,
    threshold: float | None = None,
    window_A: float | None = None,
    rotation_deg: float | None = 0.0,
    periodic: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """Site table of the whole field of view from one image (find → refine → lattice → basis).

    Parameters
    ----------
    image : ndarray (sy, sx)
        Virtual ADF (atoms bright) or ABF/BF (atoms dark: ``invert=True``).
    site_table_one_cell, cell_A, match_label : see :func:`map_basis`.
    rotation_deg : float or None
        Crystal rotation in the scan frame (see :func:`map_basis`); ``None`` = search 0-180° in
        3° steps for the rotation whose lattice fit (with no more basis positions per cell than
        ``match_label`` columns, and vector lengths within 8 % of the cell's: the scale is known)
        scores best, score = Σ exp(−r²/2σ²) over the peaks' residuals with σ = 3 % of the
        shorter cell vector; among scores within 2 % of the best the lowest-rms fit wins. Fits
        with rms above 5 % of the shorter cell vector, or more than 4 × (+ 1 % of a cell) the
        rms of a fit whose lengths are off, are wrong lattices and not considered (the error
        then names the off-scale lattice: check ``step_A``). The fitted vectors give the
        rotation.
    step_A : float or (y, x)
    invert : bool
        Search minima instead of maxima.
    min_distance_A : float, optional
        Minimum distance between ``match_label`` columns; default 0.8 × their smallest in-cell
        (periodic) separation.
    threshold : float, optional
        Peak threshold on the (possibly inverted) image. Default: keep the strongest peaks, as
        many as ``match_label`` columns fit in the field of view (the "strongest ADF peaks are
        Fe" rule).
    window_A : float, optional
        Gaussian-fit half window; default 0.4 × ``min_distance_A``.
    periodic : bool
        The image covers whole cells periodically (simulations).

    Returns
    -------
    sites : DataFrame
        As :func:`map_basis`.
    info : dict
        ``peaks_px`` (refined, DataFrame), ``lattice`` (origin, a, b in px), ``fit`` (lattice
        fit info: rms, inliers, ...), ``rotation_deg`` (used or found).
    """
    img = _image2d(image)
    if invert:
        img = -img
    step = _step_pair(step_A)
    table = _check_sites(site_table_one_cell)
    ly, lx = (float(v) for v in cell_A)
    if min_distance_A is None:
        m = table.loc[table["label"] == match_label, ["y_A", "x_A"]].to_numpy()
        if len(m) == 0:
            raise ValueError(f"match_label {match_label!r} not in the site table")
        tiles = np.array([(dy, dx) for dy in (-ly, 0, ly) for dx in (-lx, 0, lx)])
        allm = (m[None, :, :] + tiles[:, None, :]).reshape(-1, 2)
        d = np.hypot(*(allm[None] - m[:, None]).transpose(2, 0, 1))
        d = d[d > 1e-6]
        min_distance_A = 0.8 * float(d.min()) if d.size else 0.8 * min(ly, lx)
    md_px = max(1.0, min_distance_A / float(step.max()))
    peaks = find_peaks(img, min_distance_px=md_px, threshold=threshold)
    if threshold is None:
        # keep the strongest peaks, as many as match_label columns fit in the field of view
        n_cell = int((table["label"] == match_label).sum())
        n_expected = n_cell * img.size * float(np.prod(step)) / (ly * lx)
        peaks = peaks[: max(3, int(round(n_expected)))]
    if len(peaks) < 3:
        raise ValueError(f"only {len(peaks)} peaks found; lower the threshold or check the image")
    w_px = max(1, int(round((window_A or 0.4 * min_distance_A) / float(step.min()))))
    ref = refine_gaussian(img, peaks, window_px=w_px, periodic=periodic)
    pos = ref[["y_px", "x_px"]].to_numpy()
    n_cell = int((table["label"] == match_label).sum())
    if rotation_deg is None:
        cands, off_scale = [], None
        for rot in np.arange(0.0, 180.0, 3.0):
            a0, b0 = _cell_vectors_px(cell_A, step, rot)
            try:
                res = fit_lattice(pos, a_guess=a0, b_guess=b0, max_basis=n_cell,
                                  return_info=True)
            except ValueError:
                continue
            short = min(np.hypot(*a0), np.hypot(*b0))
            if res[3]["rms"] > _MAX_RMS_FRAC * short:
                continue  # residuals of a sizeable fraction of a cell: not this lattice
            if not _lengths_match(res[1], res[2], a0, b0):
                # the scale is known (step, cell): a lattice of other lengths is wrong
                if off_scale is None or res[3]["rms"] < off_scale[0]:
                    off_scale = (res[3]["rms"], np.hypot(*res[1]) * step[0],
                                 np.hypot(*res[2]) * step[1])
                continue
            # soft inlier count: peaks within ~3% of the shorter cell vector count fully, so a
            # loose fit of a wrong rotation (residuals ~ 0.1 cell) scores low
            sigma = 0.03 * short
            score = float(np.sum(np.exp(-0.5 * (res[3]["residuals"] / sigma) ** 2)))
            cands.append((score, res[3]["rms"], rot, res, short))
        # an off-scale lattice that fits far better than every in-scale one means the in-scale
        # ones are wrong lattices that happen to have the right lengths (e.g. near 120 degrees)
        if off_scale is not None:
            cands = [c for c in cands if c[1] <= 4.0 * off_scale[0] + 0.01 * c[4]]
        if not cands:
            hint = ""
            if off_scale is not None:
                hint = (f"; the best lattice fit (rms {off_scale[0]:.2f} px) has vectors "
                        f"{off_scale[1]:.2f}, {off_scale[2]:.2f} Å, more than 8 % off the cell "
                        f"{tuple(cell_A)} Å: check step_A (scan drift / calibration)")
            raise ValueError("no crystal rotation makes the structure's cell fit the peaks"
                             + hint)
        # the best soft score; among (near-)equal scores the lowest-rms lattice
        top = max(c[0] for c in cands)
        _, _, rot, (origin, a, b, fit), _ = min((c for c in cands if c[0] >= 0.98 * top),
                                             key=lambda c: c[1])
        # the fitted b vector (cell x axis) gives the rotation precisely
        rotation_deg = float(np.degrees(np.arctan2(b[0] * step[0], b[1] * step[1])))
    else:
        a0, b0 = _cell_vectors_px(cell_A, step, rotation_deg)
        origin, a, b, fit = fit_lattice(pos, a_guess=a0, b_guess=b0, return_info=True)
        if not _lengths_match(a, b, a0, b0):
            raise ValueError(
                f"the lattice fitted to the peaks ({np.hypot(*a) * step[0]:.2f}, "
                f"{np.hypot(*b) * step[1]:.2f} Å) differs from the cell {tuple(cell_A)} Å by "
                f"more than 8 %; check step_A / the structure, or let the rotation be searched")
    inl = fit["indices"][:, 0] != -1 if len(fit["indices"]) else np.zeros(0, bool)
    sites = map_basis((origin, a, b), table, cell_A, scan_shape=img.shape, step_A=step,
                      match_label=match_label, peaks=pos[inl], rotation_deg=rotation_deg)
    return sites, {"peaks_px": ref, "lattice": (origin, a, b), "fit": fit,
                   "rotation_deg": float(rotation_deg)}


def refine_sites(
    image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    labels: Sequence[str] | None = None,
    window_A: float = 0.5,
    invert: bool = False,
) -> pd.DataFrame:
    """Refine site positions (of ``labels``) by gaussian fits on an atom-specific image.

    Returns a copy of ``sites`` restricted to ``labels`` with refined ``y_A, x_A`` and the fit
    columns of :func:`refine_gaussian` (``fit_ok`` etc.).
    """
    img = _image2d(image)
    if invert:
        img = -img
    step = _step_pair(step_A)
    df = _check_sites(sites)
    if labels is not None:
        df = df[df["label"].isin(list(labels))]
    if df.empty:
        raise ValueError(f"no sites with labels {labels!r}")
    yx = df[["y_A", "x_A"]].to_numpy() / step
    w = max(1, int(round(window_A / float(step.min()))))
    ref = refine_gaussian(img, yx, window_px=w)
    out = df.reset_index(drop=True).copy()
    out["y_A"] = ref["y_px"].to_numpy() * step[0]
    out["x_A"] = ref["x_px"].to_numpy() * step[1]
    for col in ("amplitude", "sigma_y_px", "sigma_x_px", "background", "fit_ok"):
        out[col] = ref[col].to_numpy()
    return out


# ----------------------------------------------------------------------------------------------
# site tables on disk, regions
# ----------------------------------------------------------------------------------------------
def _check_sites(sites: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(sites, pd.DataFrame):
        raise ValueError(f"a site table must be a pandas DataFrame, got {type(sites).__name__}")
    missing = [c for c in ("label", "y_A", "x_A") if c not in sites.columns]
    if missing:
        raise ValueError(f"site table lacks columns {missing}")
    df = sites.copy()
    if not np.all(np.isfinite(df[["y_A", "x_A"]].to_numpy(dtype=float))):
        raise ValueError("site positions must be finite")
    df["label"] = df["label"].astype(str)
    if "composition" not in df.columns:
        df["composition"] = df["label"].str.replace("+", "", regex=False)
    df["composition"] = df["composition"].fillna(df["label"]).astype(str)
    if "n_atoms" not in df.columns:
        df["n_atoms"] = 1
    df["n_atoms"] = df["n_atoms"].fillna(1).astype(int)
    return df


def read_sites_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a site table CSV (columns ``label, y_A, x_A[, composition, n_atoms, ...]``).

    Missing ``composition`` defaults to the label without "+", missing ``n_atoms`` to 1.
    """
    df = pd.read_csv(path, dtype={"label": str})
    return _check_sites(df)


def write_sites_csv(sites: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a site table as CSV (the standard columns first)."""
    df = _check_sites(sites)
    rest = [c for c in df.columns if c not in SITE_COLUMNS]
    df[list(SITE_COLUMNS) + rest].to_csv(path, index=False, float_format="%.6g")


def region_from_rectangle(
    scan_shape: tuple[int, int],
    *,
    y: tuple[float, float],
    x: tuple[float, float],
    units: str = "px",
    step_A: float | Sequence[float] | None = None,
) -> np.ndarray:
    """Boolean scan-region mask of a rectangle (for partial templates / region statistics).

    ``units="px"``: half-open index ranges ``a <= i < b`` (like slicing). ``units="A"``: probe
    positions ``i * step`` with ``a <= y_A <= b`` (closed; needs ``step_A``).

    Raises
    ------
    ValueError
        Unknown units, missing step, reversed or empty rectangle.
    """
    sy, sx = (int(v) for v in scan_shape)
    (y0, y1), (x0, x1) = (float(v) for v in y), (float(v) for v in x)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"rectangle must have a < b, got y={y!r}, x={x!r}")
    iy, ix = np.arange(sy, dtype=float), np.arange(sx, dtype=float)
    if units == "px":
        ry, rx = (iy >= y0) & (iy < y1), (ix >= x0) & (ix < x1)
    elif units == "A":
        if step_A is None:
            raise ValueError("units='A' needs step_A")
        s = _step_pair(step_A)
        ya, xa = iy * s[0], ix * s[1]
        eps = 1e-9
        ry = (ya >= y0 - eps) & (ya <= y1 + eps)
        rx = (xa >= x0 - eps) & (xa <= x1 + eps)
    else:
        raise ValueError(f"units must be 'px' or 'A', got {units!r}")
    mask = ry[:, None] & rx[None, :]
    if not mask.any():
        raise ValueError(f"rectangle y={y!r}, x={x!r} ({units}) contains no probe position")
    return mask


# ----------------------------------------------------------------------------------------------
# PbTiO3 Ti-O displacement
# ----------------------------------------------------------------------------------------------
def ti_o_displacement(
    ti_positions: np.ndarray,
    o_positions: np.ndarray,
    *,
    cell_A: Sequence[float],
    max_distance_frac: float = 0.75,
) -> pd.DataFrame:
    """Displacement of every Ti column from the centre of its four nearest O columns (Fig. 4h).

    Parameters
    ----------
    ti_positions, o_positions : ndarray (n, 2)
        ``(y, x)`` column positions in Å (e.g. refined on the Ti- and O-specific images).
    cell_A : (Ly, Lx)
        Projected cell; O columns farther than ``max_distance_frac × max(cell)`` do not count.
    max_distance_frac : float

    Returns
    -------
    DataFrame
        One row per Ti column with four O neighbours in range (edge columns without them are
        dropped): ``y_A, x_A`` (Ti), ``o_center_y_A, o_center_x_A``, ``dy_A, dx_A`` (Ti − O
        centre), ``d_A`` (length), ``angle_deg`` (``atan2(dy, dx)``).
    """
    ti = np.asarray(ti_positions, dtype=float).reshape(-1, 2)
    ox = np.asarray(o_positions, dtype=float).reshape(-1, 2)
    if len(ox) < 4:
        raise ValueError(f"need at least 4 O columns, got {len(ox)}")
    if not (np.all(np.isfinite(ti)) and np.all(np.isfinite(ox))):
        raise ValueError("positions must be finite")
    cut = max_distance_frac * max(float(v) for v in cell_A)
    d, idx = cKDTree(ox).query(ti, k=4)
    ok = np.all(d <= cut, axis=1)
    centre = ox[idx[ok]].mean(axis=1)
    t = ti[ok]
    disp = t - centre
    return pd.DataFrame({
        "y_A": t[:, 0], "x_A": t[:, 1],
        "o_center_y_A": centre[:, 0], "o_center_x_A": centre[:, 1],
        "dy_A": disp[:, 0], "dx_A": disp[:, 1],
        "d_A": np.hypot(disp[:, 0], disp[:, 1]),
        "angle_deg": np.degrees(np.arctan2(disp[:, 0], disp[:, 1])),
    })


def ti_o_displacement_from_images(
    ti_image: np.ndarray,
    o_image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    cell_A: Sequence[float],
    ti_label: str = "Ti+O",
    o_label: str = "O",
    window_A: float = 0.5,
    invert: tuple[bool, bool] = (False, False),
) -> pd.DataFrame:
    """Ti-column displacements (Fig. 4h) from Ti- and O-specific images.

    The ``ti_label`` sites are refined on ``ti_image`` and the ``o_label`` sites on ``o_image``
    (gaussian fits, :func:`refine_sites`; starting from e.g. the mapped sites of
    :func:`sites_from_image`), then :func:`ti_o_displacement` is applied. Columns whose fit
    failed are left out.
    """
    ti = refine_sites(ti_image, sites, step_A=step_A, labels=[ti_label], window_A=window_A,
                      invert=invert[0])
    ox = refine_sites(o_image, sites, step_A=step_A, labels=[o_label], window_A=window_A,
                      invert=invert[1])
    ti = ti[ti["fit_ok"]]
    ox = ox[ox["fit_ok"]]
    return ti_o_displacement(ti[["y_A", "x_A"]].to_numpy(), ox[["y_A", "x_A"]].to_numpy(),
                             cell_A=cell_A)
