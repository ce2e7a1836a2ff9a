"""Template images from atom-column site tables (paper Sec. 3.1-3.2).

A *template* is an image on the scan grid, shape ``(scan_y, scan_x)``, that marks the sites of
interest; :func:`tmask_validate.core.pcc_mask` correlates it with every pixel-STEM image to make a
PCC mask. This module builds templates from the site tables of :mod:`tmask_validate.structures`
(pandas DataFrames with columns ``label``, ``y_A``, ``x_A``, ...).

Geometry conventions (used by :mod:`tmask_validate.metrics` too)
------------------------------------------------------------------
- Scan pixel ``[i, j]`` is the probe position ``(y, x) = origin_A + (i * step_y, j * step_x)`` Å,
  i.e. pixel *centres* sit on the probe positions and ``origin_A`` is the position of pixel
  ``[0, 0]`` (``(0, 0)`` for our simulations: first probe at 0).
- Pixel coordinates are ``(y_px, x_px) = ((y_A - origin_y) / step_y, (x_A - origin_x) / step_x)``;
  they are floats (sub-pixel). The nearest pixel is ``floor(p + 0.5)`` (halves round up).
- Steps may differ in y and x. Radii and widths given in Å are converted per axis, so a disc of
  radius ``r`` Å is an ellipse in pixel units whenever ``step_y != step_x``.
- ``periodic=True`` means the scan covers whole projected unit cells, so the image is periodic
  with period ``shape * step_A``: positions are wrapped modulo the scan size, gaussians/discs wrap
  around the edges, and sites that coincide after wrapping (a column listed at ``x = 0`` and at
  ``x = L``) are counted once.
- ``region`` is a boolean ``(scan_y, scan_x)`` array (True = inside). Templates are zero outside
  it; pass the same array as ``region=`` to :func:`tmask_validate.core.pcc_mask` for a partial
  template (paper Sec. 3.2). :func:`box_region` makes a rectangular one.

Template kinds
--------------
``"binary"``
    1 at the nearest pixel of every site, 0 elsewhere (the paper's LiFePO4 templates).
``"disc"``
    1 at every pixel whose centre lies within ``radius`` of a site (always including the
    site's nearest pixel), 0 elsewhere.
``"gaussian"``
    sum over sites of ``exp(-0.5 * ((dy / sigma_y)**2 + (dx / sigma_x)**2))`` (peak value 1 for an
    isolated site; the paper's PbTiO3 templates). Truncated at ``truncate`` sigma.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "TEMPLATE_KINDS",
    "as_pair",
    "box_region",
    "check_region",
    "check_template",
    "dedupe_periodic_px",
    "make_template",
    "random_site_template",
    "random_sites",
    "shifted_sites",
    "sites_to_pixels",
    "species_templates",
    "template_set_attrs",
    "validate_sites",
    "wrap_sites",
]

#: template kinds understood by :func:`make_template`
TEMPLATE_KINDS = ("binary", "disc", "gaussian")
#: tolerance (pixels) below which two wrapped sites count as the same site
DEDUPE_TOL_PX = 1e-3


# --------------------------------------------------------------------------------------------
# small validators
# --------------------------------------------------------------------------------------------
def as_pair(value: Any, name: str, *, positive: bool = True) -> tuple[float, float]:
    """Return ``value`` (a number or a ``(y, x)`` pair) as a pair of finite floats.

    Parameters
    ----------
    value : float or sequence of 2 floats
        A scalar (used for both axes) or a ``(y, x)`` pair.
    name : str
        Parameter name for the error message.
    positive : bool
        Require both entries to be > 0.

    Returns
    -------
    tuple of float
        ``(y, x)``.

    Raises
    ------
    ValueError
        If ``value`` is not a finite scalar/pair (or not positive when required).
    """
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=float))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number or a (y, x) pair, got {value!r}") from exc
    if arr.size == 1:
        arr = np.repeat(arr.reshape(1), 2)
    if arr.shape != (2,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite number or a (y, x) pair, got {value!r}")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(arr[0]), float(arr[1])


def _as_shape(shape: Any) -> tuple[int, int]:
    try:
        sy, sx = (int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shape must be a (scan_y, scan_x) pair of ints, got {shape!r}") from exc
    if sy < 1 or sx < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return sy, sx


def validate_sites(sites: pd.DataFrame) -> pd.DataFrame:
    """Check a site table and return it (index reset, coordinates as float).

    Parameters
    ----------
    sites : pandas.DataFrame
        Site table with at least the columns ``label`` (str), ``y_A`` and ``x_A`` (Å).

    Returns
    -------
    pandas.DataFrame
        A copy with a fresh ``RangeIndex``, ``label`` as str and ``y_A``/``x_A`` as float64.

    Raises
    ------
    ValueError
        Missing columns, no rows, or non-finite coordinates.
    """
    if not isinstance(sites, pd.DataFrame):
        raise ValueError(f"sites must be a pandas DataFrame, got {type(sites).__name__}")
    missing = {"label", "y_A", "x_A"} - set(sites.columns)
    if missing:
        raise ValueError(f"site table lacks columns {sorted(missing)}")
    if len(sites) == 0:
        raise ValueError("site table is empty")
    out = sites.reset_index(drop=True).copy()
    out["label"] = out["label"].astype(str)
    for col in ("y_A", "x_A"):
        out[col] = out[col].astype(float)
        if not np.all(np.isfinite(out[col].to_numpy())):
            raise ValueError(f"site table column {col} has non-finite values")
    return out


def check_region(region: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """Validate an optional region mask.

    Parameters
    ----------
    region : array_like of bool, shape (scan_y, scan_x), or None
        True inside the region.
    shape : tuple of int
        Expected scan shape.

    Returns
    -------
    numpy.ndarray of bool or None

    Raises
    ------
    ValueError
        Wrong shape, non-boolean values or an empty region.
    """
    if region is None:
        return None
    reg = np.asarray(region)
    if reg.shape != tuple(shape):
        raise ValueError(f"region shape {reg.shape} does not match the scan shape {tuple(shape)}")
    if reg.dtype != bool:
        if not np.all(np.isin(reg, (0, 1))):
            raise ValueError("region must be boolean (True inside)")
        reg = reg.astype(bool)
    if not reg.any():
        raise ValueError("region is empty (no True pixel)")
    return reg


def box_region(
    shape: Sequence[int],
    y_px: tuple[int, int],
    x_px: tuple[int, int],
) -> np.ndarray:
    """Rectangular region mask for a partial template (paper Fig. 4b, blue box).

    Parameters
    ----------
    shape : (int, int)
        Scan shape ``(scan_y, scan_x)``.
    y_px, x_px : (int, int)
        Half-open pixel ranges ``[start, stop)`` along scan y and scan x.

    Returns
    -------
    numpy.ndarray of bool, shape (scan_y, scan_x)

    Raises
    ------
    ValueError
        If the box is empty or outside the scan.
    """
    sy, sx = _as_shape(shape)
    (y0, y1), (x0, x1) = (int(v) for v in y_px), (int(v) for v in x_px)
    y0, y1, x0, x1 = max(y0, 0), min(y1, sy), max(x0, 0), min(x1, sx)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"box {y_px}, {x_px} is empty inside a scan of shape {(sy, sx)}")
    reg = np.zeros((sy, sx), dtype=bool)
    reg[y0:y1, x0:x1] = True
    return reg


def check_template(template: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Raise unless ``template`` is a finite 2D image with non-zero variance (inside ``region``).

    A constant template has no Pearson correlation with anything, so
    :func:`tmask_validate.core.pcc_mask` cannot use it.

    Parameters
    ----------
    template : numpy.ndarray, shape (scan_y, scan_x)
    region : numpy.ndarray of bool or None
        Pixels over which the variance is taken (all pixels if None).

    Returns
    -------
    numpy.ndarray
        The template as float64.

    Raises
    ------
    ValueError
        Not 2D, non-finite values, or zero variance.
    """
    t = np.asarray(template, dtype=float)
    if t.ndim != 2:
        raise ValueError(f"template must be 2D (scan_y, scan_x), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("template has non-finite values")
    reg = check_region(region, t.shape)
    vals = t[reg] if reg is not None else t.ravel()
    if vals.size < 2 or np.ptp(vals) == 0:
        where = " inside the region" if reg is not None else ""
        raise ValueError(
            f"template has zero variance{where} (no site inside, or sites everywhere); "
            "it cannot define a PCC mask"
        )
    return t


# --------------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------------
def sites_to_pixels(
    sites: pd.DataFrame | np.ndarray,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """Convert site positions in Å to (sub-pixel) scan-pixel coordinates.

    Parameters
    ----------
    sites : pandas.DataFrame or array_like, shape (n, 2)
        Site table (columns ``y_A``, ``x_A``) or an array of ``(y, x)`` positions in Å.
    step_A : float or (float, float)
        Scan step ``(y, x)`` in Å.
    origin_A : (float, float)
        Position in Å of scan pixel ``[0, 0]``.

    Returns
    -------
    numpy.ndarray, shape (n, 2), float64
        ``(y_px, x_px)`` with ``y_px = (y_A - origin_y) / step_y`` (same for x).

    Raises
    ------
    ValueError
        Bad step/origin or positions.
    """
    step = np.array(as_pair(step_A, "step_A"))
    origin = np.array(as_pair(origin_A, "origin_A", positive=False))
    if isinstance(sites, pd.DataFrame):
        yx = validate_sites(sites)[["y_A", "x_A"]].to_numpy(dtype=float)
    else:
        yx = np.asarray(sites, dtype=float)
        if yx.ndim == 1 and yx.shape == (2,):
            yx = yx[None, :]
        if yx.ndim != 2 or yx.shape[1] != 2:
            raise ValueError(f"site positions must have shape (n, 2), got {yx.shape}")
        if not np.all(np.isfinite(yx)):
            raise ValueError("site positions must be finite")
    return (yx - origin) / step


def _nearest_px(yx_px: np.ndarray) -> np.ndarray:
    """Nearest pixel index (halves round up)."""
    return np.floor(yx_px + 0.5).astype(np.int64)


def dedupe_periodic_px(yx_px: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Wrap pixel positions into the periodic scan and drop duplicates.

    Two sites are duplicates when their wrapped positions agree to within
    ``DEDUPE_TOL_PX`` (1e-3 pixel) on the torus, e.g. a column listed both at ``x = 0`` and at
    ``x = L`` (the cell edge).

    Parameters
    ----------
    yx_px : numpy.ndarray, shape (n, 2)
        Pixel positions.
    shape : (int, int)
        Scan shape = the period in pixels.

    Returns
    -------
    wrapped : numpy.ndarray, shape (k, 2)
        Unique positions wrapped to ``[0, shape)``.
    keep : numpy.ndarray of int, shape (k,)
        Indices (into ``yx_px``) of the first occurrence of each unique site, sorted.
    """
    period = np.asarray(_as_shape(shape), dtype=float)
    yx = np.asarray(yx_px, dtype=float).reshape(-1, 2)
    wrapped = np.mod(yx, period)
    ticks = np.round(period / DEDUPE_TOL_PX).astype(np.int64)
    keys = np.mod(np.round(wrapped / DEDUPE_TOL_PX).astype(np.int64), ticks)
    _, keep = np.unique(keys, axis=0, return_index=True)
    keep = np.sort(keep)
    return wrapped[keep], keep


def wrap_sites(
    sites: pd.DataFrame,
    cell_A: float | Sequence[float],
    cell_origin_A: Sequence[float] = (0.0, 0.0),
) -> pd.DataFrame:
    """Fold site positions into one periodic cell and drop boundary duplicates.

    Parameters
    ----------
    sites : pandas.DataFrame
        Site table.
    cell_A : float or (float, float)
        Cell (period) size ``(Ly, Lx)`` in Å.
    cell_origin_A : (float, float)
        Corner of the cell in Å.

    Returns
    -------
    pandas.DataFrame
        Copy with ``y_A``, ``x_A`` in ``[origin, origin + L)`` and duplicates (same label and
        same wrapped position to within 1e-6 of the cell) removed; other columns kept.
    """
    s = validate_sites(sites)
    cell = np.array(as_pair(cell_A, "cell_A"))
    origin = np.array(as_pair(cell_origin_A, "cell_origin_A", positive=False))
    # work in units of 1/1000 cell so the pixel-tolerance dedupe applies
    frac = (s[["y_A", "x_A"]].to_numpy() - origin) / cell * 1000.0
    keep_all: list[int] = []
    wrapped = np.mod(frac, 1000.0)
    for _, idx in s.groupby("label", sort=False).indices.items():
        _, keep = dedupe_periodic_px(frac[idx], (1000, 1000))
        keep_all.extend(idx[keep].tolist())
    keep_all.sort()
    out = s.iloc[keep_all].copy()
    out[["y_A", "x_A"]] = wrapped[keep_all] / 1000.0 * cell + origin
    return out.reset_index(drop=True)


def shifted_sites(sites: pd.DataFrame, shift_A: float | Sequence[float]) -> pd.DataFrame:
    """Return a copy of ``sites`` moved by ``shift_A`` (a wrong-site control template).

    Parameters
    ----------
    sites : pandas.DataFrame
        Site table.
    shift_A : float or (float, float)
        Shift ``(dy, dx)`` in Å added to every site (a scalar shifts both axes).

    Returns
    -------
    pandas.DataFrame
        Same rows and labels, positions shifted. With ``periodic=True`` templates the shifted
        sites wrap around; otherwise sites shifted out of the scan are dropped by the template
        builders.
    """
    s = validate_sites(sites)
    dy, dx = as_pair(shift_A, "shift_A", positive=False)
    s["y_A"] = s["y_A"] + dy
    s["x_A"] = s["x_A"] + dx
    return s


# --------------------------------------------------------------------------------------------
# template construction
# --------------------------------------------------------------------------------------------
def _in_field(idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return (idx[:, 0] >= 0) & (idx[:, 0] < shape[0]) & (idx[:, 1] >= 0) & (idx[:, 1] < shape[1])


def _sites_in_scan(
    yx_px: np.ndarray,
    shape: tuple[int, int],
    *,
    periodic: bool,
    region: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct sites that count for a scan: ``(rows, yx_px, idx)``.

    Periodic: positions wrapped and duplicates dropped (:func:`dedupe_periodic_px`); otherwise
    sites whose nearest pixel is outside the scan are dropped. With a (checked, boolean)
    ``region`` only sites whose nearest pixel lies in it are kept. ``rows`` are the kept
    indices into ``yx_px`` (ascending), then the kept (wrapped) positions and nearest pixels.
    """
    if periodic:
        yx, rows = dedupe_periodic_px(yx_px, shape)
        idx = np.mod(_nearest_px(yx), shape)
    else:
        idx = _nearest_px(yx_px)
        rows = np.flatnonzero(_in_field(idx, shape))
        yx, idx = yx_px[rows], idx[rows]
    if region is not None:
        ok = region[idx[:, 0], idx[:, 1]]
        rows, yx, idx = rows[ok], yx[ok], idx[ok]
    return rows, yx, idx


def _stamp(
    yx_px: np.ndarray,
    shape: tuple[int, int],
    half: tuple[int, int],
    periodic: bool,
    weight_fn,
    combine: str,
) -> np.ndarray:
    """Evaluate ``weight_fn(dy_px, dx_px)`` in a window around each site and combine."""
    sy, sx = shape
    out = np.zeros(shape, dtype=float)
    hy, hx = half
    oy = np.arange(-hy, hy + 1)
    ox = np.arange(-hx, hx + 1)
    centre = _nearest_px(yx_px)
    # process in blocks of sites to bound memory
    block = max(1, 2_000_000 // ((2 * hy + 1) * (2 * hx + 1)))
    for b0 in range(0, len(yx_px), block):
        c = centre[b0:b0 + block]
        p = yx_px[b0:b0 + block]
        iy = c[:, 0, None, None] + oy[None, :, None]  # (n, wy, 1)
        ix = c[:, 1, None, None] + ox[None, None, :]  # (n, 1, wx)
        w = weight_fn(iy - p[:, 0, None, None], ix - p[:, 1, None, None])  # (n, wy, wx)
        iy_b = np.broadcast_to(iy, w.shape)
        ix_b = np.broadcast_to(ix, w.shape)
        if periodic:
            iy_b, ix_b = np.mod(iy_b, sy), np.mod(ix_b, sx)
            ok = np.ones(w.shape, dtype=bool)
        else:
            ok = (iy_b >= 0) & (iy_b < sy) & (ix_b >= 0) & (ix_b < sx)
        if combine == "sum":
            np.add.at(out, (iy_b[ok], ix_b[ok]), w[ok])
        else:
            np.maximum.at(out, (iy_b[ok], ix_b[ok]), w[ok])
    return out


def make_template(
    yx_px: np.ndarray,
    shape: Sequence[int],
    *,
    kind: str = "binary",
    radius_px: float | Sequence[float] | None = None,
    sigma_px: float | Sequence[float] | None = None,
    periodic: bool = False,
    region: np.ndarray | None = None,
    truncate: float = 5.0,
) -> np.ndarray:
    """Template image from site positions in pixel coordinates.

    Parameters
    ----------
    yx_px : array_like, shape (n, 2)
        Site positions ``(y_px, x_px)`` (sub-pixel; see :func:`sites_to_pixels`).
    shape : (int, int)
        Scan shape ``(scan_y, scan_x)``.
    kind : {"binary", "disc", "gaussian"}
        Template kind (see the module docstring).
    radius_px : float or (float, float), optional
        Disc radius ``(ry, rx)`` in pixels (required for ``kind="disc"``).
    sigma_px : float or (float, float), optional
        Gaussian standard deviation ``(sigma_y, sigma_x)`` in pixels (required for
        ``kind="gaussian"``).
    periodic : bool
        Wrap sites and their discs/gaussians around the scan edges (scan = whole cells);
        duplicate sites after wrapping are used once.
    region : numpy.ndarray of bool, shape (scan_y, scan_x), optional
        The template is set to 0 outside the region (partial template).
    truncate : float
        Gaussians are evaluated out to ``truncate`` sigma (value there ``exp(-truncate**2/2)``).

    Returns
    -------
    numpy.ndarray, shape (scan_y, scan_x), float64
        Values in [0, 1] for binary/disc; gaussian peaks are 1 for isolated sites (overlapping
        tails add up).

    Raises
    ------
    ValueError
        Unknown kind, missing/invalid radius or sigma, no site whose nearest pixel is inside the
        scan (non-periodic), or a resulting template of zero variance (inside ``region``).

    Notes
    -----
    Non-periodic: the binary kind uses only sites whose nearest pixel is inside the scan; disc
    and gaussian kinds also stamp the parts of out-of-field sites that reach into the scan (a
    column just outside the field of view still contributes to the image).
    """
    shape = _as_shape(shape)
    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"kind must be one of {TEMPLATE_KINDS}, got {kind!r}")
    yx = np.asarray(yx_px, dtype=float)
    if yx.ndim == 1 and yx.shape == (2,):
        yx = yx[None, :]
    if yx.ndim != 2 or yx.shape[1] != 2 or len(yx) == 0:
        raise ValueError(f"yx_px must have shape (n>0, 2), got {yx.shape}")
    if not np.all(np.isfinite(yx)):
        raise ValueError("yx_px must be finite")
    reg = check_region(region, shape)
    if periodic:
        yx, _ = dedupe_periodic_px(yx, shape)
    else:
        if not _in_field(_nearest_px(yx), shape).any():
            raise ValueError(
                f"all {len(yx)} sites lie outside the scan of shape {shape} "
                "(check step_A / origin_A, or use periodic=True)"
            )

    if kind == "binary":
        idx = _nearest_px(yx)
        if periodic:
            idx = np.mod(idx, shape)
        else:
            idx = idx[_in_field(idx, shape)]
        out = np.zeros(shape, dtype=float)
        out[idx[:, 0], idx[:, 1]] = 1.0
    elif kind == "disc":
        if radius_px is None:
            raise ValueError("kind='disc' needs radius_px (or radius_A)")
        ry, rx = as_pair(radius_px, "radius_px")
        half = (int(np.ceil(ry)) + 1, int(np.ceil(rx)) + 1)

        def disc(dy, dx):
            inside = (dy / ry) ** 2 + (dx / rx) ** 2 <= 1.0
            nearest = (np.abs(dy) <= 0.5) & (np.abs(dx) <= 0.5)  # the site's own pixel
            return (inside | nearest).astype(float)

        out = _stamp(yx, shape, half, periodic, disc, "max")
    else:
        if sigma_px is None:
            raise ValueError("kind='gaussian' needs sigma_px (or sigma_A)")
        sgy, sgx = as_pair(sigma_px, "sigma_px")
        if not np.isfinite(truncate) or truncate <= 0:
            raise ValueError(f"truncate must be > 0, got {truncate!r}")
        half = (int(np.ceil(truncate * sgy)) + 1, int(np.ceil(truncate * sgx)) + 1)

        def gauss(dy, dx):
            r2 = (dy / sgy) ** 2 + (dx / sgx) ** 2
            return np.where(r2 <= truncate**2, np.exp(-0.5 * r2), 0.0)

        out = _stamp(yx, shape, half, periodic, gauss, "sum")

    if reg is not None:
        out[~reg] = 0.0
    check_template(out, reg)
    return out


def _px_radius(value_A: float | Sequence[float] | None, step: tuple[float, float], name: str):
    if value_A is None:
        return None
    vy, vx = as_pair(value_A, name)
    return (vy / step[0], vx / step[1])


def _make_template_kwargs(
    step: tuple[float, float],
    *,
    kind: str,
    radius_A: float | Sequence[float] | None,
    sigma_A: float | Sequence[float] | None,
    periodic: bool,
    region: np.ndarray | None,
    truncate: float,
) -> dict[str, Any]:
    """Keywords for :func:`make_template` from Å-valued options (radius/sigma -> px per axis)."""
    return dict(
        kind=kind,
        radius_px=_px_radius(radius_A, step, "radius_A"),
        sigma_px=_px_radius(sigma_A, step, "sigma_A"),
        periodic=periodic,
        region=region,
        truncate=truncate,
    )


def species_templates(
    sites: pd.DataFrame,
    shape: Sequence[int],
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    kind: str = "binary",
    radius_A: float | Sequence[float] | None = None,
    sigma_A: float | Sequence[float] | None = None,
    periodic: bool = False,
    region: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    include_all: bool = True,
    truncate: float = 5.0,
) -> dict[str, np.ndarray]:
    """One template per site label, plus the combined ``"all"`` template.

    Parameters
    ----------
    sites : pandas.DataFrame
        Site table (``label``, ``y_A``, ``x_A`` in Å).
    shape : (int, int)
        Scan shape ``(scan_y, scan_x)``.
    step_A : float or (float, float)
        Scan step ``(y, x)`` in Å.
    origin_A : (float, float)
        Position in Å of scan pixel ``[0, 0]``.
    kind : {"binary", "disc", "gaussian"}
        Template kind.
    radius_A : float or (float, float), optional
        Disc radius in Å (``kind="disc"``).
    sigma_A : float or (float, float), optional
        Gaussian sigma in Å (``kind="gaussian"``).
    periodic : bool
        The scan covers whole projected cells: wrap around the edges (see module docstring).
    region : numpy.ndarray of bool, optional
        Partial-template region; templates are zero outside it. Pass the same array to
        :func:`tmask_validate.core.pcc_mask`.
    labels : sequence of str, optional
        Labels to build (default: every label in ``sites``, in order of first appearance).
    include_all : bool
        Also build ``"all"`` from every site in the table.
    truncate : float
        Gaussian truncation in sigma.

    Returns
    -------
    dict of str to numpy.ndarray
        ``{label: template}`` (float64, ``(scan_y, scan_x)``), plus ``"all"`` if requested.

    Raises
    ------
    ValueError
        A requested label has no sites, a label is called ``"all"`` while ``include_all``,
        sites all outside the scan, bad sigma/radius, or a zero-variance template.
    """
    s = validate_sites(sites)
    step = as_pair(step_A, "step_A")
    present = list(dict.fromkeys(s["label"]))
    if labels is None:
        labels = present
    labels = [str(lab) for lab in labels]
    if include_all and "all" in present:
        raise ValueError('site label "all" is reserved for the combined template')
    kw = _make_template_kwargs(step, kind=kind, radius_A=radius_A, sigma_A=sigma_A,
                               periodic=periodic, region=region, truncate=truncate)
    yx = sites_to_pixels(s, step, origin_A)
    out: dict[str, np.ndarray] = {}
    for lab in labels:
        sel = (s["label"] == lab).to_numpy()
        if not sel.any():
            raise ValueError(f"no sites with label {lab!r} (labels present: {present})")
        try:
            out[lab] = make_template(yx[sel], shape, **kw)
        except ValueError as exc:
            raise ValueError(f"template for label {lab!r}: {exc}") from exc
    if include_all:
        out["all"] = make_template(yx, shape, **kw)
    return out


def _select_label(s: pd.DataFrame, label: str | None) -> pd.DataFrame:
    if label is None:
        return s
    sel = s[s["label"] == str(label)]
    if len(sel) == 0:
        raise ValueError(f"no sites with label {label!r}")
    return sel.reset_index(drop=True)


def random_sites(
    sites: pd.DataFrame,
    shape: Sequence[int],
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    periodic: bool = False,
    region: np.ndarray | None = None,
    seed: int | np.random.Generator = 0,
) -> pd.DataFrame:
    """Random positions for the same number of sites (a random-template control).

    The number of sites is the number of *distinct* sites the real table contributes to the
    scan: sites whose nearest pixel is inside the scan (and inside ``region``), after removing
    periodic duplicates. Each random site is put on a distinct pixel drawn uniformly without
    replacement from the allowed pixels, plus a uniform sub-pixel offset in [-0.5, 0.5) px, so a
    binary random template has exactly as many set pixels as sites. Labels are kept (shuffled
    with the positions), so per-label random templates can be made too.

    Parameters
    ----------
    sites : pandas.DataFrame
        Real site table.
    shape : (int, int)
        Scan shape.
    step_A : float or (float, float)
        Scan step in Å.
    origin_A : (float, float)
        Position of pixel ``[0, 0]`` in Å.
    periodic : bool
        As for the templates (affects which real sites count).
    region : numpy.ndarray of bool, optional
        Random sites are drawn inside it; only real sites inside it are counted.
    seed : int or numpy.random.Generator
        Random seed (results are reproducible for a given seed).

    Returns
    -------
    pandas.DataFrame
        Columns ``label``, ``y_A``, ``x_A`` (Å).

    Raises
    ------
    ValueError
        No real site in the scan/region, or more sites than allowed pixels.
    """
    shape = _as_shape(shape)
    s = validate_sites(sites)
    reg = check_region(region, shape)
    step = np.array(as_pair(step_A, "step_A"))
    origin = np.array(as_pair(origin_A, "origin_A", positive=False))
    rows, _, _ = _sites_in_scan(sites_to_pixels(s, step, origin), shape, periodic=periodic,
                                region=reg)
    labels = s["label"].to_numpy()[rows]
    n = len(labels)
    if n == 0:
        raise ValueError("no site lies inside the scan/region; nothing to randomise")
    allowed = np.flatnonzero(reg.ravel()) if reg is not None else np.arange(shape[0] * shape[1])
    if n > allowed.size:
        raise ValueError(f"{n} sites do not fit on {allowed.size} distinct pixels")
    rng = np.random.default_rng(seed)
    flat = rng.choice(allowed, size=n, replace=False)
    py, px = np.unravel_index(flat, shape)
    jitter = rng.uniform(-0.5, 0.5, size=(n, 2))
    pos = (np.stack([py, px], axis=1) + jitter) * step + origin
    return pd.DataFrame({"label": labels, "y_A": pos[:, 0], "x_A": pos[:, 1]})


def random_site_template(
    sites: pd.DataFrame,
    shape: Sequence[int],
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    label: str | None = None,
    kind: str = "binary",
    radius_A: float | Sequence[float] | None = None,
    sigma_A: float | Sequence[float] | None = None,
    periodic: bool = False,
    region: np.ndarray | None = None,
    seed: int | np.random.Generator = 0,
    truncate: float = 5.0,
) -> np.ndarray:
    """Template with as many sites as the real one, at random positions (control).

    Parameters
    ----------
    sites, shape, step_A, origin_A
        As for :func:`random_sites`.
    label : str, optional
        Use only the sites of this label (default: all sites).
    kind, radius_A, sigma_A, periodic, region, truncate
        As for :func:`species_templates`.
    seed : int or numpy.random.Generator
        Random seed.

    Returns
    -------
    numpy.ndarray, shape (scan_y, scan_x), float64

    Raises
    ------
    ValueError
        As :func:`random_sites` and :func:`make_template`.
    """
    s = _select_label(validate_sites(sites), label)
    rnd = random_sites(
        s, shape, step_A=step_A, origin_A=origin_A, periodic=periodic, region=region, seed=seed
    )
    step = as_pair(step_A, "step_A")
    kw = _make_template_kwargs(step, kind=kind, radius_A=radius_A, sigma_A=sigma_A,
                               periodic=periodic, region=region, truncate=truncate)
    return make_template(sites_to_pixels(rnd, step, origin_A), shape, **kw)


def template_set_attrs(
    *,
    kind: str,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float | Sequence[float] | None = None,
    sigma_A: float | Sequence[float] | None = None,
    periodic: bool = False,
    region: np.ndarray | None = None,
) -> Mapping[str, Any]:
    """JSON-friendly description of how a template set was made (for provenance attrs).

    Parameters
    ----------
    kind, step_A, origin_A, radius_A, sigma_A, periodic, region
        As for :func:`species_templates`.

    Returns
    -------
    dict
        ``kind``, ``step_A``, ``origin_A``, ``radius_A``, ``sigma_A`` (pairs or None),
        ``periodic`` and ``region_fraction`` (fraction of scan pixels in the region, 1.0 if none).
    """
    return {
        "kind": kind,
        "step_A": list(as_pair(step_A, "step_A")),
        "origin_A": list(as_pair(origin_A, "origin_A", positive=False)),
        "radius_A": None if radius_A is None else list(as_pair(radius_A, "radius_A")),
        "sigma_A": None if sigma_A is None else list(as_pair(sigma_A, "sigma_A")),
        "periodic": bool(periodic),
        "region_fraction": 1.0 if region is None else float(np.mean(np.asarray(region, bool))),
    }
