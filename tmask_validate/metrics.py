"""Image metrics shared by template-mask images, inverted ABF, iCoM and any other image.

Every function takes a plain 2D image ``(scan_y, scan_x)`` and a site table (pandas DataFrame
with ``label``, ``y_A``, ``x_A`` in Å; see :mod:`tmask_validate.templates` for the geometry
conventions: pixel ``[i, j]`` sits at ``origin_A + (i * step_y, j * step_x)``). Results are
tidy pandas DataFrames that the workflow writes to CSV/NetCDF. The section below is Markdown
(``METRIC_DEFINITIONS`` holds it as a string for the README/report).

## Metric definitions

Notation: image `I`, site labels `A, B, ...`; `n_L` = number of distinct sites of label `L`
inside the field of view (periodic duplicates removed).

- **Site signal** `S_L`. For one site `s`, `S_s = Σ_p w_sp I_p / Σ_p w_sp`, where `w_sp` is the
  fraction of pixel `p` (5×5 sub-samples per pixel) lying within `radius_A` (default 0.3 Å,
  measured in Å, so non-square steps are handled) of the exact sub-pixel site position. If the
  disc catches no sub-sample, the site's nearest pixel is used. With `periodic=True` the disc
  wraps around the image edges; otherwise pixels outside the image are left out. `S_L` is the
  mean of `S_s` over the sites of `L`; `site_std` is their standard deviation (ddof=0).
- **Background** `b` = the mean of the *interstitial* pixels: pixel centres at least
  `background_distance_A` (default 0.7 Å) from every atom-column site (minimum-image distance
  over the scan period when `periodic=True`), within the field of view (or `region`). This is
  the level of the image where there is no column - what a microscopist measures contrast
  against - so a column's contrast is the signal it adds over empty space, bright or dark, and
  no column type can be hidden by the choice of baseline. The old baseline, the image median
  `b_med`, is the level of the *typical pixel*; in a template image the typical pixel sits on a
  plateau, and any column weaker than that plateau got `X ≤ 0`, which the bright-only
  specificity then turned into exactly 0 - specificity saturated at 1.00 (measured: LiFePO4
  with all Li removed still gave a "Li image" of specificity 1.00). The image mean was also
  considered and rejected: it is pulled by the columns themselves (dark heavy columns lower it,
  making every weak column look bright), and for a perfect binary-template image it puts the
  off-template level below zero, so a perfect image would not score 1. At 0.7 Å (the distance
  the random-site controls keep from every column) 42 % of a LiFePO4 [001] cell and 64 % of a
  PbTiO3 [100] cell are interstitial (0.25 Å grid); with fewer than 8 interstitial pixels the
  background is an error (pass a smaller distance), never silently replaced. The median
  baseline is still computed beside it (`*_median` metrics) so that every verdict can be
  checked under both.
- **Noise** `σ = 1.4826 · median(|I − b_med|)` over the field of view (or `region`): a robust
  spread (the MAD, = σ for Gaussian noise), unaffected by the column peaks as long as they
  cover less than half the pixels; it does not depend on the baseline, so both baselines share
  it. If the MAD is 0 (over half the pixels share one value) `σ` falls back to the standard
  deviation; a constant image is an error. For noiseless simulations `σ` is the structured
  background "clutter" (probe tails, ripples between columns); for noisy data it also contains
  the shot noise.
- **Contrast** `C_L = S_L − b` (negative = dark columns) and **CNR** `CNR_L = C_L / σ`;
  `C_L^med = S_L − b_med`, `CNR_L^med = C_L^med / σ`.
- **Relative signal** `R_L = C_L / max_K C_K` (brightest label = 1, dark labels < 0); if no
  label is brighter than the background, `R_L = C_L / max_K |C_K|`.
- **Crosstalk** of the image made with the template of label `A`: the full signed vector
  `X[A, B] = C_B / |C_A|` for every label `B` (metrics rows `crosstalk`, species = B) -
  background-subtracted signal at `B` sites over that at the target sites. `X[A, A] = 1` when
  the target is bright; `target_bright = False` (and `X[A, A] = −1`) flags a template that
  failed to make its own columns bright. `bright = max(X, 0)` and `dark = min(X, 0)` split it
  for display only. `X^med[A, B] = C_B^med / |C_A^med|`.
- **Specificity** `specificity_A = 1 − max_{B≠A} X[A, B]` on the signed crosstalk, no clipping:
  1 = the brightest wrong column is at the background level, 0 = a wrong column as bright as
  the target, < 0 = brighter than the target, > 1 = every wrong column is *darker* than empty
  space. `specificity_abs_A = 1 − max_{B≠A} |X[A, B]|` also penalises dark contrast. With a
  single label both are 1. The old metric, median baseline and bright crosstalk only,
  `specificity_median_A = 1 − max_{B≠A} max(X^med[A, B], 0)`, is reported beside it; it cannot
  exceed 1 and sits at exactly 1.00 whenever every wrong column is below the median.
- **Unit-cell average**: every pixel goes to the nearest of `bins` (default `round(L/step)`)
  bin centres of the cell `(L_y, L_x)`, by position modulo the cell (ties to the upper bin);
  each bin is the mean of its pixels. Works for non-integer numbers of cells per scan.
- **Line profile**: the image is interpolated (bilinear, or spline of `order`) at points spaced
  ≤ `sample_step_A` (default half the step) along start→end and across a band of full width
  `width_A`; the profile is the band mean, normalised `"minmax"` → `(p − min p)/(max p − min p)`
  (the paper's Fig. 5d "normalized intensity"), `"zscore"` → `(p − mean p)/std p`, or not at
  all. The unit-cell-averaged profile folds the image first and samples the folded cell
  periodically.
- **Mask similarity**: Pearson correlation `r` of two masks over the pixels where both are
  finite (and `valid`, e.g. detector pixels of non-zero variance); a constant mask is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from tmask_validate.templates import (
    _nearest_px,
    _sites_in_scan,
    as_pair,
    check_region,
    sites_to_pixels,
    validate_sites,
)

__all__ = [
    "MAD_TO_SIGMA",
    "METRIC_DEFINITIONS",
    "BACKGROUND_DISTANCE_A",
    "BASELINES",
    "background_noise",
    "cnr",
    "crosstalk_matrix",
    "crosstalk_table",
    "image_metrics",
    "interstitial_pixels",
    "line_profile",
    "mask_similarity",
    "metrics_table",
    "per_site_signals",
    "similarity_matrix",
    "site_signals",
    "specificity",
    "specificity_from_metrics",
    "unit_cell_average",
    "unit_cell_line_profile",
]

#: the "Metric definitions" section of this docstring (Markdown), for the README / report
METRIC_DEFINITIONS = (__doc__ or "## Metric definitions").split("## Metric definitions", 1)[-1]
METRIC_DEFINITIONS = "## Metric definitions" + METRIC_DEFINITIONS.rstrip() + "\n"
#: scale factor from the median absolute deviation to the standard deviation of a Gaussian
MAD_TO_SIGMA = 1.4826
#: default site-disc radius in Å
DEFAULT_RADIUS_A = 0.3
#: sub-pixel samples per axis used for the disc weights
N_SUB = 5
#: default distance (Å) from every column beyond which a pixel is interstitial (background)
BACKGROUND_DISTANCE_A = 0.7
#: fewest interstitial pixels the background may be computed from
MIN_BACKGROUND_PX = 8
#: background definitions: "interstitial" (default, see "Background"), "median" (the old one)
BASELINES = ("interstitial", "median")


def _as_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    img = np.asarray(image, dtype=float)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"{name} must be a non-empty 2D array (scan_y, scan_x), got {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{name} has non-finite values")
    return img


# --------------------------------------------------------------------------------------------
# site signals
# --------------------------------------------------------------------------------------------
def per_site_signals(
    image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
) -> pd.DataFrame:
    """Mean image value in a small disc around every site (see "Site signal").

    Parameters
    ----------
    image : numpy.ndarray, shape (scan_y, scan_x)
        Any image (template-mask image, inverted ABF, iCoM, ...).
    sites : pandas.DataFrame
        Site table (``label``, ``y_A``, ``x_A`` in Å).
    step_A : float or (float, float)
        Scan step ``(y, x)`` in Å.
    origin_A : (float, float)
        Position in Å of pixel ``[0, 0]``.
    radius_A : float
        Disc radius in Å (>= 0; 0 = nearest pixel only).
    periodic : bool
        Image is periodic (scan = whole cells): sites and discs wrap, duplicates dropped.
    region : numpy.ndarray of bool, optional
        Only sites whose nearest pixel lies in the region are used.

    Returns
    -------
    pandas.DataFrame
        One row per site used: the site table's columns (positions as given) plus ``y_px``,
        ``x_px`` (sub-pixel, wrapped if periodic), ``signal`` (weighted disc mean) and
        ``n_px`` (pixels with non-zero weight).

    Raises
    ------
    ValueError
        Bad image/sites/step/radius, or no site inside the field of view (or region).
    """
    img = _as_image(image)
    shape = img.shape
    s = validate_sites(sites)
    step = as_pair(step_A, "step_A")
    if not np.isfinite(radius_A) or radius_A < 0:
        raise ValueError(f"radius_A must be >= 0, got {radius_A!r}")
    reg = check_region(region, shape)
    rows, yx, _ = _sites_in_scan(sites_to_pixels(s, step, origin_A), shape, periodic=periodic,
                                 region=reg)
    s = s.iloc[rows].reset_index(drop=True)
    if len(s) == 0:
        raise ValueError(
            "no site lies inside the field of view"
            + (" / region" if reg is not None else "")
            + " (check step_A, origin_A and periodic)"
        )

    signal, n_px = _disc_means(img, yx, step, float(radius_A), periodic)
    out_df = s.copy()
    out_df["y_px"] = yx[:, 0]
    out_df["x_px"] = yx[:, 1]
    out_df["signal"] = signal
    out_df["n_px"] = n_px
    return out_df


def _disc_means(
    img: np.ndarray,
    yx: np.ndarray,
    step: tuple[float, float],
    radius_A: float,
    periodic: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel-weighted disc mean around each site (positions in px); blocks bound memory."""
    shape = img.shape
    hy = int(np.ceil(radius_A / step[0])) + 1
    hx = int(np.ceil(radius_A / step[1])) + 1
    oy = np.arange(-hy, hy + 1)
    ox = np.arange(-hx, hx + 1)
    sub = (np.arange(N_SUB) + 0.5) / N_SUB - 0.5  # sub-pixel sample offsets, px
    per_site = oy.size * ox.size * N_SUB * N_SUB
    block = max(1, 4_000_000 // per_site)
    signal = np.empty(len(yx))
    n_px = np.empty(len(yx), dtype=int)
    for b0 in range(0, len(yx), block):
        p = yx[b0:b0 + block]
        c = _nearest_px(p)  # unwrapped window centre (may equal shape after wrapping)
        iy = c[:, 0, None, None] + oy[None, :, None]  # (n, wy, 1)
        ix = c[:, 1, None, None] + ox[None, None, :]  # (n, 1, wx)
        dy_A = ((iy - p[:, 0, None, None])[..., None, None] + sub[:, None]) * step[0]
        dx_A = ((ix - p[:, 1, None, None])[..., None, None] + sub[None, :]) * step[1]
        inside = dy_A**2 + dx_A**2 <= radius_A**2 * (1 + 1e-12)  # (n, wy, wx, ns, ns)
        w = inside.mean(axis=(-2, -1))  # (n, wy, wx)
        iy_b = np.broadcast_to(iy, w.shape)
        ix_b = np.broadcast_to(ix, w.shape)
        if periodic:
            iy_b, ix_b = np.mod(iy_b, shape[0]), np.mod(ix_b, shape[1])
        else:
            outside = (iy_b < 0) | (iy_b >= shape[0]) | (ix_b < 0) | (ix_b >= shape[1])
            w = np.where(outside, 0.0, w)
            iy_b = np.clip(iy_b, 0, shape[0] - 1)
            ix_b = np.clip(ix_b, 0, shape[1] - 1)
        empty = w.sum(axis=(1, 2)) == 0
        if empty.any():  # disc smaller than the sub-sampling: use the nearest pixel
            w[empty, hy, hx] = 1.0
        signal[b0:b0 + block] = (w * img[iy_b, ix_b]).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
        n_px[b0:b0 + block] = (w > 0).sum(axis=(1, 2))
    return signal, n_px


def site_signals(
    image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
) -> pd.DataFrame:
    """Site signal per label: mean over the label's sites of the disc mean.

    Parameters
    ----------
    image, sites, step_A, origin_A, radius_A, periodic, region
        As for :func:`per_site_signals`.

    Returns
    -------
    pandas.DataFrame
        One row per label (order of first appearance in ``sites``) with columns ``label``,
        ``n_sites`` (distinct sites used), ``signal`` (image units) and ``site_std`` (std over
        the sites, ddof=0). Labels with no site in the field of view are omitted.
    """
    per = per_site_signals(
        image, sites, step_A=step_A, origin_A=origin_A, radius_A=radius_A,
        periodic=periodic, region=region,
    )
    g = per.groupby("label", sort=False)["signal"]
    out = pd.DataFrame({
        "n_sites": g.size(),
        "signal": g.mean(),
        "site_std": g.std(ddof=0),
    }).reset_index()
    return out[["label", "n_sites", "signal", "site_std"]]


# --------------------------------------------------------------------------------------------
# background, noise, CNR
# --------------------------------------------------------------------------------------------
def interstitial_pixels(
    shape: Sequence[int],
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    periodic: bool = False,
    min_distance_A: float = BACKGROUND_DISTANCE_A,
) -> np.ndarray:
    """Pixels whose centre lies at least ``min_distance_A`` from every site (see "Background").

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(scan_y, scan_x)``.
    sites : pandas.DataFrame
        Site table (``label``, ``y_A``, ``x_A`` in Å); every row counts, whatever its label.
    step_A, origin_A
        Scan step and position of pixel ``[0, 0]``, Å.
    periodic : bool
        The scan is whole cells: distances are minimum-image over the period ``step * shape``.
    min_distance_A : float
        Distance in Å (> 0).

    Returns
    -------
    numpy.ndarray of bool, shape ``shape``
    """
    from scipy.spatial import cKDTree

    sy, sx = (int(v) for v in shape)
    s = validate_sites(sites)
    step = np.array(as_pair(step_A, "step_A"))
    origin = np.array(as_pair(origin_A, "origin_A", positive=False))
    if not np.isfinite(min_distance_A) or min_distance_A <= 0:
        raise ValueError(f"background_distance_A must be > 0, got {min_distance_A!r}")
    py, px = np.mgrid[0:sy, 0:sx]
    pix = np.stack([py.ravel(), px.ravel()], 1) * step  # relative to origin, Å
    ref = s[["y_A", "x_A"]].to_numpy(float) - origin
    if periodic:
        per = step * (sy, sx)

        def wrap(x):
            x = np.mod(x, per)
            return np.where(x >= per, 0.0, x)  # np.mod(-tiny, L) can round to L

        d, _ = cKDTree(wrap(ref), boxsize=per).query(wrap(pix))
    else:
        d, _ = cKDTree(ref).query(pix)
    return (np.asarray(d) >= min_distance_A * (1 - 1e-12)).reshape(sy, sx)


def background_noise(
    image: np.ndarray,
    *,
    region: np.ndarray | None = None,
    baseline: str = "median",
    interstitial: np.ndarray | None = None,
) -> tuple[float, float]:
    """Background level and robust noise of an image (see "Background" and "Noise").

    Parameters
    ----------
    image : numpy.ndarray, shape (scan_y, scan_x)
    region : numpy.ndarray of bool, optional
        Pixels to use (default: the whole field of view).
    baseline : {"median", "interstitial"}
        ``"median"``: the median of the image; ``"interstitial"``: the mean of the
        ``interstitial`` pixels (see :func:`interstitial_pixels`) inside ``region``.
    interstitial : numpy.ndarray of bool, optional
        Required for ``baseline="interstitial"``.

    Returns
    -------
    background : float
        Background level (image units).
    noise : float
        ``1.4826 * median(|I - median(I)|)``; the standard deviation (ddof=0) if that is 0.

    Raises
    ------
    ValueError
        Non-finite or constant image (zero spread), unknown baseline, or fewer than
        ``MIN_BACKGROUND_PX`` interstitial pixels.
    """
    img = _as_image(image)
    reg = check_region(region, img.shape)
    vals = img[reg] if reg is not None else img.ravel()
    med = float(np.median(vals))
    noise = MAD_TO_SIGMA * float(np.median(np.abs(vals - med)))
    if noise == 0.0:
        noise = float(np.std(vals))
    if noise == 0.0:
        raise ValueError("image is constant: background noise is zero, CNR undefined")
    if baseline == "median":
        return med, noise
    if baseline != "interstitial":
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if interstitial is None:
        raise ValueError("baseline 'interstitial' needs the interstitial pixel mask")
    far = np.asarray(interstitial, dtype=bool)
    if far.shape != img.shape:
        raise ValueError(f"interstitial mask has shape {far.shape}, image {img.shape}")
    if reg is not None:
        far = far & reg
    n_far = int(far.sum())
    if n_far < MIN_BACKGROUND_PX:
        raise ValueError(
            f"only {n_far} pixels lie far enough from every column for the interstitial "
            f"background (need {MIN_BACKGROUND_PX}): use a smaller background_distance_A"
        )
    return float(img[far].mean()), noise


def cnr(signal: float | np.ndarray, background: float, noise: float) -> float | np.ndarray:
    """Contrast-to-noise ratio ``(signal - background) / noise``.

    Parameters
    ----------
    signal : float or numpy.ndarray
        Site signal(s), image units.
    background : float
        Background level, image units.
    noise : float
        Noise (robust spread), image units, > 0.

    Returns
    -------
    float or numpy.ndarray
        Dimensionless CNR (negative for dark contrast).

    Raises
    ------
    ValueError
        If ``noise`` is not a positive finite number.
    """
    if not np.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise must be > 0, got {noise!r}")
    if np.ndim(signal):
        return (np.asarray(signal, dtype=float) - background) / noise
    return (float(signal) - background) / noise


def _relative(contrast: np.ndarray) -> np.ndarray:
    cmax = contrast.max()
    if cmax > 0:
        return contrast / cmax
    amax = np.abs(contrast).max()
    return contrast / amax if amax > 0 else np.zeros_like(contrast)


def image_metrics(
    image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
    target: str | None = None,
    name: str | None = None,
    baseline: str = "interstitial",
    background_distance_A: float = BACKGROUND_DISTANCE_A,
    background_sites: pd.DataFrame | None = None,
    interstitial: np.ndarray | None = None,
    with_median: bool = False,
) -> pd.DataFrame:
    """Per-label signal, contrast, CNR and relative signal of one image (tidy rows).

    Parameters
    ----------
    image : numpy.ndarray, shape (scan_y, scan_x)
        Any image: template-mask image, inverted ABF, iCoM, ...
    sites : pandas.DataFrame
        Site table.
    step_A, origin_A, radius_A, periodic
        As for :func:`per_site_signals`.
    region : numpy.ndarray of bool, optional
        Restrict background/noise statistics and the sites to this region.
    target : str, optional
        Label of the template that made the image. Adds the columns ``target``, ``is_target``,
        ``target_bright`` and ``crosstalk`` (:math:`X[A, B]`, see "Crosstalk").
    name : str, optional
        Value of an ``image`` column identifying the image (default: ``target`` or "").
    baseline : {"interstitial", "median"}
        Background definition (see "Background").
    background_distance_A : float
        Interstitial distance, Å (``baseline="interstitial"``).
    background_sites : pandas.DataFrame, optional
        Sites that define the interstitial pixels (default ``sites``; pass the real columns
        when ``sites`` holds extra control sites, which lie in the interstitial space).
    interstitial : numpy.ndarray of bool, optional
        Precomputed :func:`interstitial_pixels` (overrides ``background_sites``).
    with_median : bool
        Also add ``background_median``, ``contrast_median``, ``cnr_median`` and, with
        ``target``, ``crosstalk_median`` and ``target_bright_median`` (the median baseline).

    Returns
    -------
    pandas.DataFrame
        One row per label with columns ``image``, ``label``, ``n_sites``, ``signal``,
        ``site_std``, ``background``, ``noise``, ``contrast`` (= signal - background), ``cnr``
        (= contrast / noise), ``relative`` (contrast relative to the brightest label), and with
        ``target`` also ``target``, ``is_target``, ``target_bright``, ``crosstalk``,
        ``bright`` (= max(crosstalk, 0)), ``dark`` (= min(crosstalk, 0)).

    Raises
    ------
    ValueError
        Bad inputs, constant image, unknown target label, a target contrast of exactly 0, or
        too few interstitial pixels.
    """
    sig = site_signals(
        image, sites, step_A=step_A, origin_A=origin_A, radius_A=radius_A,
        periodic=periodic, region=region,
    )
    if baseline == "interstitial" and interstitial is None:
        interstitial = interstitial_pixels(
            np.shape(image), sites if background_sites is None else background_sites,
            step_A=step_A, origin_A=origin_A, periodic=periodic,
            min_distance_A=background_distance_A)
    bg, noise = background_noise(image, region=region, baseline=baseline,
                                 interstitial=interstitial)
    out = sig.copy()
    out.insert(0, "image", name if name is not None else (target or ""))
    out["background"] = bg
    out["noise"] = noise
    labels = out["label"].tolist()
    if target is not None:
        target = str(target)
        if target not in labels:
            raise ValueError(
                f"target label {target!r} has no site in the field of view (labels: {labels})"
            )
    contrast = sig["signal"].to_numpy() - bg
    out["contrast"] = contrast
    out["cnr"] = contrast / noise
    out["relative"] = _relative(contrast)
    if with_median:
        bg_med = float(np.median(np.asarray(image, float)[region] if region is not None
                                 else np.asarray(image, float)))
        c_med = sig["signal"].to_numpy() - bg_med
        out["background_median"] = bg_med
        out["contrast_median"] = c_med
        out["cnr_median"] = c_med / noise
    if target is not None:
        c_t = float(contrast[labels.index(target)])
        if c_t == 0.0:
            raise ValueError(f"target {target!r} contrast is exactly 0: crosstalk undefined")
        x = contrast / abs(c_t)
        out["target"] = target
        out["is_target"] = out["label"] == target
        out["target_bright"] = c_t > 0
        out["crosstalk"] = x
        out["bright"] = np.maximum(x, 0.0)
        out["dark"] = np.minimum(x, 0.0)
        if with_median:
            cm_t = float(c_med[labels.index(target)])
            out["crosstalk_median"] = c_med / abs(cm_t) if cm_t != 0 else np.nan
            out["target_bright_median"] = cm_t > 0
    return out.reset_index(drop=True)


def metrics_table(
    images: Mapping[str, np.ndarray],
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
    baseline: str = "interstitial",
    background_distance_A: float = BACKGROUND_DISTANCE_A,
) -> pd.DataFrame:
    """:func:`image_metrics` (no target) for several images, stacked into one tidy frame.

    Use it for non-specific images (inverted ABF, iCoM, the "all" template image), e.g.
    ``metrics_table({"abf_inv": -abf, "icom": icom, "tm_all": img}, sites, step_A=...)``.

    Parameters
    ----------
    images : mapping of str to numpy.ndarray
        ``{image name: image}``, all the same shape.
    sites, step_A, origin_A, radius_A, periodic, region, baseline, background_distance_A
        As for :func:`image_metrics`.

    Returns
    -------
    pandas.DataFrame
        Rows ``image`` × ``label`` with the columns of :func:`image_metrics`.
    """
    if not images:
        raise ValueError("no images given")
    frames = [
        image_metrics(img, sites, step_A=step_A, origin_A=origin_A, radius_A=radius_A,
                      periodic=periodic, region=region, name=str(key), baseline=baseline,
                      background_distance_A=background_distance_A)
        for key, img in images.items()
    ]
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# crosstalk and specificity
# --------------------------------------------------------------------------------------------
def crosstalk_table(
    images: Mapping[str, np.ndarray],
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
    baseline: str = "interstitial",
    background_distance_A: float = BACKGROUND_DISTANCE_A,
    skip: Sequence[str] = ("all",),
) -> pd.DataFrame:
    """Tidy crosstalk table for a family of species-specific template images.

    Parameters
    ----------
    images : mapping of str to numpy.ndarray
        ``{template label: image made with that label's template}``. Keys in ``skip``
        (default ``"all"``) are ignored; every other key must be a site label.
    sites, step_A, origin_A, radius_A, periodic, region, baseline, background_distance_A
        As for :func:`image_metrics`.
    skip : sequence of str
        Image keys that are not species templates.

    Returns
    -------
    pandas.DataFrame
        One row per (template, site label) with columns ``template``, ``site_label``,
        ``is_target``, ``signal``, ``background``, ``noise``, ``contrast``, ``cnr``, ``X``
        (crosstalk :math:`X[A, B]`), ``bright`` (:math:`\\max(X, 0)`), ``dark``
        (:math:`\\min(X, 0)`), ``target_bright`` and, repeated on every row of a template,
        ``specificity``, ``specificity_clipped`` and ``specificity_abs`` (see "Specificity").

    Raises
    ------
    ValueError
        No species image, a key that is not a site label, or errors of :func:`image_metrics`.
    """
    labels = list(dict.fromkeys(validate_sites(sites)["label"]))
    keys = [k for k in images if k not in skip]
    if not keys:
        raise ValueError(f"no species template images (keys {list(images)}, skip {list(skip)})")
    unknown = [k for k in keys if k not in labels]
    if unknown:
        raise ValueError(f"image keys {unknown} are not site labels {labels}")
    rows = []
    for key in keys:
        m = image_metrics(images[key], sites, step_A=step_A, origin_A=origin_A,
                          radius_A=radius_A, periodic=periodic, region=region, target=key,
                          baseline=baseline, background_distance_A=background_distance_A)
        rows.append(pd.DataFrame({
            "template": key,
            "site_label": m["label"],
            "is_target": m["is_target"],
            "signal": m["signal"],
            "background": m["background"],
            "noise": m["noise"],
            "contrast": m["contrast"],
            "cnr": m["cnr"],
            "X": m["crosstalk"],
            "bright": m["bright"],
            "dark": m["dark"],
            "target_bright": m["target_bright"],
        }))
    table = pd.concat(rows, ignore_index=True)
    spec = specificity(_pivot(table))
    table = table.merge(spec[["specificity", "specificity_clipped", "specificity_abs"]],
                        left_on="template",
                        right_index=True, how="left")
    return table.reset_index(drop=True)


def _pivot(table: pd.DataFrame) -> pd.DataFrame:
    x = table.pivot(index="template", columns="site_label", values="X")
    x = x.reindex(index=list(dict.fromkeys(table["template"])),
                  columns=list(dict.fromkeys(table["site_label"])))
    x.index.name, x.columns.name = "template", "site_label"
    return x


def crosstalk_matrix(
    images: Mapping[str, np.ndarray],
    sites: pd.DataFrame,
    *,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    radius_A: float = DEFAULT_RADIUS_A,
    periodic: bool = False,
    region: np.ndarray | None = None,
    baseline: str = "interstitial",
    background_distance_A: float = BACKGROUND_DISTANCE_A,
    skip: Sequence[str] = ("all",),
) -> pd.DataFrame:
    """Crosstalk matrix ``X[template, site_label]`` (see "Crosstalk").

    Parameters
    ----------
    images, sites, step_A, origin_A, radius_A, periodic, region, baseline,
    background_distance_A, skip
        As for :func:`crosstalk_table`.

    Returns
    -------
    pandas.DataFrame
        Rows = template labels (order of ``images``), columns = site labels (order of first
        appearance in ``sites``; labels without a site in the field are absent).
        ``xarray.DataArray(X)`` turns it into a labelled array.
    """
    table = crosstalk_table(images, sites, step_A=step_A, origin_A=origin_A, radius_A=radius_A,
                            periodic=periodic, region=region, skip=skip, baseline=baseline,
                            background_distance_A=background_distance_A)
    return _pivot(table)


def specificity(x: pd.DataFrame) -> pd.DataFrame:
    """Specificity of each template from a crosstalk matrix (see "Specificity").

    Parameters
    ----------
    x : pandas.DataFrame
        Crosstalk matrix from :func:`crosstalk_matrix` (index = template labels, which must be
        column labels too; other columns are the wrong labels B).

    Returns
    -------
    pandas.DataFrame
        Indexed by template, columns ``specificity`` (= 1 - max_{B≠A} X[A,B], signed, no
        clipping), ``specificity_clipped`` (= 1 - max_{B≠A} max(X[A,B], 0), bright crosstalk
        only: the old definition, <= 1), ``specificity_abs`` (= 1 - max_{B≠A} |X[A,B]|),
        ``max_bright`` and
        ``max_bright_label`` (largest X[A,B], B≠A, and its label), ``max_dark`` and
        ``max_dark_label`` (most negative X[A,B], B≠A). With no other label: specificities 1,
        max values 0 and labels "".

    Raises
    ------
    ValueError
        A template that is not a column, or non-finite entries.
    """
    if not isinstance(x, pd.DataFrame):
        raise ValueError("x must be a pandas DataFrame (crosstalk matrix)")
    vals = x.to_numpy(dtype=float)
    if not np.all(np.isfinite(vals)):
        raise ValueError("crosstalk matrix has non-finite entries")
    rows = []
    for tmpl in x.index:
        if tmpl not in x.columns:
            raise ValueError(f"template {tmpl!r} is not a site label column of the matrix")
        others = x.loc[tmpl].drop(index=tmpl)
        if len(others) == 0:
            rows.append((tmpl, 1.0, 1.0, 1.0, 0.0, "", 0.0, ""))
            continue
        b_lab, d_lab = others.idxmax(), others.idxmin()
        b_val, d_val = float(others[b_lab]), float(others[d_lab])
        rows.append((
            tmpl,
            1.0 - b_val,
            1.0 - max(b_val, 0.0),
            1.0 - float(np.abs(others.to_numpy(dtype=float)).max()),
            b_val, str(b_lab), d_val, str(d_lab),
        ))
    out = pd.DataFrame(rows, columns=["template", "specificity", "specificity_clipped",
                                      "specificity_abs", "max_bright",
                                      "max_bright_label", "max_dark", "max_dark_label"])
    return out.set_index("template")


def specificity_from_metrics(metrics: pd.DataFrame) -> dict[str, float | str | bool]:
    """Specificity of one template image from its :func:`image_metrics` table (with target).

    Parameters
    ----------
    metrics : pandas.DataFrame
        Output of :func:`image_metrics` called with ``target=``.

    Returns
    -------
    dict
        ``target``, ``specificity``, ``specificity_clipped``, ``specificity_abs``,
        ``max_bright``, ``max_bright_label``,
        ``max_dark``, ``max_dark_label`` (as :func:`specificity`) and ``target_bright``.

    Raises
    ------
    ValueError
        If the table has no ``crosstalk`` column (``image_metrics`` was called without target).
    """
    if "crosstalk" not in metrics.columns or "target" not in metrics.columns:
        raise ValueError("metrics table has no crosstalk: call image_metrics(..., target=...)")
    target = str(metrics["target"].iloc[0])
    row = pd.DataFrame([metrics["crosstalk"].to_numpy(float)], index=[target],
                       columns=metrics["label"].astype(str).tolist())
    out = specificity(row).iloc[0].to_dict()
    return {"target": target, **out, "target_bright": bool(metrics["target_bright"].iloc[0])}


# --------------------------------------------------------------------------------------------
# unit-cell average and line profiles
# --------------------------------------------------------------------------------------------
def unit_cell_average(
    image: np.ndarray,
    *,
    step_A: float | Sequence[float],
    cell_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    cell_origin_A: Sequence[float] = (0.0, 0.0),
    bins: int | Sequence[int] | None = None,
    return_counts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Fold a multi-cell scan onto one unit cell by binning positions modulo the cell.

    Parameters
    ----------
    image : numpy.ndarray, shape (scan_y, scan_x)
    step_A : float or (float, float)
        Scan step ``(y, x)`` in Å.
    cell_A : float or (float, float)
        Projected cell ``(Ly, Lx)`` in Å (need not be a multiple of the step).
    origin_A : (float, float)
        Position in Å of scan pixel ``[0, 0]``.
    cell_origin_A : (float, float)
        A cell corner in Å (same frame as the sites); bin ``[0, 0]`` is centred on it.
    bins : int or (int, int), optional
        Bins per cell axis; default ``round(L / step)`` (at least 1).
    return_counts : bool
        Also return the number of pixels per bin.

    Returns
    -------
    average : numpy.ndarray, shape (bins_y, bins_x)
        Mean of the pixels in each bin. Bin ``[k, l]`` is centred at
        ``cell_origin_A + (k * Ly / bins_y, l * Lx / bins_x)``: the result is a periodic image
        with step ``cell_A / bins`` and origin ``cell_origin_A``, so sites folded with
        :func:`tmask_validate.templates.wrap_sites` can be measured on it with ``periodic=True``.
    counts : numpy.ndarray of int, shape (bins_y, bins_x)
        Only if ``return_counts``.

    Raises
    ------
    ValueError
        Bad inputs, or an empty bin (scan smaller than a cell, or too many bins).
    """
    img = _as_image(image)
    step = np.array(as_pair(step_A, "step_A"))
    cell = np.array(as_pair(cell_A, "cell_A"))
    origin = np.array(as_pair(origin_A, "origin_A", positive=False))
    corner = np.array(as_pair(cell_origin_A, "cell_origin_A", positive=False))
    if bins is None:
        nb = np.maximum(np.round(cell / step), 1).astype(int)
    else:
        nb = np.atleast_1d(np.asarray(bins))
        nb = np.repeat(nb, 2) if nb.size == 1 else nb
        if nb.shape != (2,) or np.any(nb < 1) or np.any(nb != np.round(nb)):
            raise ValueError(f"bins must be a positive int or (int, int), got {bins!r}")
        nb = nb.astype(int)
    ky = _fold_bins(origin[0] + np.arange(img.shape[0]) * step[0], corner[0], cell[0], nb[0])
    kx = _fold_bins(origin[1] + np.arange(img.shape[1]) * step[1], corner[1], cell[1], nb[1])
    flat = (ky[:, None] * nb[1] + kx[None, :]).ravel()
    counts = np.bincount(flat, minlength=nb[0] * nb[1]).reshape(nb)
    sums = np.bincount(flat, weights=img.ravel(), minlength=nb[0] * nb[1]).reshape(nb)
    if np.any(counts == 0):
        raise ValueError(
            f"{int(np.sum(counts == 0))} of {counts.size} unit-cell bins are empty: the scan "
            f"covers less than a cell along some axis, or bins={tuple(nb)} is too fine"
        )
    avg = sums / counts
    return (avg, counts) if return_counts else avg


def _fold_bins(pos_A: np.ndarray, corner_A: float, cell_A: float, nb: int) -> np.ndarray:
    frac = np.mod((pos_A - corner_A) / cell_A, 1.0)
    # nearest bin centre, wrapped; exact ties (a pixel halfway between two bin centres, common
    # when the cell is a rational multiple of the step) go to the upper bin deterministically
    return np.mod(np.floor(frac * nb + 0.5 + 1e-9).astype(np.int64), nb)


def line_profile(
    image: np.ndarray,
    start_A: Sequence[float],
    end_A: Sequence[float],
    *,
    width_A: float = 0.0,
    step_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    periodic: bool = False,
    sample_step_A: float | None = None,
    order: int = 1,
    normalise: str | None = "minmax",
) -> pd.DataFrame:
    """Intensity profile along a segment, averaged across a band (paper Fig. 5d).

    Parameters
    ----------
    image : numpy.ndarray, shape (scan_y, scan_x)
    start_A, end_A : (float, float)
        Segment end points ``(y, x)`` in Å (scan frame).
    width_A : float
        Full width in Å of the band (perpendicular to the segment) averaged over; 0 = the line.
    step_A : float or (float, float)
        Scan step ``(y, x)`` in Å.
    origin_A : (float, float)
        Position in Å of pixel ``[0, 0]``.
    periodic : bool
        Image is periodic (e.g. a unit-cell average): samples wrap around the edges, so the
        segment may extend beyond the image. Otherwise every sample must lie inside the image
        (between the first and last pixel centres).
    sample_step_A : float, optional
        Maximum spacing of samples along and across the segment, Å (default: half the
        smaller scan step).
    order : int
        Interpolation order (1 = bilinear, 3 = cubic spline).
    normalise : {"minmax", "zscore", None}
        Normalisation of the band-averaged profile (see "Line profile").

    Returns
    -------
    pandas.DataFrame
        Columns ``distance_A`` (from ``start_A``), ``y_A``, ``x_A`` (sample positions on the
        centre line) and ``intensity``.

    Raises
    ------
    ValueError
        Zero-length segment, samples outside a non-periodic image, bad parameters, or a flat
        profile with ``normalise`` set.
    """
    img = _as_image(image)
    step = np.array(as_pair(step_A, "step_A"))
    origin = np.array(as_pair(origin_A, "origin_A", positive=False))
    p0 = np.array(as_pair(start_A, "start_A", positive=False))
    p1 = np.array(as_pair(end_A, "end_A", positive=False))
    if normalise not in ("minmax", "zscore", None):
        raise ValueError(f"normalise must be 'minmax', 'zscore' or None, got {normalise!r}")
    if not np.isfinite(width_A) or width_A < 0:
        raise ValueError(f"width_A must be >= 0, got {width_A!r}")
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"order must be an int in 0..5, got {order!r}")
    ds = 0.5 * float(step.min()) if sample_step_A is None else float(sample_step_A)
    if not np.isfinite(ds) or ds <= 0:
        raise ValueError(f"sample_step_A must be > 0, got {sample_step_A!r}")
    vec = p1 - p0
    length = float(np.hypot(*vec))
    if length == 0:
        raise ValueError("start_A and end_A coincide: zero-length profile")
    n_along = int(np.ceil(length / ds - 1e-9)) + 1
    t = np.linspace(0.0, 1.0, n_along)
    centre = p0[None, :] + t[:, None] * vec[None, :]  # (n, 2) Å
    normal = np.array([-vec[1], vec[0]]) / length
    if width_A > 0:
        n_across = int(np.ceil(width_A / ds - 1e-9)) + 1
        off = np.linspace(-0.5 * width_A, 0.5 * width_A, n_across)
    else:
        off = np.zeros(1)
    pts = centre[:, None, :] + off[None, :, None] * normal[None, None, :]  # (n, m, 2)
    px = (pts - origin) / step
    if not periodic:
        lim = np.array(img.shape) - 1
        tol = 1e-9
        if np.any(px < -tol) or np.any(px > lim + tol):
            raise ValueError(
                "the profile band leaves the image (use periodic=True for periodic images, "
                "or a shorter/narrower band)"
            )
        px = np.clip(px, 0, lim)
    mode = "grid-wrap" if periodic else "nearest"
    vals = ndimage.map_coordinates(img, [px[..., 0].ravel(), px[..., 1].ravel()], order=order,
                                   mode=mode).reshape(px.shape[:2])
    prof = vals.mean(axis=1)
    if normalise is not None:
        spread = np.ptp(prof) if normalise == "minmax" else np.std(prof)
        if spread == 0:
            raise ValueError("profile is flat: cannot normalise it")
        prof = (prof - prof.min()) / spread if normalise == "minmax" else (
            (prof - prof.mean()) / spread
        )
    return pd.DataFrame({"distance_A": t * length, "y_A": centre[:, 0], "x_A": centre[:, 1],
                         "intensity": prof})


def unit_cell_line_profile(
    image: np.ndarray,
    start_A: Sequence[float],
    end_A: Sequence[float],
    *,
    step_A: float | Sequence[float],
    cell_A: float | Sequence[float],
    origin_A: Sequence[float] = (0.0, 0.0),
    cell_origin_A: Sequence[float] = (0.0, 0.0),
    width_A: float = 0.0,
    bins: int | Sequence[int] | None = None,
    sample_step_A: float | None = None,
    order: int = 1,
    normalise: str | None = "minmax",
) -> pd.DataFrame:
    """Unit-cell-averaged line profile (paper Fig. 5d): fold, then profile periodically.

    The image is folded with :func:`unit_cell_average` and the profile is taken on the folded
    (periodic) cell with :func:`line_profile`; ``start_A``/``end_A`` are in the scan/site frame
    and are interpreted modulo the cell, so the segment may cross cell boundaries.

    Parameters
    ----------
    image, step_A, cell_A, origin_A, cell_origin_A, bins
        As for :func:`unit_cell_average`.
    start_A, end_A, width_A, sample_step_A, order, normalise
        As for :func:`line_profile` (``sample_step_A`` defaults to half the folded step).

    Returns
    -------
    pandas.DataFrame
        As :func:`line_profile`.
    """
    avg = unit_cell_average(image, step_A=step_A, cell_A=cell_A, origin_A=origin_A,
                            cell_origin_A=cell_origin_A, bins=bins)
    cell = np.array(as_pair(cell_A, "cell_A"))
    fold_step = cell / np.array(avg.shape)
    return line_profile(avg, start_A, end_A, width_A=width_A, step_A=tuple(fold_step),
                        origin_A=cell_origin_A, periodic=True, sample_step_A=sample_step_A,
                        order=order, normalise=normalise)


# --------------------------------------------------------------------------------------------
# mask similarity
# --------------------------------------------------------------------------------------------
def mask_similarity(
    a: np.ndarray,
    b: np.ndarray,
    *,
    valid: np.ndarray | None = None,
) -> float:
    """Pearson correlation coefficient between two masks (or any two same-shape arrays).

    Parameters
    ----------
    a, b : numpy.ndarray
        Masks of the same shape, e.g. ``(ky, kx)`` PCC maps (simulation vs experiment).
    valid : numpy.ndarray of bool, optional
        Pixels to use, e.g. ``column_stats(...).std > 0`` to drop detector pixels of zero
        variance. Pixels where either mask is NaN/Inf are always ignored.

    Returns
    -------
    float
        :math:`r = \\sum (a-\\bar a)(b-\\bar b) / \\sqrt{\\sum (a-\\bar a)^2 \\sum (b-\\bar b)^2}`
        over the used pixels, in [-1, 1].

    Raises
    ------
    ValueError
        Shape mismatch, fewer than 2 usable pixels, or a mask that is constant there.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    use = np.isfinite(a) & np.isfinite(b)
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        if v.shape != a.shape:
            raise ValueError(f"valid has shape {v.shape}, masks {a.shape}")
        use &= v
    if use.sum() < 2:
        raise ValueError("fewer than 2 pixels where both masks are finite/valid")
    x = a[use] - a[use].mean()
    y = b[use] - b[use].mean()
    sxx, syy = float(x @ x), float(y @ y)
    if sxx == 0 or syy == 0:
        raise ValueError("a mask is constant over the used pixels: correlation undefined")
    return float(np.clip((x @ y) / np.sqrt(sxx * syy), -1.0, 1.0))


def similarity_matrix(
    masks: Mapping[str, np.ndarray],
    others: Mapping[str, np.ndarray] | None = None,
    *,
    valid: np.ndarray | None = None,
) -> pd.DataFrame:
    """Pairwise :func:`mask_similarity` between named masks.

    Parameters
    ----------
    masks : mapping of str to numpy.ndarray
        Row masks (e.g. simulated PCC maps per species).
    others : mapping of str to numpy.ndarray, optional
        Column masks (e.g. experimental maps); default ``masks`` itself.
    valid : numpy.ndarray of bool, optional
        As for :func:`mask_similarity`.

    Returns
    -------
    pandas.DataFrame
        ``r[row name, column name]``.
    """
    others = masks if others is None else others
    data = {c: [mask_similarity(masks[r], others[c], valid=valid) for r in masks] for c in others}
    return pd.DataFrame(data, index=list(masks))
