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

Chunk kernels: compiled numba ones (read uint16/float32/float64 chunks in place; pass 1
parallel over column blocks with per-fold accumulator slices, pass 2 over row pairs)
and a numpy fallback (float64 BLAS per fold group of a chunk); float64 accumulation
throughout.  Self-contained on purpose (only the input checks and the row streaming are
shared with :mod:`._pcc` / :mod:`._stream`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _kernels
from ._kernels import use_numba
from ._pcc import _check_normalisation, _check_templates, _check_valid, _column_scale
from ._stream import DataInfo, check_data, check_finite_result, iter_row_chunks

try:  # pragma: no cover - exercised implicitly
    from numba import njit, prange

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

#: compiled launches are serialised with the core's other kernels (numba's workqueue
#: threading layer must not be entered from two Python threads at once)
_LAUNCH_LOCK = getattr(_kernels, "_LAUNCH_LOCK", None) or threading.Lock()

#: columns per work item of the pass-1 kernel (4 row buffers + 2 accumulator rows in L1/L2)
_COL_BLOCK = 512

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
    present = np.unique(lab[used])
    k_folds = int(present[-1]) + 1
    if present.size < 2:
        raise ValueError(
            f"fold {int(present[0])} holds every used probe position: no out-of-fold data to "
            "fit its mask (cross-fitting needs K >= 2 non-empty folds)"
        )
    if present.size != k_folds:
        # the first few missing labels (among the first |present| + 11 integers)
        empty = np.setdiff1d(np.arange(min(k_folds, present.size + 11)), present)
        missing = k_folds - present.size
        shown = ", ".join(str(int(e)) for e in empty[:10]) + (", ..." if missing > 10 else "")
        raise ValueError(
            f"{missing} fold label(s) below K = {k_folds} have no probe position ({shown}): "
            "labels must be 0..K-1 with every fold non-empty"
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

    Per-fold sums (``k m`` work) give every out-of-fold moment as total - in-fold; ``t0`` has
    unit variance over the used positions, so that subtraction loses nothing that matters.
    Sets whose variance comes out below 1e-6 are recomputed directly, so a template constant
    outside a fold is recognised exactly as :func:`pcc_mask` would.
    """
    used = lab >= 0
    lu = lab[used]
    tu = t0[:, used]
    cnt = np.bincount(lu, minlength=k_folds).astype(np.float64)
    s1 = np.stack([np.bincount(lu, weights=ti, minlength=k_folds) for ti in tu], axis=1)
    s2 = np.stack([np.bincount(lu, weights=ti * ti, minlength=k_folds) for ti in tu], axis=1)
    n_out = (cnt.sum() - cnt)[:, None]
    mean = (s1.sum(axis=0) - s1) / n_out
    var = (s2.sum(axis=0) - s2) / n_out - mean * mean
    for f in np.flatnonzero(np.any(var < 1e-6, axis=1)):
        to = t0[:, used & (lab != f)]
        mean[f] = to.mean(axis=1)
        dev = to - mean[f][:, None]
        var[f] = np.mean(dev * dev, axis=1)
        scale = np.max(np.abs(to), axis=1)
        bad = ~(np.sqrt(var[f]) > _TEMPLATE_STD_FLOOR * np.maximum(scale, np.finfo(float).tiny))
        if np.any(bad):
            raise ValueError(
                f"template {int(np.flatnonzero(bad)[0])} has zero variance over the probe "
                f"positions outside fold {f} (a constant template correlates with nothing)"
            )
    return mean, np.sqrt(var)


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


def _fold_sums_numpy(x, lab, t, shift, s1, s2, tp) -> None:
    """Add the chunk's per-fold Σy, Σy², Σ t y (``y = x - shift``); float64 BLAS per fold."""
    order, groups = _fold_groups(lab)
    if not groups:
        return
    y = np.subtract(x[order], shift, dtype=np.float64)
    tt = t[:, order]
    for f, a, b in groups:
        yf = y[a:b]
        s1[f] += yf.sum(axis=0)
        s2[f] += np.einsum("ij,ij->j", yf, yf)
        tp[f] += tt[:, a:b] @ yf


def _fold_apply_numpy(x, lab, mu, w, out) -> None:
    """Set ``out[j] = (x_j - mu_f) @ w_fᵀ`` for the chunk's used rows (``f = lab[j]``)."""
    order, groups = _fold_groups(lab)
    if not groups:
        return
    y = x[order]
    res = np.empty((order.size, w.shape[1]))
    for f, a, b in groups:
        np.matmul(np.subtract(y[a:b], mu[f], dtype=np.float64), w[f].T, out=res[a:b])
    out[order] = res


if _HAVE_NUMBA:
    _FM = {"reassoc", "contract", "nsz", "arcp"}  # no nnan/ninf: NaN data still propagate

    @njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
    def _fold_sums_numba(x, lab, t, shift, s1, s2, tp, cb):  # pragma: no cover - compiled
        # parallel over column blocks (each block's slices of the per-fold accumulators
        # belong to one thread); 4 consecutive rows of one fold share each accumulator
        # load/store; template 0 rides in the statistics sweep, the others go 2 per sweep over
        # the row buffer
        r = x.shape[0]
        n = x.shape[1]
        k = t.shape[0]
        nb = (n + cb - 1) // cb
        for b in prange(nb):
            c0 = b * cb
            c1 = min(n, c0 + cb)
            wd = c1 - c0
            y0 = np.empty(cb, dtype=np.float64)
            y1 = np.empty(cb, dtype=np.float64)
            y2 = np.empty(cb, dtype=np.float64)
            y3 = np.empty(cb, dtype=np.float64)
            sh = shift[c0:c1]
            j = 0
            while j < r:
                f = lab[j]
                if f < 0:
                    j += 1
                    continue
                a1 = s1[f, c0:c1]
                a2 = s2[f, c0:c1]
                if j + 3 < r and lab[j + 1] == f and lab[j + 2] == f and lab[j + 3] == f:
                    xa = x[j, c0:c1]
                    xb = x[j + 1, c0:c1]
                    xc = x[j + 2, c0:c1]
                    xd = x[j + 3, c0:c1]
                    # template 0 is fused into the statistics sweep (k >= 1 always)
                    p0 = t[0, j]
                    p1 = t[0, j + 1]
                    p2 = t[0, j + 2]
                    p3 = t[0, j + 3]
                    lz = tp[f, 0, c0:c1]
                    for c in range(wd):
                        sc = sh[c]
                        va = np.float64(xa[c]) - sc
                        vb = np.float64(xb[c]) - sc
                        vc = np.float64(xc[c]) - sc
                        vd = np.float64(xd[c]) - sc
                        y0[c] = va
                        y1[c] = vb
                        y2[c] = vc
                        y3[c] = vd
                        a1[c] += (va + vb) + (vc + vd)
                        a2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                        lz[c] += (p0 * va + p1 * vb) + (p2 * vc + p3 * vd)
                    i = 1
                    while i + 2 <= k:
                        p0 = t[i, j]
                        p1 = t[i, j + 1]
                        p2 = t[i, j + 2]
                        p3 = t[i, j + 3]
                        q0 = t[i + 1, j]
                        q1 = t[i + 1, j + 1]
                        q2 = t[i + 1, j + 2]
                        q3 = t[i + 1, j + 3]
                        la = tp[f, i, c0:c1]
                        lb = tp[f, i + 1, c0:c1]
                        for c in range(wd):
                            ya = y0[c]
                            yb = y1[c]
                            yc = y2[c]
                            yd = y3[c]
                            la[c] += (p0 * ya + p1 * yb) + (p2 * yc + p3 * yd)
                            lb[c] += (q0 * ya + q1 * yb) + (q2 * yc + q3 * yd)
                        i += 2
                    if i < k:
                        p0 = t[i, j]
                        p1 = t[i, j + 1]
                        p2 = t[i, j + 2]
                        p3 = t[i, j + 3]
                        la = tp[f, i, c0:c1]
                        for c in range(wd):
                            la[c] += (p0 * y0[c] + p1 * y1[c]) + (p2 * y2[c] + p3 * y3[c])
                    j += 4
                else:
                    xa = x[j, c0:c1]
                    p0 = t[0, j]
                    lz = tp[f, 0, c0:c1]
                    for c in range(wd):
                        va = np.float64(xa[c]) - sh[c]
                        y0[c] = va
                        a1[c] += va
                        a2[c] += va * va
                        lz[c] += p0 * va
                    for i in range(1, k):
                        p0 = t[i, j]
                        la = tp[f, i, c0:c1]
                        for c in range(wd):
                            la[c] += p0 * y0[c]
                    j += 1

    @njit(cache=True, nogil=True, fastmath=_FM)
    def _apply_rows(x, j, nrow, mf, wf, out):  # pragma: no cover - compiled
        # rows j (and j+1 when nrow == 2, same fold) x 4 masks per sweep: each weight load
        # serves nrow rows, each data load 4 masks
        n = x.shape[1]
        k = wf.shape[0]
        xa = x[j]
        xb = x[j + nrow - 1]
        i = 0
        while i < k:
            w0 = wf[i]
            w1 = wf[min(i + 1, k - 1)]
            w2 = wf[min(i + 2, k - 1)]
            w3 = wf[min(i + 3, k - 1)]
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            b0 = 0.0
            b1 = 0.0
            b2 = 0.0
            b3 = 0.0
            for c in range(n):
                mc = mf[c]
                ya = np.float64(xa[c]) - mc
                yb = np.float64(xb[c]) - mc
                a0 += ya * w0[c]
                a1 += ya * w1[c]
                a2 += ya * w2[c]
                a3 += ya * w3[c]
                b0 += yb * w0[c]
                b1 += yb * w1[c]
                b2 += yb * w2[c]
                b3 += yb * w3[c]
            got_a = (a0, a1, a2, a3)
            got_b = (b0, b1, b2, b3)
            for q in range(min(4, k - i)):
                out[j, i + q] = got_a[q]
                if nrow == 2:
                    out[j + 1, i + q] = got_b[q]
            i += 4

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _fold_apply_numba(x, lab, mu, w, out):  # pragma: no cover - compiled
        # parallel over pairs of rows; a pair of one fold shares every weight load
        r = x.shape[0]
        for p in prange((r + 1) // 2):
            j = 2 * p
            f = lab[j]
            g = lab[j + 1] if j + 1 < r else -1
            if f >= 0 and g == f:
                _apply_rows(x, j, 2, mu[f], w[f], out)
            else:
                if f >= 0:
                    _apply_rows(x, j, 1, mu[f], w[f], out)
                if g >= 0:
                    _apply_rows(x, j + 1, 1, mu[g], w[g], out)


def _fold_sums(x, lab, t, shift, s1, s2, tp) -> None:
    if use_numba():
        if t.shape[0] == 0:  # statistics only: the kernel needs one template (k >= 1)
            t = np.zeros((1, x.shape[0]))
            tp = np.zeros((s1.shape[0], 1, s1.shape[1]))
        with _LAUNCH_LOCK:
            _fold_sums_numba(x, lab, np.ascontiguousarray(t), shift, s1, s2, tp, _COL_BLOCK)
    else:
        _fold_sums_numpy(x, lab, t, shift, s1, s2, tp)


def _fold_apply(x, lab, mu, w, out) -> None:
    if use_numba():
        with _LAUNCH_LOCK:
            _fold_apply_numba(x, lab, mu, w, out)
    else:
        _fold_apply_numpy(x, lab, mu, w, out)


class _FoldSums:
    """Per-fold float64 sums of pass 1: counts, Σy, Σy², Σ t⁰y (``y = x - shift``)."""

    def __init__(self, k_folds: int, k: int, n: int) -> None:
        self.count = np.zeros(k_folds, dtype=np.int64)
        self.s1 = np.zeros((k_folds, n))
        self.s2 = np.zeros((k_folds, n))
        self.tp = np.zeros((k_folds, k, n))
        self.shift: np.ndarray | None = None

    def add_chunk(self, x: np.ndarray, lab_chunk: np.ndarray, t_chunk: np.ndarray) -> None:
        used = lab_chunk >= 0
        if not used.any():
            return
        if self.shift is None:
            self.shift = x[int(np.argmax(used))].astype(np.float64)
        self.count += np.bincount(lab_chunk[used], minlength=self.count.size)
        _fold_sums(x, lab_chunk, t_chunk, self.shift, self.s1, self.s2, self.tp)


def _set_stats(count, s1, s2, shift, valid, normalisation):
    """Column means, stds and normalisation scales ``(n,)`` of one position set.

    ``scale`` is ``1/σ`` (``1/(σ·mean)`` for ``"mean"``) on usable columns and 0 on
    zero-variance (zero-mean) columns and outside ``valid``.
    """
    n_set = float(count)
    d1 = s1 / n_set
    var = s2 / n_set - d1 * d1
    # a column constant over the set gives var == 0 exactly for integer data; float
    # rounding of (total - in-fold) is caught by a floor relative to the column's own scale
    std = np.sqrt(np.where(var > 1e-13 * (s2 / n_set), var, 0.0))
    if valid is not None:
        std = np.where(valid, std, 0.0)
    mean = shift + d1
    return mean, std, _column_scale(mean, std, normalisation)


def _set_mask(count, s1, s2, tp, shift, t_mean, t_std, valid, normalisation):
    """Mask ``(k, n)``, apply weights ``(k, n)`` and column means ``(n,)`` of one position set.

    From the set's count, ``Σy``, ``Σy²`` ``(n,)``, ``Σ t⁰y`` ``(k, n)`` (``y = x - shift``)
    and the template's mean and std ``(k,)`` over the set.
    """
    mean, std, scale = _set_stats(count, s1, s2, shift, valid, normalisation)
    good = std > 0
    # numerator Σ (t - t̄)(y - ȳ) = Σ t y - t̄ Σ y, per template
    num = tp - t_mean[:, None] * s1[None]
    r = np.where(good[None],
                 num / (float(count) * t_std[:, None] * np.where(good, std, 1.0)[None]), 0.0)
    np.clip(r, -1.0, 1.0, out=r)
    if normalisation == "mean":
        good_m = good & (mean != 0)
        r = np.where(good_m[None], r / np.where(good_m, mean, 1.0)[None], 0.0)
    return r, r * scale[None], mean


def _pass_apply_folds(data: Any, info: DataInfo, lab: np.ndarray, w: np.ndarray,
                      mean: np.ndarray, chunk_bytes: int | None) -> np.ndarray:
    """Pass 2: ``image_j = (x_j - mean_f) @ w_fᵀ`` with ``f`` the fold of row ``j``; (k, m)."""
    out = np.full((info.m, w.shape[1]), np.nan)
    w = np.ascontiguousarray(w)
    mean = np.ascontiguousarray(mean)
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        r1 = r0 + x.shape[0]
        _fold_apply(x, lab[r0:r1], mean, w, out[r0:r1])
    check_finite_result(out[lab >= 0])
    return np.ascontiguousarray(out.T)


@dataclass(frozen=True)
class _Plan:
    """Checked inputs of one cross-fit: shapes, labels, standardised templates and moments."""

    info: DataInfo
    single: bool
    lab: np.ndarray  # (m,) int64, -1 = unused
    k_folds: int
    valid: np.ndarray | None
    normalisation: str
    t0: np.ndarray  # (k, m) standardised over the used positions
    t_mean: np.ndarray  # (K, k) out-of-fold template means (of t0)
    t_std: np.ndarray  # (K, k)


@dataclass(frozen=True)
class _Weights:
    """Masks and apply weights from the pass-1 sums."""

    r: np.ndarray  # (K, k, n) masks
    w: np.ndarray  # (K, k or 2k, n) weights applied in pass 2 (2k with the in-sample set)
    mean: np.ndarray  # (K, n) out-of-fold column means subtracted in pass 2
    mask_in: np.ndarray | None  # (k, n) in-sample mask
    offset: np.ndarray | None  # (K, k) per-fold offset of the in-sample image


def _prepare_crossfit(data, template, folds, normalisation, valid) -> _Plan:
    info = check_data(data)
    _check_normalisation(normalisation)
    t, single = _check_templates(template, info)
    lab, k_folds = _check_folds(folds, info)
    val = _check_valid(valid, info)
    t0 = _standardise_used(t, lab >= 0)
    t_mean, t_std = _template_fold_moments(t0, lab, k_folds)
    return _Plan(info, single, lab, k_folds, val, normalisation, t0, t_mean, t_std)


def _fold_weights(plan: _Plan, count, s1, s2, tp, shift, in_sample: bool) -> _Weights:
    """Per-fold masks and weights from the per-fold sums ``(K,)``, ``(K, n)``, ``(K, k, n)``."""
    k, n = plan.t0.shape[0], plan.info.n
    tot = (count.sum(), s1.sum(axis=0), s2.sum(axis=0), tp.sum(axis=0))
    r = np.empty((plan.k_folds, k, n))
    w = np.empty((plan.k_folds, 2 * k if in_sample else k, n))
    mean = np.empty((plan.k_folds, n))
    for f in range(plan.k_folds):  # one fold at a time: no K x k x n temporaries
        r[f], w[f, :k], mean[f] = _set_mask(
            tot[0] - count[f], tot[1] - s1[f], tot[2] - s2[f], tot[3] - tp[f], shift,
            plan.t_mean[f], plan.t_std[f], plan.valid, plan.normalisation)
    if not in_sample:
        return _Weights(r, w, mean, None, None)
    tu = plan.t0[:, plan.lab >= 0]
    mask_in, w_in, mean_in = _set_mask(*tot, shift, tu.mean(axis=1), tu.std(axis=1),
                                       plan.valid, plan.normalisation)
    # (x - mean_in) w_in = (x - mean_f) w_in - (mean_in - mean_f) w_in: k more weights per
    # fold in the same pass 2, and a per-fold offset
    w[:, k:] = w_in[None]
    return _Weights(r, w, mean, mask_in, (mean_in[None] - mean) @ w_in.T)


def _finish(plan: _Plan, weights: _Weights, img: np.ndarray) -> tuple[np.ndarray, ...]:
    """Public return value from the pass-2 image rows ``(k or 2k, m)``."""
    info, k = plan.info, plan.t0.shape[0]
    masks = weights.r.reshape((plan.k_folds, k, *info.det_shape))
    out = [masks, img[:k].reshape((k, *info.scan_shape))]
    if weights.mask_in is not None:
        img_in = img[k:]
        used = plan.lab >= 0
        img_in[:, used] -= weights.offset[plan.lab[used]].T
        out += [weights.mask_in.reshape((k, *info.det_shape)),
                img_in.reshape((k, *info.scan_shape))]
    if plan.single:
        out = [out[0][:, 0]] + [a[0] for a in out[1:]]
    return tuple(out)


# ----------------------------------------------------------------------------- public API
def crossfit_template_image(
    data: Any,
    template: Any,
    folds: Any,
    *,
    normalisation: str = "pcc",
    valid: Any = None,
    chunk_bytes: int | None = None,
    in_sample: bool = False,
) -> tuple[np.ndarray, ...]:
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
    passes whatever the number of folds ``K``; extra memory ``≈ 3 K k n`` float64 (per-fold
    sums, masks, weights; ``n = ky*kx``; K = 64, k = 16, 128 x 128 pixels: 0.4 GB), plus
    ``K k n`` more with ``in_sample``; the numpy fallback also copies one chunk as float64.

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
    in_sample : bool
        Also return the in-sample counterpart from the same two passes: the mask fitted on
        ALL used positions and its image there, normalised with the used-position statistics
        (``template_mask_image(data, template, region=folds >= 0)`` up to the statistics of
        the image at unused positions, which are NaN here).  Costs ``k`` more multiply-adds
        per element in pass 2, no extra pass.  The "template imprint" diagnostic.

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
    in_sample_mask, in_sample_image : ndarray
        Only with ``in_sample=True``: ``([k,] ky, kx)`` and ``([k,] scan_y, scan_x)``.

    Raises
    ------
    ValueError
        Bad shapes; folds that are not integer labels, with fewer than 2 non-empty folds, or
        with an empty label below ``K``; a template constant over the used positions or
        over the out-of-fold positions of some fold; unknown normalisation; bad ``valid``;
        NaN/Inf in the template or (found during a pass) in the data.
    """
    plan = _prepare_crossfit(data, template, folds, normalisation, valid)
    info, lab, k_folds, t0 = plan.info, plan.lab, plan.k_folds, plan.t0

    # pass 1: per-fold sums; out-of-fold sums = totals - in-fold
    sums = _FoldSums(k_folds, t0.shape[0], info.n)
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        r1 = r0 + x.shape[0]
        sums.add_chunk(x, lab[r0:r1], t0[:, r0:r1])
    check_finite_result(sums.s1, sums.s2, sums.tp)
    weights = _fold_weights(plan, sums.count, sums.s1, sums.s2, sums.tp, sums.shift, in_sample)
    del sums

    # pass 2: each fold's mask applied to its own patterns
    img = _pass_apply_folds(data, info, lab, weights.w, weights.mean, chunk_bytes)
    return _finish(plan, weights, img)


def crossfit_apply_masks(
    data: Any,
    masks: Any,
    folds: Any,
    *,
    normalisation: str = "pcc",
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> np.ndarray:
    """Apply per-fold masks fitted elsewhere with out-of-fold normalisation, in two passes.

    The held-out application step of :func:`crossfit_template_image` on its own: the image
    at fold ``f``'s positions is ``s_j = Σ_c (x_jc - x̄_c) / σ_c · mask_f,c`` (÷ ``x̄_c`` too
    for ``"mean"``) with ``x̄``, ``σ`` (population) taken over the used positions NOT in ``f``
    of ``data``.  Use it to apply masks fitted on one dataset (e.g. species present) to
    another (species removed) exactly as the cross-fitted image treats its own data.
    Pass 1: per-fold column sums; pass 2: apply.

    Parameters
    ----------
    data : array-like
        4D data ``[scan_y, scan_x, ky, kx]`` (as :func:`crossfit_template_image`).
    masks : array-like
        ``(K, ky, kx)`` or ``(K, k, ky, kx)``: one mask (stack) per fold, e.g. the ``masks``
        returned by :func:`crossfit_template_image`.
    folds : int array (scan_y, scan_x)
        Labels ``0..K-1`` (``K`` = ``masks.shape[0]``), negative = unused (NaN in the image).
    normalisation : {"pcc", "mean"}
        Column normalisation (Eq. 4 or Eq. 8).
    valid : bool array (ky, kx), optional
        Detector pixels to use; the others contribute nothing.
    chunk_bytes : int, optional
        Byte budget of one row chunk.

    Returns
    -------
    ndarray
        ``(scan_y, scan_x)`` or ``(k, scan_y, scan_x)`` float64; NaN at unused positions.
        Zero-variance (zero-mean for ``"mean"``) columns over a fold's complement contribute
        nothing to that fold.
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    lab, k_folds = _check_folds(folds, info)
    val = _check_valid(valid, info)
    mk = np.asarray(masks)
    if mk.dtype.kind not in "uifb":
        raise TypeError(f"masks must be real-valued, got dtype {mk.dtype}")
    single = mk.ndim == 3
    if single:
        mk = mk[:, None]
    if mk.ndim != 4 or mk.shape[2:] != info.det_shape or mk.shape[1] == 0:
        raise ValueError(
            f"masks shape {np.shape(masks)} must be (K, ky, kx) or (K, k, ky, kx) with the "
            f"detector shape {info.det_shape}"
        )
    if mk.shape[0] != k_folds:
        raise ValueError(
            f"{mk.shape[0]} fold masks given but folds has K = {k_folds} folds (labels 0..K-1)"
        )
    mk = mk.astype(np.float64).reshape(k_folds, mk.shape[1], info.n)
    if not np.all(np.isfinite(mk)):
        raise ValueError("masks contain NaN or Inf")

    sums = _FoldSums(k_folds, 0, info.n)
    empty_t = np.zeros((0, info.m))
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        r1 = r0 + x.shape[0]
        sums.add_chunk(x, lab[r0:r1], empty_t[:, r0:r1])
    check_finite_result(sums.s1, sums.s2)
    tot = (sums.count.sum(), sums.s1.sum(axis=0), sums.s2.sum(axis=0))
    w = np.empty_like(mk)
    mean = np.empty((k_folds, info.n))
    for f in range(k_folds):
        mean[f], _, scale = _set_stats(tot[0] - sums.count[f], tot[1] - sums.s1[f],
                                       tot[2] - sums.s2[f], sums.shift, val, normalisation)
        w[f] = mk[f] * scale[None]
    img = _pass_apply_folds(data, info, lab, w, mean, chunk_bytes).reshape(
        (-1, *info.scan_shape))
    return img[0] if single else img


__all__ = ["crossfit_apply_masks", "crossfit_template_image"]
