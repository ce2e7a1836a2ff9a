"""Cross-fitted template-mask images: each fold's mask is fitted on the other folds (2 passes).

Why: with more detector pixels than probe positions, shot noise alone makes
``C = D̂ D̂ᵀ / m ≈ (n/m) I`` and the in-sample image of Eq. 9 + Eq. 7 reproduces ANY template.
A held-out image -- mask fitted on positions outside a fold, applied to the fold -- does not.

Algebra (per fold ``f``; ``U`` = used positions, labels ``>= 0``; ``O = U \\ F_f`` the
out-of-fold positions, ``n_O = |O|``; every statistic below is over ``O``)::

    x̄_c = Σ_O x_jc / n_O              σ_c² = Σ_O x_jc² / n_O - x̄_c²         (columns of D)
    t̄   = Σ_O t_j / n_O               σ_t² = Σ_O t_j² / n_O - t̄²           (template)
    r_c = Σ_O (t_j - t̄)(x_jc - x̄_c) / (n_O σ_t σ_c)
        = (Σ_O t_j x_jc - t̄ Σ_O x_jc) / (n_O σ_t σ_c)                          (Eqs. 4-6)
    "mean": r_c / x̄_c                                                           (Eq. 8)
    image_j = Σ_c (x_jc - x̄_c) / σ_c · r_c   (÷ x̄_c too for "mean"), j in F_f    (Eq. 7)

Every ``Σ_O`` is ``Σ_U - Σ_{F_f}``, so ONE pass accumulating per-fold sums (counts, Σy, Σy²,
Σ t⁰y for each template, with ``y = x - x_first`` shifted by one pattern against
cancellation and ``t⁰`` the template standardised once over ``U`` -- Pearson r does not
change under an affine map of ``t``) gives every fold's mask; a second pass applies each
fold's mask to its own patterns.  Two passes whatever the number of folds ``K``.

The chunk work is float64 BLAS (``t⁰_F @ y_F`` and ``y_F @ wᵀ`` per fold present in a
chunk), float64 accumulation throughout.  Self-contained on purpose (only the input checks
and the row streaming are shared with :mod:`._pcc`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._pcc import _check_normalisation, _check_templates, _check_valid
from ._stream import DataInfo, check_data, check_finite_result, iter_row_chunks

#: relative floor under which a template's out-of-fold std counts as zero (as in pcc_mask)
_TEMPLATE_STD_FLOOR = 1e-12


# ----------------------------------------------------------------------------- validation
def _check_folds(folds: Any, info: DataInfo) -> tuple[np.ndarray, int]:
    """Return fold labels as flat int64 ``(m,)`` (``-1`` = unused) and the number of folds K."""
    f = np.asarray(folds)
    if f.shape != info.scan_shape:
        raise ValueError(
            f"folds shape {f.shape} does not match the scan shape {info.scan_shape}"
        )
    if f.dtype.kind == "f":
        if not np.all(np.isfinite(f)) or not np.all(f == np.round(f)):
            raise ValueError(
                "folds must hold integer fold labels 0..K-1 (negative = unused); "
                "got non-integer or non-finite values"
            )
    elif f.dtype.kind not in "iu":
        raise ValueError(
            f"folds must be an integer array of fold labels 0..K-1 (negative = unused), "
            f"got dtype {f.dtype}"
        )
    lab = f.astype(np.int64).reshape(-1)
    lab = np.where(lab < 0, -1, lab)
    used = lab >= 0
    if not used.any():
        raise ValueError("folds: every label is negative, no probe position is used")
    k_folds = int(lab.max()) + 1
    counts = np.bincount(lab[used], minlength=k_folds)
    if k_folds < 2 or np.count_nonzero(counts) < 2:
        only = int(np.flatnonzero(counts)[0])
        raise ValueError(
            f"fold {only} holds every used probe position: no out-of-fold data to fit its "
            "mask (cross-fitting needs K >= 2 non-empty folds)"
        )
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"fold label(s) {empty.tolist()} have no probe position: labels must be "
            f"0..K-1 with every fold non-empty (K = {k_folds})"
        )
    return lab, k_folds


def _standardise_used(t: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Templates ``(k, m)`` made zero-mean, unit-std over the used positions (0 elsewhere)."""
    tu = t[:, used]
    dev = tu - tu.mean(axis=1, keepdims=True)
    std = np.sqrt(np.mean(dev * dev, axis=1))
    scale = np.max(np.abs(tu), axis=1)
    bad = ~(std > _TEMPLATE_STD_FLOOR * np.maximum(scale, np.finfo(float).tiny))
    if np.any(bad):
        raise ValueError(
            f"template(s) {np.flatnonzero(bad).tolist()} have zero variance over the used "
            "probe positions (a constant template correlates with nothing)"
        )
    out = np.zeros_like(t)
    out[:, used] = dev / std[:, None]
    return out


def _template_fold_moments(t0: np.ndarray, lab: np.ndarray, k_folds: int):
    """Out-of-fold template mean and std, ``(K, k)`` each; raises if any std is 0.

    Taken directly over each out-of-fold set (templates are in memory, ``K k m`` work), so
    a template constant outside a fold is recognised exactly as :func:`pcc_mask` would.
    """
    k = t0.shape[0]
    mean = np.empty((k_folds, k))
    std = np.empty((k_folds, k))
    for f in range(k_folds):
        to = t0[:, (lab >= 0) & (lab != f)]
        mean[f] = to.mean(axis=1)
        dev = to - mean[f][:, None]
        std[f] = np.sqrt(np.mean(dev * dev, axis=1))
        scale = np.max(np.abs(to), axis=1)
        bad = ~(std[f] > _TEMPLATE_STD_FLOOR * np.maximum(scale, np.finfo(float).tiny))
        if np.any(bad):
            raise ValueError(
                f"template {int(np.flatnonzero(bad)[0])} has zero variance over the probe "
                f"positions outside fold {f} (a constant template correlates with nothing)"
            )
    return mean, std


# ----------------------------------------------------------------------------- chunk helpers
def _fold_groups(lab_chunk: np.ndarray):
    """Row order grouping a chunk's used rows by fold, and ``[(fold, start, stop), ...]``."""
    used = np.flatnonzero(lab_chunk >= 0)
    if used.size == 0:
        return used, []
    order = used[np.argsort(lab_chunk[used], kind="stable")]
    ls = lab_chunk[order]
    cut = np.flatnonzero(ls[1:] != ls[:-1]) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [ls.size]])
    return order, [(int(ls[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


class _FoldSums:
    """Per-fold float64 sums of pass 1: counts, Σy, Σy², Σ t⁰y (``y = x - shift``)."""

    def __init__(self, k_folds: int, k: int, n: int) -> None:
        self.count = np.zeros(k_folds, dtype=np.int64)
        self.s1 = np.zeros((k_folds, n))
        self.s2 = np.zeros((k_folds, n))
        self.tp = np.zeros((k_folds, k, n))
        self.shift: np.ndarray | None = None

    def add_chunk(self, x: np.ndarray, lab_chunk: np.ndarray, t_chunk: np.ndarray) -> None:
        order, groups = _fold_groups(lab_chunk)
        if not groups:
            return
        if self.shift is None:
            self.shift = x[order[0]].astype(np.float64)
        y = x[order].astype(np.float64)
        y -= self.shift
        tt = t_chunk[:, order]
        for f, a, b in groups:
            yf = y[a:b]
            self.count[f] += b - a
            self.s1[f] += yf.sum(axis=0)
            self.s2[f] += np.einsum("ij,ij->j", yf, yf)
            self.tp[f] += tt[:, a:b] @ yf


def _fold_masks_and_weights(sums: _FoldSums, t_mean: np.ndarray, t_std: np.ndarray,
                            valid: np.ndarray | None, normalisation: str):
    """Out-of-fold masks ``(K, k, n)``, apply weights ``(K, k, n)`` and column means ``(K, n)``."""
    check_finite_result(sums.s1, sums.s2, sums.tp)
    n_out = (sums.count.sum() - sums.count).astype(np.float64)  # (K,)
    s1 = sums.s1.sum(axis=0) - sums.s1
    s2 = sums.s2.sum(axis=0) - sums.s2
    tp = sums.tp.sum(axis=0) - sums.tp
    d1 = s1 / n_out[:, None]
    var = s2 / n_out[:, None] - d1 * d1
    # a column constant outside the fold gives var == 0 exactly for integer data; float
    # rounding of (total - in-fold) is caught by a floor relative to the column's own scale
    floor = 1e-13 * (s2 / n_out[:, None])
    std = np.sqrt(np.where(var > floor, var, 0.0))
    if valid is not None:
        std = np.where(valid[None], std, 0.0)
    mean = sums.shift[None] + d1  # (K, n)
    good = std > 0
    # numerator Σ_O (t - t̄)(y - ȳ) = Σ_O t y - t̄ Σ_O y  (per fold, per template)
    num = tp - t_mean[:, :, None] * s1[:, None, :]
    den = n_out[:, None, None] * t_std[:, :, None] * np.where(good, std, 1.0)[:, None, :]
    r = np.where(good[:, None, :], num / den, 0.0)
    np.clip(r, -1.0, 1.0, out=r)
    scale = np.zeros_like(std)
    if normalisation == "mean":
        good_m = good & (mean != 0)
        r = np.where(good_m[:, None, :], r / np.where(good_m, mean, 1.0)[:, None, :], 0.0)
        scale[good_m] = 1.0 / (std[good_m] * mean[good_m])
    else:
        scale[good] = 1.0 / std[good]
    w = r * scale[:, None, :]
    return r, w, mean


def _pass_apply_folds(data: Any, info: DataInfo, lab: np.ndarray, w: np.ndarray,
                      mean: np.ndarray, chunk_bytes: int | None) -> np.ndarray:
    """Pass 2: ``image_j = (x_j - mean_f) @ w_fᵀ`` with ``f`` the fold of row ``j``; (k, m)."""
    k = w.shape[1]
    out = np.full((info.m, k), np.nan)
    for r0, x in iter_row_chunks(data, info, chunk_bytes, big_views=False):
        r1 = r0 + x.shape[0]
        order, groups = _fold_groups(lab[r0:r1])
        if not groups:
            continue
        y = x[order].astype(np.float64)
        res = np.empty((order.size, k))
        for f, a, b in groups:
            yf = y[a:b]
            yf -= mean[f]
            np.matmul(yf, w[f].T, out=res[a:b])
        out[r0 + order] = res
    check_finite_result(out[lab >= 0])
    return np.ascontiguousarray(out.T)


# ----------------------------------------------------------------------------- public API
def crossfit_template_image(
    data: Any,
    template: Any,
    folds: Any,
    *,
    normalisation: str = "pcc",
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted PCC masks and the held-out template-mask image, in two streaming passes.

    For each fold ``f`` the PCC mask (Eqs. 4-6; Eq. 8 for ``"mean"``) is computed from the
    probe positions NOT in ``f`` -- template standardised and column means/stds taken over
    those out-of-fold positions -- and the image at ``f``'s positions is that mask applied
    (Eq. 7) to those patterns normalised with the same out-of-fold statistics.  No pattern
    ever enters the mask that images it, so an image that reproduces its template here is
    evidence of signal, not of the in-sample imprint ``C ≈ (n/m) I`` of noisy data.

    With ``O = {j : folds_j >= 0, folds_j != f}`` and ``n_O = |O|`` (all sums over ``O``)::

        r_f,c = Σ (t_j - t̄)(x_jc - x̄_c) / (n_O σ_t σ_c)       [÷ x̄_c for "mean"]
        s_j   = Σ_c (x_jc - x̄_c) / σ_c · r_f,c                [÷ x̄_c for "mean"], j in f

    ``σ`` are population stds (ddof=0).  Pass 1 accumulates per-fold counts, ``Σ x``,
    ``Σ x²`` and ``Σ t x`` (float64, shifted by one pattern); each out-of-fold sum is the
    total minus the fold's own.  Pass 2 applies each fold's mask to its own patterns.  Two
    passes whatever the number of folds ``K``; extra memory ``≈ 2 K (k + 1) n`` float64
    (``n = ky*kx``; K = 64, k = 16, 128 x 128 pixels: 0.3 GB) plus a float64 copy of one chunk.

    Parameters
    ----------
    data : array-like
        4D data ``[scan_y, scan_x, ky, kx]``; uint8/16/32 or float32/64; numpy, memmap,
        zarr or dask.  Counts (or any linear intensity unit).
    template : array-like
        Template image ``(scan_y, scan_x)`` or a stack ``(k, scan_y, scan_x)`` (all in the
        same two passes).  Only its shape matters up to scale and offset (per fold).
    folds : int array (scan_y, scan_x)
        Fold label of every probe position, ``0..K-1`` with ``K >= 2`` and every fold
        non-empty (e.g. the unit cell or group of cells a position lies in).  Negative labels
        mark unused positions: excluded from every statistic and fit; the image is NaN there.
    normalisation : {"pcc", "mean"}
        Column normalisation (Eq. 4 or Eq. 8), as in :func:`pcc_mask`.
    valid : bool array (ky, kx), optional
        Detector pixels to use; masks are exactly 0 on the others, which contribute nothing
        to the image (as in :func:`pcc_mask` / :func:`apply_mask`).
    chunk_bytes : int, optional
        Byte budget of one row chunk (default :data:`DEFAULT_CHUNK_BYTES`).

    Returns
    -------
    masks : ndarray
        ``(K, ky, kx)`` or ``(K, k, ky, kx)`` float64: mask ``f`` is fitted without fold ``f``.
        Columns with zero out-of-fold variance (or zero mean for ``"mean"``) and pixels
        outside ``valid`` are 0.
    image : ndarray
        ``(scan_y, scan_x)`` or ``(k, scan_y, scan_x)`` float64, the held-out image; same
        scale as :func:`apply_mask` (plain sum over detector pixels, dimensionless for
        ``"pcc"``); NaN at unused positions.  Unlike the in-sample image it need not have
        zero mean over the scan.

    Raises
    ------
    ValueError
        Bad shapes; folds that are not integer labels, with fewer than 2 non-empty folds, or
        with an empty label below ``K``; a template constant over the used positions or
        over the out-of-fold positions of some fold; unknown normalisation; bad ``valid``;
        NaN/Inf in the template or (found during a pass) in the data.
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    t, single = _check_templates(template, info)
    lab, k_folds = _check_folds(folds, info)
    val = _check_valid(valid, info)
    t0 = _standardise_used(t, lab >= 0)
    t_mean, t_std = _template_fold_moments(t0, lab, k_folds)

    sums = _FoldSums(k_folds, t.shape[0], info.n)
    for r0, x in iter_row_chunks(data, info, chunk_bytes, big_views=False):
        r1 = r0 + x.shape[0]
        sums.add_chunk(x, lab[r0:r1], t0[:, r0:r1])
    r, w, mean = _fold_masks_and_weights(sums, t_mean, t_std, val, normalisation)
    img = _pass_apply_folds(data, info, lab, w, mean, chunk_bytes)

    masks = r.reshape((k_folds, -1, *info.det_shape))
    img = img.reshape((-1, *info.scan_shape))
    if single:
        return masks[:, 0], img[0]
    return masks, img


__all__ = ["crossfit_template_image"]
