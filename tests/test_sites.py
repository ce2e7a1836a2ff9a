"""tmask_validate.sites: peaks, gaussian refinement, lattice fit, basis mapping, Ti-O shifts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmask_validate.sites import (
    find_peaks,
    fit_lattice,
    map_basis,
    read_sites_csv,
    refine_gaussian,
    refine_sites,
    region_from_rectangle,
    sites_from_image,
    ti_o_displacement,
    ti_o_displacement_from_images,
    write_sites_csv,
)

#: LiFePO4 [001] projected cell (Ly, Lx) and columns (like structures.projected_columns)
CELL = (6.01, 10.332)
_HALF = [("Fe", 1.5025, 2.91569, "Fe1", 1), ("Fe", 4.5075, 2.25031, "Fe1", 1),
         ("Li", 0.0, 0.0, "Li1", 1), ("Li", 3.005, 0.0, "Li1", 1),
         ("P+O", 1.5025, 0.98051, "P1O1", 2), ("P+O", 4.5075, 4.18549, "P1O1", 2),
         ("O", 0.27947, 1.71098, "O1", 1), ("O", 1.5025, 4.72276, "O1", 1),
         ("O", 2.72554, 1.71098, "O1", 1), ("O", 3.28447, 3.45502, "O1", 1),
         ("O", 4.5075, 0.44324, "O1", 1), ("O", 5.73054, 3.45502, "O1", 1)]
TOY = pd.DataFrame([r for lab, y, x, c, n in _HALF for r in
                    ((lab, y, x, c, n), (lab, y, x + CELL[1] / 2, c, n))],
                   columns=["label", "y_A", "x_A", "composition", "n_atoms"])
AMP = {"Fe": 1.0, "P+O": 0.5, "O": 0.15, "Li": 0.08}


def _tile(table, cell, corner_A, shape, step, margin=0.0):
    """All sites of the table tiled over a field of view (truth), in Å."""
    ly, lx = cell
    rows = []
    for i in range(-2, int(shape[0] * step / ly) + 3):
        for j in range(-2, int(shape[1] * step / lx) + 3):
            for r in table.itertuples():
                y = corner_A[0] + i * ly + r.y_A
                x = corner_A[1] + j * lx + r.x_A
                if -margin <= y <= (shape[0] - 1) * step + margin and \
                        -margin <= x <= (shape[1] - 1) * step + margin:
                    rows.append((r.label, y, x))
    return pd.DataFrame(rows, columns=["label", "y_A", "x_A"])


def _render(sites, shape, step, sigma_A=0.45, noise=0.0, seed=0, amp=None):
    amp = amp or AMP
    yy, xx = np.mgrid[: shape[0], : shape[1]] * step
    img = np.zeros(shape)
    for r in sites.itertuples():
        img += amp[r.label] * np.exp(-((yy - r.y_A) ** 2 + (xx - r.x_A) ** 2) / (2 * sigma_A**2))
    return img + noise * np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------------ peaks / refinement
def test_find_peaks_matches_naive_reference():
    rng = np.random.default_rng(1)
    img = rng.random((23, 31))
    got = find_peaks(img, min_distance_px=1.0, threshold=0.5)
    naive = []
    for y in range(23):
        for x in range(31):
            nb = [img[y + dy, x + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                  if 0 <= y + dy < 23 and 0 <= x + dx < 31]
            if img[y, x] > 0.5 and all(img[y, x] >= v for v in nb):
                naive.append((img[y, x], y, x))
    naive.sort(reverse=True)
    np.testing.assert_array_equal(got, np.array([(y, x) for _, y, x in naive], float))


def test_find_peaks_min_distance_and_order():
    img = np.zeros((20, 20))
    img[5, 5], img[5, 8], img[15, 15] = 3.0, 2.0, 1.0
    got = find_peaks(img, min_distance_px=4, threshold=0.1)
    np.testing.assert_array_equal(got, [[5, 5], [15, 15]])
    got = find_peaks(img, min_distance_px=2, threshold=0.1)
    np.testing.assert_array_equal(got, [[5, 5], [5, 8], [15, 15]])
    assert find_peaks(img, min_distance_px=2, threshold=5).shape == (0, 2)
    with pytest.raises(ValueError):
        find_peaks(img, min_distance_px=0.5)


def test_refine_gaussian_subpixel():
    rng = np.random.default_rng(2)
    truth = np.array([[10.3, 12.7], [25.6, 8.2], [18.05, 30.45]])
    yy, xx = np.mgrid[:40, :42]
    img = 0.2 + sum(np.exp(-((yy - y) ** 2 / (2 * 1.6**2) + (xx - x) ** 2 / (2 * 2.1**2)))
                    for y, x in truth)
    img = img + 0.01 * rng.standard_normal(img.shape)
    res = refine_gaussian(img, np.round(truth), window_px=4)
    assert res["fit_ok"].all()
    np.testing.assert_allclose(res[["y_px", "x_px"]].to_numpy(), truth, atol=0.05)
    np.testing.assert_allclose(res["sigma_y_px"], 1.6, atol=0.1)
    np.testing.assert_allclose(res["sigma_x_px"], 2.1, atol=0.1)
    np.testing.assert_allclose(res["background"], 0.2, atol=0.02)


def test_refine_gaussian_periodic_edge():
    yy, xx = np.mgrid[:20, :20]
    # a peak centred on the wrap-around corner
    img = sum(np.exp(-(((yy - 0.3 - dy) ** 2 + (xx - 19.6 - dx) ** 2) / 2.0))
              for dy in (-20, 0, 20) for dx in (-20, 0, 20))
    res = refine_gaussian(img, [[0, 19]], window_px=3, periodic=True)
    assert res["fit_ok"].all()
    np.testing.assert_allclose(res[["y_px", "x_px"]].to_numpy(), [[0.3, 19.6]], atol=0.02)


# ------------------------------------------------------------------ lattice
@pytest.mark.parametrize("rot_deg", [0.0, 7.0, -31.0])
def test_fit_lattice_bravais_from_nn_vectors(rot_deg):
    rng = np.random.default_rng(3)
    t = np.deg2rad(rot_deg)
    a = np.array([np.cos(t), -np.sin(t)]) * 13.0
    b = np.array([np.sin(t), np.cos(t)]) * 9.0
    origin = np.array([4.2, 5.1])
    ij = np.array([(i, j) for i in range(-2, 9) for j in range(-3, 12)])
    pos = origin + ij @ np.array([a, b]) + 0.1 * rng.standard_normal((len(ij), 2))
    outliers = rng.uniform(0, 100, (4, 2))
    o, fa, fb, info = fit_lattice(np.vstack([pos, outliers]), return_info=True)
    # same lattice: the fitted vectors are integer combinations of the true ones and vice versa
    M, F = np.array([a, b]), np.array([fa, fb])
    c = F @ np.linalg.inv(M)
    np.testing.assert_allclose(c, np.round(c), atol=0.01)
    assert abs(round(np.linalg.det(np.round(c)))) == 1
    f = (o - origin) @ np.linalg.inv(M)
    np.testing.assert_allclose(f, np.round(f), atol=0.01)
    assert len(pos) - 2 <= info["n_inliers"] <= len(pos) + 1 and info["rms"] < 0.2
    assert np.sum(info["indices"][-4:, 0] == -1) >= 3


def test_fit_lattice_with_basis_and_guess():
    rng = np.random.default_rng(4)
    a, b = np.array([20.0, 0.6]), np.array([-0.4, 34.0])
    basis = np.array([[0.0, 0.0], [0.5 * 20, 0.3 * 34], [0.25 * 20, 0.7 * 34]])
    origin = np.array([3.0, 2.0])
    pts = [origin + i * a + j * b + d for i in range(-1, 6) for j in range(-1, 4) for d in basis]
    pts = np.array(pts) + 0.05 * rng.standard_normal((len(pts), 2))
    o, fa, fb, info = fit_lattice(pts, a_guess=(19.0, 0.0), b_guess=(0.0, 35.5),
                                  return_info=True)
    np.testing.assert_allclose(fa, a, atol=0.03)
    np.testing.assert_allclose(fb, b, atol=0.03)
    assert len(info["basis"]) == 3 and info["n_inliers"] == len(pts)
    # the origin is one of the basis positions of some cell
    f = (o - origin - basis) @ np.linalg.inv(np.array([a, b]))
    assert np.min(np.abs(f - np.round(f)).max(axis=1)) < 0.01
    with pytest.raises(ValueError):
        fit_lattice(pts[:2])


# ------------------------------------------------------------------ basis mapping
def _match(found, truth, tol):
    """Every truth site has a found site of the same label within tol (and counts agree)."""
    for lab in truth["label"].unique():
        t = truth.loc[truth["label"] == lab, ["y_A", "x_A"]].to_numpy()
        f = found.loc[found["label"] == lab, ["y_A", "x_A"]].to_numpy()
        d = np.hypot(*(t[:, None] - f[None]).transpose(2, 0, 1))
        assert d.min(axis=1).max() < tol, lab


@pytest.mark.parametrize("corner", [(0.0, 0.0), (1.3, -2.2), (-4.0, 3.7)])
def test_sites_from_adf_image_finds_invisible_species(corner):
    step, shape = 0.3, (64, 80)
    truth = _tile(TOY, CELL, corner, shape, step)
    img = _render(truth, shape, step, noise=0.02)
    sites, info = sites_from_image(img, TOY, CELL, step_A=step, match_label="Fe")
    assert set(sites["label"]) == set(TOY["label"])
    assert info["fit"]["rms"] < 0.3
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step - 1)]
    _match(sites, inner, tol=0.12)  # O and Li (invisible to the peak search) included
    _match(inner[inner.label != "x"], sites[(sites.y_A > 1.2) & (sites.x_A > 1.2)
                                            & (sites.y_A < (shape[0] - 1) * step - 1.2)
                                            & (sites.x_A < (shape[1] - 1) * step - 1.2)],
           tol=0.12)
    assert sites["visible"].sum() == (sites["label"] == "Fe").sum()
    assert list(sites.columns[:5]) == ["label", "y_A", "x_A", "composition", "n_atoms"]
    assert (sites.loc[sites.label == "P+O", "n_atoms"] == 2).all()


def _rotated_truth(table, cell, theta_deg, shape, step, pivot_A):
    """Sites of a crystal rotated by theta (cell x axis along (sin, cos)) inside the scan."""
    t = np.deg2rad(theta_deg)
    ly, lx = cell
    rows = []
    for i in range(-12, 13):
        for j in range(-8, 9):
            for r in table.itertuples():
                u, v = i * ly + r.y_A, j * lx + r.x_A  # crystal frame (y, x)
                y = pivot_A[0] + u * np.cos(t) + v * np.sin(t)
                x = pivot_A[1] - u * np.sin(t) + v * np.cos(t)
                if 0 <= y <= (shape[0] - 1) * step and 0 <= x <= (shape[1] - 1) * step:
                    rows.append((r.label, y, x))
    return pd.DataFrame(rows, columns=["label", "y_A", "x_A"])


@pytest.mark.parametrize("theta", [25.0, -62.0])
def test_sites_from_image_finds_crystal_rotation(theta):
    step, shape = 0.3, (70, 76)
    truth = _rotated_truth(TOY, CELL, theta, shape, step, pivot_A=(9.1, 10.2))
    img = _render(truth, shape, step, noise=0.02)
    sites, info = sites_from_image(img, TOY, CELL, step_A=step, match_label="Fe",
                                   rotation_deg=None)
    # the cell is rectangular with a half-cell translation: theta is found modulo 180 degrees
    assert abs((info["rotation_deg"] - theta + 90) % 180 - 90) < 1.0
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step - 1)]
    _match(sites, inner, tol=0.15)


def test_sites_from_inverted_image():
    step, shape = 0.35, (48, 60)
    truth = _tile(TOY, CELL, (0.7, 1.1), shape, step)
    img = 5.0 - _render(truth, shape, step, noise=0.01)  # ABF-like: atoms dark
    sites, _ = sites_from_image(img, TOY, CELL, step_A=step, match_label="Fe", invert=True)
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step - 1)]
    _match(sites, inner, tol=0.15)


def test_ambiguous_anchor_is_an_error():
    # drop the half-cell translation symmetry of everything but Fe: Fe alone cannot place Li/O
    broken = TOY.drop(index=TOY.index[(TOY.label != "Fe") & (TOY.x_A > CELL[1] / 2)])
    step, shape = 0.3, (48, 64)
    truth = _tile(broken, CELL, (0.4, 0.9), shape, step)
    img = _render(truth, shape, step)
    with pytest.raises(ValueError, match="ambiguous anchor"):
        sites_from_image(img, broken, CELL, step_A=step, match_label="Fe")
    # an image in which the P+O columns are the strongest places everything unambiguously
    img = _render(truth, shape, step, amp={"P+O": 1.0, "Fe": 0.3, "O": 0.1, "Li": 0.05})
    sites, _ = sites_from_image(img, broken, CELL, step_A=step, match_label="P+O")
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step - 1)]
    _match(sites, inner, tol=0.15)


def test_map_basis_rejects_wrong_cell_and_label():
    lat = (np.zeros(2), np.array([20.0, 0.0]), np.array([0.0, 34.4]))
    with pytest.raises(ValueError, match="does not match"):
        map_basis(lat, TOY, (12.0, 10.33), scan_shape=(40, 40), step_A=0.3, match_label="Fe")
    with pytest.raises(ValueError, match="match_label"):
        map_basis(lat, TOY, CELL, scan_shape=(40, 40), step_A=0.3, match_label="Zr")


def test_refine_sites_moves_to_true_positions():
    step, shape = 0.3, (40, 50)
    truth = _tile(TOY, CELL, (0.5, 0.5), shape, step)
    img = _render(truth[truth.label == "Fe"], shape, step)
    guess = truth[truth.label == "Fe"].copy()
    guess["y_A"] += 0.2
    guess["x_A"] -= 0.15
    ref = refine_sites(img, guess, step_A=step, labels=["Fe"], window_A=0.9)
    inside = (ref.y_A > 1) & (ref.x_A > 1) & (ref.y_A < 10.5) & (ref.x_A < 13.5)
    exp = truth[truth.label == "Fe"].reset_index(drop=True)[inside.to_numpy()]
    np.testing.assert_allclose(ref.loc[inside, ["y_A", "x_A"]].to_numpy(),
                               exp[["y_A", "x_A"]].to_numpy(), atol=0.03)


# ------------------------------------------------------------------ csv, regions, Ti-O
def test_sites_csv_roundtrip(tmp_path):
    p = tmp_path / "s.csv"
    write_sites_csv(TOY, p)
    back = read_sites_csv(p)
    pd.testing.assert_frame_equal(back[TOY.columns], TOY, check_dtype=False)
    (tmp_path / "min.csv").write_text("label,y_A,x_A\nP+O,1.0,2.0\nO,0.5,0.25\n")
    m = read_sites_csv(tmp_path / "min.csv")
    assert m["composition"].tolist() == ["PO", "O"] and m["n_atoms"].tolist() == [1, 1]
    (tmp_path / "bad.csv").write_text("label,y\nO,1\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_sites_csv(tmp_path / "bad.csv")


def test_region_from_rectangle():
    m = region_from_rectangle((6, 8), y=(1, 3), x=(2, 7))
    ref = np.zeros((6, 8), bool)
    ref[1:3, 2:7] = True
    np.testing.assert_array_equal(m, ref)
    m = region_from_rectangle((6, 8), y=(0.5, 1.5), x=(0.0, 1.0), units="A", step_A=0.5)
    ref = np.zeros((6, 8), bool)
    ref[1:4, 0:3] = True
    np.testing.assert_array_equal(m, ref)
    with pytest.raises(ValueError, match="step_A"):
        region_from_rectangle((6, 8), y=(0, 1), x=(0, 1), units="A")
    with pytest.raises(ValueError, match="no probe"):
        region_from_rectangle((6, 8), y=(10, 11), x=(0, 1))
    with pytest.raises(ValueError, match="units"):
        region_from_rectangle((6, 8), y=(0, 1), x=(0, 1), units="nm")


def test_ti_o_displacement_pbtio3_like():
    ly, lx = 4.152, 3.904
    ti, ox = [], []
    for i in range(5):
        for j in range(5):
            ti.append((i * ly + 2.242, j * lx + 1.952))
            ox += [(i * ly + 0.465, j * lx + 1.952), (i * ly + 2.541, j * lx)]
    res = ti_o_displacement(np.array(ti), np.array(ox), cell_A=(ly, lx))
    # Ti columns with four O neighbours: all but those of the last row (no O above) and the
    # last column (no O to the right)
    assert len(res) == 16
    np.testing.assert_allclose(res["dy_A"], 2.242 - (0.465 + 4.617) / 2, atol=1e-9)
    np.testing.assert_allclose(res["dx_A"], 0.0, atol=1e-9)
    np.testing.assert_allclose(res["d_A"], 0.299, atol=1e-9)
    np.testing.assert_allclose(res["angle_deg"], -90.0)


# ------------------------------------------------------------------ CLI end to end
def test_find_sites_cli_on_written_mib(tmp_path):
    pytest.importorskip("ase")
    from tmask_validate.cli import main
    from tmask_validate.io import write_mib
    from tmask_validate.structures import build, projected_cell_A, projected_columns

    table = projected_columns("lifepo4")
    cell = projected_cell_A(build("lifepo4"))
    step, shape, n = 0.3, (40, 52), 32
    truth = _tile(table, cell, (0.8, 1.6), shape, step)
    img = _render(truth, shape, step, amp={"Fe": 1.0, "P+O": 0.45, "O": 0.12, "Li": 0.06})
    ky, kx = np.mgrid[:n, :n]
    r = np.hypot(ky - 15.5, kx - 15.5)
    disc = (r < 5).astype(float) * 200
    ring = ((r > 9) & (r < 15)).astype(float)
    rng = np.random.default_rng(0)
    data = rng.poisson(disc[None, None] + 40 * img[..., None, None] * ring + 1).astype(np.uint16)
    p = write_mib(tmp_path / "scan.mib", data, bit_depth=12)
    (tmp_path / "scan.mib.calibration.yaml").write_text(
        "step_A: 0.3\nmrad_per_px: 4.0\ncenter_px: [15.5, 15.5]\nenergy_keV: 300\n")
    out = tmp_path / "sites.csv"
    rc = main(["find-sites", str(p), "--structure", "lifepo4", "--image", "adf",
               "--inner-mrad", "36", "--outer-mrad", "60", "--out", str(out)])
    assert rc == 0
    sites = read_sites_csv(out)
    assert set(sites.label) == set(table.label)
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step - 1)]
    _match(sites, inner, tol=0.15)
    rc = main(["inspect", str(p)])
    assert rc == 0


def test_ti_o_displacement_from_images_recovers_shift_field():
    ly, lx, step, shape = 4.152, 3.904, 0.2, (90, 80)
    nominal, ti_true = [], []
    for i in range(5):
        for j in range(5):
            y0, x0 = i * ly + 2.242 - 0.3 * 0, j * lx + 1.952
            shift = (-0.30 if j < 2 else 0.25, 0.1 if i % 2 else -0.05)  # two "domains"
            nominal.append(("Ti+O", y0, x0))
            ti_true.append((y0 + shift[0], x0 + shift[1]))
            nominal += [("O", i * ly + 0.465, j * lx + 1.952), ("O", i * ly + 2.541, j * lx)]
    sites = pd.DataFrame(nominal, columns=["label", "y_A", "x_A"])
    yy, xx = np.mgrid[: shape[0], : shape[1]] * step
    g = lambda y, x: np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 0.35**2))  # noqa: E731
    ti_img = sum(g(y, x) for y, x in ti_true)
    o_img = sum(g(r.y_A, r.x_A) for r in sites[sites.label == "O"].itertuples())
    res = ti_o_displacement_from_images(ti_img, o_img, sites, step_A=step, cell_A=(ly, lx),
                                        window_A=0.6)
    assert len(res) >= 9
    truth = np.array(ti_true)
    for r in res.itertuples():
        k = np.argmin(np.hypot(truth[:, 0] - r.y_A, truth[:, 1] - r.x_A))
        i, j = divmod(k, 5)
        o_centre = (i * ly + 0.465 + (i + 1) * ly + 0.465) / 2, j * lx + 1.952
        assert r.dy_A == pytest.approx(truth[k, 0] - o_centre[0], abs=0.02)
        assert r.dx_A == pytest.approx(truth[k, 1] - o_centre[1], abs=0.02)


def _strained_drifted_field(scale, drift_A_per_row, step=(0.43, 0.45), shape=(112, 92),
                            corner=(0.9, 1.3), noise=0.02):
    """An 8 x 4 cell LiFePO4-like ADF field: lattice ``scale`` x the nominal cell, slow-scan drift.

    Row ``i`` of the scan sits at ``i (step_y + dy)`` on the sample and is shifted by ``i dx``:
    in the nominal scan frame the lattice comes out compressed along y and sheared.
    """
    cell = (CELL[0] * scale, CELL[1] * scale)
    table = TOY.assign(y_A=TOY.y_A * scale, x_A=TOY.x_A * scale)
    truth = _tile(table, cell, corner, (2 * shape[0], 2 * shape[1]), min(step))
    row = truth.y_A / (step[0] + drift_A_per_row[0])
    truth = truth.assign(y_A=row * step[0], x_A=truth.x_A - row * drift_A_per_row[1])
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    yy, xx = yy * step[0], xx * step[1]
    img = np.zeros(shape)
    for r in truth.itertuples():
        img += AMP[r.label] * np.exp(-((yy - r.y_A) ** 2 + (xx - r.x_A) ** 2) / (2 * 0.45**2))
    img += noise * np.random.default_rng(3).standard_normal(shape)
    return img, truth


@pytest.mark.parametrize("scale, drift", [(0.955, (0.0, 0.01)), (0.955, (0.01, 0.01)),
                                          (1.02, (0.01, -0.01))])
def test_rotation_search_on_strained_drifted_field(scale, drift):
    """A lattice 2-7 % off the cell guess: offsets must not split, rotation 0 must win.

    Before the fix, one Fe offset split in two (5-6 positions per cell), max_basis rejected
    every rotation near 0 and the search failed ("no crystal rotation").
    """
    step, shape = (0.43, 0.45), (112, 92)
    img, truth = _strained_drifted_field(scale, drift, step, shape)
    sites, info = sites_from_image(img, TOY, CELL, step_A=step, match_label="Fe",
                                   rotation_deg=None)
    assert abs((info["rotation_deg"] + 90) % 180 - 90) < 1.5
    assert len(info["fit"]["basis"]) == 4
    assert info["fit"]["rms"] < 0.1  # px; a wrong lattice fits at ~0.7-1.7 px
    inner = truth[(truth.y_A > 1) & (truth.y_A < (shape[0] - 1) * step[0] - 1)
                  & (truth.x_A > 1) & (truth.x_A < (shape[1] - 1) * step[1] - 1)]
    _match(sites, inner, tol=0.12)


def test_fit_lattice_merges_split_offsets():
    """fit_lattice with a 5 % short guess finds the 4 Fe offsets, not a split fifth one."""
    step, shape = (0.43, 0.45), (112, 92)
    img, truth = _strained_drifted_field(0.955, (0.0, 0.0), step, shape, noise=0.0)
    fe = truth.loc[truth.label == "Fe", ["y_A", "x_A"]].to_numpy() / np.array(step)
    fe = fe[(fe[:, 0] >= 0) & (fe[:, 0] < shape[0]) & (fe[:, 1] >= 0) & (fe[:, 1] < shape[1])]
    a0, b0 = np.array([CELL[0] / step[0], 0.0]), np.array([0.0, CELL[1] / step[1]])
    _, a, b, info = fit_lattice(fe, a_guess=a0, b_guess=b0, max_basis=4, return_info=True)
    assert len(info["basis"]) == 4
    np.testing.assert_allclose(a, 0.955 * a0, atol=1e-6)
    np.testing.assert_allclose(b, 0.955 * b0, atol=1e-6)
    assert info["rms"] < 1e-6 and info["n_inliers"] == len(fe)


def test_rotation_search_rejects_off_scale_lattice_with_a_clear_error():
    """9 % short along y (beyond the 8 % length tolerance): no wrong lattice near 120 degrees."""
    img, _ = _strained_drifted_field(0.955, (0.02, 0.01))
    with pytest.raises(ValueError, match="more than 8 % off the cell"):
        sites_from_image(img, TOY, CELL, step_A=(0.43, 0.45), match_label="Fe",
                         rotation_deg=None)
