"""Tests for tmask_validate.templates: naive references on small asymmetric grids, geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmask_validate import templates as T

SHAPE = (9, 13)  # asymmetric on purpose
STEP = (0.3, 0.45)  # non-square steps


def _sites(rng, n=7, labels=("Li", "Fe", "O")):
    return pd.DataFrame({
        "label": [labels[i % len(labels)] for i in range(n)],
        "y_A": rng.uniform(0, SHAPE[0] * STEP[0], n),
        "x_A": rng.uniform(0, SHAPE[1] * STEP[1], n),
    })


# ---------------------------------------------------------------------------- naive references
def naive_binary(yx_px, shape, periodic):
    out = np.zeros(shape)
    for y, x in yx_px:
        i, j = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if periodic:
            i, j = i % shape[0], j % shape[1]
        if 0 <= i < shape[0] and 0 <= j < shape[1]:
            out[i, j] = 1.0
    return out


def naive_disc(yx_px, shape, r_px, periodic):
    out = np.zeros(shape)
    for y, x in yx_px:
        ni, nj = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        for i in range(shape[0]):
            for j in range(shape[1]):
                shifts = [(a * shape[0], b * shape[1]) for a in (-1, 0, 1) for b in (-1, 0, 1)]
                for sy, sx in (shifts if periodic else [(0, 0)]):
                    dy, dx = i + sy - y, j + sx - x
                    own = (i + sy == ni) and (j + sx == nj)
                    if (dy / r_px[0]) ** 2 + (dx / r_px[1]) ** 2 <= 1 or own:
                        out[i, j] = 1.0
    return out


def naive_gauss(yx_px, shape, s_px, periodic):
    out = np.zeros(shape)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    rng_img = range(-3, 4) if periodic else range(0, 1)
    for y, x in yx_px:
        for a in rng_img:
            for b in rng_img:
                dy = ii - (y + a * shape[0])
                dx = jj - (x + b * shape[1])
                out += np.exp(-0.5 * ((dy / s_px[0]) ** 2 + (dx / s_px[1]) ** 2))
    return out


# ---------------------------------------------------------------------------- coordinates
def test_sites_to_pixels_matches_formula():
    rng = np.random.default_rng(1)
    s = _sites(rng)
    px = T.sites_to_pixels(s, STEP, origin_A=(0.7, -1.1))
    ref = np.stack([(s.y_A - 0.7) / STEP[0], (s.x_A + 1.1) / STEP[1]], axis=1)
    np.testing.assert_allclose(px, ref)
    # array input and scalar step
    np.testing.assert_allclose(T.sites_to_pixels(s[["y_A", "x_A"]].to_numpy(), 0.5),
                               s[["y_A", "x_A"]].to_numpy() / 0.5)


@pytest.mark.parametrize("bad", [0, -1, (1, 0), (1, 2, 3), np.nan, "x"])
def test_bad_step_raises(bad):
    with pytest.raises(ValueError):
        T.sites_to_pixels(np.zeros((1, 2)), bad)


def test_missing_columns_and_empty_table_raise():
    with pytest.raises(ValueError, match="lacks columns"):
        T.validate_sites(pd.DataFrame({"label": ["A"], "y_A": [0.0]}))
    with pytest.raises(ValueError, match="empty"):
        T.validate_sites(pd.DataFrame({"label": [], "y_A": [], "x_A": []}))
    with pytest.raises(ValueError, match="non-finite"):
        T.validate_sites(pd.DataFrame({"label": ["A"], "y_A": [np.nan], "x_A": [0.0]}))


# ---------------------------------------------------------------------------- kinds vs naive
@pytest.mark.parametrize("periodic", [False, True])
def test_binary_matches_naive(periodic):
    rng = np.random.default_rng(2)
    yx = rng.uniform(-1.5, 14, size=(12, 2))  # some outside the field
    yx[0] = (2.5, 3.5)  # exact halves round up
    got = T.make_template(yx, SHAPE, kind="binary", periodic=periodic)
    np.testing.assert_array_equal(got, naive_binary(yx, SHAPE, periodic))
    assert got[3, 4] == 1.0


@pytest.mark.parametrize("periodic", [False, True])
def test_disc_matches_naive(periodic):
    rng = np.random.default_rng(3)
    yx = rng.uniform(0, 9, size=(5, 2))
    r = (1.7, 0.9)
    got = T.make_template(yx, SHAPE, kind="disc", radius_px=r, periodic=periodic)
    np.testing.assert_array_equal(got, naive_disc(yx, SHAPE, r, periodic))


@pytest.mark.parametrize("periodic", [False, True])
def test_gaussian_matches_naive(periodic):
    rng = np.random.default_rng(4)
    yx = rng.uniform(-1, 12, size=(6, 2))
    s = (1.3, 0.8)
    got = T.make_template(yx, SHAPE, kind="gaussian", sigma_px=s, periodic=periodic,
                          truncate=9.0)
    np.testing.assert_allclose(got, naive_gauss(yx, SHAPE, s, periodic), atol=1e-12)


def test_tiny_disc_still_marks_nearest_pixel():
    got = T.make_template([(2.4, 3.4)], SHAPE, kind="disc", radius_px=0.05)
    assert got.sum() == 1 and got[2, 3] == 1


# ---------------------------------------------------------------------------- periodic geometry
def test_periodic_cell_edge_sites_not_duplicated():
    shape = (10, 8)
    step = (0.4, 0.5)
    cell = (shape[0] * step[0], shape[1] * step[1])
    one = pd.DataFrame({"label": ["A"], "y_A": [0.0], "x_A": [0.0]})
    # the same column listed at all four cell corners
    four = pd.DataFrame({"label": ["A"] * 4, "y_A": [0, cell[0], 0, cell[0]],
                         "x_A": [0, 0, cell[1], cell[1]]})
    for kind, kw in [("binary", {}), ("disc", {"radius_A": 0.6}), ("gaussian", {"sigma_A": 0.5})]:
        a = T.species_templates(one, shape, step_A=step, kind=kind, periodic=True, **kw)["A"]
        b = T.species_templates(four, shape, step_A=step, kind=kind, periodic=True, **kw)["A"]
        np.testing.assert_allclose(a, b, err_msg=kind)
    # the corner gaussian wraps: the far edge pixel sees the same value as pixel 1
    g = T.species_templates(one, shape, step_A=step, kind="gaussian", sigma_A=0.5,
                            periodic=True)["A"]
    assert g[0, 0] == pytest.approx(1.0, abs=1e-9)
    assert g[-1, 0] == pytest.approx(g[1, 0]) and g[0, -1] == pytest.approx(g[0, 1])
    # and is invariant to shifting the sites by a whole cell
    g2 = T.species_templates(T.shifted_sites(one, (cell[0], -2 * cell[1])), shape, step_A=step,
                             kind="gaussian", sigma_A=0.5, periodic=True)["A"]
    np.testing.assert_allclose(g, g2, atol=1e-12)


def test_shift_by_one_pixel_rolls_periodic_template():
    rng = np.random.default_rng(5)
    s = _sites(rng, n=5)
    kw = dict(step_A=STEP, kind="gaussian", sigma_A=0.4, periodic=True)
    a = T.species_templates(s, SHAPE, **kw)["all"]
    b = T.species_templates(T.shifted_sites(s, (STEP[0], 2 * STEP[1])), SHAPE, **kw)["all"]
    np.testing.assert_allclose(np.roll(a, (1, 2), axis=(0, 1)), b, atol=1e-12)


def test_non_square_step_disc_is_round_in_angstrom():
    shape = (21, 21)
    step = (0.1, 0.3)
    s = pd.DataFrame({"label": ["A"], "y_A": [1.0], "x_A": [3.0]})  # pixel (10, 10)
    t = T.species_templates(s, shape, step_A=step, kind="disc", radius_A=0.65)["A"]
    ys, xs = np.nonzero(t)
    assert (ys.min(), ys.max()) == (4, 16)  # 0.6 Å / 0.1 = 6 px along y
    assert (xs.min(), xs.max()) == (8, 12)  # 0.6 Å / 0.3 = 2 px along x


def test_wrap_sites_folds_and_dedupes():
    s = pd.DataFrame({"label": ["A", "A", "B", "A"], "y_A": [0.0, 5.0, 0.0, 7.5],
                      "x_A": [0.0, 3.0, 0.0, -1.0], "n_atoms": [1, 1, 2, 1]})
    w = T.wrap_sites(s, (5.0, 3.0))
    assert list(w.label) == ["A", "B", "A"]  # A@(5,3) == A@(0,0); B kept (other label)
    np.testing.assert_allclose(w[["y_A", "x_A"]].to_numpy(), [[0, 0], [0, 0], [2.5, 2.0]])
    assert "n_atoms" in w.columns


# ---------------------------------------------------------------------------- species, regions
def test_species_templates_labels_and_all():
    rng = np.random.default_rng(6)
    s = _sites(rng, n=9)
    t = T.species_templates(s, SHAPE, step_A=STEP, kind="binary")
    assert list(t) == ["Li", "Fe", "O", "all"]
    np.testing.assert_array_equal(t["all"], np.maximum.reduce([t["Li"], t["Fe"], t["O"]]))
    g = T.species_templates(s, SHAPE, step_A=STEP, kind="gaussian", sigma_A=0.3)
    np.testing.assert_allclose(g["all"], g["Li"] + g["Fe"] + g["O"])
    only = T.species_templates(s, SHAPE, step_A=STEP, labels=["Fe"], include_all=False)
    assert list(only) == ["Fe"]


def test_region_zeroes_outside_and_partial_template():
    rng = np.random.default_rng(7)
    s = _sites(rng, n=30)
    reg = T.box_region(SHAPE, (0, 5), (0, 7))
    t = T.species_templates(s, SHAPE, step_A=STEP, kind="gaussian", sigma_A=0.3, region=reg)
    for img in t.values():
        assert np.all(img[~reg] == 0) and img[reg].max() > 0
    with pytest.raises(ValueError, match="region shape"):
        T.make_template([(1, 1)], SHAPE, region=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="empty"):
        T.box_region(SHAPE, (5, 5), (0, 3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, labels=["Pb"]), "no sites"),
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, kind="gaussian"), "sigma"),
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, kind="gaussian", sigma_A=-1),
         "sigma_A"),
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, kind="disc"), "radius"),
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, kind="square"), "kind"),
        (lambda s: T.species_templates(s, SHAPE, step_A=STEP, origin_A=(100, 100)), "outside"),
        # region that contains no site -> zero-variance template
        (lambda s: T.species_templates(s.iloc[:1], SHAPE, step_A=STEP,
                                       region=T.box_region(SHAPE, (8, 9), (12, 13))),
         "zero variance"),
    ],
)
def test_bad_inputs_raise(call, match):
    s = pd.DataFrame({"label": ["A", "B"], "y_A": [0.3, 1.2], "x_A": [0.45, 2.0]})
    with pytest.raises(ValueError, match=match):
        call(s)


def test_zero_variance_template_raises():
    with pytest.raises(ValueError, match="zero variance"):
        T.check_template(np.ones(SHAPE))
    # every pixel is a site
    yy, xx = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    with pytest.raises(ValueError, match="zero variance"):
        T.make_template(np.stack([yy.ravel(), xx.ravel()], 1), (3, 4))


# ---------------------------------------------------------------------------- controls
def test_random_site_template_seeded_same_count():
    rng = np.random.default_rng(8)
    s = _sites(rng, n=10)
    real = T.species_templates(s, SHAPE, step_A=STEP)["all"]
    a = T.random_site_template(s, SHAPE, step_A=STEP, seed=3)
    b = T.random_site_template(s, SHAPE, step_A=STEP, seed=3)
    c = T.random_site_template(s, SHAPE, step_A=STEP, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.sum() == real.sum()  # same number of marked pixels
    fe = T.random_site_template(s, SHAPE, step_A=STEP, label="Fe", seed=1)
    assert fe.sum() == T.species_templates(s, SHAPE, step_A=STEP, labels=["Fe"])["Fe"].sum()
    reg = T.box_region(SHAPE, (0, 6), (0, 13))
    inreg = T.random_site_template(s, SHAPE, step_A=STEP, seed=2, region=reg, kind="gaussian",
                                   sigma_A=0.3)
    assert np.all(inreg[~reg] == 0)
    rs = T.random_sites(s, SHAPE, step_A=STEP, seed=0)
    assert len(rs) == real.sum() and set(rs.label) <= set(s.label)


def test_shifted_sites():
    s = pd.DataFrame({"label": ["A", "B"], "y_A": [1.0, 2.0], "x_A": [3.0, 4.0], "n_atoms": [1, 2]})
    sh = T.shifted_sites(s, (0.5, -1.0))
    np.testing.assert_allclose(sh.y_A, [1.5, 2.5])
    np.testing.assert_allclose(sh.x_A, [2.0, 3.0])
    assert list(sh.n_atoms) == [1, 2] and list(s.y_A) == [1.0, 2.0]  # input untouched


def test_template_set_attrs_is_json_friendly():
    import json

    a = T.template_set_attrs(kind="gaussian", step_A=0.3, sigma_A=(0.4, 0.5),
                             region=T.box_region((4, 4), (0, 2), (0, 4)))
    assert json.loads(json.dumps(a))["region_fraction"] == 0.5
