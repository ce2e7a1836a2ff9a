"""Streaming kernels: one chunk of rows of D in, float64 accumulators updated.

Two kernels cover every pass of :mod:`tmask_validate.core`:

``stats_tprod``
    column sums and sums of squares of ``y = x - shift`` (the shift, e.g. the first pattern,
    avoids cancellation in the variance) and the template products ``t @ y`` for ``k``
    templates, over a selected subset of the chunk's rows.
``apply_weights``
    ``out[j, i] = sum_c (x[j, c] - mu[c]) * w[i, c]`` for ``k`` weight vectors (masks).

Each has a numba implementation (parallel over column blocks resp. row blocks, float64
accumulators, read straight from uint8/16/32, float32/64 chunks) and a plain numpy one used
when numba is unavailable or disabled (``TMASK_VALIDATE_NO_NUMBA=1`` or :func:`use_numba`).
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised implicitly
    from numba import njit, prange

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

_STATE = {"numba": _HAVE_NUMBA and os.environ.get("TMASK_VALIDATE_NO_NUMBA", "") in ("", "0")}

#: columns per work item of ``stats_tprod`` (ybuf + k accumulators stay in L1/L2)
COL_BLOCK = 512
#: rows per work item / columns per cache block of ``apply_weights``
ROW_BLOCK = 16
APPLY_COL_BLOCK = 1024


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

    @njit(parallel=True, cache=True, nogil=True)
    def _stats_tprod_numba(x, rows, t, shift, s1, s2, acc):  # pragma: no cover - compiled
        n = x.shape[1]
        k = t.shape[0]
        q = rows.shape[0]
        nb = (n + COL_BLOCK - 1) // COL_BLOCK
        for b in prange(nb):
            c0 = b * COL_BLOCK
            c1 = min(n, c0 + COL_BLOCK)
            w = c1 - c0
            ybuf = np.empty(w, dtype=np.float64)
            ls1 = np.zeros(w, dtype=np.float64)
            ls2 = np.zeros(w, dtype=np.float64)
            lacc = np.zeros((k, w), dtype=np.float64)
            for jj in range(q):
                j = rows[jj]
                for c in range(w):
                    y = np.float64(x[j, c0 + c]) - shift[c0 + c]
                    ybuf[c] = y
                    ls1[c] += y
                    ls2[c] += y * y
                for i in range(k):
                    tv = t[i, jj]
                    for c in range(w):
                        lacc[i, c] += tv * ybuf[c]
            for c in range(w):
                s1[c0 + c] += ls1[c]
                s2[c0 + c] += ls2[c]
            for i in range(k):
                for c in range(w):
                    acc[i, c0 + c] += lacc[i, c]

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _apply_weights_numba(x, mu, w, out):  # pragma: no cover - compiled
        r = x.shape[0]
        n = x.shape[1]
        k = w.shape[0]
        nrb = (r + ROW_BLOCK - 1) // ROW_BLOCK
        for rb in prange(nrb):
            j0 = rb * ROW_BLOCK
            j1 = min(r, j0 + ROW_BLOCK)
            lacc = np.zeros((j1 - j0, k), dtype=np.float64)
            ybuf = np.empty(APPLY_COL_BLOCK, dtype=np.float64)
            for c0 in range(0, n, APPLY_COL_BLOCK):
                c1 = min(n, c0 + APPLY_COL_BLOCK)
                wd = c1 - c0
                for j in range(j0, j1):
                    for c in range(wd):
                        ybuf[c] = np.float64(x[j, c0 + c]) - mu[c0 + c]
                    for i in range(k):
                        s = 0.0
                        for c in range(wd):
                            s += ybuf[c] * w[i, c0 + c]
                        lacc[j - j0, i] += s
            for j in range(j0, j1):
                for i in range(k):
                    out[j, i] = lacc[j - j0, i]


def stats_tprod(x, rows, t, shift, s1, s2, acc) -> None:
    """Accumulate column sums/sums of squares of ``x[rows] - shift`` and ``t @ (x[rows]-shift)``.

    ``x`` (r, n) C-contiguous; ``rows`` int64 (q,); ``t`` float64 (k, q); ``shift`` float64
    (n,); ``s1``, ``s2`` float64 (n,) and ``acc`` float64 (k, n) are updated in place.
    """
    if rows.shape[0] == 0:
        return
    if _STATE["numba"]:
        _stats_tprod_numba(x, rows, t, shift, s1, s2, acc)
    else:
        _stats_tprod_numpy(x, rows, t, shift, s1, s2, acc)


def apply_weights(x, mu, w, out) -> None:
    """Set ``out[j, i] = sum_c (x[j, c] - mu[c]) * w[i, c]`` (float64 accumulation).

    ``x`` (r, n) C-contiguous; ``mu`` float64 (n,); ``w`` float64 C-contiguous (k, n);
    ``out`` float64 (r, k).
    """
    if _STATE["numba"]:
        _apply_weights_numba(x, mu, w, out)
    else:
        _apply_weights_numpy(x, mu, w, out)


__all__ = ["apply_weights", "stats_tprod", "use_numba"]
