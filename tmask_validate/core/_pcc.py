"""PCC masks, normalised mask application and the eigen-image (paper Eqs. 2-10).

Notation follows the paper: ``D`` is the ``m x n`` matrix of Eq. 1 (rows = diffraction
patterns, columns = pixel-STEM images ``s_k``), ``D̂`` has each column normalised by Eq. 4
(``(s_k - mean_k) / std_k``, population std) or, for ``normalisation="mean"``, by Eq. 8
(additionally divided by ``mean_k``).  ``D̂`` is never formed: every result is accumulated in
float64 while streaming row chunks of ``D`` (see :mod:`._stream`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._kernels import ApplyPlan, apply_weights, fast_for, run_sums, stats_tprod
from ._stream import DataInfo, check_data, check_finite_result, iter_row_chunks

NORMALISATIONS = ("pcc", "mean")


@dataclass(frozen=True)
class ColumnStats:
    """Statistics of the pixel-STEM images (columns of D).

    Attributes
    ----------
    mean : ndarray
        Column means, ``(ky, kx)`` float64.
    std : ndarray
        Column population standard deviations (ddof=0), ``(ky, kx)`` float64.
    count : int
        Number of probe positions the statistics were taken over.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int

    @property
    def valid(self) -> np.ndarray:
        """Columns with non-zero variance (bool ``(ky, kx)``)."""
        return self.std > 0


#: patterns (evenly spaced, first and last included) whose digests identify a dataset
DIGEST_ROWS = 17


def _row_digest(row: np.ndarray) -> bytes:
    """Digest of one pattern as the kernels read it (identifies the dataset a mask came from)."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


def _digest_rows(m: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, m - 1, DIGEST_ROWS)).astype(np.int64))


def _chunk_digests(x: np.ndarray, r0: int, rows: np.ndarray) -> dict[int, bytes]:
    """Digests of the sampled patterns that lie in the chunk starting at row ``r0``."""
    sel = rows[(rows >= r0) & (rows < r0 + x.shape[0])]
    return {int(j): _row_digest(x[j - r0]) for j in sel}


class PCCMask(np.ndarray):
    """A PCC mask (plain float64 ndarray) that also carries the data's column statistics.

    :func:`pcc_mask` returns one.  ``column_stats`` are the all-position statistics of the
    dataset the mask was computed from (without ``valid`` restriction), gathered in the
    mask's own pass, so ``apply_mask(data, pcc_mask(data, t))`` reads the data twice, not
    three times.  :func:`apply_mask` uses them only after checking, while it streams, that
    :data:`DIGEST_ROWS` evenly spaced patterns (first and last included) of the data it is
    given are those the statistics came from (digests); at the first mismatch it computes
    fresh statistics (one more pass) -- same result either way.  Data that differ from the
    mask's only in other patterns (e.g. edited in place between the two calls) would go
    unnoticed: pass ``stats=`` or ``np.asarray(mask)`` then.  Slices, copies and arithmetic
    keep the statistics (they describe the data, not the mask values); ``np.asarray(mask)``
    drops them.
    """

    column_stats: ColumnStats | None
    source_digest: dict[int, bytes] | None

    def __new__(cls, values: np.ndarray, column_stats: ColumnStats | None,
                source_digest: dict[int, bytes] | None) -> PCCMask:
        obj = np.asarray(values, dtype=np.float64).view(cls)
        obj.column_stats = column_stats
        obj.source_digest = source_digest
        return obj

    def __array_finalize__(self, obj) -> None:
        self.column_stats = getattr(obj, "column_stats", None)
        self.source_digest = getattr(obj, "source_digest", None)

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        out = super().__array_wrap__(arr, context, return_scalar)
        if isinstance(out, np.ndarray) and out.ndim == 0:
            return out.view(np.ndarray)[()]
        return out

    def __reduce__(self):  # pickles (and multiprocessing) as a plain ndarray
        return np.asarray(self).__reduce__()


# ----------------------------------------------------------------------------- validation
def _check_normalisation(normalisation: str) -> str:
    if normalisation not in NORMALISATIONS:
        raise ValueError(
            f"unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}"
        )
    return normalisation


def _check_region(region: Any, info: DataInfo) -> np.ndarray | None:
    """Return the region as a flat bool (m,) array (None = all positions)."""
    if region is None:
        return None
    reg = np.asarray(region)
    if reg.shape != info.scan_shape:
        raise ValueError(
            f"region shape {reg.shape} does not match the scan shape {info.scan_shape}"
        )
    if reg.dtype != bool:
        if not np.all(np.isin(reg, (0, 1))):
            raise ValueError("region must be boolean (or 0/1)")
        reg = reg.astype(bool)
    if not reg.any():
        raise ValueError("region is empty: it selects no probe position")
    return reg.reshape(-1)


def _check_valid(valid: Any, info: DataInfo) -> np.ndarray | None:
    """Return the valid-pixel mask as a flat bool (n,) array (None = every pixel valid)."""
    if valid is None:
        return None
    v = np.asarray(valid)
    if v.shape != info.det_shape:
        raise ValueError(
            f"valid shape {v.shape} does not match the detector shape {info.det_shape}"
        )
    if v.dtype != bool:
        if v.dtype.kind not in "uifb" or not np.all(np.isin(v, (0, 1))):
            raise ValueError("valid must be boolean (or 0/1)")
        v = v.astype(bool)
    if not v.any():
        raise ValueError("valid is empty: it selects no detector pixel")
    return v.reshape(-1)


def _restrict_stats(stats: ColumnStats, valid: np.ndarray | None) -> ColumnStats:
    """Stats with the std of invalid pixels set to 0 (treated as zero-variance columns)."""
    if valid is None or valid.all():
        return stats
    std = np.where(valid.reshape(stats.std.shape), stats.std, 0.0)
    return ColumnStats(mean=stats.mean, std=std, count=stats.count)


def _check_stack(arr: Any, what: str, shape: tuple[int, int], shape_name: str,
                 size: int) -> tuple[np.ndarray, bool]:
    """Return one image or a stack of ``shape`` images as float64 ``(k, size)``.

    Also returns whether a single image was given; ``what`` names the input in error messages.
    """
    a = np.asarray(arr)
    if a.dtype.kind not in "uifb":
        raise TypeError(f"{what} must be real-valued, got dtype {a.dtype}")
    single = a.ndim == 2
    if single:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != shape:
        raise ValueError(
            f"{what} shape {np.shape(arr)} must be the {shape_name} shape {shape} "
            f"or a stack (k, {shape[0]}, {shape[1]})"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{what} stack is empty")
    a = a.astype(np.float64).reshape(a.shape[0], size)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or Inf")
    return a, single


def _check_templates(template: Any, info: DataInfo) -> tuple[np.ndarray, bool]:
    """Return templates as float64 (k, m) and whether a single template was given."""
    return _check_stack(template, "template", info.scan_shape, "scan", info.m)


def _check_masks(mask: Any, info: DataInfo) -> tuple[np.ndarray, bool]:
    """Return masks as float64 (k, n) and whether a single mask was given."""
    return _check_stack(mask, "mask", info.det_shape, "detector", info.n)


def _standardise_templates(t: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """Zero-mean, unit population std over the region; zero outside. (k, m) float64."""
    sel = np.ones(t.shape[1], bool) if region is None else region
    ts = t[:, sel]
    mean = ts.mean(axis=1, keepdims=True)
    dev = ts - mean
    std = np.sqrt(np.mean(dev * dev, axis=1, keepdims=True))
    scale = np.max(np.abs(ts), axis=1, keepdims=True)
    bad = ~(std[:, 0] > 1e-12 * np.maximum(scale[:, 0], np.finfo(float).tiny))
    if np.any(bad):
        which = np.flatnonzero(bad).tolist()
        raise ValueError(
            f"template(s) {which} have zero variance over the probe positions used "
            "(a constant template correlates with nothing)"
        )
    out = np.zeros_like(t)
    out[:, sel] = dev / std
    return out


# ----------------------------------------------------------------------------- passes
def _first_shift(x: np.ndarray, rows: np.ndarray, fast: bool) -> np.ndarray:
    """Per-column shift subtracted before the sums (tames cancellation in the variance).

    float64 kernels (and float64 data): the first pattern, which keeps constant columns at
    exactly zero variance.  float32 tiles: the mean of the first (up to 32) patterns,
    rounded to an integer for integer data and to float32 for float32 data -- exact on
    constant columns as well, and within ~σ/6 of the column mean, so that the float32
    sums of squares lose no digits to the subtraction ``s2/c - (s1/c)²``.
    """
    if not fast or x.dtype == np.float64:
        return x[rows[0]].astype(np.float64)
    use = rows[:32]
    head = np.zeros(x.shape[1])
    for r in use:  # row by row: no (rows, n) temporary
        head += x[r]
    head /= use.size
    if x.dtype.kind in "ui":
        return np.round(head)
    return head.astype(np.float32).astype(np.float64)


class _Acc:
    """Float64 accumulators of one stats(+template products) pass over a row subset."""

    def __init__(self, n: int, k: int, fast: bool = False) -> None:
        self.fast = fast
        self.s1 = np.zeros(n)
        self.s2 = np.zeros(n)
        self.acc = np.zeros((k, n))
        self.shift: np.ndarray | None = None
        self.count = 0
        self.digest: dict[int, bytes] | None = None

    def add(self, x: np.ndarray, rows: np.ndarray, t: np.ndarray) -> None:
        if rows.size == 0:
            return
        if self.shift is None:
            self.shift = _first_shift(x, rows, self.fast)
        stats_tprod(x, rows, t, self.shift, self.s1, self.s2, self.acc, fast=self.fast)
        self.count += rows.size

    def stats(self, det_shape: tuple[int, int]) -> ColumnStats:
        check_finite_result(self.s1, self.s2, self.acc)
        c = self.count
        d1 = self.s1 / c
        var = self.s2 / c - d1 * d1
        var = np.where(var > 0, var, 0.0)
        mean = self.shift + d1
        return ColumnStats(mean=mean.reshape(det_shape), std=np.sqrt(var).reshape(det_shape),
                           count=c)


def _pass_stats_products(
    data: Any,
    info: DataInfo,
    that: np.ndarray | None,
    region: np.ndarray | None,
    *,
    all_stats: bool,
    chunk_bytes: int | None,
) -> tuple[_Acc, _Acc | None]:
    """One pass: region stats + template products, and optionally all-position stats."""
    k = 0 if that is None else that.shape[0]
    fast = fast_for(info.m * info.n)
    main = _Acc(info.n, k, fast)
    extra = _Acc(info.n, 0, fast) if (all_stats and region is not None) else None
    empty_t = np.zeros((0, 0))
    sample = _digest_rows(info.m)
    digest: dict[int, bytes] = {}
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        r1 = r0 + x.shape[0]
        digest.update(_chunk_digests(x, r0, sample))
        if region is None:
            rows = np.arange(x.shape[0], dtype=np.int64)
        else:
            rows = np.flatnonzero(region[r0:r1]).astype(np.int64)
        t = np.zeros((0, rows.size)) if that is None else np.ascontiguousarray(
            that[:, r0:r1][:, rows])
        main.add(x, rows, t)
        if extra is not None:
            extra.add(x, np.arange(x.shape[0], dtype=np.int64), empty_t.reshape(0, x.shape[0]))
    main.digest = digest
    return main, extra


def _pcc_from(acc: _Acc, stats: ColumnStats, normalisation: str) -> np.ndarray:
    """PCC (or PCC / mean) maps (k, n) from template products and column stats."""
    std = stats.std.reshape(-1)
    mean = stats.mean.reshape(-1)
    good = std > 0
    r = np.zeros_like(acc.acc)
    r[:, good] = acc.acc[:, good] / (acc.count * std[good])
    np.clip(r, -1.0, 1.0, out=r)
    if normalisation == "mean":
        good_m = good & (mean != 0)
        r[:, ~good_m] = 0.0
        r[:, good_m] /= mean[good_m]
    return r


def _column_scale(mean: np.ndarray, std: np.ndarray, normalisation: str) -> np.ndarray:
    """1/σ (Eq. 4) or 1/(σ·mean) (Eq. 8) per column; 0 where σ (or the mean) is 0."""
    scale = np.zeros_like(std)
    good = std > 0
    if normalisation == "mean":
        good &= mean != 0
        scale[good] = 1.0 / (std[good] * mean[good])
    else:
        scale[good] = 1.0 / std[good]
    return scale


def _weights_for(w: np.ndarray, stats: ColumnStats, normalisation: str) -> np.ndarray:
    """Per-column weights that turn ``(x - mean) @ w`` into ``D̂ @ mask``."""
    scale = _column_scale(stats.mean.reshape(-1), stats.std.reshape(-1), normalisation)
    return np.ascontiguousarray(w * scale)


#: few-valued masks (e.g. binary virtual detectors) use column runs when there are at least
#: RUN_MIN_MASKS masks (below that the dense kernel is faster; measured), at most
#: RUN_MAX_LABELS distinct per-pixel weight vectors and runs this long on average
RUN_MIN_MASKS = 8
RUN_MAX_LABELS = 256
#: with the float32 tiles the dense kernel beats the run sums up to this many masks (measured:
#: 16 binary segments 1.6x faster dense)
RUN_MIN_MASKS_TILES = 32
RUN_MIN_MEAN_LENGTH = 8


def _run_plan(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Column runs for masks with few distinct per-pixel weight vectors, else None.

    Returns ``(starts, labels, unique_weights)`` such that ``x @ w.T`` equals
    ``(per-label run sums of x) @ unique_weights`` -- exact up to summation order, with one
    addition per data element whatever the number of masks.
    """
    k, n = w.shape
    if n < 2 * RUN_MIN_MEAN_LENGTH or k < RUN_MIN_MASKS:
        return None
    if np.unique(w[0]).size > RUN_MAX_LABELS:  # cheap rejection of weighted masks
        return None
    uniq, inverse = np.unique(w.T, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if uniq.shape[0] > RUN_MAX_LABELS:
        return None
    change = np.flatnonzero(inverse[1:] != inverse[:-1]) + 1
    starts = np.concatenate([[0], change, [n]]).astype(np.int64)
    if n / (starts.size - 1) < RUN_MIN_MEAN_LENGTH:
        return None
    labels = inverse[starts[:-1]].astype(np.int64)
    return starts, labels, np.ascontiguousarray(uniq)


class _StaleStats(Exception):
    """The data streamed are not those a mask's carried statistics came from."""


def _check_digest(x: np.ndarray, r0: int, m: int, expect: dict[int, bytes] | None) -> None:
    if expect is None:
        return
    for j, dig in _chunk_digests(x, r0, _digest_rows(m)).items():
        if expect.get(j) != dig:
            raise _StaleStats


def _pass_apply(
    data: Any, info: DataInfo, w: np.ndarray, mu: np.ndarray, chunk_bytes: int | None,
    expect: dict[int, bytes] | None = None,
) -> np.ndarray:
    """One pass: ``(D - mu) @ w.T`` as (k, m) float64.

    Raw data (``mu == 0``) with few-valued masks (binary virtual detectors) go through the
    column-run kernel; everything else through the dense multiply-add kernel.  ``expect``:
    digests of the sampled patterns the statistics behind ``mu``/``w`` came from
    (:class:`_StaleStats` is raised as soon as the data streamed differ).
    """
    out = np.empty((info.m, w.shape[0]))
    w = np.ascontiguousarray(w, dtype=np.float64)
    mu = np.ascontiguousarray(mu, dtype=np.float64).reshape(-1)
    fast = fast_for(info.m * info.n)
    plan = None
    if not np.any(mu) and (not fast or w.shape[0] >= RUN_MIN_MASKS_TILES):
        plan = _run_plan(w)
    if plan is not None:
        starts, labels, uniq = plan
        for r0, x in iter_row_chunks(data, info, chunk_bytes):
            _check_digest(x, r0, info.m, expect)
            lab = np.empty((x.shape[0], uniq.shape[0]))
            run_sums(x, starts, labels, uniq.shape[0], lab)
            np.matmul(lab, uniq, out=out[r0 : r0 + x.shape[0]])
    else:
        tiles = None
        for r0, x in iter_row_chunks(data, info, chunk_bytes):
            _check_digest(x, r0, info.m, expect)
            if fast and (tiles is None or x.dtype != tiles.dtype):
                tiles = ApplyPlan(mu, w, x.dtype)  # once (per chunk dtype)
            apply_weights(x, mu, w, out[r0 : r0 + x.shape[0]], plan=tiles)
    check_finite_result(out)
    return np.ascontiguousarray(out.T)


def _check_stats(stats: Any, info: DataInfo) -> ColumnStats:
    if not isinstance(stats, ColumnStats):
        raise TypeError(f"stats must be a ColumnStats, got {type(stats).__name__}")
    if stats.mean.shape != info.det_shape or stats.std.shape != info.det_shape:
        raise ValueError(
            f"stats are for detector shape {stats.mean.shape}, data have {info.det_shape}"
        )
    return stats


# ----------------------------------------------------------------------------- public API
def column_stats(
    data: Any, *, region: Any = None, valid: Any = None, chunk_bytes: int | None = None
) -> ColumnStats:
    """Mean and population std of every pixel-STEM image (column of D), one streaming pass.

    Parameters
    ----------
    data : array-like
        4D data ``[scan_y, scan_x, ky, kx]`` (numpy, memmap, zarr, dask).
    region : bool array (scan_y, scan_x), optional
        Only these probe positions are used.
    valid : bool array (ky, kx), optional
        Detector pixels to use (e.g. leave out pixels beyond a simulation's antialiasing
        aperture, whose tiny rounding-noise variance Eq. 4 would blow up to unit variance).
        Invalid pixels keep their mean but get ``std = 0``, so every normalised result
        treats them as zero-variance columns (they contribute nothing).
    chunk_bytes : int, optional
        Byte budget of one row chunk (default :data:`DEFAULT_CHUNK_BYTES`).

    Returns
    -------
    ColumnStats
        ``mean`` and ``std`` as ``(ky, kx)`` float64, ``count`` positions used.
    """
    info = check_data(data)
    reg = _check_region(region, info)
    val = _check_valid(valid, info)
    main, _ = _pass_stats_products(data, info, None, reg, all_stats=False,
                                   chunk_bytes=chunk_bytes)
    return _restrict_stats(main.stats(info.det_shape), val)


def _prepare_templates(data, template, normalisation, region, valid):
    """Check the inputs of a template pass; returns ``(info, single, region, valid, t̂)``.

    ``t̂`` is the ``(k, m)`` float64 stack standardised over the region (Eq. 4 for templates).
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    t, single = _check_templates(template, info)
    reg = _check_region(region, info)
    val = _check_valid(valid, info)
    return info, single, reg, val, _standardise_templates(t, reg)


def _pcc_mask_and_stats(data, template, normalisation, region, chunk_bytes, all_stats,
                        valid=None):
    info, single, reg, val, that = _prepare_templates(data, template, normalisation, region,
                                                      valid)
    main, extra = _pass_stats_products(data, info, that, reg, all_stats=all_stats,
                                       chunk_bytes=chunk_bytes)
    raw = main.stats(info.det_shape)
    stats = _restrict_stats(raw, val)
    r = _pcc_from(main, stats, normalisation).reshape((-1, *info.det_shape))
    raw_all = raw if reg is None else (extra.stats(info.det_shape) if extra else None)
    r = PCCMask(r[0] if single else r, raw_all, main.digest if raw_all is not None else None)
    all_st = None if raw_all is None else _restrict_stats(raw_all, val)
    return r, stats, all_st, info


def pcc_mask(
    data: Any,
    template: Any,
    *,
    normalisation: str = "pcc",
    region: Any = None,
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> np.ndarray:
    """PCC map (mask) of a template image with every pixel-STEM image (Eqs. 4-6, 8, 9).

    One streaming pass accumulates the column sums, shifted sums of squares and
    ``t̂ᵀ D`` together; with ``t̂`` zero-mean over the positions used,
    ``r_k = (t̂ᵀ D)_k / (m σ_k)``.

    Parameters
    ----------
    data : array-like
        4D data ``[scan_y, scan_x, ky, kx]``; uint8/16/32 or float32/64; numpy, memmap,
        zarr or dask.
    template : array-like
        Template image ``(scan_y, scan_x)`` or a stack ``(k, scan_y, scan_x)`` (all in the
        same pass).  Only its shape matters up to scale and offset.
    normalisation : {"pcc", "mean"}
        ``"pcc"``: Pearson r (Eq. 4, population std), values in ``[-1, 1]``.
        ``"mean"``: Eq. 8, the Pearson r of each column divided by that column's mean.
    region : bool array (scan_y, scan_x), optional
        Partial template: only these positions enter the template normalisation, the column
        statistics and the correlation.
    valid : bool array (ky, kx), optional
        Detector pixels to use; the mask is exactly 0 on the others (as on zero-variance
        columns).  See :func:`column_stats`.
    chunk_bytes : int, optional
        Byte budget of one row chunk.

    Returns
    -------
    PCCMask
        ``(ky, kx)`` or ``(k, ky, kx)`` float64 ndarray.  Columns with zero variance (or zero
        mean for ``"mean"``), and pixels outside ``valid``, give 0.  It also carries the
        data's all-position column statistics (``.column_stats``; with a ``region`` they are
        gathered in the same pass), which :func:`apply_mask` uses, after checking they belong
        to the data it is given, so that ``apply_mask(data, pcc_mask(data, t))`` makes two
        passes over the data.

    Raises
    ------
    ValueError
        Bad shapes, zero-variance or non-finite template, empty region, unknown
        normalisation, or NaN/Inf found in the data during the pass.
    """
    r, _, _, _ = _pcc_mask_and_stats(data, template, normalisation, region, chunk_bytes, True,
                                     valid)
    return r


def _apply_weights(mask, info, threshold, valid):
    """Checked mask stack with the threshold and the valid-pixel mask applied.

    Returns ``(w, single, valid)``: ``w`` is ``(k, n)`` float64, ``single`` whether one mask was
    given, ``valid`` the checked boolean pixel mask (or ``None``).
    """
    w, single = _check_masks(mask, info)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError("threshold must be finite")
        w = np.where(w > threshold, w, 0.0)
    val = _check_valid(valid, info)
    if val is not None:
        w = np.where(val[None], w, 0.0)
    return w, single, val


def apply_mask(
    data: Any,
    mask: Any,
    *,
    normalised: bool = True,
    normalisation: str = "pcc",
    threshold: float | None = None,
    stats: ColumnStats | None = None,
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> np.ndarray:
    """Apply a (weighted) detector mask to every diffraction pattern (Eqs. 2 and 7).

    Parameters
    ----------
    data : array-like
        4D data ``[scan_y, scan_x, ky, kx]``.
    mask : array-like
        ``(ky, kx)`` or a stack ``(k, ky, kx)``, all applied in one pass.
    normalised : bool
        True: Eq. 7, ``s = D̂ rᵀ`` with the columns of D normalised as in :func:`pcc_mask`
        (statistics over ALL probe positions).  False: Eq. 2, ``s = D rᵀ`` on the raw data.
    normalisation : {"pcc", "mean"}
        Column normalisation used when ``normalised`` (Eq. 4 or Eq. 8).
    threshold : float, optional
        Mask values ``<= threshold`` are set to 0 first (Fig. 2d uses ``threshold=0``).
    stats : ColumnStats, optional
        Precomputed all-position :func:`column_stats` (skips that pass).  Not needed for a
        mask from :func:`pcc_mask` of the same data: it carries them (see :class:`PCCMask`).
    valid : bool array (ky, kx), optional
        Detector pixels to use: the mask is set to 0 outside them (raw and normalised), so
        they contribute nothing.  See :func:`column_stats`.
    chunk_bytes : int, optional
        Byte budget of one row chunk.

    Returns
    -------
    ndarray
        ``(scan_y, scan_x)`` or ``(k, scan_y, scan_x)`` float64.  Scale: the plain sum
        over detector pixels, ``s_j = Σ_k D̂_jk r_k`` -- no ``1/m`` or ``1/n`` factor; with
        ``normalised=True`` the image has zero mean over the scan.  Zero-variance columns
        (and zero-mean columns for ``"mean"``) contribute nothing.
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    w, single, val = _apply_weights(mask, info, threshold, valid)
    expect = None
    if normalised:
        if stats is not None:
            st = _check_stats(stats, info)
        else:
            st = _carried_stats(mask, info)
            if st is None:
                st = column_stats(data, chunk_bytes=chunk_bytes)
            else:
                expect = mask.source_digest
        try:
            img = _apply_normalised(data, info, w, st, val, normalisation, chunk_bytes, expect)
        except _StaleStats:  # the mask came from other data: fresh statistics
            st = column_stats(data, chunk_bytes=chunk_bytes)
            img = _apply_normalised(data, info, w, st, val, normalisation, chunk_bytes, None)
    else:
        img = _pass_apply(data, info, w, np.zeros(info.n), chunk_bytes)
    img = img.reshape((-1, *info.scan_shape))
    return img[0] if single else img


def _carried_stats(mask: Any, info: DataInfo) -> ColumnStats | None:
    """The column statistics a :class:`PCCMask` carries, if they fit these data's shape."""
    st = getattr(mask, "column_stats", None) if isinstance(mask, PCCMask) else None
    if (st is None or mask.source_digest is None or st.count != info.m
            or st.mean.shape != info.det_shape):
        return None
    return st


def _apply_normalised(data, info, w, st, val, normalisation, chunk_bytes, expect):
    st = _restrict_stats(st, val)
    wn = _weights_for(w, st, normalisation)
    return _pass_apply(data, info, wn, st.mean.reshape(-1), chunk_bytes, expect)


def template_mask_image(
    data: Any,
    template: Any,
    *,
    normalisation: str = "pcc",
    region: Any = None,
    threshold: float | None = None,
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PCC mask from a template and the image it gives (Eq. 9 then Eq. 7), in two passes.

    Pass 1 computes the mask (with the statistics of the positions in ``region``) and, in
    the same pass, the all-position column statistics; pass 2 applies the mask to ``D̂``
    normalised with the all-position statistics.  ``valid`` (bool ``(ky, kx)``) restricts
    both to those detector pixels (see :func:`column_stats`).

    Returns
    -------
    mask, image : ndarray
        As :func:`pcc_mask` and :func:`apply_mask` (stacks if ``template`` is a stack).
    """
    r, _, all_st, _ = _pcc_mask_and_stats(data, template, normalisation, region, chunk_bytes,
                                          True, valid)
    img = apply_mask(data, r, normalised=True, normalisation=normalisation,
                     threshold=threshold, stats=all_st, valid=valid, chunk_bytes=chunk_bytes)
    return r, img


def _normalised_chunk(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) - mean) * scale


def _gram_times(data, info, v, s_all, mean, scale, chunk_bytes) -> np.ndarray:
    """One pass: ``D̂ᵀ (D̂ v)`` (or ``D̂ᵀ s_all`` if ``v`` is None) with the compiled kernels.

    Per chunk the image rows ``s_c = D̂_c v`` come from ``apply_weights`` and are folded back
    with ``stats_tprod`` (template = ``s_c``, shift = column means), so D̂ is never formed.
    """
    out = np.zeros((1, info.n))
    s1 = np.zeros(info.n)
    s2 = np.zeros(info.n)
    w = None if v is None else np.ascontiguousarray((v * scale)[None])
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        r = x.shape[0]
        if w is None:
            sc = np.ascontiguousarray(s_all[r0 : r0 + r][None])
        else:
            sc = np.empty((r, 1))
            apply_weights(x, mean, w, sc)
            sc = np.ascontiguousarray(sc.T)
        stats_tprod(x, np.arange(r, dtype=np.int64), sc, mean, s1, s2, out)
    check_finite_result(out, s1)
    return out[0] * scale


def eigen_image(
    data: Any,
    *,
    init: Any = None,
    normalisation: str = "pcc",
    n_iter: int = 200,
    tol: float = 1e-8,
    method: str = "auto",
    valid: Any = None,
    chunk_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Leading eigenvector of ``C = D̂ D̂ᵀ`` (the first principal component image, Eq. 10).

    Two strategies (``method``):

    ``"gram"`` (default when ``n = ky*kx <= 2048``)
        one pass accumulates the ``n x n`` matrix ``G = D̂ᵀ D̂`` in float64; its leading
        eigenvector (numpy ``eigh``) is the mask direction; a second pass gives the image.
    ``"power"``
        power iteration on the mask side, ``r <- D̂ᵀ (D̂ r)``: each iteration is ONE
        streaming pass (per chunk the image rows ``D̂_c r`` are formed and immediately folded
        back into ``D̂_cᵀ (D̂_c r)``) -- i.e. iterating Eq. 7 with Eq. 6.

    Parameters
    ----------
    init : array (scan_y, scan_x), optional
        Starting image for power iteration (e.g. a virtual ADF image); its PCC-type mask
        ``D̂ᵀ ŝ`` starts the iteration.  Default: a fixed pseudo-random image.
    normalisation : {"pcc", "mean"}
        Column normalisation of D̂ (Eq. 4 or 8).
    n_iter, tol : int, float
        Power iteration limits (relative change of the eigenvalue estimate).
    valid : bool array (ky, kx), optional
        Detector pixels to use: the other columns of D̂ are exactly 0 (as zero-variance
        columns), so the mask is 0 there.  See :func:`column_stats`.

    Returns
    -------
    image : ndarray (scan_y, scan_x)
        Unit-norm leading eigenvector ``s`` of ``C`` (``C s = λ s``), sign chosen so that the
        mask has a non-negative sum.
    mask : ndarray (ky, kx)
        ``r = sᵀ D̂`` (Eq. 6 with the eigen-image), so ``D̂ rᵀ = λ s`` (Eq. 7).
    eigenvalue : float
        ``λ``, the largest eigenvalue of ``C`` (= of ``D̂ᵀ D̂``).
    """
    info = check_data(data)
    _check_normalisation(normalisation)
    if method not in ("auto", "gram", "power"):
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'gram' or 'power'")
    if method == "auto":
        method = "gram" if info.n <= 2048 else "power"
    st = column_stats(data, valid=valid, chunk_bytes=chunk_bytes)
    scale = _weights_for(np.ones((1, info.n)), st, normalisation)[0]
    mean = st.mean.reshape(-1)
    if method == "gram":
        g = np.zeros((info.n, info.n))
        for _, x in iter_row_chunks(data, info, chunk_bytes, big_views=False):
            y = _normalised_chunk(x, mean, scale)  # float64 copy: keep chunks small
            g += y.T @ y
        check_finite_result(g)
        evals, evecs = np.linalg.eigh(g)
        lam = float(evals[-1])
        v = evecs[:, -1]
    else:
        if init is None:
            s0 = np.random.default_rng(0).standard_normal(info.m)
        else:
            s0 = np.asarray(init, dtype=np.float64)
            if s0.shape != info.scan_shape:
                raise ValueError(f"init shape {s0.shape} != scan shape {info.scan_shape}")
            s0 = s0.reshape(-1)
        if not np.all(np.isfinite(s0)):
            raise ValueError("init contains NaN or Inf")
        # starting mask r0 = D̂ᵀ s0 (one pass)
        v = _gram_times(data, info, None, s0, mean, scale, chunk_bytes)
        lam = 0.0
        for _ in range(n_iter):
            nv = np.linalg.norm(v)
            if not np.isfinite(nv):
                check_finite_result(v)
            if nv == 0:
                break
            v = v / nv
            gv = _gram_times(data, info, v, None, mean, scale, chunk_bytes)
            check_finite_result(gv)
            new_lam = float(v @ gv)
            done = abs(new_lam - lam) <= tol * max(abs(new_lam), np.finfo(float).tiny)
            lam, v = new_lam, gv
            if done:
                break
        nv = np.linalg.norm(v)
        v = v / nv if nv > 0 else v
    # image s = D̂ v / sqrt(λ) (unit norm); mask r = D̂ᵀ s = sqrt(λ) v
    s = _pass_apply(data, info, (v * scale)[None], mean, chunk_bytes)[0]
    ns = np.linalg.norm(s)
    s = s / ns if ns > 0 else s
    r = v * (ns if ns > 0 else 0.0)
    if r.sum() < 0:
        r, s = -r, -s
    return s.reshape(info.scan_shape), r.reshape(info.det_shape), lam
