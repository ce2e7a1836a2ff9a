"""Figures of the validation workflow (matplotlib, Agg backend; PNG + PDF).

Paper figures reproduced on simulated data, from one analysis Dataset
(:func:`tmask_validate.analysis.analyse_dataset`):

- :func:`fig1c_dmatrix` - sorted, normalised D matrix with example masks (Fig. 1c);
- :func:`fig2_adf` - virtual ADF, PCC map of the ADF image, intensity and PCC vs angle,
  optimised ADF (Fig. 2);
- :func:`fig3_species` - per-species PCC masks and images, all-atom image (Fig. 3);
- :func:`fig4_domain_wall` - PbTiO3 domain wall: ADF, ABF, partial-template Pb/Ti/O/all images
  and the Ti-O displacement map (Fig. 4);
- :func:`fig5_compare` - inverted ABF, iCoM, template image and the unit-cell-averaged line
  profile (Fig. 5);

and from the aggregated metrics table: :func:`sweep_thickness` and :func:`sweep_dose`
(specificity and CNR of template masks, best ABF and iCoM vs thickness / dose).
Every function returns ``(figure, caption)``; :func:`save` writes PNG and PDF.
Periodic one-cell images are tiled (``tile`` x ``tile``) for display.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

__all__ = [
    "save",
    "fig1c_dmatrix",
    "fig2_adf",
    "fig3_species",
    "fig4_domain_wall",
    "fig5_compare",
    "sweep_thickness",
    "sweep_dose",
    "dataset_overview",
    "mask_similarity_plot",
    "FIGURE_GUIDE",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def save(fig, path: str | Path, *, dpi: int = 130) -> tuple[Path, Path]:
    """Write ``path`` (.png) and the same name with .pdf; close the figure."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pdf = path.with_suffix(".pdf")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)
    return path, pdf


def _names(ads) -> list[str]:
    return [str(n) for n in ads["name"].values]


def _has(ads, name: str) -> bool:
    return name in _names(ads)


def _img(ads, name: str, *, polarity: bool = False) -> np.ndarray:
    i = _names(ads).index(name)
    img = ads["images"].values[i].astype(float)
    if polarity:
        img = img * float(ads["polarity"].values[i])
    return img


def _mask(ads, name: str) -> np.ndarray:
    return ads["masks"].values[_names(ads).index(name)].astype(float)


def _periodic(ads) -> bool:
    return bool(int(ads.attrs.get("periodic", 0)))


def _tile(ads, img: np.ndarray, tile: int) -> np.ndarray:
    return np.tile(img, (tile, tile)) if _periodic(ads) and tile > 1 else img


def _step(ads) -> tuple[float, float]:
    return tuple(json.loads(ads.attrs["calibration"])["step_A"])


def _meta(ads) -> dict:
    return json.loads(ads.attrs.get("meta", "{}"))


def _dose_text(m: dict) -> str:
    """Dose as recorded in the dataset's metadata: "1e+05 e⁻/Å²", "noiseless" (a simulation
    without dose noise) or "dose unknown" (data that do not record it)."""
    dose = m.get("dose_e_per_A2")
    if isinstance(dose, int | float) and np.isfinite(dose) and dose > 0:
        return f"{dose:.3g} e⁻/Å²"
    simulated = m.get("simulated", "n_configurations" in m)
    return "noiseless" if simulated is True else "dose unknown"


def _title(ads) -> str:
    """``structure, thickness, dose`` from the dataset's metadata (unknowns said so)."""
    m = _meta(ads)
    t = m.get("thickness_nm")
    tt = f"{t:.1f} nm" if isinstance(t, int | float) else "thickness unknown"
    return f"{m.get('structure', '')}, {tt}, {_dose_text(m)}"


def _intensity_unit(ads) -> str:
    """Colour-bar label of a virtual (raw-data) image: noiseless simulations are in fractions
    of the incident probe intensity, everything else in detector counts."""
    m = _meta(ads)
    dose = m.get("dose_e_per_A2")
    noisy = isinstance(dose, int | float) and np.isfinite(dose) and dose > 0
    if not noisy and m.get("simulated", "n_configurations" in m) is True:
        return "fraction of probe"
    return "counts"


#: colour-bar labels of the other image kinds
UNIT_PCC = "PCC r"
UNIT_TEMPLATE_IMAGE = "a.u. (mask · D̂)"


def _nice_length(width: float) -> float:
    """A round scale-bar length (1, 2, 5 x 10^k) of about a quarter of ``width``."""
    target = max(width / 4.0, 1e-9)
    k = np.floor(np.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10 ** k <= target:
            return float(m * 10 ** k)
    return float(10 ** k)


def _scale_bar(ax, width_A: float, height_A: float):
    """Scale bar in Å, lower left, drawn in data coordinates (the image extent is in Å)."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    L = _nice_length(width_A)
    bar = AnchoredSizeBar(ax.transData, L, f"{L:g} Å", "lower left", pad=0.2, borderpad=0.3,
                          sep=1, color="white", frameon=True, size_vertical=height_A * 0.025,
                          fontproperties=FontProperties(size=6), label_top=True)
    # a translucent dark box keeps the white bar readable on bright (ABF) and dark images
    bar.patch.set(facecolor="black", alpha=0.45, edgecolor="none")
    ax.add_artist(bar)
    return bar


def _colorbar(ax, mappable, label: str):
    """A slim colour bar beside ``ax`` with ``label`` (units)."""
    cb = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label, fontsize=6, labelpad=1)
    cb.ax.tick_params(labelsize=5, length=2, pad=1)
    cb.ax.yaxis.get_offset_text().set_fontsize(5)
    return cb


def _show_image(ax, ads, img, *, tile=3, title="", cmap="gray", unit: str | None = None,
                scale_bar: bool = True):
    """Scan image with physical extent (Å), a scale bar and a colour bar labelled ``unit``
    (``None``: the virtual-image unit of the data)."""
    sy, sx = _step(ads)
    im = _tile(ads, img, tile)
    w, h = im.shape[1] * sx, im.shape[0] * sy
    art = ax.imshow(im, cmap=cmap, origin="upper", extent=(0, w, h, 0),
                    interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if scale_bar:
        _scale_bar(ax, w, h)
    _colorbar(ax, art, _intensity_unit(ads) if unit is None else unit)
    return art


#: non-negative weight masks spanning more than this ratio are shown on a log scale
LOG_MASK_RANGE = 1e3


def _mask_norm(mask: np.ndarray, diverging: bool):
    """Colour normalisation that shows the structure of a mask: symmetric for PCC maps;
    for non-negative weight masks linear from 0 unless the non-zero weights span more than
    :data:`LOG_MASK_RANGE` (an Eq. 8 mask: weights 1e1-1e9, largest on near-zero-mean pixels
    at the aperture edge, which a linear scale paints black), then logarithmic from the 1st
    percentile to the largest weight (zeros drawn black)."""
    from matplotlib.colors import LogNorm, Normalize

    m = np.asarray(mask, float)
    if diverging:
        v = float(np.nanmax(np.abs(m))) if m.size else 0.0
        return Normalize(-(v or 1.0), v or 1.0)
    nz = m[np.isfinite(m) & (m > 0)]
    if nz.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(np.percentile(nz, 1)), float(nz.max())
    if np.nanmin(m) >= 0 and hi > LOG_MASK_RANGE * lo:
        return LogNorm(lo, hi, clip=True)
    return Normalize(min(0.0, float(np.nanmin(m))), hi)


def _show_mask(ax, ads, mask, *, title="", diverging=True, unit: str | None = UNIT_PCC,
               axis_labels: bool = True):
    """Detector-plane mask in mrad; ``unit=None``: no colour bar."""
    ky, kx = ads["ky"].values, ads["kx"].values
    ext = (kx[0], kx[-1], ky[-1], ky[0])
    norm = _mask_norm(mask, diverging)
    shown = np.asarray(mask, float)
    if type(norm).__name__ == "LogNorm":
        shown = np.where(shown > 0, shown, np.nan)  # zeros: the axes background (black)
        ax.set_facecolor("black")
    art = ax.imshow(shown, cmap="RdBu_r" if diverging else "gray", norm=norm, extent=ext,
                    origin="upper")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6, length=2, pad=1)
    if axis_labels:
        ax.set_xlabel("kx (mrad)", fontsize=6, labelpad=1)
        ax.set_ylabel("ky (mrad)", fontsize=6, labelpad=1)
    if unit is not None:
        _colorbar(ax, art, unit)
    return art


def _inset_mask(ax, ads, mask, diverging=True):
    ins = ax.inset_axes([0.68, 0.68, 0.3, 0.3])
    _show_mask(ins, ads, mask, diverging=diverging, unit=None, axis_labels=False)
    ins.set_xticks([])
    ins.set_yticks([])
    for sp in ins.spines.values():
        sp.set_color("white")
    return ins


def _labels(ads) -> list[str]:
    return list(dict.fromkeys(str(x) for x in ads["site_label"].values))


def _overlay_sites(ax, ads, tile=3):
    sy, sx = _step(ads)
    ny, nx = ads["images"].shape[1:]
    y = ads["site_y_A"].values.astype(float)
    x = ads["site_x_A"].values.astype(float)
    lab = ads["site_label"].values.astype(str)
    org = json.loads(ads.attrs.get("origin_A", "[0, 0]"))
    reps = range(tile) if _periodic(ads) else range(1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, L in enumerate(_labels(ads)):
        sel = lab == L
        pts = []
        for i in reps:
            for j in reps:
                yy = y[sel] - org[0] + i * ny * sy
                xx = x[sel] - org[1] + j * nx * sx
                pts.append(np.stack([yy, xx], 1))
        p = np.concatenate(pts)
        ax.scatter(p[:, 1] + sx / 2, p[:, 0] + sy / 2, s=6, facecolors="none",
                   edgecolors=colors[k % len(colors)], linewidths=0.6, label=L)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4,
              frameon=False, markerscale=1.5, handletextpad=0.2, columnspacing=0.8)


#: per figure kind: (human heading, what to look at, in-sample?) for the report
FIGURE_GUIDE: dict[str, tuple[str, str, bool]] = {
    "fig1c_dmatrix": (
        "Sorted D matrix (Fig. 1c)",
        "the bright band of the BF disc on the left and how the example masks pick columns "
        "of it; this is a view of the data, not a test.", False),
    "fig2_adf": (
        "Virtual ADF and its PCC map (Fig. 2)",
        "whether the PCC map (b, c) is positive at high angle and negative in the BF disc, "
        "and whether the optimised ADF (d) shows the same columns as the virtual ADF (a).",
        True),
    "fig3_species": (
        "Atom-specific masks and images (Fig. 3)",
        "whether each column type's image (bottom row) is bright on its own sites only "
        "(circles in the ABF panel). In-sample: an image that looks like its template is not "
        "evidence on its own.", True),
    "fig4_domain_wall": (
        "Domain wall with partial templates (Fig. 4)",
        "whether the images made from the small reference window (cyan) keep the column "
        "contrast across the wall, and the arrows (h) flip direction at the wall.", True),
    "fig5_compare": (
        "ABF, iCoM and template image compared (Fig. 5)",
        "the line profile (d): the light columns (grey lines) should be peaks in the template "
        "image, and how deep they are in ABF and iCoM.", True),
    "sweep_thickness": (
        "Specificity and CNR vs thickness",
        "where the specificity curves drop below the dashed 0.8 line, and whether the "
        "template images' CNR stays above ABF and iCoM as the sample thickens.", False),
    "sweep_dose": (
        "CNR and specificity vs dose",
        "the dose below which the template images lose their advantage (dotted lines: "
        "noiseless values).", False),
    "mask_stability": (
        "Stability of the PCC masks",
        "values near 1 mean the mask hardly changes with thickness (left) or noise (right).",
        False),
}


# ----------------------------------------------------------------------------------------------
# paper figures
# ----------------------------------------------------------------------------------------------
def fig1c_dmatrix(ads: xr.Dataset, *, example: str | None = None):
    """Fig. 1c: sorted normalised D matrix with example masks (ADF, ABF, template) above it."""
    dm = ads["dmatrix"].values
    cang = ads["dmatrix_col_angle_mrad"].values
    ang = ads["angle_mrad"].values.ravel()
    order = np.argsort(ang, kind="stable")
    if example is None:
        cands = [f"tm_pcc_binary_{L}" for L in ("O", "Li", "all")] + ["tm_pcc_binary_all"]
        example = next((c for c in cands if _has(ads, c)), "adf_pcc")
    fig = plt.figure(figsize=(6.5, 6))
    gs = fig.add_gridspec(4, 1, height_ratios=[0.35, 0.35, 0.35, 6], hspace=0.15)
    for k, name in enumerate(["adf", "abf", example]):
        ax = fig.add_subplot(gs[k])
        vals = _mask(ads, name).ravel()[order]
        idx = np.clip(np.searchsorted(ang[order], cang), 0, vals.size - 1)
        strip = vals[idx][None, :]
        v = float(np.max(np.abs(strip))) or 1.0
        ax.imshow(strip, aspect="auto", cmap="gray" if name in ("adf", "abf") else "RdBu_r",
                  vmin=0 if name in ("adf", "abf") else -v, vmax=v)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    ax = fig.add_subplot(gs[3])
    lo, hi = np.percentile(dm, [1, 99])
    art = ax.imshow(dm, aspect="auto", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    # colour bar outside the axes, so the mask strips above stay aligned with the columns
    cb = fig.colorbar(art, cax=ax.inset_axes([1.02, 0.0, 0.025, 1.0]))
    cb.set_label("normalised D̂ (Eq. 4, dimensionless)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    ticks = np.linspace(0, len(cang) - 1, 6).astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{cang[t]:.0f}" for t in ticks], fontsize=7)
    ax.set_xlabel("pixel-STEM images sorted by scattering angle (mrad)", fontsize=8)
    ax.set_ylabel("probe positions sorted by high-angle intensity", fontsize=8)
    fig.suptitle(f"Sorted normalised D matrix - {_title(ads)}", fontsize=9)
    cap = ("Fig. 1c analogue: columns of the normalised matrix D̂ (Eq. 4) sorted by scattering "
           "angle, rows (probe positions) by intensity beyond the ADF inner angle; above, the "
           f"binary ADF and ABF masks and the PCC mask '{example}' as row vectors in the same "
           "column order.")
    return fig, cap


def _bin_width_mrad(ads) -> float:
    """Ring width for azimuthal means: one detector pixel (mean of ky, kx sampling)."""
    cal = json.loads(ads.attrs.get("calibration", "{}"))
    mpp = cal.get("mrad_per_px")
    if mpp is not None:
        return float(np.mean(np.atleast_1d(np.asarray(mpp, float))))
    ang = np.sort(np.unique(np.round(ads["angle_mrad"].values.ravel(), 3)))
    return float(np.median(np.diff(ang))) if ang.size > 2 else 1.0


def fig2_adf(ads: xr.Dataset, *, tile: int = 3):
    """Fig. 2: virtual ADF, its PCC map, intensity and PCC vs angle (azimuthal mean with the
    16-84 % band), optimised ADF."""
    from tmask_validate.core import binned_profile

    fig = plt.figure(figsize=(14, 3.6), layout="constrained")
    axs = fig.subplots(1, 4, width_ratios=[1, 1, 1.35, 1])
    _show_image(axs[0], ads, _img(ads, "adf"), tile=tile, title="(a) virtual ADF")
    _inset_mask(axs[0], ads, _mask(ads, "adf"), diverging=False)
    _show_mask(axs[1], ads, _mask(ads, "adf_pcc"), title="(b) PCC map r_adf (Eq. 6)")
    ang = ads["angle_mrad"].values.ravel()
    mean = ads["mean_pattern"].values.ravel().astype(float)
    r = _mask(ads, "adf_pcc").ravel()
    width = _bin_width_mrad(ads)
    ax = axs[2]
    pi = binned_profile(ang, mean / max(float(mean.max()), 1e-30), bin_mrad=width)
    pos = pi["mean"] > 0
    ax.fill_between(pi["center_mrad"][pos], np.maximum(pi["low"][pos], 1e-12),
                    pi["high"][pos], color="tab:blue", alpha=0.25, lw=0)
    ax.plot(pi["center_mrad"][pos], pi["mean"][pos], color="tab:blue", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("scattering angle (mrad)", fontsize=8)
    ax.set_ylabel("mean intensity (norm. to max)", fontsize=8, color="tab:blue")
    ax2 = ax.twinx()
    pr = binned_profile(ang, r, bin_mrad=width)
    ax2.fill_between(pr["center_mrad"], pr["low"], pr["high"], color="tab:red", alpha=0.2,
                     lw=0)
    ax2.plot(pr["center_mrad"], pr["mean"], color="tab:red", lw=1)
    ax2.axhline(0, color="tab:red", lw=0.5, ls=":")
    ax2.set_ylabel("PCC r with the ADF image", fontsize=8, color="tab:red")
    ax.set_title(f"(c) intensity and PCC vs angle ({width:.2g} mrad rings)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax2.tick_params(labelsize=7)
    _show_image(axs[3], ads, _img(ads, "adf_opt"), tile=tile,
                title="(d) optimised ADF (Eq. 8 mask, r > 0)")
    _inset_mask(axs[3], ads, _mask(ads, "adf_opt"), diverging=False)
    fig.suptitle(_title(ads), fontsize=9)
    cap = ("Fig. 2 analogue: (a) virtual ADF image (binary mask inset); (b) PCC of every "
           "pixel-STEM image with the ADF image (red positive, blue negative); (c) azimuthal "
           "mean (line) and 16-84 % spread (band) over the detector pixels of each "
           "one-pixel-wide ring of the mean intensity (blue, log scale) and the PCC (red); (d) "
           "optimised ADF image from the Eq. 8 ('mean') mask of the ADF image thresholded at "
           "r > 0 and applied to the raw data (mask inset; its weights span decades, so the grey "
           "scale is logarithmic when they span more than 1e3).")
    return fig, cap


def fig3_species(ads: xr.Dataset, *, kind: str = "binary", tile: int = 3, norm: str = "pcc"):
    """Fig. 3: ABF with sites, per-species PCC masks (top) and images (bottom), all-atom."""
    labels = [L for L in _labels(ads) if _has(ads, f"tm_{norm}_{kind}_{L}")]
    cols = ["abf", *labels, "all"]
    fig, axs = plt.subplots(2, len(cols), figsize=(2.8 * len(cols), 5.2), layout="constrained")
    axs = np.atleast_2d(axs)
    _show_image(axs[0, 0], ads, _img(ads, "abf"), tile=tile, title="virtual ABF + sites")
    _overlay_sites(axs[0, 0], ads, tile=tile)
    first = labels[-1] if labels else "all"
    _show_image(axs[1, 0], ads, ads["templates"].values[_names(ads).index(
        f"tm_{norm}_{kind}_{first}")], tile=tile, title=f"template s_{first}", cmap="magma",
        unit="template (a.u.)")
    for j, L in enumerate(cols[1:], start=1):
        name = f"tm_{norm}_{kind}_{L}"
        if not _has(ads, name):
            axs[0, j].axis("off")
            axs[1, j].axis("off")
            continue
        _show_mask(axs[0, j], ads, _mask(ads, name), title=f"r_{L}")
        _show_image(axs[1, j], ads, _img(ads, name), tile=tile, title=f"image {L}",
                    unit=UNIT_TEMPLATE_IMAGE)
    fig.suptitle(f"Atom-specific PCC masks and images ({kind}, {norm}) - {_title(ads)}",
                 fontsize=9)
    cap = (f"Fig. 3 analogue: virtual ABF image with the column sites; {kind} template of the "
           "last label; top row: PCC masks r_L (Eq. 9) of each column type and of all columns "
           "(red positive, blue negative correlation); bottom row: the images they give (Eq. 7).")
    return fig, cap


def _arrow_scale(dmax_A: float, cell_A: float) -> tuple[float, float]:
    """(magnification, key length in Å) for displacement arrows: the longest arrow drawn at
    about 40 % of ``cell_A`` (the column spacing; a round magnification), the key a round
    length <= the longest displacement."""
    if not (np.isfinite(dmax_A) and dmax_A > 0):
        return 1.0, 0.1
    return _nice_length(4 * 0.4 * cell_A / dmax_A), _nice_length(4 * dmax_A)


def _ti_o_map(ads, ax, gtag):
    """Fig. 4h: Ti displacement from the centre of its four O columns (measured on the Ti- and
    O-specific partial-template images)."""
    from tmask_validate import sites as sitesmod

    labels = _labels(ads)
    ti = next((L for L in labels if L.split("+")[0] == "Ti"), None)
    o = next((L for L in labels if L.split("+")[0] == "O"), None)
    if ti is None or o is None or not hasattr(sitesmod, "ti_o_displacement"):
        ax.axis("off")
        return False
    tab = pd.DataFrame({"label": ads["site_label"].values.astype(str),
                        "y_A": ads["site_y_A"].values, "x_A": ads["site_x_A"].values})
    step = _step(ads)
    pos = {}
    for L in (ti, o):
        name = f"partial_pcc_{gtag}_{L}"
        if not _has(ads, name):
            name = f"tm_pcc_{gtag}_{L}"
        ref = sitesmod.refine_sites(_img(ads, name), tab, step_A=step, labels=[L])
        pos[L] = ref[["y_A", "x_A"]].to_numpy()
    cell = json.loads(ads.attrs.get("cell_A", "null")) or [3.9, 3.9]
    try:
        disp = sitesmod.ti_o_displacement(pos[ti], pos[o], cell_A=cell[:2] if len(cell) > 1
                                          else cell)
    except (ValueError, TypeError):
        ax.axis("off")
        return False
    _show_image(ax, ads, _img(ads, "adf"), tile=1, title="(h) Ti - O-centre displacement")
    d = np.hypot(disp["dx_A"].to_numpy(float), disp["dy_A"].to_numpy(float))
    xy = disp[["x_A", "y_A"]].to_numpy(float)
    if len(xy) > 1:  # arrow length relative to the Ti-Ti spacing (not the supercell)
        dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(dist, np.inf)
        spacing = float(np.median(dist.min(axis=1)))
    else:
        spacing = float(min(cell[:2]))
    mag, key = _arrow_scale(float(np.nanmax(d)) if d.size else 0.0, spacing)
    q = ax.quiver(disp["x_A"], disp["y_A"], disp["dx_A"], disp["dy_A"], color="yellow",
                  angles="xy", scale_units="xy", scale=1.0 / mag, width=0.012)
    ax.quiverkey(q, 0.52, 0.93, key, f"{key:g} Å (arrows ×{mag:g})", labelpos="E",
                 coordinates="axes", color="yellow", labelcolor="yellow",
                 fontproperties={"size": 6})
    return True


def fig4_domain_wall(ads: xr.Dataset, *, gaussian_tag: str | None = None):
    """Fig. 4: domain wall - ADF, ABF with the reference window, partial-template images."""
    gtag = gaussian_tag or "g" + format(float(ads.attrs.get("reference_sigma_A", 0.35)), ".2f"
                                        ).rstrip("0").rstrip(".")
    labels = [L for L in _labels(ads) if _has(ads, f"partial_pcc_{gtag}_{L}")] + ["all"]
    n = 2 + len(labels) + 1
    fig, axs = plt.subplots(1, n, figsize=(2.9 * n, 3.3), layout="constrained")
    _show_image(axs[0], ads, _img(ads, "adf"), tile=1, title="(a) virtual ADF")
    _show_image(axs[1], ads, _img(ads, "abf"), tile=1, title="(b) virtual ABF + window")
    if "region_partial" in ads:
        reg = ads["region_partial"].values.astype(bool)
        sy, sx = _step(ads)
        axs[1].contour(np.arange(reg.shape[1]) * sx + sx / 2, np.arange(reg.shape[0]) * sy
                       + sy / 2, reg.astype(float), levels=[0.5], colors="cyan", linewidths=1)
    for k, L in enumerate(labels):
        name = f"partial_pcc_{gtag}_{L}"
        ax = axs[2 + k]
        if not _has(ads, name):
            ax.axis("off")
            continue
        _show_image(ax, ads, _img(ads, name), tile=1, title=f"({chr(99 + k)}) {L} (partial)",
                    unit=UNIT_TEMPLATE_IMAGE)
        _inset_mask(ax, ads, _mask(ads, name))
    has_map = _ti_o_map(ads, axs[-1], gtag)
    fig.suptitle(f"Domain wall, partial templates (gaussian {gtag}) - {_title(ads)}", fontsize=9)
    cap = ("Fig. 4 analogue: (a) virtual ADF and (b) virtual ABF of the domain-wall scan; the "
           "cyan box is the reference window (1/9 of the area) of the partial templates; then "
           "the images given by the partial-template PCC masks (inset) of each column type and "
           "of all columns, applied to the whole scan"
           + ("; (h) Ti column displacement from the centre of its four O columns, positions "
              "refined on the Ti and O images; arrows magnified, length key at the top."
              if has_map else "."))
    return fig, cap


def fig5_compare(ads: xr.Dataset, *, tile: int = 3, template: str = "tm_pcc_binary_all"):
    """Fig. 5: inverted ABF, iCoM, template image and a unit-cell-averaged line profile."""
    from tmask_validate import metrics
    from tmask_validate.core import sites_near_line

    names = [("abf", "inverted virtual ABF", None), ("icom", "iCoM", "a.u."),
             (template, "template (all)", UNIT_TEMPLATE_IMAGE)]
    fig = plt.figure(figsize=(13, 3.6), layout="constrained")
    gs = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.5])
    step = _step(ads)
    cell = json.loads(ads.attrs.get("cell_A", "null"))
    labels = _labels(ads)
    light = next((L for L in ("Li", "O") if L in labels), labels[-1])
    sel = ads["site_label"].values.astype(str) == light
    y0 = float(ads["site_y_A"].values[sel][0])
    org = json.loads(ads.attrs.get("origin_A", "[0, 0]"))
    sx_extent = ads["images"].shape[2] * step[1]
    L_x = (cell[1] if cell else sx_extent)
    start, end = (y0, org[1]), (y0, org[1] + L_x)
    ax_p = fig.add_subplot(gs[3])
    for k, (name, title, unit) in enumerate(names):
        if not _has(ads, name):
            continue
        ax = fig.add_subplot(gs[k])
        img = _img(ads, name, polarity=True)
        _show_image(ax, ads, img, tile=tile, title=title, unit=unit)
        if k == 0:
            for dy in (-0.4, 0.4):
                ax.axhline(y0 - org[0] + dy + step[0] / 2, color="lime", lw=0.6)
        try:
            if cell:
                prof = metrics.unit_cell_line_profile(img, start, end, step_A=step, cell_A=cell,
                                                      origin_A=org, width_A=0.8)
            else:
                prof = metrics.line_profile(img, start, (y0, org[1] + sx_extent - step[1]),
                                            step_A=step, origin_A=org, width_A=0.8)
            xcol = "distance_A" if "distance_A" in prof else prof.columns[0]
            ycol = "profile" if "profile" in prof else prof.columns[-1]
            ax_p.plot(prof[xcol], prof[ycol], label=title)
        except (ValueError, KeyError):
            pass
    periodic_cell = cell[:2] if (cell and _periodic(ads)) else None
    idx, xs = sites_near_line(ads["site_y_A"].values, ads["site_x_A"].values, y0_A=y0,
                              half_width_A=0.6, cell_A=periodic_cell, origin_A=org)
    line_len = L_x if cell else sx_extent
    labs = ads["site_label"].values.astype(str)[idx]
    for L, x in zip(labs, xs, strict=True):
        # a column on the cell edge belongs to both ends of the one-cell profile
        for xx in ([x, x + L_x] if periodic_cell is not None and x < 0.3 else [x]):
            if xx <= line_len + 1e-6:
                ax_p.axvline(float(xx), color="0.7", lw=0.5)
                ax_p.text(float(xx), 1.0, L, fontsize=6, ha="center", va="bottom",
                          transform=ax_p.get_xaxis_transform())
    ax_p.set_xlabel("distance along the line (Å)", fontsize=8)
    ax_p.set_ylabel("normalised intensity", fontsize=8)
    ax_p.tick_params(labelsize=7)
    ax_p.legend(fontsize=6)
    ax_p.set_title(f"(d) unit-cell-averaged profile through {light} columns", fontsize=8,
                   pad=10)
    fig.suptitle(_title(ads), fontsize=9)
    cap = ("Fig. 5 analogue: inverted virtual ABF, iCoM and the all-atom template image of the "
           f"same data; (d) line profile along x through the {light} columns (between the green "
           "lines in the first panel), averaged over unit cells and normalised; grey lines mark "
           "the columns within 0.6 Å of the line (periodic across the cell edge).")
    return fig, cap


def dataset_overview(ads: xr.Dataset, path: str | Path, *, dpi: int = 110):
    """One-page summary of any analysed dataset (experimental data): ADF, inverted ABF, iCoM,
    eigen-image and per-species template images with their masks."""
    fig, _ = fig3_species(ads, tile=1)
    save(fig, path, dpi=dpi)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# sweep plots from the aggregated metrics table
# ----------------------------------------------------------------------------------------------
def _light(labels) -> str:
    for L in ("Li", "O"):
        if L in labels:
            return L
    return sorted(labels)[0]


def _legend_below(ax) -> None:
    """Legend under the axes, outside the data (inside, "best" still covered crossing lines)."""
    n = len(ax.get_legend_handles_labels()[0])
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, n),
              frameon=False)


def sweep_thickness(metrics: pd.DataFrame, structure: str, *, dose_key: str = "noiseless"):
    """Specificity of each species' binary PCC template and CNR (lightest species) of template
    images, best ABF, ABF and iCoM vs thickness."""
    d = metrics[(metrics["structure"] == structure) & (metrics["dose_key"] == dose_key)].copy()
    d["t"] = d["thickness_nm"].astype(float)
    fig, axs = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    tm = d[(d["family"] == "template") & (d["normalisation"] == "pcc")
           & (d["template_kind"] == "binary") & (d["metric"] == "specificity")]
    for L, g in tm.groupby("species"):
        g = g.sort_values("t")
        axs[0].plot(g["t"], g["value"], "o-", label=f"tm {L}")
    axs[0].axhline(0.8, color="0.6", ls="--", lw=0.8)
    axs[0].set_xlabel("thickness (nm)")
    axs[0].set_ylabel("specificity (1 − max signed crosstalk)")
    _legend_below(axs[0])
    axs[0].set_title(f"{structure}: specificity of binary PCC templates", fontsize=9)
    labels = [x for x in d.loc[d["metric"] == "cnr", "species"].unique() if x != "fake"]
    light = _light(labels)
    for name, lab in ((f"tm_pcc_binary_{light}", f"template {light}"),
                      ("tm_pcc_binary_all", "template all"), ("abf_best", "best ABF (inv.)"),
                      ("abf", "ABF 11-23.5 (inv.)"), ("icom", "iCoM")):
        g = d[(d["name"] == name) & (d["metric"] == "cnr") & (d["species"] == light)]
        g = g.sort_values("t")
        if len(g):
            axs[1].plot(g["t"], g["value"], "o-", label=lab)
    axs[1].set_xlabel("thickness (nm)")
    axs[1].set_ylabel(f"CNR of {light} columns")
    _legend_below(axs[1])
    axs[1].set_title(f"{structure}: {light} CNR ({dose_key})", fontsize=9)
    cap = (f"{structure}, {dose_key}: left, specificity (1 - largest bright crosstalk) of the "
           "binary PCC template image of each column type vs thickness (dashed: 0.8); right, "
           f"CNR of the {light} columns in the {light} and all-atom template images, the best "
           "ABF of the radius sweep, the standard ABF and iCoM.")
    return fig, cap


def sweep_dose(metrics: pd.DataFrame, structure: str, *, thickness_nm: float | None = None):
    """CNR (lightest species) and specificity vs dose at one thickness (default: thickest)."""
    d = metrics[metrics["structure"] == structure].copy()
    d["t"] = d["thickness_nm"].astype(float)
    if thickness_nm is None:
        thickness_nm = float(d["t"].max())
    d = d[np.isclose(d["t"], thickness_nm)]
    d["dose"] = pd.to_numeric(d["dose_e_per_A2"], errors="coerce")
    noisy = d[d["dose"].notna()]
    fig, axs = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    labels = [x for x in d.loc[d["metric"] == "cnr", "species"].unique() if x != "fake"]
    light = _light(labels) if labels else ""
    for name, lab in ((f"tm_pcc_binary_{light}", f"template {light}"),
                      ("tm_pcc_binary_all", "template all"), ("abf_best", "best ABF (inv.)"),
                      ("icom", "iCoM")):
        g = noisy[(noisy["name"] == name) & (noisy["metric"] == "cnr")
                  & (noisy["species"] == light)].sort_values("dose")
        if len(g):
            line = axs[0].plot(g["dose"], g["value"], "o-", label=lab)
            ref = d[(d["name"] == name) & (d["metric"] == "cnr") & (d["species"] == light)
                    & d["dose"].isna()]
            if len(ref):
                axs[0].axhline(float(ref["value"].iloc[0]), color=line[0].get_color(), ls=":",
                               lw=0.8)
    axs[0].set_xscale("log")
    axs[0].set_xlabel("dose (e-/Å²)")
    axs[0].set_ylabel(f"CNR of {light}")
    _legend_below(axs[0])
    tm = noisy[(noisy["family"] == "template") & (noisy["normalisation"] == "pcc")
               & (noisy["template_kind"] == "binary") & (noisy["metric"] == "specificity")]
    for L, g in tm.groupby("species"):
        g = g.sort_values("dose")
        axs[1].plot(g["dose"], g["value"], "o-", label=f"tm {L}")
    axs[1].set_xscale("log")
    axs[1].axhline(0.8, color="0.6", ls="--", lw=0.8)
    axs[1].set_xlabel("dose (e-/Å²)")
    axs[1].set_ylabel("specificity (1 − max signed crosstalk)")
    _legend_below(axs[1])
    fig.suptitle(f"{structure} at {thickness_nm:.1f} nm vs dose", fontsize=9)
    cap = (f"{structure} at {thickness_nm:.1f} nm: left, CNR of the {light} columns vs dose "
           "(dotted: noiseless value); right, specificity of the binary PCC template images "
           "vs dose.")
    return fig, cap


def mask_similarity_plot(similarity: pd.DataFrame, structure: str):
    """Stability of the binary PCC masks: Pearson r between masks at adjacent thicknesses
    (noiseless) and between noisy and noiseless masks at the same thickness, vs dose."""
    s = similarity[similarity["structure"] == structure]
    s = s[s["name"].str.startswith("tm_pcc_binary_")]
    fig, axs = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    th = s[(s["comparison"] == "thickness") & (s["dose_key_a"] == "noiseless")]
    ts = sorted(set(th["thickness_config_nm_a"]) | set(th["thickness_config_nm_b"]))
    adj = {(a, b) for a, b in zip(ts[:-1], ts[1:], strict=True)}
    keep = np.array([(a, b) in adj for a, b in zip(th["thickness_config_nm_a"],
                                                    th["thickness_config_nm_b"], strict=True)],
                    dtype=bool)
    th = th.loc[keep] if len(th) else th
    for name, g in th.groupby("name"):
        g = g.sort_values("thickness_config_nm_b")
        mid = (g["thickness_config_nm_a"] + g["thickness_config_nm_b"]) / 2
        axs[0].plot(mid, g["value"], "o-", label=name.replace("tm_pcc_binary_", ""))
    axs[0].set_xlabel("thickness (nm, mid-point of adjacent pair)")
    axs[0].set_ylabel("mask r (adjacent thicknesses)")
    if axs[0].get_legend_handles_labels()[0]:
        _legend_below(axs[0])
    dv = s[s["comparison"] == "dose_vs_noiseless"].copy()
    dv["dose"] = pd.to_numeric(dv["dose_key_b"].str.lstrip("d"), errors="coerce")
    for name, g in dv.groupby("name"):
        g = g.groupby("dose")["value"].mean().sort_index()
        axs[1].plot(g.index, g.values, "o-", label=name.replace("tm_pcc_binary_", ""))
    axs[1].set_xscale("log")
    axs[1].set_xlabel("dose (e-/Å²)")
    axs[1].set_ylabel("mask r, noisy vs noiseless\n(mean over thickness)")
    if axs[1].get_legend_handles_labels()[0]:
        _legend_below(axs[1])
    fig.suptitle(f"{structure}: stability of the binary PCC masks", fontsize=9)
    cap = (f"{structure}: Pearson r between binary PCC masks of each column type at adjacent "
           "thicknesses (noiseless, left) and between the noisy and noiseless masks at the same "
           "thickness, averaged over thickness, vs dose (right).")
    return fig, cap
