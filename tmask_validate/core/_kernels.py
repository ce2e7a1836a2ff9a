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

Each has a numba implementation (float64 accumulators, reading uint8/16/32 and float32/64
chunks directly; :mod:`._stream` converts other dtypes per chunk) and a plain numpy one used
when numba is unavailable or disabled (``TMASK_VALIDATE_NO_NUMBA=1`` or :func:`use_numba`).

float32 tiles (data of at least :data:`FAST_MIN_ELEMENTS` values; :func:`use_float32`)
-------------------------------------------------------------------------------------
``_apply_f32`` (4 patterns x 4 masks register tiles; ``_apply_f32_panel`` the same tiles
over column blocks of 32-row panels, for >= 12 masks on 4-byte data), ``_stats_rows_f32``
(<= 4 templates: each thread streams its own rows, 4 at a time across all columns),
``_stats_f32`` (more templates: column block x 4 rows x 4 templates) and ``_moments_f32``
form the products in float32 and flush float32 partial sums into float64: statistics after
128 rows (template products) and 32 rows (column sums and sums of squares), the centre of
mass after 256 values, apply after :data:`APPLY_FLUSH_COLUMNS` = 1024 columns, which the
compiled loop spreads over its ``V`` vector lanes (LLVM's choice for the host CPU, checked in
the assembly: ``V = 16`` on the AMD Zen 5 hosts, ``V = 8`` -- 256-bit vectors -- on the Intel
AVX-512 host of the README's current table; the uint16 case with integer weights flushes
every 256 columns).  Error bound, with ``u = 2**-24``:

* ``y = x - s``: exact for uint8/uint16 (integers below 2**24) and for float32 data within a
  factor 2 of the shift (Sterbenz); one rounding (``|dy| <= u |y|``) for float64 and 32-bit
  integer data, which are shifted in float64 first.  The shift is the per-column mean of the
  first 32 patterns rounded to an integer (integer data) or to float32 (float32 data), or the
  first pattern (float64 data), so ``y`` is of the size of the column's spread, not its
  mean: large means with small variances lose nothing to cancellation.  The float32 rounding
  of a non-integer shift is corrected exactly in float64 afterwards.
* weights and templates are rounded to float32 once (``<= u`` relative).
* each float32 partial is a sum of ``L`` products with error ``<= gamma_L sum |y w|``,
  ``gamma_L = L u / (1 - L u)``: ``L <= 256`` for the statistics and the centre of mass, and
  ``L = 1024 / V + log2 V`` for apply (68 with ``V = 16``, 131 with ``V = 8``; at most 258
  for any ``V >= 4``, 1024 for scalar code), so ``gamma_L <= 1.54e-5`` with SIMD code; the
  float64 additions add ``<= 2**-53`` each.

So ``|error| <= (2u + gamma_258) * sum_c |y_c w_c|`` in the worst case; rounding errors
are random in practice and grow like the square root of the terms: measured on the hard
cases of ``tests/test_core_precision.py`` (means 1e4 / 1e6 with sigma 0.05 / 1e-3, 12-bit
and 24-bit counts) the results stay within 4e-7 of their scale (test limit 1e-6).  For
uint8 data with integer weights (binary detectors; 1024 x 255 < 2**24), uint16 data with
integer weights (256-column partials) and the centre of mass of uint8/uint16 data every
partial sum is an integer below 2**24: exact.

Performance notes (2-core hosts, AMD Zen 5 and Intel with AVX-512).  See
``benchmarks/bench_core.py``, ``benchmarks/bench_kernel_rates.py`` (one-thread in-cache rates:
the compute floor) and the README: the float64 kernels do ``k`` float64 multiply-adds per
element per pass at ~55-60 % of the float64 peak; the float32 tiles double the lanes and keep
16 accumulators per tile, and reach 0.34-0.49 of a one-thread sgemm's multiply-add rate with
16 masks (Intel host).  The float32-tile apply bound above holds for any ``V``.
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


# ----------------------------------------------------------------------------- float32 tiles
#: float32 partial sums are flushed into float64 after at most this many products
FLUSH_TERMS = 256

#: columns per float32 partial of ``_apply_f32``: the compiled dot products spread them over
#: the vector lanes (16 with AVX-512, >= 4 on any x86-64 SIMD), so each lane sums at most
#: FLUSH_TERMS products before the lanes are added pairwise (with a flush every 256 columns
#: the 16 horizontal sums per flush cost 1.1-1.4x in time, measured single-threaded)
APPLY_FLUSH_COLUMNS = 1024

#: the float32-tile kernels are used for data of at least this many elements (m * n, 64 MiB
#: of float32) unless :func:`use_float32` says otherwise; smaller data take the float64
#: kernels (a pass over them costs milliseconds either way, and they give results exact to
#: float64 rounding; their first call also compiles nothing new).
FAST_MIN_ELEMENTS = 2**24

_STATE["float32"] = os.environ.get("TMASK_VALIDATE_FLOAT64", "") in ("", "0")

#: dtypes converted to float64 before the shift is subtracted (not exact in float32)
_WIDE = (np.dtype(np.float64), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(np.uint64),
         np.dtype(np.int64))


def use_float32(flag: bool | None = None) -> bool:
    """Query (``flag=None``) or set whether large data use the float32-tile kernels.

    With ``False`` every pass accumulates in float64 throughout (slower; also set by the
    environment variable ``TMASK_VALIDATE_FLOAT64=1``).  See :data:`FAST_MIN_ELEMENTS`.
    """
    if flag is not None:
        _STATE["float32"] = bool(flag)
    return _STATE["float32"]


def fast_for(elements: int) -> bool:
    """Whether a pass over data of ``elements`` (m * n) values uses the float32 tiles."""
    return _STATE["numba"] and _STATE["float32"] and int(elements) >= FAST_MIN_ELEMENTS


if _HAVE_NUMBA:
    from numba import types as _nt
    from numba.extending import overload as _overload

    def _shifted(xv, s32, s64):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    @_overload(_shifted, inline="always")
    def _shifted_ov(xv, s32, s64):  # pragma: no cover - compiled
        # narrow dtypes (uint8/16, float32) are exact in float32: subtract there; wide ones
        # (float64, 32/64-bit integers) subtract in float64 first, then round once
        wide = (isinstance(xv, _nt.Float) and xv.bitwidth == 64) or (
            isinstance(xv, _nt.Integer) and xv.bitwidth >= 32)
        if wide:
            return lambda xv, s32, s64: np.float32(np.float64(xv) - s64)
        return lambda xv, s32, s64: np.float32(xv) - s32

    _F32 = np.float32

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _apply_f32(x, s32, s64, w, out, bl):  # pragma: no cover - compiled
        # out[j, i] = sum_c y[j, c] * w[i, c], y = x - shift, float32 products and partial
        # sums over bl columns (ApplyPlan.flush_columns, spread over the vector lanes), then
        # float64.
        # Tiles: 4 rows x 4 masks (16 accumulators: each data load serves 4 masks, each
        # weight load 4 rows); leftover masks 4 rows x 1.  The caller passes a multiple of 4
        # rows.
        r = x.shape[0]
        n = x.shape[1]
        k = w.shape[0]
        for p in prange(r // 4):
            j = 4 * p
            i = 0
            while i + 4 <= k:
                acc = np.zeros(16)
                for c0 in range(0, n, bl):
                    c1 = min(n, c0 + bl)
                    wd = c1 - c0
                    xa = x[j, c0:c1]
                    xb = x[j + 1, c0:c1]
                    xc = x[j + 2, c0:c1]
                    xd = x[j + 3, c0:c1]
                    sa = s32[c0:c1]
                    sb = s64[c0:c1]
                    w0 = w[i, c0:c1]
                    w1 = w[i + 1, c0:c1]
                    w2 = w[i + 2, c0:c1]
                    w3 = w[i + 3, c0:c1]
                    a0 = _F32(0)
                    a1 = _F32(0)
                    a2 = _F32(0)
                    a3 = _F32(0)
                    b0 = _F32(0)
                    b1 = _F32(0)
                    b2 = _F32(0)
                    b3 = _F32(0)
                    e0 = _F32(0)
                    e1 = _F32(0)
                    e2 = _F32(0)
                    e3 = _F32(0)
                    d0 = _F32(0)
                    d1 = _F32(0)
                    d2 = _F32(0)
                    d3 = _F32(0)
                    for c in range(wd):
                        ya = _shifted(xa[c], sa[c], sb[c])
                        yb = _shifted(xb[c], sa[c], sb[c])
                        yc = _shifted(xc[c], sa[c], sb[c])
                        yd = _shifted(xd[c], sa[c], sb[c])
                        u0 = w0[c]
                        u1 = w1[c]
                        u2 = w2[c]
                        u3 = w3[c]
                        a0 += ya * u0
                        a1 += ya * u1
                        a2 += ya * u2
                        a3 += ya * u3
                        b0 += yb * u0
                        b1 += yb * u1
                        b2 += yb * u2
                        b3 += yb * u3
                        e0 += yc * u0
                        e1 += yc * u1
                        e2 += yc * u2
                        e3 += yc * u3
                        d0 += yd * u0
                        d1 += yd * u1
                        d2 += yd * u2
                        d3 += yd * u3
                    acc[0] += a0
                    acc[1] += a1
                    acc[2] += a2
                    acc[3] += a3
                    acc[4] += b0
                    acc[5] += b1
                    acc[6] += b2
                    acc[7] += b3
                    acc[8] += e0
                    acc[9] += e1
                    acc[10] += e2
                    acc[11] += e3
                    acc[12] += d0
                    acc[13] += d1
                    acc[14] += d2
                    acc[15] += d3
                for q in range(4):
                    for t in range(4):
                        out[j + q, i + t] = acc[4 * q + t]
                i += 4
            while i < k:
                g0 = 0.0
                g1 = 0.0
                g2 = 0.0
                g3 = 0.0
                for c0 in range(0, n, bl):
                    c1 = min(n, c0 + bl)
                    wd = c1 - c0
                    xa = x[j, c0:c1]
                    xb = x[j + 1, c0:c1]
                    xc = x[j + 2, c0:c1]
                    xd = x[j + 3, c0:c1]
                    sa = s32[c0:c1]
                    sb = s64[c0:c1]
                    w0 = w[i, c0:c1]
                    a0 = _F32(0)
                    a1 = _F32(0)
                    a2 = _F32(0)
                    a3 = _F32(0)
                    for c in range(wd):
                        u0 = w0[c]
                        a0 += _shifted(xa[c], sa[c], sb[c]) * u0
                        a1 += _shifted(xb[c], sa[c], sb[c]) * u0
                        a2 += _shifted(xc[c], sa[c], sb[c]) * u0
                        a3 += _shifted(xd[c], sa[c], sb[c]) * u0
                    g0 += a0
                    g1 += a1
                    g2 += a2
                    g3 += a3
                out[j, i] = g0
                out[j + 1, i] = g1
                out[j + 2, i] = g2
                out[j + 3, i] = g3
                i += 1

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _apply_f32_panel(x, s32, s64, w, out, bl, rp):  # pragma: no cover - compiled
        # _apply_f32 for many masks on 4-byte data: panels of rp rows (one per work item); for
        # each column block of bl columns (one float32 partial, as in _apply_f32) the panel's
        # rows are shifted into a float32 buffer 4 at a time and every 4-mask tile sweeps it:
        # the weight block (k x bl float32) stays in L2 for all rows of the panel instead of all
        # k x n weights streaming through it for every 4 rows.  Measured on 1 GiB float32, 16
        # masks: 57-71 ms against 66-78 ms (noisy host; 32 masks 94 vs 112 ms); slower for
        # k <= 8 and for uint16 data (short row
        # segments cost the prefetchers more than the weights do), which keep _apply_f32.
        r = x.shape[0]
        n = x.shape[1]
        k = w.shape[0]
        npan = (r + rp - 1) // rp
        for p in prange(npan):
            j0 = p * rp
            ng = (min(r, j0 + rp) - j0) // 4
            acc = np.zeros((4 * ng, k))
            Y = np.empty((4, bl), dtype=np.float32)
            ya = Y[0]
            yb = Y[1]
            yc = Y[2]
            yd = Y[3]
            for c0 in range(0, n, bl):
                c1 = min(n, c0 + bl)
                wd = c1 - c0
                sa = s32[c0:c1]
                sb = s64[c0:c1]
                for g in range(ng):
                    j = j0 + 4 * g
                    xa = x[j, c0:c1]
                    xb = x[j + 1, c0:c1]
                    xc = x[j + 2, c0:c1]
                    xd = x[j + 3, c0:c1]
                    for c in range(wd):
                        ya[c] = _shifted(xa[c], sa[c], sb[c])
                        yb[c] = _shifted(xb[c], sa[c], sb[c])
                        yc[c] = _shifted(xc[c], sa[c], sb[c])
                        yd[c] = _shifted(xd[c], sa[c], sb[c])
                    i = 0
                    while i + 4 <= k:
                        w0 = w[i, c0:c1]
                        w1 = w[i + 1, c0:c1]
                        w2 = w[i + 2, c0:c1]
                        w3 = w[i + 3, c0:c1]
                        a0 = _F32(0)
                        a1 = _F32(0)
                        a2 = _F32(0)
                        a3 = _F32(0)
                        b0 = _F32(0)
                        b1 = _F32(0)
                        b2 = _F32(0)
                        b3 = _F32(0)
                        e0 = _F32(0)
                        e1 = _F32(0)
                        e2 = _F32(0)
                        e3 = _F32(0)
                        d0 = _F32(0)
                        d1 = _F32(0)
                        d2 = _F32(0)
                        d3 = _F32(0)
                        for c in range(wd):
                            va = ya[c]
                            vb = yb[c]
                            vc = yc[c]
                            vd = yd[c]
                            u0 = w0[c]
                            u1 = w1[c]
                            u2 = w2[c]
                            u3 = w3[c]
                            a0 += va * u0
                            a1 += va * u1
                            a2 += va * u2
                            a3 += va * u3
                            b0 += vb * u0
                            b1 += vb * u1
                            b2 += vb * u2
                            b3 += vb * u3
                            e0 += vc * u0
                            e1 += vc * u1
                            e2 += vc * u2
                            e3 += vc * u3
                            d0 += vd * u0
                            d1 += vd * u1
                            d2 += vd * u2
                            d3 += vd * u3
                        q = 4 * g
                        acc[q, i] += a0
                        acc[q, i + 1] += a1
                        acc[q, i + 2] += a2
                        acc[q, i + 3] += a3
                        acc[q + 1, i] += b0
                        acc[q + 1, i + 1] += b1
                        acc[q + 1, i + 2] += b2
                        acc[q + 1, i + 3] += b3
                        acc[q + 2, i] += e0
                        acc[q + 2, i + 1] += e1
                        acc[q + 2, i + 2] += e2
                        acc[q + 2, i + 3] += e3
                        acc[q + 3, i] += d0
                        acc[q + 3, i + 1] += d1
                        acc[q + 3, i + 2] += d2
                        acc[q + 3, i + 3] += d3
                        i += 4
                    while i < k:
                        w0 = w[i, c0:c1]
                        a0 = _F32(0)
                        a1 = _F32(0)
                        a2 = _F32(0)
                        a3 = _F32(0)
                        for c in range(wd):
                            u0 = w0[c]
                            a0 += ya[c] * u0
                            a1 += yb[c] * u0
                            a2 += yc[c] * u0
                            a3 += yd[c] * u0
                        q = 4 * g
                        acc[q, i] += a0
                        acc[q + 1, i] += a1
                        acc[q + 2, i] += a2
                        acc[q + 3, i] += a3
                        i += 1
            for q in range(4 * ng):
                for i in range(k):
                    out[j0 + q, i] = acc[q, i]

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _stats_f32(x, rows, t, s32, s64, s1, s2, acc, cb):  # pragma: no cover - compiled
        # column sums / sums of squares of y = x[rows] - shift and t @ y (many templates):
        # parallel over column blocks (float32 accumulators k x cb in L2 owned by one thread),
        # rows 4 at a time into a float32 buffer, then templates 4 at a time (the 4 x 4 template
        # coefficients stay in registers: an 8-row variant ran out of them and was 1.2x slower);
        # float32 partial sums are flushed into float64 every 128 rows (t @ y) and 32 rows
        # (s1, s2).  q multiple of 4.
        n = x.shape[1]
        k = t.shape[0]
        q = rows.shape[0]
        nb = (n + cb - 1) // cb
        fl = 128
        fs = 32
        for b in prange(nb):
            c0 = b * cb
            c1 = min(n, c0 + cb)
            wd = c1 - c0
            Y = np.empty((4, cb), dtype=np.float32)
            ls1 = np.zeros(cb, dtype=np.float32)
            ls2 = np.zeros(cb, dtype=np.float32)
            lacc = np.zeros((k, cb), dtype=np.float32)
            g1 = np.zeros(cb)
            g2 = np.zeros(cb)
            gacc = np.zeros((k, cb))
            sa = s32[c0:c1]
            sb = s64[c0:c1]
            y0 = Y[0]
            y1 = Y[1]
            y2 = Y[2]
            y3 = Y[3]
            for jb in range(0, q, fl):
                je = min(q, jb + fl)
                for jj in range(jb, je, 4):
                    xa = x[rows[jj], c0:c1]
                    xb = x[rows[jj + 1], c0:c1]
                    xc = x[rows[jj + 2], c0:c1]
                    xd = x[rows[jj + 3], c0:c1]
                    for c in range(wd):
                        va = _shifted(xa[c], sa[c], sb[c])
                        vb = _shifted(xb[c], sa[c], sb[c])
                        vc = _shifted(xc[c], sa[c], sb[c])
                        vd = _shifted(xd[c], sa[c], sb[c])
                        y0[c] = va
                        y1[c] = vb
                        y2[c] = vc
                        y3[c] = vd
                        ls1[c] += (va + vb) + (vc + vd)
                        ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                    if (jj + 4 - jb) % fs == 0 or jj + 4 >= je:
                        for c in range(wd):
                            g1[c] += ls1[c]
                            g2[c] += ls2[c]
                            ls1[c] = 0.0
                            ls2[c] = 0.0
                    i = 0
                    while i + 4 <= k:
                        la = lacc[i]
                        lb = lacc[i + 1]
                        lc = lacc[i + 2]
                        ld = lacc[i + 3]
                        p0 = _F32(t[i, jj])
                        p1 = _F32(t[i, jj + 1])
                        p2 = _F32(t[i, jj + 2])
                        p3 = _F32(t[i, jj + 3])
                        q0 = _F32(t[i + 1, jj])
                        q1 = _F32(t[i + 1, jj + 1])
                        q2 = _F32(t[i + 1, jj + 2])
                        q3 = _F32(t[i + 1, jj + 3])
                        r0 = _F32(t[i + 2, jj])
                        r1 = _F32(t[i + 2, jj + 1])
                        r2 = _F32(t[i + 2, jj + 2])
                        r3 = _F32(t[i + 2, jj + 3])
                        u0 = _F32(t[i + 3, jj])
                        u1 = _F32(t[i + 3, jj + 1])
                        u2 = _F32(t[i + 3, jj + 2])
                        u3 = _F32(t[i + 3, jj + 3])
                        for c in range(wd):
                            e0 = y0[c]
                            e1 = y1[c]
                            e2 = y2[c]
                            e3 = y3[c]
                            la[c] += (p0 * e0 + p1 * e1) + (p2 * e2 + p3 * e3)
                            lb[c] += (q0 * e0 + q1 * e1) + (q2 * e2 + q3 * e3)
                            lc[c] += (r0 * e0 + r1 * e1) + (r2 * e2 + r3 * e3)
                            ld[c] += (u0 * e0 + u1 * e1) + (u2 * e2 + u3 * e3)
                        i += 4
                    while i < k:
                        la = lacc[i]
                        p0 = _F32(t[i, jj])
                        p1 = _F32(t[i, jj + 1])
                        p2 = _F32(t[i, jj + 2])
                        p3 = _F32(t[i, jj + 3])
                        for c in range(wd):
                            la[c] += (p0 * y0[c] + p1 * y1[c]) + (p2 * y2[c] + p3 * y3[c])
                        i += 1
                for i in range(k):
                    la = lacc[i]
                    ga = gacc[i]
                    for c in range(wd):
                        ga[c] += la[c]
                        la[c] = 0.0
            for c in range(wd):
                s1[c0 + c] += g1[c]
                s2[c0 + c] += g2[c]
            for i in range(k):
                for c in range(wd):
                    acc[i, c0 + c] += gacc[i, c]

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _stats_rows_f32(x, rows, t, s32, s64, s1, s2, acc, nparts):  # pragma: no cover - compiled
        # column sums / sums of squares of y = x[rows] - shift and t @ y for k <= 4 templates:
        # parallel over row ranges (one per thread, streamed row after row: contiguous reads
        # the prefetchers follow), 4 rows at a time across all n columns, float32 partials
        # (32 rows for s1/s2, 128 rows for t @ y; per-thread, n and k x n in L2) flushed into
        # per-thread float64 sums, added up at the end.  q multiple of 4.
        n = x.shape[1]
        k = t.shape[0]
        q = rows.shape[0]
        ng = q // 4
        fs = 8    # row groups (of 4) per float32 partial of s1/s2: 32 rows
        fl = 32   # row groups per float32 partial of template products: 128 rows
        G1 = np.zeros((nparts, n))
        G2 = np.zeros((nparts, n))
        GA = np.zeros((nparts, k, n))
        for p in prange(nparts):
            ga0 = (ng * p) // nparts
            ga1 = (ng * (p + 1)) // nparts
            ls1 = np.zeros(n, dtype=np.float32)
            ls2 = np.zeros(n, dtype=np.float32)
            lacc = np.zeros((k, n), dtype=np.float32)
            y0 = np.empty(n if k == 2 or k == 3 else 0, dtype=np.float32)
            y1 = np.empty(n if k == 2 or k == 3 else 0, dtype=np.float32)
            y2 = np.empty(n if k == 2 or k == 3 else 0, dtype=np.float32)
            y3 = np.empty(n if k == 2 or k == 3 else 0, dtype=np.float32)
            g1 = G1[p]
            g2 = G2[p]
            for g in range(ga0, ga1):
                jj = 4 * g
                xa = x[rows[jj]]
                xb = x[rows[jj + 1]]
                xc = x[rows[jj + 2]]
                xd = x[rows[jj + 3]]
                if k == 0:
                    for c in range(n):
                        sa = s32[c]
                        sb = s64[c]
                        va = _shifted(xa[c], sa, sb)
                        vb = _shifted(xb[c], sa, sb)
                        vc = _shifted(xc[c], sa, sb)
                        vd = _shifted(xd[c], sa, sb)
                        ls1[c] += (va + vb) + (vc + vd)
                        ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                else:
                    p0 = _F32(t[0, jj])
                    p1 = _F32(t[0, jj + 1])
                    p2 = _F32(t[0, jj + 2])
                    p3 = _F32(t[0, jj + 3])
                    la = lacc[0]
                    if k == 1:
                        for c in range(n):
                            sa = s32[c]
                            sb = s64[c]
                            va = _shifted(xa[c], sa, sb)
                            vb = _shifted(xb[c], sa, sb)
                            vc = _shifted(xc[c], sa, sb)
                            vd = _shifted(xd[c], sa, sb)
                            ls1[c] += (va + vb) + (vc + vd)
                            ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                            la[c] += (p0 * va + p1 * vb) + (p2 * vc + p3 * vd)
                    elif k == 4:  # all four templates fused into the statistics sweep
                        q0 = _F32(t[1, jj])
                        q1 = _F32(t[1, jj + 1])
                        q2 = _F32(t[1, jj + 2])
                        q3 = _F32(t[1, jj + 3])
                        r0 = _F32(t[2, jj])
                        r1 = _F32(t[2, jj + 1])
                        r2 = _F32(t[2, jj + 2])
                        r3 = _F32(t[2, jj + 3])
                        u0 = _F32(t[3, jj])
                        u1 = _F32(t[3, jj + 1])
                        u2 = _F32(t[3, jj + 2])
                        u3 = _F32(t[3, jj + 3])
                        lb = lacc[1]
                        lc = lacc[2]
                        ld = lacc[3]
                        for c in range(n):
                            sa = s32[c]
                            sb = s64[c]
                            va = _shifted(xa[c], sa, sb)
                            vb = _shifted(xb[c], sa, sb)
                            vc = _shifted(xc[c], sa, sb)
                            vd = _shifted(xd[c], sa, sb)
                            ls1[c] += (va + vb) + (vc + vd)
                            ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                            la[c] += (p0 * va + p1 * vb) + (p2 * vc + p3 * vd)
                            lb[c] += (q0 * va + q1 * vb) + (q2 * vc + q3 * vd)
                            lc[c] += (r0 * va + r1 * vb) + (r2 * vc + r3 * vd)
                            ld[c] += (u0 * va + u1 * vb) + (u2 * vc + u3 * vd)
                    else:  # 2 or 3 templates: template 0 fused, the others from row buffers
                        for c in range(n):
                            sa = s32[c]
                            sb = s64[c]
                            va = _shifted(xa[c], sa, sb)
                            vb = _shifted(xb[c], sa, sb)
                            vc = _shifted(xc[c], sa, sb)
                            vd = _shifted(xd[c], sa, sb)
                            y0[c] = va
                            y1[c] = vb
                            y2[c] = vc
                            y3[c] = vd
                            ls1[c] += (va + vb) + (vc + vd)
                            ls2[c] += (va * va + vb * vb) + (vc * vc + vd * vd)
                            la[c] += (p0 * va + p1 * vb) + (p2 * vc + p3 * vd)
                        for i in range(1, k):
                            t0 = _F32(t[i, jj])
                            t1 = _F32(t[i, jj + 1])
                            t2 = _F32(t[i, jj + 2])
                            t3 = _F32(t[i, jj + 3])
                            lb = lacc[i]
                            for c in range(n):
                                lb[c] += (t0 * y0[c] + t1 * y1[c]) + (t2 * y2[c] + t3 * y3[c])
                last = g + 1 == ga1
                if (g + 1 - ga0) % fs == 0 or last:
                    for c in range(n):
                        g1[c] += ls1[c]
                        g2[c] += ls2[c]
                        ls1[c] = 0.0
                        ls2[c] = 0.0
                if k and ((g + 1 - ga0) % fl == 0 or last):
                    for i in range(k):
                        la = lacc[i]
                        gg = GA[p, i]
                        for c in range(n):
                            gg[c] += la[c]
                            la[c] = 0.0
        for p in range(nparts):
            for c in range(n):
                s1[c] += G1[p, c]
                s2[c] += G2[p, c]
            for i in range(k):
                for c in range(n):
                    acc[i, c] += GA[p, i, c]

    @njit(parallel=True, cache=True, nogil=True, fastmath=_FM)
    def _moments_f32(x, kyn, kxn, out):  # pragma: no cover - compiled
        # as _moments_numba with float32 partial sums of <= FLUSH_TERMS values
        r = x.shape[0]
        fl = 256
        for j in prange(r):
            xr = x[j]
            colsum = np.zeros(kxn, dtype=np.float32)
            colsum64 = np.zeros(kxn)
            tot = 0.0
            my = 0.0
            for a in range(kyn):
                o = a * kxn
                rs = 0.0
                for b0 in range(0, kxn, fl):
                    b1 = min(kxn, b0 + fl)
                    seg = xr[o + b0:o + b1]
                    cs = colsum[b0:b1]
                    part = _F32(0)
                    for b in range(b1 - b0):
                        v = _F32(seg[b])
                        part += v
                        cs[b] += v
                    rs += part
                tot += rs
                my += a * rs
                if (a + 1) % fl == 0 or a == kyn - 1:
                    for b in range(kxn):
                        colsum64[b] += colsum[b]
                        colsum[b] = 0.0
            mx = 0.0
            for b in range(kxn):
                mx += b * colsum64[b]
            out[j, 0] = tot
            out[j, 1] = my
            out[j, 2] = mx


if _HAVE_NUMBA:

    @njit(parallel=True, cache=True, nogil=True)
    def _gather_be2(buf, off, stride, out):  # pragma: no cover - compiled
        # out[j, c] = big-endian uint16 at buf[off + j*stride + 2c]
        r, n = out.shape
        for j in prange(r):
            src = buf[off + j * stride: off + j * stride + 2 * n]
            dst = out[j]
            for c in range(n):
                dst[c] = (np.uint16(src[2 * c]) << np.uint16(8)) | np.uint16(src[2 * c + 1])

    @njit(parallel=True, cache=True, nogil=True)
    def _gather_be4(buf, off, stride, out):  # pragma: no cover - compiled
        r, n = out.shape
        for j in prange(r):
            src = buf[off + j * stride: off + j * stride + 4 * n]
            dst = out[j]
            for c in range(n):
                dst[c] = ((np.uint32(src[4 * c]) << np.uint32(24))
                          | (np.uint32(src[4 * c + 1]) << np.uint32(16))
                          | (np.uint32(src[4 * c + 2]) << np.uint32(8))
                          | np.uint32(src[4 * c + 3]))

    @njit(parallel=True, cache=True, nogil=True)
    def _gather_bytes(buf, off, stride, out):  # pragma: no cover - compiled
        # native-order rows: out (r, nbytes) uint8
        r, n = out.shape
        for j in prange(r):
            src = buf[off + j * stride: off + j * stride + n]
            dst = out[j]
            for c in range(n):
                dst[c] = src[c]


def gather_rows(buf: np.ndarray, off: int, stride: int, dtype: np.dtype, out: np.ndarray
                ) -> None:
    """Copy ``out.shape[0]`` rows of ``dtype`` from a flat uint8 buffer into native ``out``.

    Row ``j`` starts at byte ``off + j * stride``; big-endian 2- and 4-byte values are
    byte-swapped on the way (e.g. MIB frame payloads between their headers).
    """
    dtype = np.dtype(dtype)
    with _LAUNCH_LOCK:
        if dtype.isnative or dtype.itemsize == 1:
            _gather_bytes(buf, off, stride, out.view(np.uint8).reshape(out.shape[0], -1))
        elif dtype.itemsize == 2 and dtype.kind == "u":
            _gather_be2(buf, off, stride, out)
        elif dtype.itemsize == 4 and dtype.kind == "u":
            _gather_be4(buf, off, stride, out)
        else:  # pragma: no cover - other swapped dtypes: numpy
            raise TypeError(dtype)


def _shift_pair(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 and float64 shifts for the tile kernels, and their difference from ``shift``.

    For narrow dtypes the kernels subtract the float32 shift ``s32``; ``delta = s32 - shift``
    (float64, zero when the shift is exact in float32, e.g. a data row) corrects the sums.
    """
    s64 = np.ascontiguousarray(shift, dtype=np.float64)
    s32 = s64.astype(np.float32)
    if x.dtype in _WIDE:
        return s32, s64, np.zeros_like(s64)
    return s32, s64, s32.astype(np.float64) - s64


def stats_tprod(x, rows, t, shift, s1, s2, acc, *, fast: bool = False) -> None:
    """Accumulate column sums/sums of squares of ``x[rows] - shift`` and ``t @ (x[rows]-shift)``.

    ``x`` (r, n) C-contiguous; ``rows`` int64 (q,); ``t`` float64 (k, q); ``shift`` float64
    (n,); ``s1``, ``s2`` float64 (n,) and ``acc`` float64 (k, n) are updated in place.

    ``fast`` selects the float32-tile kernel (see the module notes for its error bound);
    otherwise every product and sum is float64.
    """
    q = rows.shape[0]
    if q == 0:
        return
    if _STATE["numba"]:
        with _LAUNCH_LOCK:
            if fast:
                _stats_fast_dispatch(x, rows, t, shift, s1, s2, acc)
            else:
                _stats_tprod_dispatch(x, rows, t, shift, s1, s2, acc)
    else:
        _stats_tprod_numpy(x, rows, t, shift, s1, s2, acc)


#: the row-streaming statistics kernel takes passes with at most this many templates and at
#: most ROWS_MAX_BYTES of per-thread float32 partials and row buffers (they stay in L2);
#: the others go to the column-block kernel
ROWS_MAX_TEMPLATES = 4
ROWS_MAX_BYTES = 4 * 2**20


def _rows_kernel_fits(k: int, n: int) -> bool:
    """Whether a pass with ``k`` templates over ``n`` columns takes ``_stats_rows_f32``."""
    return k <= ROWS_MAX_TEMPLATES and (k + 2 + (4 if k in (2, 3) else 0)) * n * 4 <= ROWS_MAX_BYTES


def _stats_parts(q: int) -> int:
    """Row ranges (one per numba thread, >= 64 rows each) of the row-streaming kernel."""
    from numba import get_num_threads

    return max(1, min(get_num_threads(), q // 64))


def _stats_fast_dispatch(x, rows, t, shift, s1, s2, acc) -> None:
    q = rows.shape[0]
    rows_kernel = _rows_kernel_fits(t.shape[0], x.shape[1])
    q4 = q - q % 4
    if q4:
        s32, s64, delta = _shift_pair(x, shift)
        tq = np.ascontiguousarray(t[:, :q4])
        if np.any(delta):
            # the kernel sums y' = x - s32 = y + delta: sums of y from those of y'
            p1 = np.zeros_like(s1)
            p2 = np.zeros_like(s2)
            pa = np.zeros_like(acc)
        else:
            p1, p2, pa = s1, s2, acc
        if rows_kernel:
            _stats_rows_f32(x, rows[:q4], tq, s32, s64, p1, p2, pa, _stats_parts(q4))
        else:
            _stats_f32(x, rows[:q4], tq, s32, s64, p1, p2, pa, 2 * COL_BLOCK)
        if p1 is not s1:
            s1 += p1 - q4 * delta
            s2 += p2 - 2.0 * delta * p1 + q4 * delta * delta
            acc += pa - np.outer(tq.sum(axis=1), delta)
    if q4 < q:  # the last 1-3 rows (numpy, float64)
        _stats_tprod_numpy(x, rows[q4:], t[:, q4:], shift, s1, s2, acc)


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


#: masks from which 4-byte data take ``_apply_f32_panel``, and its rows per work item
PANEL_MIN_MASKS = 12
PANEL_ROWS = 32


class ApplyPlan:
    """Weights and shift of an ``apply_weights`` pass, converted once for the float32 tiles."""

    def __init__(self, mu: np.ndarray, w: np.ndarray, x_dtype: np.dtype) -> None:
        self.dtype = np.dtype(x_dtype)
        self.mu = np.ascontiguousarray(mu, dtype=np.float64)
        self.w = np.ascontiguousarray(w, dtype=np.float64)
        self.w32 = self.w.astype(np.float32)
        self.s64 = self.mu
        self.s32 = self.mu.astype(np.float32)
        #: columns per float32 partial: APPLY_FLUSH_COLUMNS, but FLUSH_TERMS for uint16
        #: data with integer weights (binary detectors), whose partials then stay exact
        #: integers below 2**24
        self.flush_columns = APPLY_FLUSH_COLUMNS
        if self.dtype == np.dtype(np.uint16) and np.array_equal(self.w32, np.round(self.w32)):
            self.flush_columns = FLUSH_TERMS
        #: the column-blocked panel kernel: many masks on 4-byte data (see _apply_f32_panel)
        self.panel = self.w.shape[0] >= PANEL_MIN_MASKS and self.dtype.itemsize >= 4
        if np.dtype(x_dtype) in _WIDE:
            self.corr = np.zeros(self.w.shape[0])
        else:  # the kernel subtracts s32, not mu: add sum_c (s32 - mu) w (float64)
            # (einsum, not BLAS: a BLAS call wakes its thread pool, measured 15 ms on a busy
            # machine for this k x n product)
            self.corr = np.einsum("ij,j->i", self.w, self.s32.astype(np.float64) - self.mu)


def apply_weights(x, mu, w, out, *, plan: ApplyPlan | None = None) -> None:
    """Set ``out[j, i] = sum_c (x[j, c] - mu[c]) * w[i, c]``.

    ``x`` (r, n) C-contiguous; ``mu`` float64 (n,); ``w`` float64 C-contiguous (k, n);
    ``out`` float64 (r, k).  With ``plan`` (an :class:`ApplyPlan` for these ``mu`` and ``w``)
    the float32-tile kernel runs; otherwise float64 accumulation throughout.
    """
    if _STATE["numba"]:
        if plan is not None:
            r4 = x.shape[0] - x.shape[0] % 4
            if r4:
                with _LAUNCH_LOCK:
                    if plan.panel:
                        _apply_f32_panel(x[:r4], plan.s32, plan.s64, plan.w32, out[:r4],
                                         plan.flush_columns, PANEL_ROWS)
                    else:
                        _apply_f32(x[:r4], plan.s32, plan.s64, plan.w32, out[:r4],
                                   plan.flush_columns)
                if np.any(plan.corr):
                    out[:r4] += plan.corr
            if r4 < x.shape[0]:
                _apply_weights_numpy(x[r4:], mu, w, out[r4:])
            return
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


def moments(x, det_shape, out, *, fast: bool = False) -> None:
    """Set ``out[j] = (Σ x, Σ ky x, Σ kx x)`` for each row (pattern), detector index units.

    ``fast``: float32 partial sums for uint8/uint16 data -- exact, since every partial sum of
    at most 256 values below 2**16 is an integer below 2**24; other dtypes stay float64.
    """
    kyn, kxn = det_shape
    if _STATE["numba"]:
        with _LAUNCH_LOCK:
            if fast and x.dtype in (np.dtype(np.uint8), np.dtype(np.uint16)):
                _moments_f32(x, kyn, kxn, out)
            else:
                _moments_numba(x, kyn, kxn, out)
    else:
        xs = x.astype(np.float64).reshape(x.shape[0], kyn, kxn)
        out[:, 0] = xs.sum(axis=(1, 2))
        out[:, 1] = xs.sum(axis=2) @ np.arange(kyn, dtype=np.float64)
        out[:, 2] = xs.sum(axis=1) @ np.arange(kxn, dtype=np.float64)


__all__ = ["ApplyPlan", "apply_weights", "fast_for", "moments", "run_sums", "stats_tprod",
           "use_float32", "use_numba"]
