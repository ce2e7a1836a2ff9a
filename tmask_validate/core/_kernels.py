"""Streaming kernels: one chunk of rows of D in, float64 accumulators updated.

Two kernels cover every pass of :mod:`tmask_validate.core`:

``stats_tprod``
    column sums and sums of squares of ``y = x - shift`` (the shift, e.g. the first pattern,
    avoids cancellation in the variance) and the template products ``t @ y`` for ``k``
    templates, over a selected subset of the chunk's rows.
``apply_weights``
    ``out[j, i] = sum_c (x[j, c] - mu[c]) * w[i, c]`` for ``k`` weight vectors (masks).

Two more serve special cases: ``run_sums`` (per-label sums over contiguous column runs, used
for >= 8 few-valued masks such as segmented binary detectors: one addition per element
whatever the number of masks) and ``moments`` (total, Σ ky·x, Σ kx·x for the CoM, from
detector row sums and column sums).

Each has a numba implementation (float64 accumulators, reading uint16/float32/float64 chunks
directly; :mod:`._stream` converts other dtypes per chunk) and a plain numpy one used when
numba is unavailable or disabled (``TMASK_VALIDATE_NO_NUMBA=1`` or :func:`use_numba`).

Performance notes (2-core AMD EPYC, AVX2, no AVX-512).  A BLAS ``D @ v`` read of float32
data moves ~4 bytes per element; the kernels here do ``k`` float64 multiply-adds per element
per pass.  With 2 FMA units x 4 float64 lanes the arithmetic floor for k = 16 is ~2.5 reads
per pass at peak (we reach ~55-60 % of peak with 2 rows x 4 masks / 4 rows x 2 templates
register tiles), so k <= 2 is memory bound and k = 16 compute bound.  Float32 accumulation
(as in LiberTEM's ApplyMasksUDF) would halve that but the house rule is float64.
"""

from __future__ import annotations

import os
import threading

import numpy as np

try:  # pragma: no cover - exercised implicitly
    from numba import njit, prange

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

#: serialises compiled-kernel launches: numba's fallback "workqueue" threading layer must not
#: be entered from two Python threads at once (each launch already uses all cores).
_LAUNCH_LOCK = threading.Lock()

_STATE = {"numba": _HAVE_NUMBA and os.environ.get("TMASK_VALIDATE_NO_NUMBA", "") in ("", "0")}

#: columns per work item of ``stats_tprod`` (row buffers + k accumulators stay in L1/L2);
#: longer runs (2x) for the statistics-only and few-template cases, measured faster
COL_BLOCK = 512


def use_numba(flag: bool | None = None) -> bool:
    """Query (``flag=None``) or set whether the compiled kernels are used; returns the state."""
    if flag is not None:
        _STATE["numba"] = bool(flag) and _HAVE_NUMBA
    return _STATE["numba"]


# ----------------------------------------------------------------------------- numpy versions
def _stats_tprod_numpy(x, rows, t, shift, s1, s2, acc):
    y = x[rows].astype(np.float64) - shift
    s1 += y.sum(axis=0)
    s2 += np.einsum("ij,ij->j", y, y)
    if t.shape[0]:
        acc += t @ y


def _apply_weights_numpy(x, mu, w, out):
    out[...] = (x.astype(np.float64) - mu) @ w.T


# ----------------------------------------------------------------------------- numba versions
if _HAVE_NUMBA:
    # Reassociation lets LLVM vectorise the dot-product reductions; NaN/Inf semantics are
    # kept (no nnan/ninf) so non-finite data still propagate into the accumulators.
    _FM = {"reassoc", "contract", "nsz", "arcp"}

    @njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
    def _stats_tprod_numba(x, rows, t, shift, s1, s2, acc, cb):  # pragma: no cover - compiled
        # parallel over column blocks: each block's float64 accumulators (k x cb) stay
        # in cache and belong to one thread; rows are taken 4 at a time so each accumulator
        # load/store serves 4 multiply-adds.  The caller passes a multiple of 4 rows and
        # k >= 1 templates (k == 0 goes to _col_stats_numba).
        n = x.shape[1]
        k = t.shape[0]
        q = rows.shape[0]
        nb = (n + cb - 1) // cb
        for b in prange(nb):
            c0 = b * cb
            c1 = min(n, c0 + cb)
            wd = c1 - c0
            y0 = np.empty(cb, dtype=np.float64)
            y1 = np.empty(cb, dtype=np.float64)
            y2 = np.empty(cb, dtype=np.float64)
            y3 = np.empty(cb, dtype=np.float64)
            ls1 = np.zeros(cb, dtype=np.float64)
            ls2 = np.zeros(cb, dtype=np.float64)
            lacc = np.zeros((k, cb), dtype=np.float64)
            sh = shift[c0:c1]
            for jj in range(0, q - 3, 4):
                xa = x[rows[jj], c0:c1]
                xb = x[rows[jj + 1], c0:c1]
                xc = x[rows[jj + 2], c0:c1]
                xd = x[rows[jj + 3], c0:c1]
                # template 0 is fused into the statistics sweep; the others use the buffer
                p0 = t[0, jj]
                p1 = t[0, jj + 1]
                p2 = t[0, jj + 2]
                p3 = t[0, jj + 3]
                lz = lacc[0]
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
                    ls1[c] += (va + vb) + (vc + vd)
                    ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                    lz[c] += (p0 * va + p1 * vb) + (p2 * vc + p3 * vd)
                for i in range(1, k - 1, 2):  # 2 templates x 4 rows per sweep
                    t0 = t[i, jj]
                    t1 = t[i, jj + 1]
                    t2 = t[i, jj + 2]
                    t3 = t[i, jj + 3]
                    u0 = t[i + 1, jj]
                    u1 = t[i + 1, jj + 1]
                    u2 = t[i + 1, jj + 2]
                    u3 = t[i + 1, jj + 3]
                    la = lacc[i]
                    lb = lacc[i + 1]
                    for c in range(wd):
                        ya = y0[c]
                        yb = y1[c]
                        yc = y2[c]
                        yd = y3[c]
                        la[c] += (t0 * ya + t1 * yb) + (t2 * yc + t3 * yd)
                        lb[c] += (u0 * ya + u1 * yb) + (u2 * yc + u3 * yd)
                if k % 2 == 0:
                    i = k - 1
                    t0 = t[i, jj]
                    t1 = t[i, jj + 1]
                    t2 = t[i, jj + 2]
                    t3 = t[i, jj + 3]
                    la = lacc[i]
                    for c in range(wd):
                        la[c] += (t0 * y0[c] + t1 * y1[c]) + (t2 * y2[c] + t3 * y3[c])
            for c in range(wd):
                s1[c0 + c] += ls1[c]
                s2[c0 + c] += ls2[c]
            for i in range(k):
                for c in range(wd):
                    acc[i, c0 + c] += lacc[i, c]

    @njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
    def _col_stats_numba(x, rows, shift, s1, s2, cb):  # pragma: no cover - compiled
        # stats-only variant of _stats_tprod_numba (no row buffer): ~1.4x faster
        n = x.shape[1]
        q = rows.shape[0]
        nb = (n + cb - 1) // cb
        for b in prange(nb):
            c0 = b * cb
            c1 = min(n, c0 + cb)
            wd = c1 - c0
            ls1 = np.zeros(cb, dtype=np.float64)
            ls2 = np.zeros(cb, dtype=np.float64)
            sh = shift[c0:c1]
            for jj in range(0, q - 3, 4):
                xa = x[rows[jj], c0:c1]
                xb = x[rows[jj + 1], c0:c1]
                xc = x[rows[jj + 2], c0:c1]
                xd = x[rows[jj + 3], c0:c1]
                for c in range(wd):
                    sc = sh[c]
                    va = np.float64(xa[c]) - sc
                    vb = np.float64(xb[c]) - sc
                    vc = np.float64(xc[c]) - sc
                    vd = np.float64(xd[c]) - sc
                    ls1[c] += (va + vb) + (vc + vd)
                    ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
            for c in range(wd):
                s1[c0 + c] += ls1[c]
                s2[c0 + c] += ls2[c]

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _apply_weights_numba(x, mu, w, out):  # pragma: no cover - compiled
        # parallel over pairs of rows; 2 rows x 4 masks = 8 float64 accumulators per sweep,
        # so each weight load serves two rows and each data load four masks.
        r = x.shape[0]
        n = x.shape[1]
        k = w.shape[0]
        h = n // 2
        for p in prange(r // 2):
            j = 2 * p
            # the caller passes an even number of rows
            xa = x[j]
            xb = x[j + 1]
            i = 0
            while i + 4 <= k:
                w0 = w[i]
                w1 = w[i + 1]
                w2 = w[i + 2]
                w3 = w[i + 3]
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                b0 = 0.0
                b1 = 0.0
                b2 = 0.0
                b3 = 0.0
                for c in range(n):
                    mc = mu[c]
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
                out[j, i] = a0
                out[j, i + 1] = a1
                out[j, i + 2] = a2
                out[j, i + 3] = a3
                out[j + 1, i] = b0
                out[j + 1, i + 1] = b1
                out[j + 1, i + 2] = b2
                out[j + 1, i + 3] = b3
                i += 4
            while i < k:
                # 1-3 leftover masks: split the columns in two halves so that four
                # independent accumulator chains hide the FMA latency
                w0 = w[i]
                a0 = 0.0
                b0 = 0.0
                a1 = 0.0
                b1 = 0.0
                for c in range(h):
                    mc = mu[c]
                    md = mu[c + h]
                    wc = w0[c]
                    wd = w0[c + h]
                    a0 += (np.float64(xa[c]) - mc) * wc
                    b0 += (np.float64(xb[c]) - mc) * wc
                    a1 += (np.float64(xa[c + h]) - md) * wd
                    b1 += (np.float64(xb[c + h]) - md) * wd
                for c in range(2 * h, n):
                    a0 += (np.float64(xa[c]) - mu[c]) * w0[c]
                    b0 += (np.float64(xb[c]) - mu[c]) * w0[c]
                out[j, i] = a0 + a1
                out[j + 1, i] = b0 + b1
                i += 1


    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _run_sums_numba(x, starts, labels, out_lab):  # pragma: no cover - compiled
        # out_lab[j, labels[q]] += sum of x[j, starts[q]:starts[q + 1]]; four accumulator
        # chains (runs are short, so a vectorised reduction would mostly run its tail)
        r = x.shape[0]
        nr = labels.shape[0]
        for j in prange(r):
            xr = x[j]
            for q in range(nr):
                c = starts[q]
                e = starts[q + 1]
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                while c + 8 <= e:
                    s0 += np.float64(xr[c]) + np.float64(xr[c + 4])
                    s1 += np.float64(xr[c + 1]) + np.float64(xr[c + 5])
                    s2 += np.float64(xr[c + 2]) + np.float64(xr[c + 6])
                    s3 += np.float64(xr[c + 3]) + np.float64(xr[c + 7])
                    c += 8
                while c < e:
                    s0 += np.float64(xr[c])
                    c += 1
                out_lab[j, labels[q]] += (s0 + s1) + (s2 + s3)

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _moments_numba(x, kyn, kxn, out):  # pragma: no cover - compiled
        # out[j] = (sum x, sum ky*x, sum kx*x) with ky, kx the detector row/column indices
        r = x.shape[0]
        for j in prange(r):
            xr = x[j]
            colsum = np.zeros(kxn, dtype=np.float64)
            tot = 0.0
            my = 0.0
            for a in range(kyn):
                o = a * kxn
                rs = 0.0
                for b in range(kxn):
                    v = np.float64(xr[o + b])
                    rs += v
                    colsum[b] += v
                tot += rs
                my += a * rs
            mx = 0.0
            for b in range(kxn):
                mx += b * colsum[b]
            out[j, 0] = tot
            out[j, 1] = my
            out[j, 2] = mx


def stats_tprod(x, rows, t, shift, s1, s2, acc) -> None:
    """Accumulate column sums/sums of squares of ``x[rows] - shift`` and ``t @ (x[rows]-shift)``.

    ``x`` (r, n) C-contiguous; ``rows`` int64 (q,); ``t`` float64 (k, q); ``shift`` float64
    (n,); ``s1``, ``s2`` float64 (n,) and ``acc`` float64 (k, n) are updated in place.
    """
    q = rows.shape[0]
    if q == 0:
        return
    if _STATE["numba"]:
        with _LAUNCH_LOCK:
            _stats_tprod_dispatch(x, rows, t, shift, s1, s2, acc)
    else:
        _stats_tprod_numpy(x, rows, t, shift, s1, s2, acc)


def _stats_tprod_dispatch(x, rows, t, shift, s1, s2, acc) -> None:
    q = rows.shape[0]
    q4 = q - q % 4
    if q4 and t.shape[0] == 0:
        _col_stats_numba(x, rows[:q4], shift, s1, s2, 2 * COL_BLOCK)
    elif q4:
        cb = 2 * COL_BLOCK if t.shape[0] <= 2 else COL_BLOCK
        _stats_tprod_numba(x, rows[:q4], np.ascontiguousarray(t[:, :q4]), shift, s1, s2, acc,
                           cb)
    if q4 < q:  # the last 1-3 rows (numpy; keeps the compiled kernel small)
        _stats_tprod_numpy(x, rows[q4:], t[:, q4:], shift, s1, s2, acc)


def apply_weights(x, mu, w, out) -> None:
    """Set ``out[j, i] = sum_c (x[j, c] - mu[c]) * w[i, c]`` (float64 accumulation).

    ``x`` (r, n) C-contiguous; ``mu`` float64 (n,); ``w`` float64 C-contiguous (k, n);
    ``out`` float64 (r, k).
    """
    if _STATE["numba"]:
        r2 = x.shape[0] - x.shape[0] % 2
        if r2:
            with _LAUNCH_LOCK:
                _apply_weights_numba(x[:r2], mu, w, out[:r2])
        if r2 < x.shape[0]:  # odd last row (numpy; keeps the compiled kernel small)
            _apply_weights_numpy(x[r2:], mu, w, out[r2:])
    else:
        _apply_weights_numpy(x, mu, w, out)


def run_sums(x, starts, labels, nlab, out) -> None:
    """``out[j] = (per-label sums of x[j] over column runs) @ ...``: set ``out`` (r, nlab).

    ``starts`` (R+1,) int64 boundaries of R contiguous column runs, ``labels`` (R,) int64 in
    ``[0, nlab)``.  Float64 accumulation.
    """
    out[...] = 0.0
    if _STATE["numba"]:
        with _LAUNCH_LOCK:
            _run_sums_numba(x, starts, labels, out)
    else:
        lab_of_col = np.repeat(labels, np.diff(starts))
        xs = x.astype(np.float64)
        for lab in range(nlab):
            out[:, lab] = xs[:, lab_of_col == lab].sum(axis=1)


def moments(x, det_shape, out) -> None:
    """Set ``out[j] = (Σ x, Σ ky x, Σ kx x)`` for each row (pattern), detector index units."""
    kyn, kxn = det_shape
    if _STATE["numba"]:
        with _LAUNCH_LOCK:
            _moments_numba(x, kyn, kxn, out)
    else:
        xs = x.astype(np.float64).reshape(x.shape[0], kyn, kxn)
        out[:, 0] = xs.sum(axis=(1, 2))
        out[:, 1] = xs.sum(axis=2) @ np.arange(kyn, dtype=np.float64)
        out[:, 2] = xs.sum(axis=1) @ np.arange(kxn, dtype=np.float64)


__all__ = ["apply_weights", "moments", "run_sums", "stats_tprod", "use_numba"]
