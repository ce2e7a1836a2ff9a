"""Tests of the species-evidence measure (tmask_validate.evidence) against naive references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tmask_validate import core, evidence


# ----------------------------------------------------------------------------- naive references
def naive_crossfit(data, template, folds, *, normalisation="pcc", valid=None, chunk_bytes=None):
    """Obviously-right per-fold loop of the cross-fitted template-mask image (issue 9 item 1)."""
    assert normalisation == "pcc"
    sy, sx, ky, kx = data.shape
    d = np.asarray(data, float).reshape(sy * sx, ky * kx)
    t = np.asarray(template, float).reshape(-1, sy * sx)
    f = np.asarray(folds).reshape(-1)
    use = np.ones(ky * kx, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    n_f = int(f.max()) + 1
    masks = np.zeros((n_f, len(t), ky * kx))
    image = np.zeros((len(t), sy * sx))
    for k in range(n_f):
        tr = (f >= 0) & (f != k)
        te = f == k
        x = d[tr]
        mu, sd = x.mean(0), x.std(0)
        good = use & (sd > 0)
        tt = t[:, tr]
        tt = (tt - tt.mean(1, keepdims=True)) / tt.std(1, keepdims=True)
        r = np.zeros((len(t), ky * kx))
        r[:, good] = np.clip(tt @ (x[:, good] - mu[good]) / (tr.sum() * sd[good]), -1, 1)
        masks[k] = r
        image[:, te] = r[:, good] @ ((d[te][:, good] - mu[good]) / sd[good]).T
    return masks.reshape(n_f, len(t), ky, kx), image.reshape(len(t), sy, sx)


@pytest.fixture
def crossfit(monkeypatch):
    """The core's cross-fit if it exists (issue 9 item 1), else the naive loop above."""
    if not hasattr(core, "crossfit_template_image"):
        monkeypatch.setattr(core, "crossfit_template_image", naive_crossfit, raising=False)
    return core.crossfit_template_image


def naive_contrast(image, sites_mask, folds, k):
    sel = folds == k
    v = image[sel]
    return (image[sel & sites_mask].mean() - v.mean()) / v.std()


# ----------------------------------------------------------------------------- small pieces
def test_geometry_folds_are_cells():
    g = evidence.FieldGeometry(cell_shape=(2, 3), cells=(2, 2), step_A=(0.5, 0.4))
    f = g.folds()
    assert f.shape == (4, 6)
    assert f[0, 0] == 0 and f[1, 2] == 0 and f[0, 3] == 1 and f[2, 0] == 2 and f[3, 5] == 3
    assert np.bincount(f.ravel()).tolist() == [6, 6, 6, 6]
    assert g.cell_A == pytest.approx((1.0, 1.2))
    with pytest.raises(ValueError, match="at least 2 cells"):
        evidence.FieldGeometry(cell_shape=(2, 3), cells=(1, 1), step_A=0.5)


def test_cell_contrasts_against_naive():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(6, 8))
    folds = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 3, 0), 4, 1)
    sites = rng.random((6, 8)) < 0.3
    sites[0, 0] = sites[0, 4] = sites[3, 0] = sites[3, 4] = True
    got = evidence.cell_contrasts(img, sites, folds, 4)
    want = [naive_contrast(img, sites, folds, k) for k in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a constant offset and a positive scale do not change it; a sign flip flips it
    np.testing.assert_allclose(evidence.cell_contrasts(3 * img + 7, sites, folds, 4), got)
    np.testing.assert_allclose(evidence.cell_contrasts(-img, sites, folds, 4), -got)


def test_cell_contrast_is_not_clipped():
    """Sites darker than everything give a negative contrast (no median floor)."""
    img = np.ones((4, 4))
    img[0, 0] = -5.0
    sites = np.zeros((4, 4), bool)
    sites[0, 0] = True
    c = evidence.cell_contrasts(img, sites, np.zeros((4, 4), int), 1)[0]
    assert c < -3


def test_site_pixels_include_nearest_and_wrap():
    m = evidence.site_pixels(np.array([[0.0, 0.0]]), (5, 5), (1.0, 1.0), radius_A=1.0)
    assert m[0, 0] and m[0, 1] and m[1, 0] and m[4, 0] and m[0, 4]
    assert not m[1, 1] and m.sum() == 5
    m0 = evidence.site_pixels(np.array([[2.2, 2.9]]), (5, 5), (1.0, 1.0), radius_A=0.0)
    assert m0.sum() == 1 and m0[2, 3]


def test_apply_fold_masks_against_naive():
    rng = np.random.default_rng(5)
    data = rng.poisson(20, size=(4, 6, 3, 5)).astype(np.uint32)
    folds = np.array([[0, 0, 1, 1, 2, 2]] * 4)
    folds[0, 0] = -1
    masks = rng.normal(size=(3, 2, 3, 5))
    valid = np.ones((3, 5), bool)
    valid[0, 0] = False
    got = evidence.apply_fold_masks(data, masks, folds, valid=valid)
    d = data.reshape(24, 15).astype(float)
    f = folds.ravel()
    want = np.zeros((2, 24))
    for k in range(3):
        x = d[(f >= 0) & (f != k)]
        mu, sd = x.mean(0), x.std(0)
        good = valid.ravel() & (sd > 0)
        te = f == k
        z = (d[te][:, good] - mu[good]) / sd[good]
        want[:, te] = masks[k].reshape(2, 15)[:, good] @ z.T
    np.testing.assert_allclose(got, want.reshape(2, 4, 6), rtol=1e-10, atol=1e-10)
    assert np.all(got[:, 0, 0] == 0)


def test_evidence_summary_against_naive():
    rng = np.random.default_rng(7)
    p = rng.normal(2.0, 0.5, size=(3, 16))
    a = rng.normal(1.0, 0.7, size=(3, 16))
    s = evidence.evidence_summary(p, a)
    d = [p[r].mean() - a[r].mean() for r in range(3)]
    diff = sum(d) / 3
    var_cells = sum(np.var(p[r], ddof=1) / 16 + np.var(a[r], ddof=1) / 16 for r in range(3)) / 3
    se_cells = math.sqrt(var_cells / 3)
    se_rep = np.std(d, ddof=1) / math.sqrt(3)
    assert s["difference"] == pytest.approx(diff)
    assert s["se_cells"] == pytest.approx(se_cells)
    assert s["se_repeats"] == pytest.approx(se_rep)
    assert s["se"] == pytest.approx(max(se_cells, se_rep))
    assert s["evidence_z"] == pytest.approx(diff / max(se_cells, se_rep))
    one = evidence.evidence_summary(p[:1], a[:1])
    assert math.isnan(one["se_repeats"]) and one["se"] == pytest.approx(one["se_cells"])


def test_evidence_summary_repeat_spread_dominates_when_repeats_disagree():
    """Cells that agree within a repeat but repeats that do not: the repeat spread is used."""
    p = np.array([[1.0, 1.01, 0.99, 1.0], [3.0, 3.01, 2.99, 3.0]])
    a = np.zeros((2, 4))
    s = evidence.evidence_summary(p, a)
    assert s["se"] == pytest.approx(s["se_repeats"]) and s["se_repeats"] > 50 * s["se_cells"]
    assert s["evidence_z"] == pytest.approx(2.0)


def test_null_p_and_verdict():
    assert evidence.null_p(5.0, [0.1] * 20) == pytest.approx(1 / 21)
    assert evidence.null_p(1.0, [0.0] * 10 + [2.0] * 10) == pytest.approx(11 / 21)
    assert evidence.null_p(1.0, [np.nan] * 20) == pytest.approx(1.0)
    assert math.isnan(evidence.null_p(np.nan, [0.0]))
    zn = [0.0] * 20
    assert evidence.verdict(5.0, 1 / 21, zn, z_min=3, p_max=0.05) == "detected"
    assert evidence.verdict(2.0, 1 / 21, zn, z_min=3, p_max=0.05) == "not detected"
    assert evidence.verdict(5.0, 0.2, zn, z_min=3, p_max=0.05) == "not detected"
    assert evidence.verdict(np.nan, 0.5, zn, z_min=3, p_max=0.05) == "uninformative"
    # the random-site control itself shows "evidence": cannot decide
    assert evidence.verdict(9.0, 1 / 21, [4.0] * 20, z_min=3, p_max=0.05) == "uninformative"


def test_random_null_sites_keep_their_distance():
    cols = np.array([[0.0, 0.0], [1.5, 2.0], [2.9, 3.9]])
    sets = evidence.random_null_sites(cols, (3.0, 4.0), 3, n_templates=25, min_distance_A=0.7,
                                      seed=1)
    assert len(sets) == 25
    for s in sets:
        assert s.shape == (3, 2)
        assert np.all((s >= 0) & (s < [3.0, 4.0]))
        d = evidence._min_dist(s, cols, (3.0, 4.0))
        assert d.min() >= 0.7
    assert not np.allclose(sets[0], sets[1])
    with pytest.raises(ValueError, match="could not place"):
        evidence.random_null_sites(cols, (3.0, 4.0), 200, n_templates=1, min_distance_A=0.7,
                                   max_tries=2000)


def test_detection_limits():
    t = pd.DataFrame({
        "structure": "s", "species": "Li", "template": "binary", "thickness_nm": 10.0,
        "dose_e_per_A2": [1e4, 1e4, 1e4, 1e5, 1e5, 1e5],
        "occupancy": [0.25, 0.5, 1.0, 0.25, 0.5, 1.0],
        "verdict": ["not detected", "detected", "detected",
                    "detected", "not detected", "not detected"]})
    lim = evidence.detection_limits(t).set_index("dose_e_per_A2")
    assert lim.loc[1e4, "occupancy_limit"] == 0.5
    assert math.isnan(lim.loc[1e5, "occupancy_limit"])
    assert lim.loc[1e5, "lowest_detected"] == 0.25


# ----------------------------------------------------------------------------- synthetic crystals
CELL = (6, 8)
STEP = (0.5, 0.5)
SITES = pd.DataFrame({"label": ["A", "L", "L"], "y_A": [0.5, 2.0, 1.0], "x_A": [0.5, 2.5, 3.0]})


def synthetic_cell(signatures: dict[str, float], *, det=(10, 12), width_A=0.45, seed=0):
    """One periodic cell of 4D data: a flat pattern plus, near every column, its label's own
    detector signature (weight = gaussian of the probe-column distance) x its strength."""
    rng = np.random.default_rng(seed)
    sy, sx = CELL
    ly, lx = sy * STEP[0], sx * STEP[1]
    sig_shape = {lab: rng.random(det) for lab in ("A", "L")}
    base = np.ones(det)
    yy, xx = np.mgrid[0:sy, 0:sx]
    py, px = yy * STEP[0], xx * STEP[1]
    out = np.broadcast_to(base, (sy, sx, *det)).copy()
    for lab, y, x in SITES[["label", "y_A", "x_A"]].itertuples(index=False):
        dy = (py - y + ly / 2) % ly - ly / 2
        dx = (px - x + lx / 2) % lx - lx / 2
        w = np.exp(-0.5 * (dy**2 + dx**2) / width_A**2)
        out += signatures.get(lab, 0.0) * w[..., None, None] * sig_shape[lab]
    return (out / out.sum(axis=(2, 3), keepdims=True)).astype(np.float32)


def _run(variants, comparisons, *, dose=2e4, repeats=2, n_null=20):
    geom = evidence.FieldGeometry(cell_shape=CELL, cells=(4, 4), step_A=STEP)
    table, _ = evidence.evaluate_evidence(
        variants, SITES, geom, comparisons, doses_e_per_A2=[dose], kinds=["binary"],
        site_radius_A=0.3, n_null=n_null, min_distance_A=0.7, repeats=repeats, seed=4)
    return table


def test_species_with_its_own_signature_is_detected(crossfit):
    present = synthetic_cell({"A": 2.0, "L": 0.6})
    absent = synthetic_cell({"A": 2.0, "L": 0.0})
    t = _run({"crystal": [present], "no_L": [absent]},
             [evidence.Comparison("L", "crystal", "no_L", 1.0)])
    row = t.iloc[0]
    assert row["verdict"] == "detected", row.to_dict()
    assert row["evidence_z"] > 5 and row["null_p"] <= 1 / 21 + 1e-12
    assert row["contrast_present"] > row["contrast_absent"]
    # the present-data masks lose their site contrast on the removed data
    assert row["contrast_absent_present_masks"] < row["contrast_present"]
    # in-sample "imprint" with the species absent is much higher than its held-out contrast
    assert row["imprint_absent"] > row["contrast_absent"]


def test_species_without_signature_is_not_detected(crossfit):
    """The 'species' scatters nothing: present and removed are the same physics."""
    same = synthetic_cell({"A": 2.0, "L": 0.0})
    t = _run({"crystal": [same], "no_L": [same.copy()]},
             [evidence.Comparison("L", "crystal", "no_L", 1.0)])
    row = t.iloc[0]
    assert row["verdict"] == "not detected", row.to_dict()
    assert abs(row["evidence_z"]) < 3


def test_pure_noise_is_not_detected(crossfit):
    flat = np.full((*CELL, 10, 12), 1.0 / 120, np.float32)
    t = _run({"crystal": [flat], "no_L": [flat.copy()]},
             [evidence.Comparison("L", "crystal", "no_L", 1.0)])
    row = t.iloc[0]
    assert row["verdict"] != "detected", row.to_dict()
    # held-out images of pure noise have no site contrast, present or absent (spread of one
    # contrast over seeds measured ~0.15-0.3)
    assert abs(row["contrast_present"]) < 0.7 and abs(row["contrast_absent"]) < 0.7
    # ... while the in-sample image reproduces the template (the imprint)
    assert row["imprint_present"] > 1.0


def test_occupancy_series_orders_contrast(crossfit):
    full = synthetic_cell({"A": 2.0, "L": 0.6})
    half = synthetic_cell({"A": 2.0, "L": 0.3})
    none = synthetic_cell({"A": 2.0, "L": 0.0})
    t = _run({"x1": [full], "x0.5": [half], "x0": [none]},
             [evidence.Comparison("L", "x1", "x0", 1.0),
              evidence.Comparison("L", "x0.5", "x0", 0.5)])
    t = t.set_index("occupancy")
    assert t.loc[1.0, "contrast_present"] > t.loc[0.5, "contrast_present"] > \
        t.loc[0.5, "contrast_absent"]
    assert t.loc[1.0, "evidence_z"] > 3 and t.loc[0.5, "evidence_z"] > 3
    assert t.loc[1.0, "contrast_absent"] == pytest.approx(t.loc[0.5, "contrast_absent"])


# ----------------------------------------------------------------------------- workflow wiring
@pytest.mark.parametrize("config", ["smoke", "default"])
def test_evidence_jobs_in_the_dag(config, tmp_path):
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from tmask_validate.config import load_config

    root = Path(__file__).resolve().parents[1]
    cli = shutil.which("tmask-validate") or str(Path(__file__).parents[1] / ".venv" / "bin" /
                                                "tmask-validate")
    res = subprocess.run([cli, "workflow", "--config", str(root / "config" / f"{config}.yaml"),
                          "--directory", str(tmp_path), "--cores", "2", "-n"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", res.stdout.split("Job stats:", 1)[1],
                             re.M))
    cfg = load_config(root / "config" / f"{config}.yaml")
    n_var = sum(len(evidence.variants_from_config(cfg, s)) for s in cfg["evidence"]["structures"])
    assert int(counts["simulate_variant"]) == n_var * cfg["evidence"]["phonon_configurations"]
    assert int(counts["evidence"]) == sum(len(e["thicknesses_nm"])
                                          for e in cfg["evidence"]["structures"].values())
    assert int(counts["evidence_table"]) == 1
    # claims and report wait for the evidence table
    assert "species_evidence.csv" in res.stdout.split("rule claims:", 1)[1].split("rule", 1)[0]


def test_bin_detector_against_naive():
    rng = np.random.default_rng(2)
    a = rng.random((2, 3, 7, 9))
    got = evidence.bin_detector(a, 2)
    want = np.zeros((2, 3, 3, 4))
    for i in range(3):
        for j in range(4):
            want[..., i, j] = a[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum(axis=(-2, -1))
    np.testing.assert_allclose(got, want)
    assert evidence.bin_detector(a, 1) is a


def test_noisy_field_is_independent_per_cell_with_the_right_mean():
    geom = evidence.FieldGeometry(cell_shape=(3, 4), cells=(4, 5), step_A=(0.5, 0.5))
    one = np.full((3, 4, 2, 2), 0.25, np.float32)
    one[0, 0] = [[0.7, 0.1], [0.1, 0.1]]
    f = evidence.noisy_field(one, geom, 400.0, seed=1, dose_e_per_A2=1600.0, stream=5)
    assert f.shape == (12, 20, 2, 2) and f.dtype == np.uint32
    cells = f.reshape(4, 3, 5, 4, 2, 2)
    # every cell is its own draw ...
    assert not np.array_equal(cells[0, :, 0], cells[0, :, 1])
    assert not np.array_equal(cells[0, :, 0], cells[1, :, 0])
    # ... of the tiled expectation
    lam = 400 * one.astype(float)
    assert np.all(np.abs(cells.mean(axis=(0, 2)) - lam) < 5 * np.sqrt(lam / 20))
    again = evidence.noisy_field(one, geom, 400.0, seed=1, dose_e_per_A2=1600.0, stream=5)
    other = evidence.noisy_field(one, geom, 400.0, seed=1, dose_e_per_A2=1600.0, stream=6)
    assert np.array_equal(f, again) and not np.array_equal(f, other)


def test_noisy_field_takes_a_whole_multicell_scan_untiled():
    geom = evidence.FieldGeometry(cell_shape=(2, 3), cells=(2, 2), step_A=(0.5, 0.5))
    rng = np.random.default_rng(0)
    whole = rng.random((4, 6, 2, 2)).astype(np.float32)  # cells differ: a real supercell scan
    f = evidence.noisy_field(whole, geom, 1e5, seed=1, dose_e_per_A2=1.0, stream=3)
    np.testing.assert_allclose(f / 1e5, whole, rtol=0.05, atol=0.01)
    with pytest.raises(ValueError, match="match|must be"):
        evidence.noisy_field(whole[:3], geom, 1e5, seed=1, dose_e_per_A2=1.0, stream=3)
