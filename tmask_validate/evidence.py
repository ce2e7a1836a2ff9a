"""Evidence that a template mask sees a *species*, not a *position* (numpy only).

A PCC mask reproduces almost any template in-sample (DEVELOPERS.md), so an image that looks like
its template is no evidence. This module measures evidence the way a referee would accept it:

1. **Multi-cell noisy fields.** One-cell noiseless data of a periodic crystal are tiled to a
   field of ``cells = (cy, cx)`` unit cells, with *independent* Poisson counts at every probe
   position (:func:`noisy_field`, counts drawn with :func:`tmask_validate.noise.poisson_counts`).
2. **Held-out cells.** Folds are the cells (:meth:`FieldGeometry.folds`); the image of every
   cell comes from the mask fitted on the other cells
   (:func:`tmask_validate.core.crossfit_template_image`). In-sample images are kept only as a
   diagnostic, the "template imprint".
3. **Site contrast that cannot clip** (:func:`cell_contrasts`): for a cell ``i`` with image
   values ``s`` over its probe positions,

   ``c_i = (mean of s over the site pixels of cell i - mean of s over all of cell i) / std of s
   over cell i``

   - the background is the *mean image of the cell* (every pixel, sites included): nothing is
   clipped, a site darker than its surroundings gives ``c < 0``, a structureless image ``c ~ 0``.
   Site pixels are the pixels whose centre lies within ``site_radius_A`` of a site (always the
   site's nearest pixel). Dividing by the cell's std makes the contrast independent of the
   arbitrary scale of a normalised (Eq. 7) image, so fields analysed with different masks are
   comparable.
4. **Control with the species removed.** The same analysis of a structure in which the species'
   columns are emptied (atoms removed, lattice, seeds and phonon displacements of every other
   atom unchanged). ``evidence_z = (C_present - C_absent) / SE`` (:func:`evidence_summary`).
   The standard error is the largest of three estimates: the spread across cells
   (``sqrt(var_i c^P / K + var_i c^A / K)`` averaged over repeats), the spread of the
   difference across independent *repeats* (each repeat = its own Poisson draw of both fields,
   and its own frozen-phonon configuration where several were simulated) and the spread of the
   same difference over the random-site null templates. Cells share their training data and,
   when tiled, their phonon configuration, so the cell spread alone understates the
   repeat-to-repeat variation (measured on pure noise: 1 in 8 random templates reached z > 3).
5. **Random-site null** (:func:`null_p`): the same statistic for ``>= 20`` templates of the same
   kind and site count at random positions ``>= min_distance_A`` from every column
   (:func:`random_null_sites`); ``null_p = (1 + #{z_null >= z}) / (1 + N)``.
6. **Verdict** (:func:`verdict`): ``detected`` only when ``z >= z_min`` *and* ``null_p <= p_max``;
   ``uninformative`` when the standard error is not finite or the control itself fails (the
   random-site templates show "evidence" typically: median ``z_null >= z_min``, i.e. removing
   the species changes the images everywhere, not at its sites); else ``not detected``.

Everything here takes plain arrays plus explicit geometry (:class:`FieldGeometry`); reading
simulation stores is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tmask_validate import noise, templates

__all__ = [
    "EVIDENCE_COLUMNS",
    "Comparison",
    "FieldGeometry",
    "apply_fold_masks",
    "cell_contrasts",
    "detection_limits",
    "evidence_summary",
    "evaluate_evidence",
    "noisy_field",
    "null_p",
    "random_null_sites",
    "site_pixels",
    "verdict",
]

#: the contract columns of ``results/species_evidence.csv`` (extra columns follow these)
EVIDENCE_COLUMNS = ("structure", "species", "template", "thickness_nm", "dose_e_per_A2",
                    "occupancy", "contrast_present", "contrast_absent", "evidence_z", "null_p",
                    "verdict")

VERDICTS = ("detected", "not detected", "uninformative")


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class FieldGeometry:
    """A field of ``cells`` unit cells scanned on a periodic one-cell probe grid.

    Attributes
    ----------
    cell_shape : (sy, sx)
        Probe positions per cell.
    cells : (cy, cx)
        Cells of the field (folds are cells, so ``cy * cx`` is the number of folds).
    step_A : (dy, dx)
        Probe step [Å]; ``cell_shape * step_A`` is the projected cell.
    """

    cell_shape: tuple[int, int]
    cells: tuple[int, int]
    step_A: tuple[float, float]

    def __post_init__(self) -> None:
        sy, sx = (int(v) for v in self.cell_shape)
        cy, cx = (int(v) for v in self.cells)
        if min(sy, sx) < 1 or min(cy, cx) < 1:
            raise ValueError(f"cell_shape {self.cell_shape} and cells {self.cells} must be >= 1")
        if cy * cx < 2:
            raise ValueError(f"a held-out analysis needs at least 2 cells, got {self.cells}")
        dy, dx = templates.as_pair(self.step_A, "step_A")
        object.__setattr__(self, "cell_shape", (sy, sx))
        object.__setattr__(self, "cells", (cy, cx))
        object.__setattr__(self, "step_A", (dy, dx))

    @property
    def cell_A(self) -> tuple[float, float]:
        """Projected cell ``(Ly, Lx)`` [Å]."""
        return (self.cell_shape[0] * self.step_A[0], self.cell_shape[1] * self.step_A[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Scan shape of the whole field."""
        return (self.cells[0] * self.cell_shape[0], self.cells[1] * self.cell_shape[1])

    @property
    def n_cells(self) -> int:
        return self.cells[0] * self.cells[1]

    def folds(self) -> np.ndarray:
        """Fold label (= cell index, row-major over cells) of every probe position, int64."""
        sy, sx = self.cell_shape
        iy = np.arange(self.shape[0]) // sy
        ix = np.arange(self.shape[1]) // sx
        return (iy[:, None] * self.cells[1] + ix[None, :]).astype(np.int64)

    def tile_sites(self, sites: pd.DataFrame) -> pd.DataFrame:
        """The one-cell site table (positions in the cell, Å) repeated in every cell."""
        s = templates.validate_sites(sites)
        ly, lx = self.cell_A
        parts = [s.assign(y_A=s["y_A"] + i * ly, x_A=s["x_A"] + j * lx)
                 for i in range(self.cells[0]) for j in range(self.cells[1])]
        return pd.concat(parts, ignore_index=True)

    def tile(self, one_cell_image: np.ndarray) -> np.ndarray:
        """A one-cell image ``(sy, sx)`` tiled over the field."""
        a = np.asarray(one_cell_image)
        if a.shape != self.cell_shape:
            raise ValueError(f"one-cell image has shape {a.shape}, expected {self.cell_shape}")
        return np.tile(a, self.cells)


def noisy_field(one_cell: np.ndarray, geometry: FieldGeometry, electrons_per_probe: float, *,
                seed: int, dose_e_per_A2: float, stream: int, thickness_index: int = 0,
                rows_per_block: int = 16) -> np.ndarray:
    """Independent Poisson counts on a field tiled from one-cell noiseless intensities.

    Parameters
    ----------
    one_cell : ndarray (sy, sx, ky, kx)
        Noiseless intensities (fraction of the probe per pixel) of one periodic cell, tiled
        over the field; or of the whole field (a real multi-cell scan), used as it is.
    geometry : FieldGeometry
    electrons_per_probe : float
        Expected electrons per probe position (:func:`tmask_validate.noise.electrons_per_probe`).
    seed, dose_e_per_A2, stream, thickness_index : int, float, int, int
        Select the random streams (:func:`tmask_validate.noise.poisson_counts`; one per field
        row). Use a different ``stream`` for every field that must be independent (variant,
        repeat).

    Returns
    -------
    ndarray (cy*sy, cx*sx, ky, kx) uint32
    """
    src = np.asarray(one_cell)
    whole = src.ndim == 4 and tuple(src.shape[:2]) == geometry.shape
    if src.ndim != 4 or not (whole or tuple(src.shape[:2]) == geometry.cell_shape):
        raise ValueError(f"one_cell must be (sy, sx, ky, kx) with (sy, sx) = "
                         f"{geometry.cell_shape} (or the whole field {geometry.shape}), "
                         f"got {src.shape}")
    fy, fx = geometry.shape
    # a whole simulated multi-cell field (real supercell scan) is used as it is, not tiled
    sy = fy if whole else geometry.cell_shape[0]
    cx = 1 if whole else geometry.cells[1]
    out = np.empty((fy, fx, *src.shape[2:]), np.uint32)
    for r0 in range(0, fy, rows_per_block):
        r1 = min(r0 + rows_per_block, fy)
        lam = np.tile(src[np.arange(r0, r1) % sy], (1, cx, 1, 1))
        out[r0:r1] = noise.poisson_counts(lam, electrons_per_probe, seed=seed,
                                          dose_e_per_A2=dose_e_per_A2, row0=r0, stream=stream,
                                          thickness_index=thickness_index)
    return out


def site_pixels(sites_yx_A: np.ndarray, shape: Sequence[int], step_A: Sequence[float],
                radius_A: float) -> np.ndarray:
    """Boolean map of the pixels within ``radius_A`` of any site (always its nearest pixel).

    Periodic over ``shape`` (a field of whole cells). ``sites_yx_A`` is ``(n, 2)`` in Å.
    """
    yx = np.asarray(sites_yx_A, float).reshape(-1, 2)
    if len(yx) == 0:
        raise ValueError("no sites")
    step = templates.as_pair(step_A, "step_A")
    r = float(radius_A)
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"radius_A must be >= 0, got {radius_A!r}")
    px = yx / np.asarray(step)
    radius_px = (max(r / step[0], 1e-9), max(r / step[1], 1e-9))
    tmpl = templates.make_template(px, tuple(int(v) for v in shape), kind="disc",
                                   radius_px=radius_px, periodic=True)
    return tmpl > 0


def cell_contrasts(image: np.ndarray, sites_mask: np.ndarray, folds: np.ndarray,
                   n_folds: int) -> np.ndarray:
    """Site contrast of every cell: ``(mean(sites) - mean(cell)) / std(cell)``.

    Parameters
    ----------
    image : ndarray (scan_y, scan_x)
    sites_mask : bool ndarray (scan_y, scan_x)
        Site pixels (:func:`site_pixels`).
    folds : int ndarray (scan_y, scan_x)
        Cell index of every pixel (negative = not used).
    n_folds : int

    Returns
    -------
    ndarray (n_folds,) float64; NaN for a cell without site pixels or with a constant image.
    """
    img = np.asarray(image, np.float64)
    m = np.asarray(sites_mask, bool)
    f = np.asarray(folds)
    if img.shape != m.shape or img.shape != f.shape:
        raise ValueError(f"image {img.shape}, sites_mask {m.shape} and folds {f.shape} differ")
    out = np.full(int(n_folds), np.nan)
    for k in range(int(n_folds)):
        sel = f == k
        v = img[sel]
        s = m[sel]
        if v.size < 2 or not s.any():
            continue
        sd = v.std()
        if sd > 0:
            out[k] = (v[s].mean() - v.mean()) / sd
    return out


# ----------------------------------------------------------------------------- fold masks
def _fold_stats(x2: np.ndarray, fold_flat: np.ndarray, n_folds: int):
    """Per-fold column sums ``(K, n)`` and sums of squares (float64) of ``x2`` (m, n)."""
    n = x2.shape[1]
    s1 = np.zeros((n_folds, n))
    s2 = np.zeros((n_folds, n))
    cnt = np.zeros(n_folds, np.int64)
    for k in range(n_folds):
        rows = np.flatnonzero(fold_flat == k)
        if rows.size:
            xk = x2[rows].astype(np.float64)
            s1[k] = xk.sum(0)
            s2[k] = np.einsum("ij,ij->j", xk, xk)
            cnt[k] = rows.size
    return s1, s2, cnt


def apply_fold_masks(data: np.ndarray, masks: np.ndarray, folds: np.ndarray, *,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """Apply per-fold masks to (other) data with out-of-fold Eq. 4 normalisation.

    The image at fold ``f``'s positions is ``sum_k (x_k - mean_k) / std_k * mask_f[k]`` with the
    column mean and population std taken over the positions NOT in ``f`` of ``data`` - the
    held-out application of :func:`tmask_validate.core.crossfit_template_image`, but with masks
    fitted elsewhere (e.g. the species-present masks applied to the species-removed data).

    Parameters
    ----------
    data : ndarray (scan_y, scan_x, ky, kx)
    masks : ndarray (K, ky, kx) or (K, k, ky, kx)
    folds : int ndarray (scan_y, scan_x), labels 0..K-1 (negative = unused, image 0 there)
    valid : bool ndarray (ky, kx), optional
        Detector pixels used (others contribute nothing).

    Returns
    -------
    ndarray (scan_y, scan_x) or (k, scan_y, scan_x) float64
    """
    d = np.asarray(data)
    if d.ndim != 4:
        raise ValueError(f"data must be (scan_y, scan_x, ky, kx), got {d.shape}")
    sy, sx, ky, kx = d.shape
    f = np.asarray(folds)
    if f.shape != (sy, sx):
        raise ValueError(f"folds shape {f.shape} != scan shape {(sy, sx)}")
    mk = np.asarray(masks, np.float64)
    single = mk.ndim == 3
    if single:
        mk = mk[:, None]
    if mk.ndim != 4 or mk.shape[2:] != (ky, kx):
        raise ValueError(f"masks must be (K, [k,] ky, kx) for detector {(ky, kx)}, got "
                         f"{np.shape(masks)}")
    n_folds = mk.shape[0]
    if f.max() >= n_folds:
        raise ValueError(f"folds use label {int(f.max())} but only {n_folds} masks were given")
    x2 = d.reshape(sy * sx, ky * kx)
    ff = f.reshape(-1)
    s1, s2, cnt = _fold_stats(x2, ff, n_folds)
    t1, t2, tc = s1.sum(0), s2.sum(0), cnt.sum()
    use = np.ones(ky * kx, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    out = np.zeros((mk.shape[1], sy * sx))
    for k in range(n_folds):
        rows = np.flatnonzero(ff == k)
        m_oof = tc - cnt[k]
        if rows.size == 0 or m_oof < 1:
            continue
        mean = (t1 - s1[k]) / m_oof
        var = (t2 - s2[k]) / m_oof - mean * mean
        good = use & (var > 0)
        scale = np.zeros_like(mean)
        scale[good] = 1.0 / np.sqrt(var[good])
        w = mk[k].reshape(mk.shape[1], -1) * scale  # (k, n)
        xk = x2[rows].astype(np.float64) - mean
        out[:, rows] = w @ xk.T
    out = out.reshape(-1, sy, sx)
    return out[0] if single else out


# ----------------------------------------------------------------------------- null templates
def _min_dist(points: np.ndarray, ref: np.ndarray, period: Sequence[float]) -> np.ndarray:
    from scipy.spatial import cKDTree

    per = np.asarray(period, float)

    def wrap(a):
        a = np.mod(np.asarray(a, float).reshape(-1, 2), per)
        return np.where(a >= per, 0.0, a)

    d, _ = cKDTree(wrap(ref), boxsize=per).query(wrap(points))
    return np.asarray(d, float)


def random_null_sites(columns_yx_A: np.ndarray, cell_A: Sequence[float], n_sites: int, *,
                      n_templates: int, min_distance_A: float = 0.7,
                      min_separation_A: float | None = None,
                      seed: int | np.random.Generator = 0, max_tries: int = 200_000,
                      ) -> list[np.ndarray]:
    """Random site sets for the null templates, in one periodic cell.

    Each set holds ``n_sites`` positions drawn uniformly in the cell, every one at least
    ``min_distance_A`` from every real column (periodic) and at least ``min_separation_A``
    (default ``min_distance_A / 2``) from the others of its set.

    Returns
    -------
    list of ``(n_sites, 2)`` arrays of ``(y_A, x_A)``.

    Raises
    ------
    ValueError
        If the cell has no room for that many sites at those distances.
    """
    ly, lx = templates.as_pair(cell_A, "cell_A")
    cols = np.asarray(columns_yx_A, float).reshape(-1, 2)
    n = int(n_sites)
    if n < 1 or int(n_templates) < 1:
        raise ValueError("n_sites and n_templates must be >= 1")
    sep = 0.5 * float(min_distance_A) if min_separation_A is None else float(min_separation_A)
    rng = np.random.default_rng(seed)
    out = []
    tries = 0
    for _ in range(int(n_templates)):
        chosen: list[np.ndarray] = []
        while len(chosen) < n:
            tries += 1
            if tries > max_tries:
                raise ValueError(
                    f"could not place {n} random sites >= {min_distance_A} Å from every column "
                    f"and >= {sep} Å apart in a {ly:.2f} x {lx:.2f} Å cell")
            p = rng.uniform(0, 1, 2) * (ly, lx)
            if _min_dist(p, cols, (ly, lx))[0] < min_distance_A:
                continue
            if chosen and _min_dist(p, np.array(chosen), (ly, lx))[0] < sep:
                continue
            chosen.append(p)
        out.append(np.array(chosen))
    return out


# ----------------------------------------------------------------------------- statistics
def evidence_summary(present: np.ndarray, absent: np.ndarray, *,
                     se_null: float = float("nan")) -> dict[str, float]:
    """Present-vs-absent contrast difference and its standard error.

    Parameters
    ----------
    present, absent : ndarray (R, K)
        Per-repeat, per-cell contrasts (:func:`cell_contrasts`) with the species present and
        removed. Repeats are independent (own noise draw, own phonon configuration where
        available); cells within a repeat are not.

    se_null : float, optional
        Spread (std) of the same difference over the random-site null templates. Measured on
        pure-noise fields, cells-and-repeats errors alone let ~1 in 8 random templates reach
        z > 3: every held-out cell's mask is trained on the other cells, so the cell contrasts
        are positively correlated, and two repeats give a 1-dof spread. The null spread holds
        every source that varies between templates evaluated the same way, so it is a third,
        empirical, candidate.

    Returns
    -------
    dict
        ``contrast_present``, ``contrast_absent`` (means over repeats and cells), ``difference``,
        ``se_cells`` (cell spread: ``sqrt(mean_r [var_i c^P_r/K + var_i c^A_r/K]) / sqrt(R)``),
        ``se_repeats`` (``std_r(d_r) / sqrt(R)`` of the per-repeat differences; NaN for R = 1),
        ``se_null`` (as given), ``se`` (the largest finite one), ``evidence_z = difference /
        se``, ``n_repeats``, ``n_cells``.
    """
    p = np.atleast_2d(np.asarray(present, float))
    a = np.atleast_2d(np.asarray(absent, float))
    if p.shape[0] != a.shape[0]:
        raise ValueError(f"present has {p.shape[0]} repeats, absent {a.shape[0]}")
    r = p.shape[0]
    mp = np.nanmean(p, axis=1)
    ma = np.nanmean(a, axis=1)
    d = mp - ma

    def var_mean(x):
        k = np.sum(np.isfinite(x), axis=1)
        v = np.array([np.nanvar(row, ddof=1) if kk > 1 else np.nan for row, kk in zip(x, k,
                                                                                     strict=True)])
        return v / np.maximum(k, 1)

    se_cells = math.sqrt(float(np.mean(var_mean(p) + var_mean(a))) / r)
    se_rep = float(np.std(d, ddof=1) / math.sqrt(r)) if r > 1 else float("nan")
    cand = [v for v in (se_cells, se_rep, float(se_null)) if np.isfinite(v)]
    se = max(cand) if cand else float("nan")
    diff = float(np.mean(d))
    z = diff / se if (np.isfinite(se) and se > 0) else float("nan")
    return {"contrast_present": float(np.mean(mp)), "contrast_absent": float(np.mean(ma)),
            "difference": diff, "se_cells": se_cells, "se_repeats": se_rep,
            "se_null": float(se_null), "se": se,
            "evidence_z": z, "n_repeats": r, "n_cells": p.shape[1]}


def _z_noise(summary: Mapping[str, float]) -> float:
    cand = [v for v in (summary["se_cells"], summary["se_repeats"]) if np.isfinite(v)]
    se = max(cand) if cand else float("nan")
    return float(summary["difference"] / se) if np.isfinite(se) and se > 0 else float("nan")


def null_p(z: float, z_null: Sequence[float]) -> float:
    """One-sided permutation-style p-value ``(1 + #{z_null >= z}) / (1 + N)``.

    Null values that are NaN count as ``>= z`` (they cannot support the real template);
    a NaN ``z`` gives NaN.
    """
    zn = np.asarray(z_null, float).ravel()
    if zn.size == 0:
        raise ValueError("no null values")
    if not np.isfinite(z):
        return float("nan")
    exceed = np.sum(~np.isfinite(zn) | (zn >= z))
    return float((1 + exceed) / (1 + zn.size))


def verdict(z: float, p: float, z_null: Sequence[float], *, z_min: float, p_max: float) -> str:
    """``detected`` / ``not detected`` / ``uninformative`` (see the module docstring)."""
    zn = np.asarray(z_null, float)
    if not (np.isfinite(z) and np.isfinite(p)):
        return "uninformative"
    finite = zn[np.isfinite(zn)]
    if finite.size == 0 or np.median(finite) >= z_min:
        return "uninformative"  # the random-site control itself shows "evidence"
    if z >= z_min and p <= p_max:
        return "detected"
    return "not detected"


# ----------------------------------------------------------------------------- the evaluation
@dataclass(frozen=True)
class Comparison:
    """One evidence row: ``species`` in variant ``present`` against variant ``absent``.

    ``occupancy`` is the species' occupancy in ``present`` (1 = the crystal); ``absent`` must be
    the variant with the species removed.
    """

    species: str
    present: str
    absent: str
    occupancy: float = 1.0


@dataclass(frozen=True)
class _Template:
    species: str
    kind: str
    null_index: int  # -1 = the real sites
    image: np.ndarray = field(repr=False)
    sites: np.ndarray = field(repr=False)


def _template_bank(sites: pd.DataFrame, geometry: FieldGeometry, species: Sequence[str],
                   kinds: Sequence[str], *, sigma_A: float, site_radius_A: float,
                   n_null: int, min_distance_A: float, seed: int) -> dict[str, list[_Template]]:
    """Real + null templates (field-sized, tiled from the cell) per species."""
    s = templates.validate_sites(sites)
    cols = s[["y_A", "x_A"]].to_numpy(float)
    step = geometry.step_A
    out: dict[str, list[_Template]] = {}
    for si, sp in enumerate(species):
        own = cols[(s["label"] == sp).to_numpy()]
        if len(own) == 0:
            raise ValueError(f"no sites labelled {sp!r} (labels: {sorted(set(s['label']))})")
        nulls = random_null_sites(cols, geometry.cell_A, len(own), n_templates=n_null,
                                  min_distance_A=min_distance_A, seed=[int(seed), 1709, si])
        sets = [(-1, own)] + list(enumerate(nulls))
        bank = []
        for idx, yx in sets:
            yx_field = geometry.tile_sites(pd.DataFrame(
                {"label": "x", "y_A": yx[:, 0], "x_A": yx[:, 1]}))[["y_A", "x_A"]].to_numpy()
            mask = site_pixels(yx_field, geometry.shape, step, site_radius_A)
            for kind in kinds:
                kw = {"sigma_px": (sigma_A / step[0], sigma_A / step[1])} if kind == "gaussian" \
                    else ({"radius_px": (site_radius_A / step[0], site_radius_A / step[1])}
                          if kind == "disc" else {})
                # templates of one cell tiled, so every cell holds exactly the same template
                one = templates.make_template(yx / np.asarray(step), geometry.cell_shape,
                                              kind=kind, periodic=True, **kw)
                bank.append(_Template(sp, kind, idx, geometry.tile(one), mask))
        out[sp] = bank
    return out


def _crossfit(data, stack, folds, valid):
    from tmask_validate import core

    masks, images = core.crossfit_template_image(data, stack, folds, normalisation="pcc",
                                                 valid=valid)
    return np.asarray(masks), np.asarray(images)


def _insample(data, stack, valid):
    from tmask_validate import core

    _, images = core.template_mask_image(data, stack, normalisation="pcc", valid=valid)
    return np.asarray(images)


def evaluate_evidence(
    variants: Mapping[str, Sequence[np.ndarray]],
    sites: pd.DataFrame,
    geometry: FieldGeometry,
    comparisons: Sequence[Comparison],
    *,
    doses_e_per_A2: Sequence[float],
    kinds: Sequence[str] = ("binary",),
    sigma_A: float = 0.35,
    site_radius_A: float = 0.35,
    n_null: int = 20,
    min_distance_A: float = 0.7,
    repeats: int = 2,
    z_min: float = 3.0,
    p_max: float = 0.05,
    seed: int = 0,
    thickness_index: int = 0,
    valid: np.ndarray | None = None,
    keep_images: bool = False,
    progress=None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Evidence rows for every comparison, template kind and dose (one thickness).

    Parameters
    ----------
    variants : mapping name -> list of ndarray (sy, sx, ky, kx)
        Noiseless one-cell intensities of each structure variant, one array per frozen-phonon
        configuration (repeat ``r`` uses configuration ``r mod n``).
    sites : DataFrame
        One-cell site table (``label``, ``y_A``, ``x_A`` in Å, scan frame, first probe at 0).
    geometry : FieldGeometry
    comparisons : sequence of Comparison
    doses_e_per_A2 : sequence of float
    kinds : template kinds (binary / disc / gaussian)
    sigma_A, site_radius_A : gaussian template sigma; radius of the site pixels of the contrast
    n_null, min_distance_A : number of random-site null templates; their distance from columns
    repeats : independent repeats (own Poisson draws of every field; own phonon configuration)
    z_min, p_max : detection thresholds
    seed : noise / null-site seed
    thickness_index : selects independent noise streams per thickness
    valid : bool (ky, kx), optional — detector pixels used
    keep_images : bool
        Also return the cross-fitted and in-sample images of repeat 0 of the real templates.
    progress : callable(str), optional

    Returns
    -------
    table : DataFrame
        One row per (species, template kind, dose, occupancy) with
        :data:`EVIDENCE_COLUMNS` (minus structure/thickness, which the caller adds) and extras:
        ``difference``, ``se``, ``se_cells``, ``se_repeats``, ``se_null``, ``evidence_z_noise``
        (the difference over the cell/repeat errors alone),
        ``contrast_absent_present_masks``,
        ``evidence_z_present_masks`` (the present-data masks applied to the removed data),
        ``null_z_median``, ``null_z_max``, ``imprint_present``, ``imprint_absent`` (in-sample
        contrasts: the template imprint, a diagnostic only), ``n_repeats``, ``n_cells``,
        ``n_null``, ``present``, ``absent`` (variant names).
    images : dict
        With ``keep_images``: ``"<dose>/<variant>/<species>/<kind>/{crossfit,insample}"`` field
        images ``(scan_y, scan_x)``.
    """
    say = progress or (lambda _msg: None)
    for c in comparisons:
        for v in (c.present, c.absent):
            if v not in variants or len(variants[v]) == 0:
                raise ValueError(f"comparison {c} needs variant {v!r}, not given")
    species = list(dict.fromkeys(c.species for c in comparisons))
    bank = _template_bank(sites, geometry, species, kinds, sigma_A=sigma_A,
                          site_radius_A=site_radius_A, n_null=n_null,
                          min_distance_A=min_distance_A, seed=seed)
    # which species' templates each variant needs
    need: dict[str, list[str]] = {}
    for c in comparisons:
        for v in (c.present, c.absent):
            need.setdefault(v, [])
            if c.species not in need[v]:
                need[v].append(c.species)
    folds = geometry.folds()
    K = geometry.n_cells
    vnames = list(need)
    rows = []
    images: dict[str, np.ndarray] = {}
    for dose in doses_e_per_A2:
        electrons = noise.electrons_per_probe(float(dose), geometry.step_A)
        # contrasts[(variant, species, kind, null)] -> (R, K); transfer[(cmp idx, kind, null)]
        con: dict[tuple, np.ndarray] = {}
        imp: dict[tuple, float] = {}
        tra: dict[tuple, np.ndarray] = {}
        for r in range(int(repeats)):
            fields: dict[str, np.ndarray] = {}
            masks_of: dict[tuple, np.ndarray] = {}
            for v in vnames:
                cfgs = variants[v]
                one = np.asarray(cfgs[r % len(cfgs)])
                if tuple(one.shape[:2]) not in (geometry.cell_shape, geometry.shape):
                    raise ValueError(f"variant {v!r}: data {one.shape} match neither the cell "
                                     f"{geometry.cell_shape} nor the field {geometry.shape}")
                say(f"dose {dose:g} repeat {r} variant {v}: field")
                fld = noisy_field(one, geometry, electrons, seed=int(seed),
                                  dose_e_per_A2=float(dose),
                                  stream=noise.stream_id(f"evidence/{v}/{r}"),
                                  thickness_index=thickness_index)
                fields[v] = fld
                ents = [t for sp in need[v] for t in bank[sp]]
                stack = np.stack([t.image for t in ents])
                say(f"dose {dose:g} repeat {r} variant {v}: cross-fit {len(ents)} templates")
                masks, imgs = _crossfit(fld, stack, folds, valid)
                masks = masks.reshape(K, len(ents), *masks.shape[-2:])
                for j, t in enumerate(ents):
                    key = (v, t.species, t.kind, t.null_index)
                    c = cell_contrasts(imgs[j], t.sites, folds, K)
                    con.setdefault(key, np.full((int(repeats), K), np.nan))[r] = c
                    masks_of[key] = masks[:, j]
                if r == 0:
                    reals = [(j, t) for j, t in enumerate(ents) if t.null_index < 0]
                    ins = _insample(fld, np.stack([t.image for _, t in reals]), valid)
                    ins = ins.reshape(len(reals), *geometry.shape)
                    for (j, t), im in zip(reals, ins, strict=True):
                        key = (v, t.species, t.kind)
                        imp[key] = float(np.nanmean(cell_contrasts(im, t.sites, folds, K)))
                        if keep_images:
                            base = f"{dose:g}/{v}/{t.species}/{t.kind}"
                            images[base + "/crossfit"] = imgs[j].astype(np.float32)
                            images[base + "/insample"] = im.astype(np.float32)
            # present-data masks on the removed data (same folds, out-of-fold normalisation)
            for ci, cmp_ in enumerate(comparisons):
                ents = bank[cmp_.species]
                mk = np.stack([masks_of[(cmp_.present, t.species, t.kind, t.null_index)]
                               for t in ents], axis=1)
                timgs = apply_fold_masks(fields[cmp_.absent], mk, folds, valid=valid)
                for j, t in enumerate(ents):
                    key = (ci, t.kind, t.null_index)
                    tra.setdefault(key, np.full((int(repeats), K), np.nan))[r] = \
                        cell_contrasts(timgs[j], t.sites, folds, K)
            del fields
        for ci, cmp_ in enumerate(comparisons):
            for kind in kinds:
                def stat(null_index, se_null=float("nan"), _c=cmp_, _k=kind, _con=con):
                    return evidence_summary(_con[(_c.present, _c.species, _k, null_index)],
                                            _con[(_c.absent, _c.species, _k, null_index)],
                                            se_null=se_null)
                dnull = [stat(j)["difference"] for j in range(int(n_null))]
                sd_null = float(np.std(dnull, ddof=1)) if len(dnull) > 1 else float("nan")
                real = stat(-1, sd_null)
                znull = [stat(j, sd_null)["evidence_z"] for j in range(int(n_null))]
                pval = null_p(real["evidence_z"], znull)
                trans = evidence_summary(con[(cmp_.present, cmp_.species, kind, -1)],
                                         tra[(ci, kind, -1)], se_null=sd_null)
                zn = np.asarray(znull, float)
                rows.append({
                    "species": cmp_.species, "template": kind,
                    "dose_e_per_A2": float(dose), "occupancy": float(cmp_.occupancy),
                    "contrast_present": real["contrast_present"],
                    "contrast_absent": real["contrast_absent"],
                    "evidence_z": real["evidence_z"], "null_p": pval,
                    "verdict": verdict(real["evidence_z"], pval, znull, z_min=z_min,
                                       p_max=p_max),
                    "difference": real["difference"], "se": real["se"],
                    "se_cells": real["se_cells"], "se_repeats": real["se_repeats"],
                    "se_null": sd_null,
                    # the same difference over the noise errors alone (cells, repeats)
                    "evidence_z_noise": _z_noise(real),
                    "contrast_absent_present_masks": trans["contrast_absent"],
                    "evidence_z_present_masks": trans["evidence_z"],
                    "null_z_median": float(np.nanmedian(zn)) if np.isfinite(zn).any()
                    else float("nan"),
                    "null_z_max": float(np.nanmax(zn)) if np.isfinite(zn).any()
                    else float("nan"),
                    "imprint_present": imp[(cmp_.present, cmp_.species, kind)],
                    "imprint_absent": imp[(cmp_.absent, cmp_.species, kind)],
                    "n_repeats": int(repeats), "n_cells": K, "n_null": int(n_null),
                    "present": cmp_.present, "absent": cmp_.absent,
                })
    return pd.DataFrame(rows), images


def detection_limits(table: pd.DataFrame) -> pd.DataFrame:
    """Lowest occupancy detected per (structure, species, template, thickness, dose).

    ``occupancy_limit`` is the smallest occupancy whose verdict is ``detected`` such that every
    higher occupancy tested is detected too (NaN when the crystal itself is not detected);
    ``lowest_detected`` is the smallest detected occupancy regardless of monotonicity, and
    ``occupancies`` lists what was tested.
    """
    keys = [k for k in ("structure", "species", "template", "thickness_nm", "dose_e_per_A2")
            if k in table.columns]
    out = []
    for key, g in table.groupby(keys, sort=True):
        g = g.sort_values("occupancy")
        occ = g["occupancy"].to_numpy(float)
        det = g["verdict"].eq("detected").to_numpy()
        limit = float("nan")
        for i in range(len(occ) - 1, -1, -1):
            if not det[i]:
                break
            limit = occ[i]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row.update(occupancy_limit=limit,
                   lowest_detected=float(occ[det].min()) if det.any() else float("nan"),
                   occupancies=" ".join(f"{v:g}" for v in occ),
                   verdicts=" | ".join(g["verdict"]))
        out.append(row)
    return pd.DataFrame(out)


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The contract columns first (:data:`EVIDENCE_COLUMNS`), extras after them."""
    missing = [c for c in EVIDENCE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"evidence table lacks columns {missing}")
    return table[list(EVIDENCE_COLUMNS) + [c for c in table.columns
                                           if c not in EVIDENCE_COLUMNS]]


def describe_options(opts: Mapping[str, Any]) -> str:
    """One line describing the evidence settings (for logs and the README)."""
    return ", ".join(f"{k}={v}" for k, v in opts.items())


# ----------------------------------------------------------------------------- config helpers
#: name of the variant with nothing removed (the crystal, occupancy 1)
CRYSTAL = "crystal"


def variant_name(species: str, occupancy: float) -> str:
    """Path-safe variant key, e.g. ``("Li", 0) -> "Li-x0"``, ``("Ti+O", 0.5) -> "Ti+O-x0.5"``."""
    return f"{species}-x{float(occupancy):g}"


def variants_from_config(cfg: Mapping[str, Any], structure: str) -> dict[str, dict[str, Any]]:
    """The structure variants the evidence of ``structure`` needs, keyed by variant name.

    Each value holds ``name``, ``species`` (None for the crystal), ``occupancy``,
    ``thicknesses_nm``, ``seed`` (of the occupancy choice), ``mode`` and ``scan_cells``: what
    :func:`tmask_validate.simulate.simulate_structure` takes as ``variant``.
    """
    import zlib

    ev = cfg.get("evidence", {}) or {}
    ent = (ev.get("structures") or {}).get(structure)
    if ent is None:
        raise ValueError(f"structure {structure!r} has no evidence entry")
    base = {"thicknesses_nm": [float(t) for t in ent["thicknesses_nm"]],
            "scan_cells": [int(v) for v in ent.get("scan_cells", [1, 1])]}
    occ = ent.get("occupancy") or {}
    out = {CRYSTAL: dict(base, name=CRYSTAL, species=None, occupancy=1.0, seed=0,
                         mode="depth")}
    for sp in ent["species"]:
        values = [0.0] + ([float(v) for v in occ["values"]] if occ.get("species") == sp else [])
        for v in values:
            name = variant_name(sp, v)
            seed = int(ev.get("seed", 0)) * 1_000_003 + zlib.crc32(f"{structure}/{name}".encode())
            out[name] = dict(base, name=name, species=sp, occupancy=v, seed=seed % 2**32,
                             mode=occ.get("mode", "depth"))
    return out


def comparisons_from_config(cfg: Mapping[str, Any], structure: str) -> list[Comparison]:
    """Evidence comparisons of a structure: each species in the crystal and at each occupancy,
    against its removed (x = 0) variant."""
    out = []
    for name, v in variants_from_config(cfg, structure).items():
        if v["species"] is None or v["occupancy"] == 0.0:
            continue
        out.append(Comparison(v["species"], name, variant_name(v["species"], 0.0),
                              v["occupancy"]))
    ent = cfg["evidence"]["structures"][structure]
    crystal = [Comparison(sp, CRYSTAL, variant_name(sp, 0.0), 1.0) for sp in ent["species"]]
    return crystal + out


def check_evidence_config(cfg: Mapping[str, Any]) -> None:
    """Checks of the ``evidence`` section a JSON schema cannot express (raises ValueError)."""
    ev = cfg.get("evidence", {}) or {}
    known = cfg.get("structures", {}) or {}
    cells = [int(v) for v in ev.get("cells", [4, 4])]
    n_ph = int(ev.get("phonon_configurations", 1))
    n_main = int(cfg.get("simulation", {}).get("phonons", {}).get("configurations", 1))
    if ev.get("structures") and n_ph > n_main:
        raise ValueError(f"evidence.phonon_configurations: {n_ph} exceeds "
                         f"simulation.phonons.configurations {n_main} (same seeds are used)")
    for name, ent in (ev.get("structures") or {}).items():
        where = f"evidence.structures.{name}"
        if name not in known:
            raise ValueError(f"{where}: no such structure in the structures section "
                             f"(have {sorted(known)})")
        if known[name].get("scan", {}).get("region", "cell") != "cell":
            raise ValueError(f"{where}: evidence needs a periodic one-cell scan entry "
                             "(scan.region: cell)")
        occ = ent.get("occupancy") or {}
        if occ and occ["species"] not in ent["species"]:
            raise ValueError(f"{where}.occupancy.species: {occ['species']!r} is not one of the "
                             f"tested species {ent['species']}")
        sc = [int(v) for v in ent.get("scan_cells", [1, 1])]
        if sc != [1, 1] and sc != cells:
            raise ValueError(f"{where}.scan_cells: {sc} must be [1, 1] or equal evidence.cells "
                             f"{cells}")
        if occ.get("mode") == "columns" and sc == [1, 1]:
            raise ValueError(f"{where}.occupancy.mode: 'columns' varies occupancy from column "
                             "to column, which a tiled one-cell scan cannot show; set scan_cells")


def bin_detector(data: np.ndarray, b: int) -> np.ndarray:
    """Sum ``b x b`` detector pixels of ``(..., ky, kx)`` data (edges that do not fill a bin are
    dropped). A sum of Poisson counts is Poisson, so binning noiseless intensities before the
    noise draw is exact."""
    b = int(b)
    a = np.asarray(data)
    if b == 1:
        return a
    if b < 1:
        raise ValueError(f"binning must be >= 1, got {b}")
    ky, kx = (a.shape[-2] // b) * b, (a.shape[-1] // b) * b
    a = a[..., :ky, :kx]
    return a.reshape(*a.shape[:-2], ky // b, b, kx // b, b).sum(axis=(-3, -1))


def evaluate_structure(
    variants: Mapping[str, Sequence[Mapping[float, np.ndarray]]],
    thicknesses_nm: Sequence[float],
    sites: pd.DataFrame,
    step_A: Sequence[float],
    comparisons: Sequence[Comparison],
    options: Mapping[str, Any],
    *,
    structure: str,
    kinds: Sequence[str],
    scan_cells: Sequence[int] = (1, 1),
    thickness_indices: Sequence[int] | None = None,
    progress=None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """:func:`evaluate_evidence` for every thickness of a structure's evidence series.

    Parameters
    ----------
    variants : mapping variant -> list (one per phonon configuration) of
        ``{thickness_nm: ndarray (sy, sx, ky, kx)}`` noiseless intensities.
    thicknesses_nm : the series (keys of the inner mappings)
    sites : one-cell site table; step_A : probe step (y, x) [Å]
    comparisons : what to test; options : the ``evidence`` config section (defaults filled)
    structure : name written into the table; kinds : template kinds
    scan_cells : cells covered by the simulated scan ([1, 1]: tiled one-cell scan)
    thickness_indices : index of each thickness in the full series (selects its noise streams,
        so a job per thickness gives the rows of a job for the whole series); default 0, 1, ...

    Returns
    -------
    table (with ``structure`` and ``thickness_nm``), images keyed ``"<thickness>/<...>"``.
    """
    b = int(options.get("detector_binning", 1))
    say = progress or (lambda _m: None)
    tables = []
    images: dict[str, np.ndarray] = {}
    idx = list(range(len(thicknesses_nm))) if thickness_indices is None else \
        [int(i) for i in thickness_indices]
    if len(idx) != len(thicknesses_nm):
        raise ValueError("thickness_indices must give one index per thickness")
    for ti, t in zip(idx, thicknesses_nm, strict=True):
        arrs = {v: [bin_detector(np.asarray(cfg_[t]), b) for cfg_ in cfgs]
                for v, cfgs in variants.items()}
        ref = arrs.get(CRYSTAL, next(iter(arrs.values())))[0]
        sy, sx = ref.shape[:2]
        cy, cx = (int(v) for v in scan_cells)
        cell_shape = (sy // cy, sx // cx)
        geom = evidence_geometry(cell_shape, options["cells"], step_A)
        mean = np.mean(ref, axis=(0, 1))
        valid = mean > float(options.get("min_relative_mean", 1e-9)) * mean.max()
        tab, imgs = evaluate_evidence(
            arrs, sites, geom, comparisons, doses_e_per_A2=options["doses_e_per_A2"],
            kinds=kinds, sigma_A=float(options["gaussian_sigma_A"]),
            site_radius_A=float(options["site_radius_A"]),
            n_null=int(options["null_templates"]),
            min_distance_A=float(options["null_min_distance_A"]),
            repeats=int(options["repeats"]), z_min=float(options["z_min"]),
            p_max=float(options["p_max"]), seed=int(options.get("seed", 0)),
            thickness_index=ti, valid=valid, keep_images=bool(options.get("keep_images")),
            progress=lambda m, _t=t, _say=say: _say(f"{structure} {_t:g} nm: {m}"))
        tab.insert(0, "thickness_nm", float(t))
        tab.insert(0, "structure", structure)
        tables.append(tab)
        images.update({f"{float(t):g}/{k}": v for k, v in imgs.items()})
    return order_columns(pd.concat(tables, ignore_index=True)), images


def evidence_geometry(cell_shape: Sequence[int], cells: Sequence[int],
                      step_A: Sequence[float]) -> FieldGeometry:
    """:class:`FieldGeometry` from config values (cells as in ``evidence.cells``)."""
    return FieldGeometry(cell_shape=tuple(int(v) for v in cell_shape),
                         cells=tuple(int(v) for v in cells),
                         step_A=tuple(float(v) for v in step_A))
