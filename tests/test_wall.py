"""Ti–O displacements across the 90° domain wall (tmask_validate.displacement), synthetic data.

Known answers: the structure's own polar shifts (tmask_validate.structures) give the Ti–O
displacement of a Ti column deep in domain 1 as d_Ti - (d_O1 + d_O2)/2 along y and, in domain 2
(domain 1 rotated by +90°), minus that along x. Images of gaussian columns placed at known
positions (plus an imposed extra Ti shift) must give those displacements back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmask_validate import displacement as D
from tmask_validate import structures as st

STEP = (0.3, 0.3)
# config/wall.yaml's field: n_cells 10 (40.3 Å, walls at y - x = -1.0 and 19.1 Å); the field has
# y - x in [-18, 18], so it holds only the wall at -1.0 Å
N_CELLS = 10
REGION = ((11.0, 29.0), (11.0, 29.0))


@pytest.fixture(scope="module")
def wall():
    atoms = st.build("PbTiO3_DW", n_cells=N_CELLS)
    sites = st.sites_in_region(st.projected_columns(atoms), st.projected_cell_A(atoms), REGION,
                               margin_A=3.0)
    return atoms, sites


def _image(sites: pd.DataFrame, labels, shift_A=(0.0, 0.0), sigma_A=0.4):
    """Gaussian columns of ``labels`` on the scan grid of REGION (absolute coordinates)."""
    (y0, y1), (x0, x1) = REGION
    ys = y0 + STEP[0] * np.arange(int(round((y1 - y0) / STEP[0])) + 1)
    xs = x0 + STEP[1] * np.arange(int(round((x1 - x0) / STEP[1])) + 1)
    img = np.zeros((ys.size, xs.size))
    sel = sites[sites["label"].isin(labels)]
    for y, x in sel[["y_A", "x_A"]].to_numpy() + np.asarray(shift_A):
        img += np.exp(-((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2) / (2 * sigma_A**2))
    return img, (ys[0], xs[0])


def test_known_displacement_matches_the_builder(wall):
    atoms, sites = wall
    a = atoms.info["a_pc_A"]
    known = D.known_ti_o_displacement(sites, cell_A=(a, a))
    d = st._pbtio3_displacements()
    expect = d["Ti"] - 0.5 * (d["O1"] + d["O2"])  # -0.299 Å
    deep = known[known["wall_distance_A"] > 2.0]  # all four O neighbours in its domain
    d1, d2 = deep[deep["domain"] == 1], deep[deep["domain"] == 2]
    assert len(d1) >= 3 and len(d2) >= 3
    np.testing.assert_allclose(d1["dy_A"], expect, atol=1e-9)
    np.testing.assert_allclose(d1["dx_A"], 0.0, atol=1e-9)
    np.testing.assert_allclose(d2["dx_A"], -expect, atol=1e-9)
    np.testing.assert_allclose(d2["dy_A"], 0.0, atol=1e-9)
    flip = D.flip_summary(deep).set_index("domain")
    assert bool(flip.loc["flip", "flipped"])
    # head-to-tail wall: the wall-parallel component reverses, the normal one is continuous
    np.testing.assert_allclose(flip.loc["1", "parallel_pm"], 100 * expect / np.sqrt(2))
    np.testing.assert_allclose(flip.loc["2", "parallel_pm"], -100 * expect / np.sqrt(2))
    assert abs(flip.loc["flip", "normal_pm"]) < 1e-9


def test_flip_summary_no_flip_in_one_direction():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"dy_A": -0.3 + 0.01 * rng.standard_normal(40),
                      "dx_A": 0.01 * rng.standard_normal(40),
                      "domain": np.repeat([1, 2], 20)})
    flip = D.flip_summary(t).set_index("domain")
    assert not bool(flip.loc["flip", "flipped"])
    with pytest.raises(ValueError, match="domain"):
        D.flip_summary(t.drop(columns="domain"))


def test_measured_displacements_on_synthetic_images(wall):
    """Exact column positions: error < 1 pm; an imposed Ti shift comes back as the error."""
    atoms, sites = wall
    a = atoms.info["a_pc_A"]
    o_img, origin = _image(sites, ["O"])
    ti_img, _ = _image(sites, ["Ti+O"])
    res = D.measure_wall_displacements(ti_img, o_img, sites, step_A=STEP, origin_A=origin,
                                       cell_A=(a, a))
    m = res["matched"]
    assert res["err_pm"]["n"] >= 12 and set(m["domain"]) == {1, 2}
    assert res["err_pm"]["max_pm"] < 1.0
    assert bool(res["flip"].set_index("domain").loc["flip", "flipped"])
    shift = (0.04, -0.06)  # 4 pm along y, -6 pm along x
    ti_shifted, _ = _image(sites, ["Ti+O"], shift_A=shift)
    res2 = D.measure_wall_displacements(ti_shifted, o_img, sites, step_A=STEP, origin_A=origin,
                                        cell_A=(a, a))
    np.testing.assert_allclose(res2["matched"]["err_y_pm"], 4.0, atol=1.0)
    np.testing.assert_allclose(res2["matched"]["err_x_pm"], -6.0, atol=1.0)


def test_match_displacements_rejects_far_columns():
    known = pd.DataFrame({"y_A": [0.0], "x_A": [0.0], "dy_A": [0.1], "dx_A": [0.0]})
    meas = pd.DataFrame({"y_A": [3.0], "x_A": [0.0], "dy_A": [0.1], "dx_A": [0.0]})
    with pytest.raises(ValueError, match="within"):
        D.match_displacements(meas, known)


def test_window_masks_are_cross_fitted():
    """Inside the window every image pixel comes from a mask that did not see it."""
    from tmask_validate import core

    rng = np.random.default_rng(3)
    data = rng.poisson(50.0, size=(12, 10, 8, 9)).astype(np.float32)
    sites = pd.DataFrame({"label": ["O", "O", "Pb"], "y_A": [1.0, 2.5, 2.0],
                          "x_A": [1.0, 2.0, 0.6], "composition": ["O1", "O1", "Pb1"],
                          "n_atoms": [1, 1, 1]})
    win = D.window_region(np.arange(12) * 0.3, np.arange(10) * 0.3, (0.0, 1.65), (0.0, 2.95))
    res = D.wall_masks_and_images(data, sites, step_A=(0.3, 0.3), origin_A=(0.0, 0.0),
                                  window=win, labels=["O"])
    top, bottom = D._halves(win)
    assert top.sum() == bottom.sum() == 30
    m_bot = core.pcc_mask(data, res["templates"]["O"], region=bottom)
    ref = core.apply_mask(data, m_bot, stats=core.column_stats(data))
    np.testing.assert_allclose(res["images"]["O"][top], ref[top], rtol=1e-10)
    np.testing.assert_allclose(res["images"]["O"][~win], res["insample"]["O"][~win])
    assert not np.allclose(res["images"]["O"][win], res["insample"]["O"][win])


def test_wall_figure_is_written(wall, tmp_path):
    """The Fig. 4 panel set renders from a measurement (synthetic images stand in for data)."""
    from tmask_validate import plots_wall

    atoms, sites = wall
    a = atoms.info["a_pc_A"]
    o_img, origin = _image(sites, ["O"])
    ti_img, _ = _image(sites, ["Ti+O"])
    pb_img, _ = _image(sites, ["Pb"])
    disp = D.measure_wall_displacements(ti_img, o_img, sites, step_A=STEP, origin_A=origin,
                                        cell_A=(a, a))
    res = {"origin": origin, "step": STEP, "shape": o_img.shape, "displacements": disp,
           "virtual": {"ADF": pb_img + ti_img, "ABF": -(pb_img + ti_img + o_img)},
           "images": {"O": o_img, "Ti+O": ti_img, "Pb": pb_img},
           "masks": {"O": np.outer(np.hanning(9), np.hanning(9)) - 0.3},
           "window_A": [21.0, 29.0, 11.0, 19.0], "sites": sites, "thickness_nm": 20.0,
           "dose": None}
    out = plots_wall.plot_wall_figure(res, tmp_path / "fig4.png", dpi=40)
    assert out.stat().st_size > 10_000


def test_flip_needs_both_domains_significant():
    """One domain at zero within its error is not a flip, whatever the other does."""
    t = pd.DataFrame({"dy_A": [-0.30, -0.31, -0.29, 0.01, -0.01, 0.02],
                      "dx_A": [0.0, 0.0, 0.0, -0.01, 0.01, -0.02],
                      "domain": [1, 1, 1, 2, 2, 2]})
    assert not bool(D.flip_summary(t).set_index("domain").loc["flip", "flipped"])
