"""Template masks as dask graphs, for data spread over a (distributed) dask cluster.

The functions here compute the same quantities as :func:`tmask_validate.core.pcc_mask`,
:func:`~tmask_validate.core.apply_mask`, :func:`~tmask_validate.core.column_stats` and
:func:`~tmask_validate.core.template_mask_image` -- same arguments, same normalisations, same
edge cases (zero-variance columns give 0, partial-template ``region``) -- but express every pass
over the data as a dask graph: the 4D chunks are read, converted to float64 and reduced where
they live (on the workers of a ``distributed.Client`` if one is active), and only detector-sized
(``(k, ky, kx)``) or scan-sized (``(k, scan_y, scan_x)``) float64 results travel back.

Use it when the data do not fit one machine, or already live on a cluster::

    import dask.array as da
    from distributed import Client
    from tmask_validate import parallel

    client = Client("tcp://scheduler:8786")           # or Client(LocalCluster(...))
    data = da.from_zarr("results/simulate/lifepo4.zarr", component="intensity")[3]
    mask, image = parallel.template_mask_image(data, template, region=None)

Each function makes one ``dask.compute`` call per pass (two for
:func:`template_mask_image`, as in :mod:`tmask_validate.core`), so the data are read once per
pass; all reductions within a pass share the chunk reads. Column statistics use sums shifted by
the first pattern used (exact zeros for constant columns, no catastrophic cancellation for
large offsets); everything is accumulated in float64.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any

import numpy as np

from .core import ColumnStats
from .core._kernels import ApplyPlan, apply_weights, fast_for, stats_tprod
from .core._pcc import (
    _apply_weights,
    _check_normalisation,
    _check_region,
    _check_stats,
    _check_valid,
    _pcc_from,
    _prepare_templates,
    _restrict_stats,
    _weights_for,
)
from .core._stream import check_data, kernel_dtype_chunk

__all__ = [
    "apply_mask",
    "as_dask",
    "column_stats",
    "pcc_mask",
    "template_mask_image",
]


def as_dask(data: Any, *, rows_per_chunk: int | None = None):
    """Return ``data`` as a 4D dask array (unchanged if it already is one).

    Parameters
    ----------
    data : array-like
        ``[scan_y, scan_x, ky, kx]`` numpy, memmap, zarr or dask array.
    rows_per_chunk : int, optional
        Scan rows per chunk for arrays that are not dask arrays yet. Default: the zarr
        storage chunks if ``data`` has ``chunks``, else about 64 MiB per chunk.

    Returns
    -------
    dask.array.Array
    """
    import dask.array as da

    if isinstance(data, da.Array):
        return data
    info = check_data(data)
    if rows_per_chunk is None:
        chunks = getattr(data, "chunks", None)
        if isinstance(chunks, tuple) and len(chunks) == 4 and all(
                isinstance(c, int) for c in chunks):
            return da.from_array(data, chunks=chunks)
        row_bytes = info.scan_shape[1] * info.n * np.dtype(info.dtype).itemsize
        rows_per_chunk = max(1, int(64 * 2**20 // max(row_bytes, 1)))
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    return da.from_array(data, chunks=(int(rows_per_chunk), -1, -1, -1))


def _worker_kernel_threads() -> int | None:
    """Threads a compiled kernel may use inside a task on a ``distributed`` worker, else None.

    A worker runs ``nthreads`` tasks at once and several workers may share a machine;
    ``distributed`` therefore starts its worker processes with ``OMP_NUM_THREADS`` (and the
    BLAS equivalents) set to the threads each task may use -- 1 by default.  numba does not
    read that variable, so every task would start one numba thread per core: 2 workers on 2
    cores then run 4 threads whose barrier waits ruin every kernel launch.  Here the kernels
    follow the same setting (else ``cores // nthreads`` of the worker).
    """
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    nthreads = int(getattr(getattr(worker, "state", worker), "nthreads", 1) or 1)
    return max(1, (os.cpu_count() or 1) // nthreads)


def _on_worker_threads(fn):
    """Run a block task with numba limited to :func:`_worker_kernel_threads` (thread-local)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        want = _worker_kernel_threads()
        if want is None:
            return fn(*args, **kwargs)
        try:
            import numba
        except ImportError:  # pragma: no cover - numpy fallback kernels: nothing to limit
            return fn(*args, **kwargs)
        before = numba.get_num_threads()
        numba.set_num_threads(max(1, min(want, numba.config.NUMBA_NUM_THREADS)))
        try:
            return fn(*args, **kwargs)
        finally:
            numba.set_num_threads(before)

    return wrapper


def _first_position(region: np.ndarray | None, scan_x: int) -> tuple[int, int]:
    j = 0 if region is None else int(np.flatnonzero(region)[0])
    return divmod(j, scan_x)


def _compute(*arrays, **compute_kwargs) -> tuple[np.ndarray, ...]:
    import dask

    out = dask.compute(*arrays, **compute_kwargs)
    out = tuple(np.asarray(a, dtype=np.float64) for a in out)
    for a in out:
        if not np.all(np.isfinite(a)):
            raise ValueError("data contain NaN or Inf (non-finite result of a reduction)")
    return out


def _stats_from_sums(s1: np.ndarray, s2: np.ndarray, shift: np.ndarray,
                     count: int) -> ColumnStats:
    d1 = s1 / count
    var = s2 / count - d1 * d1
    var = np.where(var > 0, var, 0.0)
    return ColumnStats(mean=shift + d1, std=np.sqrt(var), count=int(count))


def _blocks(x):
    """``(delayed block, (y0, y1), (x0, x1))`` for every block of a 4D dask array whose
    detector axes are whole (rechunked if needed)."""
    if len(x.chunks[2]) > 1 or len(x.chunks[3]) > 1:
        x = x.rechunk({2: -1, 3: -1})
    ys = np.concatenate([[0], np.cumsum(x.chunks[0])])
    xs = np.concatenate([[0], np.cumsum(x.chunks[1])])
    dl = x.to_delayed()
    for i in range(len(x.chunks[0])):
        for j in range(len(x.chunks[1])):
            yield dl[i, j, 0, 0], (int(ys[i]), int(ys[i + 1])), (int(xs[j]), int(xs[j + 1]))


@_on_worker_threads
def _block_sums(blk, t_blk, reg_blk, shift, fast, want_all):
    """Pass-1 partial sums of one block with the core kernels, stacked ``(2 + k [+ 2], n)``.

    Rows ``2 + i`` hold ``t̂_i ᵀ (D - shift)``; rows 0/1 the (region's) shifted sums and sums
    of squares; with ``want_all`` the last two rows those of all positions.
    """
    xb = np.asarray(blk)
    x = kernel_dtype_chunk(xb.reshape(xb.shape[0] * xb.shape[1], -1))
    n = x.shape[1]
    k = t_blk.shape[0]
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    out = np.zeros((2 + k + (2 if want_all else 0), n))
    rows = (np.arange(x.shape[0], dtype=np.int64) if reg_blk is None
            else np.flatnonzero(reg_blk).astype(np.int64))
    acc = np.zeros((k, n))
    stats_tprod(x, rows, np.ascontiguousarray(t_blk[:, rows]), shift, out[0], out[1], acc,
                fast=fast)
    out[2:2 + k] = acc
    if want_all:
        stats_tprod(x, np.arange(x.shape[0], dtype=np.int64), np.zeros((0, x.shape[0])), shift,
                    out[2 + k], out[3 + k], np.zeros((0, n)), fast=fast)
    return out


def _pass1(x, info, that, reg, want_all, compute_kwargs):
    """One dask pass of core-kernel partial sums over all blocks; returns (shift, sums).

    The shift (first pattern used) is computed on its own first: in the same ``compute`` as
    the block sums, dask's graph optimisation gave its read keys other than those of the
    blocks (``to_delayed``), so every chunk was read and decoded twice (measured with the
    task stream: 16 extra chunk reads per pass 1).
    """
    import dask

    iy, ix = _first_position(reg, info.scan_shape[1])
    (c,) = _compute(x[iy, ix].astype(np.float64), **compute_kwargs)
    shift = dask.delayed(c, pure=True)
    fast = fast_for(info.m * info.n)
    k = 0 if that is None else that.shape[0]
    t3 = (np.zeros((0, *info.scan_shape)) if that is None
          else that.reshape((k, *info.scan_shape)))
    reg2 = None if reg is None else reg.reshape(info.scan_shape)
    parts = []
    for blk, (y0, y1), (x0, x1) in _blocks(x):
        t_blk = np.ascontiguousarray(t3[:, y0:y1, x0:x1].reshape(k, (y1 - y0) * (x1 - x0)))
        r_blk = None if reg2 is None else reg2[y0:y1, x0:x1].reshape(-1)
        parts.append(dask.delayed(_block_sums)(blk, t_blk, r_blk, shift, fast, want_all))
    while len(parts) > 1:  # tree reduction: only (2 + k, n) sums travel
        parts = [dask.delayed(np.add)(parts[i], parts[i + 1]) if i + 1 < len(parts)
                 else parts[i] for i in range(0, len(parts), 2)]
    (sums,) = _compute(parts[0], **compute_kwargs)
    return c, sums.reshape(sums.shape[0], *info.det_shape)


def _stats_and_products(data, template, normalisation, region, all_stats, compute_kwargs,
                        valid=None):
    """Pass 1 as one dask computation: region stats, ``t̂ᵀ(D - c)``, optional all-position stats.

    Every block is reduced by the core's compiled kernels where it lives; only ``(2 + k, n)``
    float64 partial sums travel.  t̂ is zero outside the region and zero-mean inside, so
    ``t̂ᵀ(D - c) = t̂ᵀD = t̂ᵀ(D - mean)`` for any shift ``c``.
    """
    info, single, reg, val, that = _prepare_templates(data, template, normalisation, region,
                                                      valid)
    x = as_dask(data)
    want_all = all_stats and reg is not None
    c, sums = _pass1(x, info, that, reg, want_all, compute_kwargs)
    k = that.shape[0]
    count = info.m if reg is None else int(reg.sum())
    stats = _restrict_stats(_stats_from_sums(sums[0], sums[1], c, count), val)
    all_st = stats if reg is None else (
        _restrict_stats(_stats_from_sums(sums[2 + k], sums[3 + k], c, info.m), val)
        if want_all else None)
    products = SimpleNamespace(acc=sums[2:2 + k].reshape(k, info.n), count=count)
    r = _pcc_from(products, stats, normalisation).reshape((-1, *info.det_shape))
    return (r[0] if single else r), stats, all_st


def column_stats(data: Any, *, region: Any = None, valid: Any = None,
                 **compute_kwargs) -> ColumnStats:
    """Column (pixel-STEM image) mean and population std as one dask computation.

    Parameters
    ----------
    data : array-like
        4D ``[scan_y, scan_x, ky, kx]`` (dask arrays are used as they are chunked).
    region : bool array (scan_y, scan_x), optional
        Only these probe positions are used.
    valid : bool array (ky, kx), optional
        Detector pixels to use; the others get ``std = 0`` (as in the core).
    **compute_kwargs
        Passed to ``dask.compute`` (e.g. ``scheduler=``); by default an active
        ``distributed.Client`` is used.

    Returns
    -------
    ColumnStats
        As :func:`tmask_validate.core.column_stats` (float64 ``(ky, kx)`` mean and std).
    """
    info = check_data(data)
    reg = _check_region(region, info)
    val = _check_valid(valid, info)
    c, sums = _pass1(as_dask(data), info, None, reg, False, compute_kwargs)
    count = info.m if reg is None else int(reg.sum())
    return _restrict_stats(_stats_from_sums(sums[0], sums[1], c, count), val)


def pcc_mask(data: Any, template: Any, *, normalisation: str = "pcc", region: Any = None,
             valid: Any = None, **compute_kwargs) -> np.ndarray:
    """PCC mask(s) of template image(s) with every pixel-STEM image, as a dask graph.

    Same semantics as :func:`tmask_validate.core.pcc_mask` (Eqs. 4-6, 8, 9): ``template`` is
    ``(scan_y, scan_x)`` or ``(k, scan_y, scan_x)``; ``normalisation`` ``"pcc"`` or ``"mean"``;
    ``region`` restricts the template normalisation, column statistics and correlation to a
    subset of probe positions (partial templates); zero-variance columns, and detector pixels
    outside ``valid`` (bool ``(ky, kx)``), give 0.

    Returns
    -------
    ndarray
        ``(ky, kx)`` or ``(k, ky, kx)`` float64.
    """
    r, _, _ = _stats_and_products(data, template, normalisation, region, False, compute_kwargs,
                                  valid)
    return r


@_on_worker_threads
def _block_apply(blk, mu, w, plan):
    """Pass-2 image rows ``(by, bx, k)`` of one block with the core kernel."""
    xb = np.asarray(blk)
    x = kernel_dtype_chunk(xb.reshape(xb.shape[0] * xb.shape[1], -1))
    out = np.empty((x.shape[0], w.shape[0]))
    if plan is not None and plan.dtype != x.dtype:
        plan = ApplyPlan(mu, w, x.dtype)
    apply_weights(x, mu, w, out, plan=plan)
    return out.reshape(xb.shape[0], xb.shape[1], w.shape[0])


def _apply(data, w: np.ndarray, mu: np.ndarray, info, compute_kwargs) -> np.ndarray:
    """``(D - mu) @ wᵀ`` as one dask pass of core-kernel blocks; returns ``(k, scan_y, scan_x)``."""
    import dask
    import dask.array as da

    x = as_dask(data)
    w = np.ascontiguousarray(w, dtype=np.float64)
    mu = np.ascontiguousarray(mu, dtype=np.float64)
    k = w.shape[0]
    plan = ApplyPlan(mu, w, np.dtype(info.dtype).newbyteorder("=")) if fast_for(
        info.m * info.n) else None
    rows: list[list] = []
    last_y0 = None
    for blk, (y0, y1), (x0, x1) in _blocks(x):
        if y0 != last_y0:
            rows.append([])
            last_y0 = y0
        part = dask.delayed(_block_apply)(blk, mu, w, plan)
        rows[-1].append(da.from_delayed(part, shape=(y1 - y0, x1 - x0, k), dtype=np.float64))
    img = da.concatenate([da.concatenate(r, axis=1) for r in rows], axis=0)
    (out,) = _compute(img, **compute_kwargs)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def apply_mask(data: Any, mask: Any, *, normalised: bool = True, normalisation: str = "pcc",
               threshold: float | None = None, stats: ColumnStats | None = None,
               valid: Any = None, **compute_kwargs) -> np.ndarray:
    """Apply detector mask(s) to every pattern (Eq. 7, or Eq. 2 raw), as a dask graph.

    Same semantics as :func:`tmask_validate.core.apply_mask`: with ``normalised`` the columns
    are normalised with all-position statistics (computed here in one extra dask pass unless
    ``stats`` is given), ``threshold`` zeroes mask values ``<= threshold`` first, zero-variance
    columns and detector pixels outside ``valid`` contribute nothing; the result is the plain
    sum over detector pixels.

    Returns
    -------
    ndarray
        ``(scan_y, scan_x)`` or ``(k, scan_y, scan_x)`` float64.
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    w, single, val = _apply_weights(mask, info, threshold, valid)
    if normalised:
        if stats is None:
            stats = column_stats(data, **compute_kwargs)
        else:
            stats = _check_stats(stats, info)
        stats = _restrict_stats(stats, val)
        wn = _weights_for(w, stats, normalisation)
        mu = stats.mean.reshape(-1)
    else:
        wn, mu = w, np.zeros(info.n)
    img = _apply(data, wn, mu, info, compute_kwargs).reshape((-1, *info.scan_shape))
    return img[0] if single else img


def template_mask_image(data: Any, template: Any, *, normalisation: str = "pcc",
                        region: Any = None, threshold: float | None = None,
                        valid: Any = None,
                        **compute_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """PCC mask from a template and the image it gives, in two dask passes.

    As :func:`tmask_validate.core.template_mask_image`: pass 1 gives the mask (statistics of
    ``region``) and the all-position statistics together; pass 2 applies the mask (Eq. 7).

    Returns
    -------
    mask, image : ndarray
        ``(ky, kx)`` and ``(scan_y, scan_x)`` float64 (stacks for a template stack).
    """
    r, _, all_st = _stats_and_products(data, template, normalisation, region, True,
                                       compute_kwargs, valid)
    img = apply_mask(data, r, normalised=True, normalisation=normalisation,
                     threshold=threshold, stats=all_st, valid=valid, **compute_kwargs)
    return r, img


# ----------------------------------------------------------------------------- cross-fitting
__all__ += ["crossfit_template_image"]


@_on_worker_threads
def _crossfit_block_sums(block, lab, t, shift, k_folds: int) -> dict:
    """Per-fold ``[count, Σy, Σy², Σ t⁰y]`` of one 4D block, for the folds present in it."""
    from .core._crossfit import _fold_sums
    from .core._stream import kernel_dtype_chunk

    bsy, bsx, ky, kx = block.shape
    x = kernel_dtype_chunk(np.asarray(block).reshape(bsy * bsx, ky * kx))
    lab = np.ascontiguousarray(np.asarray(lab).reshape(-1), dtype=np.int64)
    t = np.ascontiguousarray(np.asarray(t).reshape(t.shape[0], -1))
    present = np.unique(lab[lab >= 0])
    if present.size == 0:
        return {}
    local = np.full(k_folds, -1, dtype=np.int64)  # fold -> row of the block's accumulators
    local[present] = np.arange(present.size)
    lab_local = np.where(lab >= 0, local[np.maximum(lab, 0)], -1)
    n = ky * kx
    s1 = np.zeros((present.size, n))
    s2 = np.zeros((present.size, n))
    tp = np.zeros((present.size, t.shape[0], n))
    _fold_sums(x, lab_local, t, np.asarray(shift, dtype=np.float64).reshape(-1), s1, s2, tp)
    cnt = np.bincount(lab_local[lab_local >= 0], minlength=present.size)
    return {int(f): [int(cnt[i]), s1[i], s2[i], tp[i]] for i, f in enumerate(present)}


def _merge_fold_sums(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for f, vals in part.items():
            if f in out:
                out[f] = [a + b for a, b in zip(out[f], vals, strict=True)]
            else:
                out[f] = list(vals)
    return out


@_on_worker_threads
def _crossfit_block_apply(block, lab, mean, w) -> np.ndarray:
    """``(x_j - mean_f) @ w_fᵀ`` for the block's used rows; ``(nw, bsy, bsx)``, NaN unused."""
    from .core._crossfit import _fold_apply
    from .core._stream import kernel_dtype_chunk

    bsy, bsx, ky, kx = block.shape
    x = kernel_dtype_chunk(np.asarray(block).reshape(bsy * bsx, ky * kx))
    lab = np.ascontiguousarray(np.asarray(lab).reshape(-1), dtype=np.int64)
    out = np.full((bsy * bsx, w.shape[1]), np.nan)
    _fold_apply(x, lab, mean, w, out)
    return np.ascontiguousarray(out.T).reshape(w.shape[1], bsy, bsx)


def crossfit_template_image(data: Any, template: Any, folds: Any, *,
                            normalisation: str = "pcc", valid: Any = None,
                            in_sample: bool = False,
                            **compute_kwargs) -> tuple[np.ndarray, ...]:
    """Cross-fitted (held-out) PCC masks and image, in two dask passes.

    Same arguments, semantics and return values as
    :func:`tmask_validate.core.crossfit_template_image` (fold ``f``'s mask fitted on the
    positions outside ``f``; negative labels unused, NaN in the image).  Pass 1 reduces
    per-fold sums block by block (each scan block returns sums only for the folds it holds,
    summed in a tree), pass 2 applies each fold's mask to its own patterns where the blocks
    live; only detector-sized and scan-sized float64 arrays travel.  The detector axes are
    merged into one chunk per scan block if the input cuts them.

    ``**compute_kwargs`` go to ``dask.compute`` (e.g. ``scheduler=``); by default an active
    ``distributed.Client`` is used.
    """
    import dask

    from .core._crossfit import _finish, _fold_weights, _prepare_crossfit

    plan = _prepare_crossfit(data, template, folds, normalisation, valid)
    info, k_folds = plan.info, plan.k_folds
    sy, sx = info.scan_shape
    x = as_dask(data)
    if len(x.chunks[2]) > 1 or len(x.chunks[3]) > 1:
        x = x.rechunk({2: -1, 3: -1})
    lab2 = plan.lab.reshape(sy, sx)
    t3 = plan.t0.reshape(-1, sy, sx)
    j0 = int(np.flatnonzero(plan.lab >= 0)[0])
    (shift,) = _compute(x[j0 // sx, j0 % sx].astype(np.float64), **compute_kwargs)  # (see _pass1)
    blocks = x.to_delayed()[:, :, 0, 0]
    ys = np.concatenate([[0], np.cumsum(x.chunks[0])])
    xs = np.concatenate([[0], np.cumsum(x.chunks[1])])
    spans = [(i, j, slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
             for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]

    # pass 1: per-fold sums, block by block, merged in a tree
    shift_d = dask.delayed(shift, pure=True)
    parts = [dask.delayed(_crossfit_block_sums, pure=True)(
        blocks[i, j], lab2[a, b], t3[:, a, b], shift_d, k_folds) for i, j, a, b in spans]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_fold_sums, pure=True)(*parts[q:q + 8])
                 for q in range(0, len(parts), 8)]
    (merged,) = dask.compute(parts[0], **compute_kwargs)
    c = shift
    count = np.array([merged[f][0] for f in range(k_folds)], dtype=np.int64)
    s1 = np.stack([merged[f][1] for f in range(k_folds)])
    s2 = np.stack([merged[f][2] for f in range(k_folds)])
    tp = np.stack([merged[f][3] for f in range(k_folds)])
    del merged
    if not all(np.all(np.isfinite(a)) for a in (s1, s2, tp)):
        raise ValueError("data contain NaN or Inf (non-finite result of a reduction)")
    weights = _fold_weights(plan, count, s1, s2, tp, np.asarray(c, dtype=np.float64).reshape(-1),
                            in_sample)
    del s1, s2, tp

    # pass 2: each fold's mask on its own patterns, where the blocks live
    mean_d = dask.delayed(weights.mean, pure=True)
    w_d = dask.delayed(weights.w, pure=True)
    outs = dask.compute(*[dask.delayed(_crossfit_block_apply, pure=True)(
        blocks[i, j], lab2[a, b], mean_d, w_d) for i, j, a, b in spans], **compute_kwargs)
    img = np.full((weights.w.shape[1], sy, sx), np.nan)
    for (_, _, a, b), blk in zip(spans, outs, strict=True):
        img[:, a, b] = blk
    img = img.reshape(weights.w.shape[1], -1)
    if not np.all(np.isfinite(img[:, plan.lab >= 0])):
        raise ValueError("data contain NaN or Inf (non-finite result of a reduction)")
    return _finish(plan, weights, img)
