"""Tests for tmask_validate.metrics: naive references, hand-computable answers, physics checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tmask_validate import metrics as M
from tmask_validate import templates as T

SHAPE = (11, 14)
STEP = (0.3, 0.45)


def _rand_sites(rng, n=9, labels=("Li", "Fe", "O")):
    return pd.DataFrame({
        "label": [labels[i % len(labels)] for i in range(n)],
        "y_A": rng.uniform(0, (SHAPE[0] - 1) * STEP[0], n),
        "x_A": rng.uniform(0, (SHAPE[1] - 1) * STEP[1], n),
    })


# ---------------------------------------------------------------------------- naive references
def naive_site_signal(img, y_px, x_px, step, radius_A, periodic, n_sub=5):
    """Loop over every pixel and every sub-sample of the whole image (and its periodic images)."""
    sy, sx = img.shape
    num = den = 0.0
    offs = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    images = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)] if periodic else [(0, 0)]
    for i in range(sy):
        for j in range(sx):
            w = 0
            for a, b in images:
                for oy in offs:
                    for ox in offs:
                        dy = (i + a * sy + oy - y_px) * step[0]
                        dx = (j + b * sx + ox - x_px) * step[1]
                        w += dy * dy + dx * dx <= radius_A**2 * (1 + 1e-12)
            num += w * img[i, j]
            den += w
    if den == 0:
        i, j = int(np.floor(y_px + 0.5)) % sy, int(np.floor(x_px + 0.5)) % sx
        return img[i, j]
    return num / den


def naive_bilinear(img, y, x):
    i0, j0 = int(np.floor(y)), int(np.floor(x))
    i1, j1 = min(i0 + 1, img.shape[0] - 1), min(j0 + 1, img.shape[1] - 1)
    fy, fx = y - i0, x - j0
    return ((1 - fy) * (1 - fx) * img[i0, j0] + (1 - fy) * fx * img[i0, j1]
            + fy * (1 - fx) * img[i1, j0] + fy * fx * img[i1, j1])


# ---------------------------------------------------------------------------- site signals
@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("radius_A", [0.0, 0.2, 0.55])
def test_per_site_signals_match_naive(periodic, radius_A):
    rng = np.random.default_rng(10)
    img = rng.normal(size=SHAPE)
    s = _rand_sites(rng)
    if periodic:  # include sites near/over the edges
        s.loc[0, ["y_A", "x_A"]] = (-0.1, SHAPE[1] * STEP[1] - 0.05)
    per = M.per_site_signals(img, s, step_A=STEP, radius_A=radius_A, periodic=periodic)
    assert len(per) == len(s)
    for _, row in per.iterrows():
        ref = naive_site_signal(img, row.y_px, row.x_px, STEP, radius_A, periodic)
        assert row.signal == pytest.approx(ref, rel=1e-12, abs=1e-12)
    lab = M.site_signals(img, s, step_A=STEP, radius_A=radius_A, periodic=periodic)
    for _, row in lab.iterrows():
        sel = per[per.label == row.label].signal
        assert row.n_sites == len(sel)
        assert row.signal == pytest.approx(sel.mean())
        assert row.site_std == pytest.approx(sel.std(ddof=0))


def test_zero_radius_is_nearest_pixel_and_subpixel_disc_weights():
    img = np.arange(20.0).reshape(4, 5)
    s = pd.DataFrame({"label": ["A"], "y_A": [1.4 * 0.5], "x_A": [2.6 * 0.5]})
    per = M.per_site_signals(img, s, step_A=0.5, radius_A=0.0)
    assert per.signal[0] == img[1, 3]
    # a disc covering exactly the own pixel centre region + symmetric neighbours: on a linear
    # ramp the disc mean of a site at a pixel centre is the centre value
    s2 = pd.DataFrame({"label": ["A"], "y_A": [1.0], "x_A": [1.5]})  # pixel (2, 3)
    per2 = M.per_site_signals(img, s2, step_A=0.5, radius_A=0.6)
    assert per2.signal[0] == pytest.approx(img[2, 3])
    assert per2.n_px[0] == 9


def test_periodic_wrap_equals_rolled_image():
    rng = np.random.default_rng(11)
    img = rng.normal(size=SHAPE)
    corner = pd.DataFrame({"label": ["A"], "y_A": [0.05], "x_A": [-0.1]})
    inside = T.shifted_sites(corner, (3 * STEP[0], 4 * STEP[1]))
    a = M.per_site_signals(img, corner, step_A=STEP, radius_A=0.7, periodic=True).signal[0]
    b = M.per_site_signals(np.roll(img, (3, 4), axis=(0, 1)), inside, step_A=STEP,
                           radius_A=0.7, periodic=False).signal[0]
    assert a == pytest.approx(b, rel=1e-12)
    # the same column listed at the cell edge is counted once
    cell = (SHAPE[0] * STEP[0], SHAPE[1] * STEP[1])
    dup = pd.DataFrame({"label": ["A", "A"], "y_A": [0.0, cell[0]], "x_A": [0.0, cell[1]]})
    sig = M.site_signals(img, dup, step_A=STEP, periodic=True)
    assert sig.n_sites[0] == 1
    # non-periodic: the out-of-field copy is dropped
    assert M.site_signals(img, dup, step_A=STEP).n_sites[0] == 1


def test_sites_outside_field_raise():
    img = np.random.default_rng(0).normal(size=SHAPE)
    s = pd.DataFrame({"label": ["A"], "y_A": [100.0], "x_A": [0.0]})
    with pytest.raises(ValueError, match="field of view"):
        M.site_signals(img, s, step_A=STEP)
    with pytest.raises(ValueError, match="radius_A"):
        M.site_signals(img, s, step_A=STEP, radius_A=-1)
    with pytest.raises(ValueError, match="non-finite"):
        M.site_signals(np.full(SHAPE, np.nan), s, step_A=STEP)


# ---------------------------------------------------------------------------- background / noise
def test_background_noise_matches_numpy_and_fallbacks():
    rng = np.random.default_rng(12)
    img = rng.normal(size=SHAPE) ** 3  # skewed
    bg, noise = M.background_noise(img)
    assert bg == pytest.approx(np.median(img))
    assert noise == pytest.approx(1.4826 * np.median(np.abs(img - np.median(img))))
    reg = T.box_region(SHAPE, (0, 5), (2, 9))
    bg_r, _ = M.background_noise(img, region=reg)
    assert bg_r == pytest.approx(np.median(img[reg]))
    # MAD = 0 (mostly constant) -> standard deviation
    spiky = np.zeros(SHAPE)
    spiky[0, :3] = 5.0
    assert M.background_noise(spiky) == (0.0, pytest.approx(spiky.std()))
    with pytest.raises(ValueError, match="constant"):
        M.background_noise(np.ones(SHAPE))


def _hand_image(amps, d=0.25, b=1.0, seed=0):
    """Image with known median b and MAD d: site pixels b+amp, others ±d balanced around b."""
    shape, step = (10, 12), (0.5, 0.4)
    px = {"A": [(1, 1), (1, 7), (6, 4)], "B": [(3, 3), (8, 9)], "C": [(5, 10), (8, 2)]}
    sites = pd.DataFrame([(lab, i * step[0], j * step[1]) for lab, pts in px.items()
                          for i, j in pts], columns=["label", "y_A", "x_A"])
    site_px = {p for pts in px.values() for p in pts}
    others = [(i, j) for i in range(shape[0]) for j in range(shape[1]) if (i, j) not in site_px]
    n_bright = sum(len(px[k]) for k in px if amps[k] > 0)
    n_dark = len(site_px) - n_bright
    n_minus = shape[0] * shape[1] // 2 - n_dark
    signs = np.array([-1.0] * n_minus + [1.0] * (len(others) - n_minus))
    np.random.default_rng(seed).shuffle(signs)
    img = np.empty(shape)
    for (i, j), sg in zip(others, signs, strict=True):
        img[i, j] = b + sg * d
    for lab, pts in px.items():
        assert abs(amps[lab]) > d
        for i, j in pts:
            img[i, j] = b + amps[lab]
    return img, sites, step


def test_known_answer_cnr_crosstalk_specificity():
    d = 0.25
    img_a, sites, step = _hand_image({"A": 4.0, "B": 1.0, "C": -2.0}, d=d)
    img_b, _, _ = _hand_image({"A": 3.0, "B": 2.0, "C": -0.5}, d=d, seed=1)
    kw = dict(step_A=step, radius_A=0.1, baseline="median")  # the image is built on its median
    m = M.image_metrics(img_a, sites, target="A", **kw).set_index("label")
    noise = 1.4826 * d
    assert np.allclose(m.background, 1.0) and np.allclose(m.noise, noise)
    np.testing.assert_allclose(m.signal, [5.0, 2.0, -1.0])
    np.testing.assert_allclose(m.cnr, np.array([4.0, 1.0, -2.0]) / noise)
    np.testing.assert_allclose(m.relative, [1.0, 0.25, -0.5])
    np.testing.assert_allclose(m.crosstalk, [1.0, 0.25, -0.5])
    np.testing.assert_allclose(m.bright, [1.0, 0.25, 0.0])  # dark C is not bright crosstalk
    np.testing.assert_allclose(m.dark, [0.0, 0.0, -0.5])
    assert m.is_target.tolist() == [True, False, False] and m.target_bright.all()

    tab = M.crosstalk_table({"A": img_a, "B": img_b, "all": img_a}, sites, **kw)
    assert set(tab.template) == {"A", "B"}  # "all" skipped
    x = M.crosstalk_matrix({"A": img_a, "B": img_b}, sites, **kw)
    assert list(x.index) == ["A", "B"] and list(x.columns) == ["A", "B", "C"]
    np.testing.assert_allclose(x.to_numpy(), [[1.0, 0.25, -0.5], [1.5, 1.0, -0.25]])
    spec = M.specificity(x)
    assert spec.loc["A", "specificity"] == pytest.approx(0.75)  # 1 - max signed X (B)
    assert spec.loc["A", "specificity_clipped"] == pytest.approx(0.75)
    assert spec.loc["A", "specificity_abs"] == pytest.approx(0.5)  # |dark C| counts here
    assert spec.loc["A", "max_dark_label"] == "C" and spec.loc["A", "max_bright_label"] == "B"
    assert spec.loc["B", "specificity"] == pytest.approx(-0.5)  # wrong column brighter: no clip
    assert spec.loc["B", "specificity_abs"] == pytest.approx(-0.5)
    t_a = tab[tab.template == "A"].set_index("site_label")
    np.testing.assert_allclose(t_a.specificity, 0.75)
    np.testing.assert_allclose(t_a.dark, [0.0, 0.0, -0.5])


def test_failed_template_target_dark_and_errors():
    img, sites, step = _hand_image({"A": -3.0, "B": 1.0, "C": -2.0})
    m = M.image_metrics(img, sites, step_A=step, radius_A=0.1, target="A",
                        baseline="median").set_index("label")
    assert not m.target_bright.any()
    np.testing.assert_allclose(m.crosstalk, [-1.0, 1 / 3, -2 / 3])
    np.testing.assert_allclose(m.relative, [-3.0, 1.0, -2.0])  # B is the brightest label
    with pytest.raises(ValueError, match="not site labels"):
        M.crosstalk_table({"Zr": img}, sites, step_A=step)
    with pytest.raises(ValueError, match="no species"):
        M.crosstalk_table({"all": img}, sites, step_A=step)
    with pytest.raises(ValueError, match="target"):
        M.image_metrics(img, sites, step_A=step, target="Zr")


def test_gaussian_columns_physics_check():
    """Gaussians of known amplitude per species at known sites -> crosstalk = amplitude ratios."""
    step = (0.25, 0.2)
    shape = (48, 60)
    rng = np.random.default_rng(13)
    # 4 x 5 lattice of columns, 2.5 Å apart, labels cycling; sites on pixel centres
    pts = [(2.0 + 2.5 * i, 1.6 + 2.2 * j) for i in range(4) for j in range(5)]
    labels = ["Li", "Fe", "P", "O"]
    sites = pd.DataFrame({"label": [labels[k % 4] for k in range(len(pts))],
                          "y_A": [p[0] for p in pts], "x_A": [p[1] for p in pts]})
    amps = {"Li": 1.0, "Fe": -3.0, "P": 0.3, "O": 0.6}  # Fe dark (heavy column in a Li image)
    yy, xx = np.meshgrid(np.arange(shape[0]) * step[0], np.arange(shape[1]) * step[1],
                         indexing="ij")
    img = np.full(shape, 2.0)
    for _, r in sites.iterrows():
        img += amps[r.label] * np.exp(-0.5 * ((yy - r.y_A) ** 2 + (xx - r.x_A) ** 2) / 0.15**2)
    img += rng.normal(scale=1e-3, size=shape)
    m = M.image_metrics(img, sites, step_A=step, radius_A=0.05, target="Li").set_index("label")
    assert m.background.iloc[0] == pytest.approx(2.0, abs=2e-3)
    for lab, a in amps.items():
        assert m.loc[lab, "crosstalk"] == pytest.approx(a / amps["Li"], abs=5e-3)
    assert m.loc["Fe", "dark"] == pytest.approx(-3.0, abs=1e-2) and m.loc["Fe", "bright"] == 0
    x = M.crosstalk_matrix({"Li": img}, sites, step_A=step, radius_A=0.05)
    spec = M.specificity(x)
    assert spec.loc["Li", "specificity"] == pytest.approx(0.4, abs=5e-3)  # 1 - O/Li
    assert spec.loc["Li", "specificity_abs"] == pytest.approx(-2.0, abs=1e-2)  # 1 - |Fe/Li|


def test_background_robust_when_sites_cover_most_pixels():
    """Every pixel lies within 0.71 Å of a column; median/MAD still recover the background."""
    step = (0.2, 0.2)
    shape = (40, 40)
    b, sigma_n = 1.0, 0.1
    pts = [(0.5 + i, 0.5 + j) for i in range(8) for j in range(8)]  # 1 Å lattice
    sites = pd.DataFrame({"label": ["A" if (k % 2) else "B" for k in range(len(pts))],
                          "y_A": [p[0] for p in pts], "x_A": [p[1] for p in pts]})
    yy, xx = np.meshgrid(np.arange(shape[0]) * step[0], np.arange(shape[1]) * step[1],
                         indexing="ij")
    dist = np.full(shape, np.inf)
    img = np.full(shape, b)
    for _, r in sites.iterrows():
        r2 = (yy - r.y_A) ** 2 + (xx - r.x_A) ** 2
        dist = np.minimum(dist, np.sqrt(r2))
        img += (3.0 if r.label == "A" else -1.0) * np.exp(-0.5 * r2 / 0.12**2)
    img += np.random.default_rng(14).normal(scale=sigma_n, size=shape)
    assert not np.any(dist > 1.0)  # "pixels far from all sites" would be empty
    bg, noise = M.background_noise(img)
    assert abs(bg - b) < 0.05
    assert 0.8 * sigma_n < noise < 1.4 * sigma_n
    assert abs(img.mean() - b) > 2 * abs(bg - b)  # the plain mean is pulled by the peaks
    m = M.image_metrics(img, sites, step_A=step, radius_A=0.1, target="A",
                        baseline="median").set_index("label")
    assert m.loc["B", "crosstalk"] == pytest.approx(-1 / 3, abs=0.08)
    # no pixel is 0.75 Å from every column: the interstitial background is an error, no guess
    with pytest.raises(ValueError, match="background_distance_A"):
        M.image_metrics(img, sites, step_A=step, radius_A=0.1, target="A",
                        background_distance_A=0.75)
    m = M.image_metrics(img, sites, step_A=step, radius_A=0.1, target="A",
                        background_distance_A=0.6).set_index("label")
    assert m.loc["B", "crosstalk"] < 0


def test_non_square_steps_give_same_metrics_as_square_resampling():
    """One physical image sampled with (0.2, 0.4) and (0.2, 0.2) steps: same crosstalk."""
    sites = pd.DataFrame({"label": ["A", "B", "A", "B"], "y_A": [1.0, 1.0, 3.0, 3.0],
                          "x_A": [1.2, 3.6, 2.4, 4.8]})

    def render(step, shape):
        yy, xx = np.meshgrid(np.arange(shape[0]) * step[0], np.arange(shape[1]) * step[1],
                             indexing="ij")
        out = np.zeros(shape)
        for _, r in sites.iterrows():
            out += (2.0 if r.label == "A" else 0.5) * np.exp(
                -0.5 * ((yy - r.y_A) ** 2 + (xx - r.x_A) ** 2) / 0.3**2)
        return out + 0.01 * np.sin(yy * 7.0 + xx * 3.0)

    res = []
    for step, shape in [((0.2, 0.4), (21, 15)), ((0.2, 0.2), (21, 30))]:
        x = M.crosstalk_matrix({"A": render(step, shape)}, sites, step_A=step, radius_A=0.05)
        res.append(x.loc["A", "B"])
    assert res[0] == pytest.approx(0.25, abs=0.01) and res[1] == pytest.approx(res[0], abs=0.01)


def test_metrics_table_and_relative():
    img, sites, step = _hand_image({"A": 4.0, "B": 1.0, "C": -2.0})
    tab = M.metrics_table({"abf_inv": img, "icom": 2 * img}, sites, step_A=step, radius_A=0.1,
                          baseline="median")
    assert list(tab.image.unique()) == ["abf_inv", "icom"]
    assert "crosstalk" not in tab.columns
    icom = tab[tab.image == "icom"].set_index("label")
    np.testing.assert_allclose(icom.relative, [1.0, 0.25, -0.5])
    np.testing.assert_allclose(icom.cnr, np.array([4, 1, -2]) / (1.4826 * 0.25))  # scale-free
    assert not tab.isna().any().any()


def test_cnr_function():
    assert M.cnr(3.0, 1.0, 0.5) == pytest.approx(4.0)
    np.testing.assert_allclose(M.cnr(np.array([1.0, 2.0]), 1.0, 2.0), [0.0, 0.5])
    with pytest.raises(ValueError):
        M.cnr(1.0, 0.0, 0.0)


def test_specificity_single_label_and_bad_input():
    x = pd.DataFrame([[1.0]], index=pd.Index(["A"], name="template"), columns=["A"])
    s = M.specificity(x)
    assert s.loc["A", "specificity"] == 1.0 and s.loc["A", "specificity_abs"] == 1.0
    with pytest.raises(ValueError):
        M.specificity(pd.DataFrame([[1.0]], index=["Z"], columns=["A"]))
    with pytest.raises(ValueError):
        M.specificity(pd.DataFrame([[np.nan, 1.0]], index=["A"], columns=["A", "B"]))


# ---------------------------------------------------------------------------- unit-cell average
def test_unit_cell_average_integer_tiling_is_exact():
    rng = np.random.default_rng(15)
    cell = rng.normal(size=(5, 7))
    img = np.tile(cell, (3, 4))
    avg, counts = M.unit_cell_average(img, step_A=(0.3, 0.2), cell_A=(1.5, 1.4),
                                      return_counts=True)
    np.testing.assert_allclose(avg, cell)
    assert np.all(counts == 12)
    # a cell corner at pixel (2, 3): the average is the rolled cell
    avg2 = M.unit_cell_average(img, step_A=(0.3, 0.2), cell_A=(1.5, 1.4),
                               cell_origin_A=(0.6, 0.6))
    np.testing.assert_allclose(avg2, np.roll(cell, (-2, -3), axis=(0, 1)))


def test_unit_cell_average_non_integer_matches_naive():
    rng = np.random.default_rng(16)
    img = rng.normal(size=(23, 17))
    step, cell, origin, corner = (0.31, 0.27), (1.7, 1.3), (0.1, -0.2), (0.4, 0.053)
    avg, counts = M.unit_cell_average(img, step_A=step, cell_A=cell, origin_A=origin,
                                      cell_origin_A=corner, return_counts=True)
    nb = (round(cell[0] / step[0]), round(cell[1] / step[1]))
    assert avg.shape == nb
    sums = np.zeros(nb)
    cnt = np.zeros(nb)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            k = []
            for ax, idx in ((0, i), (1, j)):
                pos = origin[ax] + idx * step[ax]
                centres = corner[ax] + np.arange(nb[ax]) * cell[ax] / nb[ax]
                dd = (pos - centres) % cell[ax]
                dd = np.minimum(dd, cell[ax] - dd)  # periodic distance
                k.append(int(np.argmin(dd)))
            sums[k[0], k[1]] += img[i, j]
            cnt[k[0], k[1]] += 1
    np.testing.assert_array_equal(counts, cnt)
    np.testing.assert_allclose(avg, sums / cnt)


def test_unit_cell_average_empty_bins_raise():
    with pytest.raises(ValueError, match="empty"):
        M.unit_cell_average(np.ones((3, 3)), step_A=0.3, cell_A=3.0)


# ---------------------------------------------------------------------------- line profiles
def test_line_profile_linear_image_exact_and_band_average():
    step, origin = (0.3, 0.45), (0.2, -0.1)
    yy, xx = np.meshgrid(origin[0] + np.arange(SHAPE[0]) * step[0],
                         origin[1] + np.arange(SHAPE[1]) * step[1], indexing="ij")
    img = 1.0 + 2.0 * yy - 0.7 * xx
    p = M.line_profile(img, (0.8, 0.6), (2.6, 4.9), width_A=0.8, step_A=step, origin_A=origin,
                       normalise=None)
    np.testing.assert_allclose(p.intensity, 1.0 + 2.0 * p.y_A - 0.7 * p.x_A, atol=1e-12)
    assert p.distance_A.iloc[-1] == pytest.approx(np.hypot(1.8, 4.3))
    assert np.all(np.diff(p.distance_A) <= 0.5 * min(step) + 1e-12)
    mm = M.line_profile(img, (0.8, 0.6), (2.6, 4.9), step_A=step, origin_A=origin)
    assert mm.intensity.min() == 0.0 and mm.intensity.max() == 1.0
    z = M.line_profile(img, (0.8, 0.6), (2.6, 4.9), step_A=step, origin_A=origin,
                       normalise="zscore")
    assert z.intensity.mean() == pytest.approx(0, abs=1e-12)
    assert z.intensity.std(ddof=0) == pytest.approx(1)


def test_line_profile_matches_naive_bilinear_and_band():
    rng = np.random.default_rng(17)
    img = rng.normal(size=SHAPE)
    start, end, width = (0.9, 1.0), (2.1, 4.4), 0.5
    p = M.line_profile(img, start, end, width_A=width, step_A=STEP, normalise=None,
                       sample_step_A=0.1)
    vec = np.subtract(end, start)
    length = np.hypot(*vec)
    normal = np.array([-vec[1], vec[0]]) / length
    n_across = int(np.ceil(width / 0.1 - 1e-9)) + 1
    for _, row in p.iloc[::7].iterrows():
        vals = [naive_bilinear(img, (row.y_A + o * normal[0]) / STEP[0],
                               (row.x_A + o * normal[1]) / STEP[1])
                for o in np.linspace(-width / 2, width / 2, n_across)]
        assert row.intensity == pytest.approx(np.mean(vals), rel=1e-10)


def test_line_profile_periodic_and_bounds():
    rng = np.random.default_rng(18)
    img = rng.normal(size=SHAPE)
    cell = (SHAPE[0] * STEP[0], SHAPE[1] * STEP[1])
    # a segment crossing the right edge on the periodic image == same segment on a rolled image
    a = M.line_profile(img, (1.2, cell[1] - 1.0), (1.5, cell[1] + 1.0), step_A=STEP,
                       periodic=True, normalise=None)
    rolled = np.roll(img, -5, axis=1)
    b = M.line_profile(rolled, (1.2, cell[1] - 1.0 - 5 * STEP[1]),
                       (1.5, cell[1] + 1.0 - 5 * STEP[1]), step_A=STEP, normalise=None)
    np.testing.assert_allclose(a.intensity, b.intensity, atol=1e-12)
    with pytest.raises(ValueError, match="leaves the image"):
        M.line_profile(img, (1.2, cell[1] - 1.0), (1.5, cell[1] + 1.0), step_A=STEP)
    with pytest.raises(ValueError, match="zero-length"):
        M.line_profile(img, (1, 1), (1, 1), step_A=STEP)
    with pytest.raises(ValueError, match="normalise"):
        M.line_profile(img, (1, 1), (1, 2), step_A=STEP, normalise="max")
    with pytest.raises(ValueError, match="flat"):
        M.line_profile(np.ones(SHAPE), (1, 1), (1, 2), step_A=STEP)


def test_unit_cell_line_profile_equals_profile_on_cell():
    rng = np.random.default_rng(19)
    cell_img = rng.normal(size=(6, 8))
    step = (0.25, 0.3)
    cell = (1.5, 2.4)
    tiled = np.tile(cell_img, (4, 3))
    a = M.unit_cell_line_profile(tiled, (0.3, -0.5), (1.9, 3.0), step_A=step, cell_A=cell,
                                 width_A=0.4)
    b = M.line_profile(cell_img, (0.3, -0.5), (1.9, 3.0), step_A=step, width_A=0.4,
                       periodic=True)
    np.testing.assert_allclose(a.intensity, b.intensity, atol=1e-12)


# ---------------------------------------------------------------------------- mask similarity
def test_mask_similarity():
    rng = np.random.default_rng(20)
    a = rng.normal(size=(9, 12))
    b = 0.5 * a + rng.normal(size=(9, 12))
    assert M.mask_similarity(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert M.mask_similarity(a, -3 * a + 1) == pytest.approx(-1.0)
    a2 = a.copy()
    a2[0, :4] = np.nan
    keep = np.isfinite(a2)
    assert M.mask_similarity(a2, b) == pytest.approx(np.corrcoef(a[keep], b[keep])[0, 1])
    valid = np.zeros_like(a, bool)
    valid[2:7, 3:9] = True
    assert M.mask_similarity(a, b, valid=valid) == pytest.approx(
        np.corrcoef(a[valid], b[valid])[0, 1])
    with pytest.raises(ValueError, match="constant"):
        M.mask_similarity(np.ones_like(a), b)
    with pytest.raises(ValueError, match="shapes"):
        M.mask_similarity(a, b[:, :3])
    sim = M.similarity_matrix({"x": a, "y": b})
    assert sim.loc["x", "x"] == pytest.approx(1.0) and sim.loc["x", "y"] == sim.loc["y", "x"]


def test_many_sites_blocked_equals_one_by_one():
    rng = np.random.default_rng(21)
    img = rng.normal(size=(40, 30))
    s = pd.DataFrame({"label": ["A"] * 150, "y_A": rng.uniform(0, 39 * 0.1, 150),
                      "x_A": rng.uniform(0, 29 * 0.1, 150)})
    all_at_once = M.per_site_signals(img, s, step_A=0.1, radius_A=2.0, periodic=True).signal
    singles = [M.per_site_signals(img, s.iloc[[k]], step_A=0.1, radius_A=2.0,
                                  periodic=True).signal[0] for k in range(0, 150, 37)]
    np.testing.assert_allclose(all_at_once.to_numpy()[::37], singles, rtol=1e-12)


def test_metric_definitions_markdown_exported():
    md = M.METRIC_DEFINITIONS
    assert md.startswith("## Metric definitions")
    for key in ("specificity_abs", "1.4826", "interstitial", "specificity_median", "minmax"):
        assert key in md


def test_specificity_from_metrics_matches_matrix():
    img, sites, step = _hand_image({"A": 4.0, "B": 1.0, "C": -2.0})
    m = M.image_metrics(img, sites, step_A=step, radius_A=0.1, target="A", baseline="median")
    d = M.specificity_from_metrics(m)
    assert d["specificity"] == pytest.approx(0.75) and d["specificity_abs"] == pytest.approx(0.5)
    assert d["target"] == "A" and d["target_bright"] and d["max_dark_label"] == "C"
    with pytest.raises(ValueError, match="target"):
        M.specificity_from_metrics(M.image_metrics(img, sites, step_A=step))


# ---------------------------------------------------------------------------- interstitial baseline
def naive_interstitial(shape, sites, step, origin, periodic, dist_A):
    """Every pixel against every site (and, if periodic, its 8 neighbouring periodic images)."""
    sy, sx = shape
    per = (sy * step[0], sx * step[1])
    imgs = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)] if periodic else [(0, 0)]
    out = np.zeros(shape, bool)
    for i in range(sy):
        for j in range(sx):
            y, x = origin[0] + i * step[0], origin[1] + j * step[1]
            dmin = min(np.hypot(y - (r.y_A + a * per[0]), x - (r.x_A + b * per[1]))
                       for r in sites.itertuples() for a, b in imgs)
            out[i, j] = dmin >= dist_A
    return out


@pytest.mark.parametrize("periodic", [False, True])
def test_interstitial_pixels_and_background_match_naive(periodic):
    rng = np.random.default_rng(31)
    origin = (-0.2, 0.35)
    sites = _rand_sites(rng, n=5)
    sites["y_A"] += origin[0]
    sites["x_A"] += origin[1] + 0.9  # some sites near the right edge: wrap matters
    img = rng.normal(size=SHAPE) + np.arange(SHAPE[1])[None] * 0.1  # asymmetric
    far = M.interstitial_pixels(SHAPE, sites, step_A=STEP, origin_A=origin, periodic=periodic,
                                min_distance_A=0.8)
    ref = naive_interstitial(SHAPE, sites, STEP, origin, periodic, 0.8)
    np.testing.assert_array_equal(far, ref)
    assert 8 <= ref.sum() < ref.size  # the case is not trivial
    bg, noise = M.background_noise(img, baseline="interstitial", interstitial=far)
    assert bg == pytest.approx(img[ref].mean())
    assert noise == pytest.approx(1.4826 * np.median(np.abs(img - np.median(img))))
    reg = T.box_region(SHAPE, (0, 6), (0, 14))
    bg_r, _ = M.background_noise(img, baseline="interstitial", interstitial=far, region=reg)
    assert bg_r == pytest.approx(img[ref & reg].mean())
    m = M.image_metrics(img, sites, step_A=STEP, origin_A=origin, periodic=periodic,
                        background_distance_A=0.8, target="Li", with_median=True)
    assert np.allclose(m.background, img[ref].mean())
    assert np.allclose(m.background_median, np.median(img))
    np.testing.assert_allclose(m.contrast, m.signal - img[ref].mean())
    np.testing.assert_allclose(m.cnr_median, (m.signal - np.median(img)) / m.noise)
    c_t = float(m.contrast[m.label == "Li"].iloc[0])
    np.testing.assert_allclose(m.crosstalk, m.contrast / abs(c_t))
    cm_t = float(m.contrast_median[m.label == "Li"].iloc[0])
    np.testing.assert_allclose(m.crosstalk_median, m.contrast_median / abs(cm_t))
    with pytest.raises(ValueError, match="baseline"):
        M.background_noise(img, baseline="mode")
    with pytest.raises(ValueError, match="interstitial"):
        M.background_noise(img, baseline="interstitial")


def _plateau_image():
    """Columns on a 1.5 Å lattice: most pixels lie in the bright halo (0.7 Å disc) of a target
    column A, so the image MEDIAN is the halo level c + 0.5, not the empty-space level c.
    Site pixels: A = c + 1, B = c + 0.3 (a real, weaker bright column), C = c - 1 (dark).
    True crosstalk over empty space: X[A, B] = 0.3, X[A, C] = -1 -> specificity 0.7."""
    c, step, shape = 2.0, (0.25, 0.25), (24, 30)
    pts = [(0.75 + 1.5 * i, 0.75 + 1.5 * j) for i in range(4) for j in range(5)]
    labels = ["A"] * len(pts)
    labels[6], labels[13] = "B", "C"
    sites = pd.DataFrame({"label": labels, "y_A": [p[0] for p in pts],
                          "x_A": [p[1] for p in pts]})
    yy, xx = np.meshgrid(np.arange(shape[0]) * step[0], np.arange(shape[1]) * step[1],
                         indexing="ij")
    img = np.full(shape, c) + np.random.default_rng(5).normal(scale=1e-3, size=shape)
    amp = {"A": 1.0, "B": 0.3, "C": -1.0}
    for r in sites.itertuples():
        d = np.hypot(yy - r.y_A, xx - r.x_A)
        if r.label == "A":
            img[(d < 0.7) & (d > 1e-9)] = c + 0.5
        img[d < 1e-9] = c + amp[r.label]
    return img, sites, step


def test_interstitial_baseline_does_not_saturate_where_the_median_did():
    img, sites, step = _plateau_image()
    assert np.median(img) == pytest.approx(2.5, abs=0.01)  # the typical pixel is halo
    m_new = M.image_metrics(img, sites, step_A=step, radius_A=0.05, target="A",
                            with_median=True)
    d_new = M.specificity_from_metrics(m_new)
    m_old = M.image_metrics(img, sites, step_A=step, radius_A=0.05, target="A",
                            baseline="median")
    d_old = M.specificity_from_metrics(m_old)
    # the old metric: every wrong column is below the median -> clipped to exactly 1.00
    assert d_old["specificity_clipped"] == 1.0
    # the true value (B adds 0.3 of what A adds over empty space) is found
    assert d_new["specificity"] == pytest.approx(0.7, abs=0.01)
    x = m_new.set_index("label")["crosstalk"]
    assert x["B"] == pytest.approx(0.3, abs=0.01) and x["C"] == pytest.approx(-1.0, abs=0.01)
    # the *_median columns reproduce the old numbers
    np.testing.assert_allclose(m_new.crosstalk_median, m_old.crosstalk)
    assert m_new.background.iloc[0] == pytest.approx(2.0, abs=1e-3)


def test_specificity_is_not_clipped_above_one():
    """Every wrong column darker than empty space: specificity > 1, the clipped one = 1."""
    x = pd.DataFrame([[1.0, -0.2, -0.5]], index=["A"], columns=["A", "B", "C"])
    s = M.specificity(x)
    assert s.loc["A", "specificity"] == pytest.approx(1.2)
    assert s.loc["A", "specificity_clipped"] == 1.0
    assert s.loc["A", "specificity_abs"] == pytest.approx(0.5)
