"""Figures: colour bars with units, scale bars in Å, no overlapping text at the saved size,
titles from the data's metadata, and the array helpers behind Figs. 2c and 5d.

A small synthetic periodic crystal (labels Pb, Ti+O, O, so every paper figure can be drawn) is
analysed once; the figures are drawn from it at their saved size.
"""

from __future__ import annotations

import json
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from tmask_validate import core, plots  # noqa: E402
from tmask_validate.analysis import analyse_dataset  # noqa: E402
from tmask_validate.calibration import Calibration  # noqa: E402

STEP = 0.25
CELL_PX = 16
CELL = CELL_PX * STEP  # 4 Å
#: O columns at y = 0.1 and y = 3.9 Å: 0.2 Å apart across the periodic cell edge
BASIS = pd.DataFrame({
    "label": ["Pb", "Ti+O", "O", "O"],
    "y_A": [0.6, 2.6, 0.1, 3.9],
    "x_A": [0.6, 2.6, 2.6, 0.6],
    "composition": ["Pb1", "Ti1O1", "O1", "O1"],
    "n_atoms": [1, 2, 1, 1],
})
OPTS = {
    "detectors_mrad": {"bf": [0, 6], "abf": [6, 14], "adf": [16, 40]},
    "abf_sweep": {"inner_mrad": [4, 8], "outer_mrad": [12, 14]},
    "templates": {"kinds": ["binary", "gaussian"], "gaussian_sigma_A": [0.35],
                  "normalisations": ["pcc"]},
    "metrics": {"radius_A": 0.3},
}


def synthetic_ads(meta: dict | None = None):
    """Analysed periodic one-cell scan (16 x 16 positions, 20 x 22 px detector)."""
    n = CELL_PX
    yy, xx = np.mgrid[0:n, 0:n] * STEP
    dy_, dx_ = 20, 22
    ky, kx = np.mgrid[0:dy_, 0:dx_] - np.array([(dy_ - 1) / 2, (dx_ - 1) / 2])[:, None, None]
    r, th = np.hypot(ky, kx), np.arctan2(ky, kx)
    region = {"Pb": (r > 8) * (1 + 0.3 * np.cos(4 * th)),
              "Ti+O": ((r > 3) & (r < 7) & (np.cos(2 * th) > 0.3)).astype(float),
              "O": ((r > 2) & (r < 6) & (np.sin(2 * th) > 0.3)).astype(float)}
    amp = {"Pb": 3.0, "Ti+O": 2.0, "O": 1.0}
    data = np.tile((r < 7) * 5.0 + 0.2, (n, n, 1, 1))
    for row in BASIS.itertuples():
        dy = yy - row.y_A
        dy -= CELL * np.round(dy / CELL)
        dx = xx - row.x_A
        dx -= CELL * np.round(dx / CELL)
        bump = np.exp(-(dy**2 + dx**2) / (2 * 0.3**2))
        data += amp[row.label] * bump[:, :, None, None] * region[row.label][None, None]
    cal = Calibration(step_A=(STEP, STEP), mrad_per_px=(2.0, 2.0),
                      center_px=((dy_ - 1) / 2, (dx_ - 1) / 2))
    m = {"structure": "synth", "dose_key": "noiseless", "simulated": True,
         "dose_e_per_A2": None, "thickness_nm": 20.0}
    m.update(meta or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyse_dataset(data.astype(np.float32), BASIS, cal, cell_A=(CELL, CELL),
                               periodic=True, options=OPTS, meta=m)


@pytest.fixture(scope="module")
def ads():
    return synthetic_ads()


def _draw(fig, dpi=80):
    """Draw at the saved resolution (the workflow's smoke dpi) and return the renderer."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _scan_image_axes(fig):
    """Axes that show a scan image (extent in Å with a scale bar) -- everything but colour
    bars, mask panels and insets."""
    out = []
    for ax in fig.axes:
        if any(type(a).__name__ == "AnchoredSizeBar" for a in ax.artists):
            out.append(ax)
    return out


# ---- array helpers ---------------------------------------------------------------------------
def test_sites_near_line_wraps_across_the_cell_edge():
    y = np.array([0.1, 3.9, 2.0, 0.65, 4.05])
    x = np.array([2.6, 0.6, 1.0, 3.0, 5.0])
    idx, xs = core.sites_near_line(y, x, y0_A=0.1, half_width_A=0.6, cell_A=(4.0, 4.2))
    # naive reference: distance to the nearest periodic image of the line
    dist = np.min(np.abs(y[:, None] - (0.1 + 4.0 * np.arange(-2, 3))[None]), axis=1)
    assert idx.tolist() == np.flatnonzero(dist <= 0.6).tolist() == [0, 1, 3, 4]
    np.testing.assert_allclose(xs, [2.6, 0.6, 3.0, 5.0 - 4.2])
    # without a cell nothing wraps (the old behaviour, right for non-periodic scans)
    idx2, _ = core.sites_near_line(y, x, y0_A=0.1, half_width_A=0.6)
    assert idx2.tolist() == [0, 3]


def test_binned_profile_matches_naive_rings():
    rng = np.random.default_rng(3)
    ang = rng.uniform(0, 37, size=(13, 17))
    val = rng.normal(size=(13, 17)) + ang / 10
    val[2, 3] = np.nan
    p = core.binned_profile(ang, val, bin_mrad=2.5)
    ok = np.isfinite(val)
    for c, mean, lo, hi, n in zip(p["center_mrad"], p["mean"], p["low"], p["high"],
                                  p["count"], strict=True):
        sel = ok & (ang >= c - 1.25) & (ang < c + 1.25)
        assert n == sel.sum() > 0
        assert mean == pytest.approx(val[sel].mean())
        assert lo == pytest.approx(np.quantile(val[sel], 0.16))
        assert hi == pytest.approx(np.quantile(val[sel], 0.84))
    assert p["count"].sum() == ok.sum()
    with pytest.raises(ValueError, match="bin_mrad"):
        core.binned_profile(ang, val, bin_mrad=0)


# ---- titles: dose from the data's metadata ---------------------------------------------------
@pytest.mark.parametrize("meta, expect", [
    ({"dose_e_per_A2": 1e5, "simulated": False, "dose_key": "experiment"}, "1e+05 e⁻/Å²"),
    ({"dose_e_per_A2": None, "simulated": False, "dose_key": "noiseless"}, "dose unknown"),
    ({"simulated": False}, "dose unknown"),
    ({"dose_e_per_A2": None, "simulated": True}, "noiseless"),
    ({"dose_e_per_A2": 2e4, "simulated": True}, "2e+04 e⁻/Å²"),
])
def test_title_dose_comes_from_metadata(meta, expect):
    assert plots._dose_text(meta) == expect
    assert ("noiseless" in plots._dose_text(meta)) == (expect == "noiseless")


def test_experimental_overview_title_says_dose_unknown(ads, tmp_path):
    exp = ads.copy()
    exp.attrs["meta"] = json.dumps({"structure": "scan_descan", "source": "scan.mib",
                                    "thickness_nm": None, "simulated": False,
                                    "dose_e_per_A2": None, "dose_key": "experiment"})
    fig, _ = plots.fig3_species(exp, tile=1)
    title = fig._suptitle.get_text()
    assert "dose unknown" in title and "noiseless" not in title and "?" not in title
    plots.save(fig, tmp_path / "o.png")


def test_analyse_records_the_dose_of_the_file():
    from tmask_validate.commands.analyse import _dose_of

    assert _dose_of({"dose_e_per_A2": 1e5}) == 1e5
    assert _dose_of({"dose_e_per_A2": "1e4"}) == 1e4
    for bad in ({}, {"dose_e_per_A2": None}, {"dose_e_per_A2": float("inf")},
                {"dose_e_per_A2": -1}, {"dose_e_per_A2": "n/a"}):
        assert _dose_of(bad) is None


# ---- colour bars and scale bars ---------------------------------------------------------------
def _figures(ads):
    return {
        "fig1c": plots.fig1c_dmatrix(ads)[0],
        "fig2": plots.fig2_adf(ads, tile=2)[0],
        "fig3": plots.fig3_species(ads, tile=2)[0],
        "fig4": plots.fig4_domain_wall(ads, gaussian_tag="g0.35")[0],
        "fig5": plots.fig5_compare(ads, tile=2)[0],
    }


@pytest.fixture(scope="module")
def figures(ads):
    figs = _figures(ads)
    yield figs
    import matplotlib.pyplot as plt

    for f in figs.values():
        plt.close(f)


@pytest.mark.parametrize("name, n_images", [("fig2", 2), ("fig3", 6), ("fig4", 6),
                                            ("fig5", 3)])
def test_scan_images_have_scale_bar_and_colour_bar_with_unit(figures, name, n_images):
    fig = figures[name]
    axes = _scan_image_axes(fig)
    assert len(axes) == n_images
    for ax in axes:
        bar = next(a for a in ax.artists if type(a).__name__ == "AnchoredSizeBar")
        label = bar.txt_label.get_text()
        assert label.endswith(" Å") and float(label.split()[0]) > 0
        im = ax.get_images()[0]
        assert im.colorbar is not None, (name, ax.get_title())
        assert im.colorbar.ax.get_ylabel().strip(), (name, ax.get_title())


def test_scale_bar_length_matches_the_image_extent(figures):
    ax = _scan_image_axes(figures["fig3"])[0]
    x0, x1 = ax.get_xlim()
    width_A = abs(x1 - x0)
    assert width_A == pytest.approx(2 * CELL, rel=1e-6)  # tile=2, extent in Å
    bar = next(a for a in ax.artists if type(a).__name__ == "AnchoredSizeBar")
    L = float(bar.txt_label.get_text().split()[0])
    assert width_A / 10 <= L <= width_A / 2


def test_pcc_maps_have_colour_bars(figures):
    fig = figures["fig3"]
    pcc = [ax for ax in fig.axes if ax.get_title().startswith("r_")]
    assert len(pcc) == 4
    for ax in pcc:
        cb = ax.get_images()[0].colorbar
        assert cb is not None and "PCC" in cb.ax.get_ylabel()
        assert "mrad" in ax.get_xlabel()


# ---- layout ----------------------------------------------------------------------------------
def _groups(fig) -> list[int]:
    """Panel id of every axes of ``fig``: twin axes (same position) share one."""
    out = []
    for ax in fig.axes:
        same = [a for a in fig.axes if a.bbox.bounds == ax.bbox.bounds]
        out.append(id(same[0]))
    return out


def _texts(fig, renderer):
    """(panel id, text, bbox) of every drawn non-empty text of the figure."""
    out = []
    for ax, key in zip(fig.axes, _groups(fig), strict=True):
        ticks = []
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for t in axis.get_major_ticks():  # labels of ticks outside the view are not drawn
                if lo - 1e-9 * (hi - lo) <= t.get_loc() <= hi + 1e-9 * (hi - lo):
                    ticks += [t.label1, t.label2]
        items = [ax.title, ax.xaxis.label, ax.yaxis.label, *ticks, *ax.texts]
        for t in items:
            if t.get_visible() and t.get_text().strip():
                out.append((key, t.get_text(), t.get_window_extent(renderer)))
    for t in [fig._suptitle, *fig.texts]:  # the figure title is a panel of its own
        if t is not None and t.get_visible() and t.get_text().strip():
            out.append((0, t.get_text(), t.get_window_extent(renderer)))
    return out


def _overlap(a, b) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


def overprints(fig, dpi=80) -> list[tuple[str, str]]:
    """Texts of one panel that overlap a text or the plotting area of another panel (twin axes
    count as one panel)."""
    texts = _texts(fig, _draw(fig, dpi))
    groups = {id(ax): g for ax, g in zip(fig.axes, _groups(fig), strict=True)}
    clashes = []
    for i, (gi, ti, bi) in enumerate(texts):
        for gj, tj, bj in texts[i + 1:]:
            if gi != gj and _overlap(bi, bj):
                clashes.append((ti, tj))
        for ax in fig.axes:
            if groups[id(ax)] != gi and _overlap(bi, ax.bbox):
                clashes.append((ti, ax.get_title() or ax.get_ylabel() or "axes"))
    return clashes


@pytest.mark.parametrize("name", ["fig2", "fig3", "fig4", "fig5"])
def test_no_text_of_one_panel_overprints_another(figures, name):
    clashes = overprints(figures[name])
    assert not clashes, clashes[:5]


def test_sweep_and_stability_plots_do_not_overprint():
    rows = []
    for name in ("tm_pcc_binary_Pb", "tm_pcc_binary_O"):
        rows.append({"structure": "S", "name": name, "comparison": "thickness",
                     "dose_key_a": "noiseless", "dose_key_b": "noiseless",
                     "thickness_config_nm_a": 2.0, "thickness_config_nm_b": 4.0, "value": 0.8})
        for dose in (1e4, 1e5):
            rows.append({"structure": "S", "name": name, "comparison": "dose_vs_noiseless",
                         "dose_key_a": "noiseless", "dose_key_b": f"d{dose:g}",
                         "thickness_config_nm_a": 2.0, "thickness_config_nm_b": 2.0,
                         "value": 0.5})
    fig, _ = plots.mask_similarity_plot(pd.DataFrame(rows), "S")
    assert overprints(fig) == []
    plt.close(fig)


def test_fig2_optimised_adf_mask_inset_is_not_a_black_square(figures):
    fig = figures["fig2"]
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("(d)"))
    inset = next(c for c in panel.child_axes)
    im = inset.get_images()[0]
    data = np.asarray(im.get_array(), float)
    nz = data[np.isfinite(data) & (data > 0)]
    # the non-zero weights must be visible: most of them are not painted (near) black
    shown = np.asarray(im.norm(nz), float)
    assert nz.size and np.median(shown) > 0.05 and (shown > 0.05).mean() > 0.5


@pytest.mark.parametrize("decades", [0.5, 8.0])
def test_mask_inset_shows_weights_spanning_decades(ads, decades):
    """An Eq. 8 mask: weights spread over many decades (measured on the smoke LiFePO4 data:
    1e1 to 3e9, the largest on near-zero-mean pixels at the aperture edge)."""
    rng = np.random.default_rng(0)
    m = 10 ** rng.uniform(1, 1 + decades, size=(20, 22))
    m[rng.uniform(size=m.shape) < 0.3] = 0
    fig, ax = plt.subplots()
    im = plots._show_mask(ax, ads, m, diverging=False)
    nz = m[m > 0]
    shown = np.asarray(im.norm(nz), float)
    assert (shown > 0.05).mean() > 0.8, type(im.norm).__name__
    # a linear grey scale would paint most weights black when they span decades
    linear = nz / nz.max()
    assert ((linear > 0.05).mean() < 0.5) == (decades > 3)
    plt.close(fig)
    norm = plots._mask_norm(m - 5, diverging=True)
    assert norm.vmin == -norm.vmax


def test_fig2c_is_an_azimuthal_mean_not_a_scatter(figures):
    fig = figures["fig2"]
    ax = next(a for a in fig.axes if a.get_title().startswith("(c)"))
    twins = [a for a in fig.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
    for a in [ax, *twins]:
        assert not a.collections or all(type(c).__name__ != "PathCollection"
                                        for c in a.collections)
        assert a.get_lines()
    n_pix = 20 * 22
    assert max(len(line.get_xdata()) for line in ax.get_lines()) < n_pix / 3


def test_fig5_marks_o_columns_across_the_cell_edge(ads):
    fig, _ = plots.fig5_compare(ads, tile=1)
    ax = next(a for a in fig.axes if a.get_title().startswith("(d)"))
    marks = {(t.get_text(), round(float(t.get_position()[0]), 2)) for t in ax.texts}
    # y0 = 0.1 Å (first O); the O at y = 3.9 Å is 0.2 Å away through the periodic edge
    assert ("O", 0.6) in marks and ("O", 2.6) in marks
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("dmax, cell", [(0.08, 3.9), (0.3, 3.9), (0.011, 4.2), (1.5, 4.0)])
def test_fig4_arrow_magnification_and_key(dmax, cell):
    mag, key = plots._arrow_scale(dmax, cell)
    drawn = dmax * mag  # longest arrow as drawn, Å on the image
    assert 0.4 * cell / 2.5 <= drawn <= 0.4 * cell * 1.0001
    assert dmax / 2.5 <= key <= dmax
    assert float(f"{mag:g}") == mag and float(f"{key:g}") == key  # round numbers in the label


def test_figures_command_manifest_feeds_human_headings_into_the_report(ads, tmp_path):
    """figures.json carries heading, what-to-look-at, key and in-sample flags; the report
    shows the headings, not file stems."""
    import argparse

    from tmask_validate.analysis import dataset_metrics
    from tmask_validate.commands import figures as figcmd
    from tmask_validate.report import build_report

    d = tmp_path / "analysis" / "synth" / "noiseless"
    d.mkdir(parents=True)
    ads.to_netcdf(d / "t20nm.nc", engine="h5netcdf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        met = dataset_metrics(ads)
    met = met.assign(structure="synth", dose_key="noiseless", thickness_nm=20.0)
    met.to_csv(tmp_path / "metrics.csv", index=False)
    out = tmp_path / "figures"
    args = argparse.Namespace(analysis_dir=str(tmp_path / "analysis"),
                              metrics=str(tmp_path / "metrics.csv"), similarity=None,
                              config=None, out_dir=str(out))
    assert figcmd.run(args) == 0
    man = json.loads((out / "figures.json").read_text())
    ids = [f["id"] for f in man]
    assert "fig3_species_synth_g0.35" in ids and "sweep_thickness_synth" in ids
    for f in man:
        assert f["title"].startswith("synth: ") and f["look"] and (out / f["png"]).is_file()
    by = {f["id"]: f for f in man}
    assert by["fig3_species_synth_g0.35"]["key"] and by["fig3_species_synth_g0.35"]["fit"] \
        == "in-sample"
    assert not by["figSI3_binary_synth"]["key"]
    claims = tmp_path / "claims.csv"
    pd.DataFrame(columns=["claim_id", "claim", "dataset", "passed", "status"]).to_csv(
        claims, index=False)
    text = build_report(out / "figures.json", claims, tmp_path / "metrics.csv")
    assert "<h3>synth: Atom-specific masks and images (Fig. 3)" in text
    assert "<h3>fig3_species_synth_g0.35</h3>" not in text
