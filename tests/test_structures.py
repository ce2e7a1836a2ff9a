"""Tests of tmask_validate.structures: CIF loading, builders, projected column tables, scan helpers.

Reference column positions are derived here by hand from the Wyckoff positions (independently
of ASE's space-group expansion).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from tmask_validate import structures as S

# Streltsov et al. (1993) values, as in structures/LiFePO4.cif
A, B, C = 10.332, 6.010, 4.692
FE_X, P_X, O1_X, O2_X = 0.2822, 0.0949, 0.0968, 0.4571
O3_X, O3_Y = 0.1656, 0.0465
# Shirane et al. (1956) values, as in structures/PbTiO3.cif
PTO_A, PTO_C, Z_TI, Z_O1, Z_O2 = 3.904, 4.152, 0.540, 0.112, 0.612


def _proj_4c(x):
    """[001] projections (fx, fy) of the Pnma 4c orbit (x, 1/4, z)."""
    return [(x, 0.25), (0.5 - x, 0.75), (-x, 0.75), (x + 0.5, 0.25)]


def _proj_8d(x, y):
    """[001] projections of the Pnma 8d orbit (x, y, z): all eight are distinct."""
    return [(x, y), (0.5 - x, -y), (-x, 0.5 + y), (0.5 + x, 0.5 - y),
            (-x, -y), (0.5 + x, y), (x, 0.5 - y), (0.5 - x, 0.5 + y)]


def _to_yx(frac, ly, lx):
    return np.array(sorted(((fy % 1.0) * ly, (fx % 1.0) * lx) for fx, fy in frac))


def _match(df, label, expected_yx, cell, atol=2e-3):
    """Every expected (y, x) matches one table row of that label (periodic), and vice versa."""
    got = df.loc[df["label"] == label, ["y_A", "x_A"]].to_numpy()
    assert len(got) == len(expected_yx), label
    box = np.asarray(cell)
    d = got[:, None, :] - expected_yx[None, :, :]
    d -= np.round(d / box) * box
    dist = np.hypot(d[..., 0], d[..., 1])
    assert np.all(dist.min(axis=1) < atol), (label, dist.min(axis=1))
    assert np.all(dist.min(axis=0) < atol), (label, dist.min(axis=0))
    # one-to-one
    assert len(set(dist.argmin(axis=1))) == len(expected_yx)


def _mic_min_distance(atoms):
    d = atoms.get_all_distances(mic=True)
    np.fill_diagonal(d, np.inf)
    return float(d.min())


# ------------------------------------------------------------------------------------ CIFs
def test_cifs_load_with_expected_composition():
    lfp = S.load_cif("LiFePO4")
    assert len(lfp) == 28
    assert sorted(lfp.get_chemical_symbols()) == sorted(["Li"] * 4 + ["Fe"] * 4 + ["P"] * 4
                                                        + ["O"] * 16)
    np.testing.assert_allclose(lfp.cell.cellpar(), [A, B, C, 90, 90, 90])
    pto = S.load_cif("PbTiO3")
    assert len(pto) == 5 and pto.get_chemical_formula() == "O3PbTi"
    np.testing.assert_allclose(pto.cell.cellpar(), [PTO_A, PTO_A, PTO_C, 90, 90, 90])
    with pytest.raises(ValueError, match="no CIF"):
        S.load_cif("BaTiO3")


def test_bad_cif_composition_is_rejected(tmp_path, monkeypatch):
    text = (S.structure_dir() / "PbTiO3.cif").read_text()
    bad = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("O2 "))
    (tmp_path / "PbTiO3.cif").write_text(bad)
    monkeypatch.setenv("TMASK_STRUCTURES_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="composition"):
        S.load_cif("PbTiO3")


def test_pbtio3_polar_displacements_physical():
    """Ti and O shifted the same way along c relative to Pb, O (~0.11 c) more than Ti (~0.04 c);
    this gives the known short apical Ti-O bond of ~1.78 A (and a long one of ~2.37 A)."""
    d = S._pbtio3_displacements()
    assert d["Ti"] == pytest.approx(0.040 * PTO_C, abs=1e-9)
    assert d["O1"] == pytest.approx(0.112 * PTO_C, abs=1e-9)
    assert d["O2"] == pytest.approx(0.112 * PTO_C, abs=1e-9)
    cell = S.load_cif("PbTiO3")
    sym = np.array(cell.get_chemical_symbols())
    ti = np.flatnonzero(sym == "Ti")[0]
    dist = np.sort(cell.get_distances(ti, np.flatnonzero(sym == "O"), mic=True))
    # one of the apical bonds is short; the 4 equatorial bonds are equal
    short = min(np.linalg.norm(cell.get_distance(ti, j, mic=True, vector=True))
                for j in np.flatnonzero(sym == "O"))
    assert short == pytest.approx((Z_TI - Z_O1) * PTO_C, abs=1e-6)  # 1.777 A
    assert 1.7 < dist[0] < 1.85


# ------------------------------------------------------------------------------- builders
def test_lifepo4_cell_orientation_and_thickness():
    at = S.lifepo4()
    assert len(at) == 28 and at.info["n_repeats_z"] == 1
    np.testing.assert_allclose(np.asarray(at.cell), np.diag([A, B, C]))
    assert S.projected_cell_A(at) == pytest.approx((B, A))
    assert at.info["zone_axis"] == "[001]" and at.info["beam_period_A"] == pytest.approx(C)
    assert all(at.pbc)
    thick = S.lifepo4(thickness_nm=20, repeats=(2, 3))
    nz = round(200 / C)  # 42.6 -> 43
    assert nz == 43 and thick.info["n_repeats_z"] == 43
    assert thick.info["thickness_nm"] == pytest.approx(43 * C / 10)
    assert len(thick) == 28 * 43 * 6
    np.testing.assert_allclose(np.asarray(thick.cell), np.diag([3 * A, 2 * B, 43 * C]))
    assert S.projected_cell_A(thick) == pytest.approx((2 * B, 3 * A))
    assert thick.positions[:, 2].min() >= 0 and thick.positions[:, 2].max() < 43 * C


@pytest.mark.parametrize(("thickness_nm", "period_A", "expected"), [
    (None, 4.692, 1), (0.1, 4.692, 1), (2.3, 4.692, 5), (2.6, 4.692, 6), (20, 4.692, 43),
    (0.39, 3.904, 1), (10, 3.904, 26), (0.5856, 3.904, 2),  # 1.5 periods rounds up
])
def test_thickness_to_repeats(thickness_nm, period_A, expected):
    assert S.n_repeats_for_thickness(thickness_nm, period_A) == expected


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_thickness_rejected(bad):
    with pytest.raises(ValueError):
        S.lifepo4(thickness_nm=bad)


@pytest.mark.parametrize("bad", [(0, 1), (1,), (1.5, 1), "ab", None])
def test_bad_repeats_rejected(bad):
    with pytest.raises(ValueError):
        S.pbtio3(repeats=bad)


def test_pbtio3_orientation_beam_along_a_polar_axis_along_y():
    at = S.pbtio3(thickness_nm=1.0)
    nz = at.info["n_repeats_z"]
    assert nz == 3  # 10 A / 3.904 A = 2.56 -> 3
    np.testing.assert_allclose(np.asarray(at.cell), np.diag([PTO_A, PTO_C, nz * PTO_A]))
    assert S.projected_cell_A(at) == pytest.approx((PTO_C, PTO_A))
    # the short Ti-O bond (polar axis) lies along y
    sym = np.array(at.get_chemical_symbols())
    ti = np.flatnonzero(sym == "Ti")[0]
    oxy = np.flatnonzero(sym == "O")
    vecs = at.get_distances(ti, oxy, mic=True, vector=True)
    v = vecs[np.argmin(np.linalg.norm(vecs, axis=1))]
    assert abs(v[1]) == pytest.approx(1.777, abs=2e-3) and abs(v[0]) < 1e-9 and abs(v[2]) < 1e-9
    # P (Ti relative to its O cage) along -y with the Shirane et al. signs
    assert at.info["polarisation_yx"] == (-1.0, 0.0)


def test_build_dispatch_and_options():
    assert len(S.build("lifepo4")) == 28
    assert len(S.build("PbTiO3", thickness_nm=0.4)) == 5
    assert len(S.build("PbTiO3_DW", n_cells=4)) == 5 * 16
    with pytest.raises(ValueError, match="unknown structure"):
        S.build("SrTiO3")
    with pytest.raises(ValueError, match="does not take"):
        S.build("LiFePO4", n_cells=4)
    with pytest.raises(ValueError, match="n_cells"):
        S.pbtio3_domain_wall(n_cells=7)


# ------------------------------------------------------------------------- column tables
def test_lifepo4_columns_against_wyckoff_positions():
    df = S.projected_columns("LiFePO4")
    assert list(df.columns[:5]) == ["label", "y_A", "x_A", "composition", "n_atoms"]
    counts = df["label"].value_counts().to_dict()
    assert counts == {"Li": 4, "Fe": 4, "P+O": 4, "O": 12}
    comp = df.groupby("label")["composition"].unique().to_dict()
    assert {k: list(v) for k, v in comp.items()} == {"Fe": ["Fe1"], "Li": ["Li1"], "O": ["O1"],
                                                     "P+O": ["P1O1"]}
    assert df.loc[df.label == "P+O", "n_atoms"].eq(2).all()
    assert df.loc[df.label != "P+O", "n_atoms"].eq(1).all()
    assert df["n_atoms"].sum() == 28
    cell = (B, A)
    li = [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)]
    _match(df, "Li", _to_yx(li, B, A), cell)
    _match(df, "Fe", _to_yx(_proj_4c(FE_X), B, A), cell)
    _match(df, "P+O", _to_yx(_proj_4c(P_X), B, A), cell)  # the column sits at P
    pure_o = _proj_4c(O2_X) + _proj_8d(O3_X, O3_Y)
    _match(df, "O", _to_yx(pure_o, B, A), cell)
    # positions wrapped into [0, L), no duplicates
    assert ((df.y_A >= 0) & (df.y_A < B) & (df.x_A >= 0) & (df.x_A < A)).all()
    assert not df.duplicated(["y_A", "x_A"]).any()


def test_lifepo4_p_and_o1_project_0p02_A_apart():
    df = S.projected_columns("LiFePO4")
    expected = abs(O1_X - P_X) * A  # 0.0196 A; same y = 1/4 b
    assert expected == pytest.approx(0.02, abs=1e-3)
    np.testing.assert_allclose(df.loc[df.label == "P+O", "spread_A"], expected, atol=1e-6)
    # all other columns hold one atom per period
    assert df.loc[df.label != "P+O", "spread_A"].eq(0).all()
    # the nearest distinct columns are >= 1.4 A apart, so a 0.35 A tolerance is unambiguous
    yx = df[["y_A", "x_A"]].to_numpy()
    d = yx[:, None] - yx[None]
    d -= np.round(d / (B, A)) * (B, A)
    r = np.hypot(d[..., 0], d[..., 1]) + np.eye(len(yx)) * 99
    assert r.min() > 1.4


def test_columns_of_thick_tiled_slab_are_tiles_of_one_cell():
    one = S.projected_columns(S.lifepo4())
    big = S.projected_columns(S.lifepo4(thickness_nm=3, repeats=(2, 3)))
    assert len(big) == 6 * len(one)
    per_label = big.groupby("label")["n_atoms"].sum()
    assert (per_label == 6 * one.groupby("label")["n_atoms"].sum()).all()
    tiled = S.sites_in_region(one, (B, A), ((0, 2 * B - 1e-6), (0, 3 * A - 1e-6)))
    key = ["label", "y_A", "x_A", "composition", "n_atoms"]
    a = big[key].sort_values(key[1:3]).round(6).reset_index(drop=True)
    b = tiled[key].sort_values(key[1:3]).round(6).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_pbtio3_columns_100():
    df = S.projected_columns("PbTiO3")
    assert df["label"].value_counts().to_dict() == {"O": 2, "Pb": 1, "Ti+O": 1}
    cell = (PTO_C, PTO_A)
    _match(df, "Pb", np.array([[0.0, 0.0]]), cell, atol=1e-6)
    _match(df, "Ti+O", np.array([[Z_TI * PTO_C, 0.5 * PTO_A]]), cell, atol=1e-6)
    _match(df, "O", np.array([[Z_O1 * PTO_C, 0.5 * PTO_A], [Z_O2 * PTO_C, 0.0]]), cell, atol=1e-6)
    tio = df[df.label == "Ti+O"].iloc[0]
    assert tio.composition == "Ti1O1" and tio.n_atoms == 2
    assert tio.spread_A == pytest.approx((Z_O2 - Z_TI) * PTO_C, abs=1e-9)  # 0.30 A along c
    assert df.n_atoms.sum() == 5
    # with a 0.1 A tolerance the O of that column becomes its own column 0.30 A from Ti
    fine = S.projected_columns("PbTiO3", tol_A=0.1)
    assert fine["label"].value_counts().to_dict() == {"O": 3, "Pb": 1, "Ti": 1}


def test_projected_columns_input_validation():
    with pytest.raises(ValueError):
        S.projected_columns(S.lifepo4(), tol_A=0)
    with pytest.raises(ValueError):
        S.projected_columns(42)


# --------------------------------------------------------------------------- domain wall
@pytest.fixture(scope="module")
def dw():
    return S.pbtio3_domain_wall(n_cells=8)


def _polar_vectors(atoms, far_A):
    """Per domain: mean (y, x) displacement of Ti from the centroid of its 6 nearest O,
    using Ti at least ``far_A`` from any wall."""
    atoms = atoms.repeat((1, 1, 2))  # so the two O above/below Ti along the beam are distinct
    sym = np.array(atoms.get_chemical_symbols())
    oxy = np.flatnonzero(sym == "O")
    out = {}
    for dom in (1, 2):
        ti = np.flatnonzero((sym == "Ti") & (atoms.arrays["domain"] == dom))
        dist = S.wall_distance_A(atoms.positions[ti, 1], atoms.positions[ti, 0], atoms)
        vecs = []
        for t in ti[dist > far_A]:
            v = atoms.get_distances(t, oxy, mic=True, vector=True)
            near = v[np.argsort(np.linalg.norm(v, axis=1))[:6]]
            centroid = near.mean(axis=0)  # O cage centre relative to Ti
            vecs.append(-centroid[[1, 0]])  # Ti minus cage centre, (y, x)
        assert vecs, dom
        out[dom] = np.mean(vecs, axis=0)
    return out


def test_domain_wall_composition_domains_and_overlaps(dw):
    n = 8
    assert len(dw) == 5 * n * n
    assert dw.get_chemical_formula() == f"O{3 * n * n}Pb{n * n}Ti{n * n}"
    dom = dw.arrays["domain"]
    assert set(np.unique(dom)) == {1, 2}
    assert np.sum(dom == 1) == np.sum(dom == 2) == 5 * n * n // 2
    L = n * 0.5 * (PTO_A + PTO_C)
    np.testing.assert_allclose(np.asarray(dw.cell), np.diag([L, L, PTO_A]))
    assert _mic_min_distance(dw) > 1.5


def test_domain_wall_c_axes_at_90_deg_head_to_tail(dw):
    p = _polar_vectors(dw, far_A=3.0)
    # Ti off-centring ~0.072 c = 0.30 A; domain 1 along y, domain 2 along x
    p1, p2 = p[1], p[2]
    assert abs(p1[1]) < 1e-6 and abs(p2[0]) < 1e-6
    assert abs(p1[0]) == pytest.approx(0.072 * PTO_C, abs=1e-3)
    assert abs(p2[1]) == pytest.approx(0.072 * PTO_C, abs=1e-3)
    cosang = np.dot(p1, p2) / (np.linalg.norm(p1) * np.linalg.norm(p2))
    assert abs(cosang) < 1e-6
    # wall along the (x, y) direction (1, 1): normal n = (1, -1)/sqrt2; in (y, x) order:
    n_yx = np.array([-1.0, 1.0]) / math.sqrt(2)
    t_yx = np.array([1.0, 1.0]) / math.sqrt(2)
    assert np.dot(p1, n_yx) == pytest.approx(np.dot(p2, n_yx), abs=1e-6)  # neutral wall
    assert np.dot(p1, t_yx) == pytest.approx(-np.dot(p2, t_yx), abs=1e-6)  # head-to-tail
    assert np.dot(p1, t_yx) != pytest.approx(0, abs=1e-3)
    # the recorded polarisation agrees with the structure
    for k in (1, 2):
        unit = p[k] / np.linalg.norm(p[k])
        np.testing.assert_allclose(dw.info["polarisation_yx"][k], unit, atol=1e-9)


def test_domain_wall_is_on_011_plane(dw):
    """Domains depend only on y - x (walls are diagonal lines): the structure is invariant under
    a pseudo-cubic translation along (1, 1) but not along (1, 0)."""
    a_pc = dw.info["a_pc_A"]

    def keyset(atoms, shift_xy):
        box = np.diag(np.asarray(atoms.cell))
        p = atoms.positions.copy()
        p[:, 0] += shift_xy[0]
        p[:, 1] += shift_xy[1]
        p = np.round((p % box) / 1e-4).astype(np.int64) % np.round(box / 1e-4).astype(np.int64)
        return {(s, *map(int, q)) for s, q in zip(atoms.get_chemical_symbols(), p, strict=True)}

    ref = keyset(dw, (0, 0))
    assert keyset(dw, (a_pc, a_pc)) == ref
    assert keyset(dw, (a_pc, 0)) != ref
    assert keyset(dw, (0, a_pc)) != ref
    # each pair of nearest-neighbour Pb with different domains straddles a recorded wall line
    sym = np.array(dw.get_chemical_symbols())
    pb = np.flatnonzero(sym == "Pb")
    dom = dw.arrays["domain"][pb]
    pos = dw.positions[pb]
    L = dw.info["wall_period_A"]
    walls = [w["y_minus_x_A"] for w in dw.info["walls"]]
    n_changes = 0
    for i, j in itertools.combinations(range(len(pb)), 2):
        d = pos[j] - pos[i]
        d[:2] -= np.round(d[:2] / L) * L
        if abs(np.hypot(d[0], d[1]) - a_pc) > 1e-6 or dom[i] == dom[j]:
            continue
        n_changes += 1
        s0 = pos[i, 1] - pos[i, 0]
        s1 = s0 + d[1] - d[0]
        crosses = any(((s0 - w) * (s1 - w) < 0) or ((s0 - w - L) * (s1 - w - L) < 0)
                      or ((s0 - w + L) * (s1 - w + L) < 0) for w in walls)
        assert crosses
    assert n_changes == 2 * 2 * 8  # 2 walls x 8 Pb along each x 2 bonds per Pb


def test_domain_wall_periodic_along_beam():
    one = S.pbtio3_domain_wall(n_cells=4)
    thick = S.pbtio3_domain_wall(n_cells=4, thickness_nm=1.2)
    nz = thick.info["n_repeats_z"]
    assert nz == 3
    assert thick.cell[2, 2] == pytest.approx(nz * PTO_A)
    assert len(thick) == nz * len(one)
    # atoms only at z = 0 and a/2 within each period, the same in every period
    zf = (thick.positions[:, 2] / PTO_A) % 1.0
    assert np.all(np.isclose(zf, 0) | np.isclose(zf, 0.5) | np.isclose(zf, 1))
    a = S.projected_columns(one)
    b = S.projected_columns(thick)
    pd.testing.assert_frame_equal(a, b)
    # periodic images across the z boundary keep the min distance
    assert _mic_min_distance(thick) > 1.5


def test_domain_wall_column_table_ti_offcentring(dw):
    df = S.projected_columns(dw)
    assert df.label.value_counts().to_dict() == {"O": 128, "Pb": 64, "Ti+O": 64}
    assert set(df.domain) == {1, 2}
    assert (df.groupby("domain").size() == 128).all()
    assert "wall_distance_A" in df and df.wall_distance_A.min() < 1.0
    # Fig 4h style: Ti column relative to the centre of its 4 neighbouring O columns
    L = np.array(S.projected_cell_A(dw))
    oxy = df[df.label == "O"][["y_A", "x_A"]].to_numpy()
    for _, row in df[(df.label == "Ti+O") & (df.wall_distance_A > 3)].iterrows():
        d = oxy - [row.y_A, row.x_A]
        d -= np.round(d / L) * L
        near = d[np.argsort(np.hypot(d[:, 0], d[:, 1]))[:4]]
        off = -near.mean(axis=0)  # Ti minus O-centre, (y, x)
        expected = (-0.072 * PTO_C, 0) if row.domain == 1 else (0, 0.072 * PTO_C)
        np.testing.assert_allclose(off, expected, atol=1e-6)


# ------------------------------------------------------------------------------- scans
def test_scan_grid():
    assert S.scan_grid((B, A), 0.4)[:2] == (16, 26)
    ny, nx, sy, sx = S.scan_grid((B, A), 0.4)
    assert sy * ny == pytest.approx(B) and sx * nx == pytest.approx(A)
    assert sy <= 0.4 and sx <= 0.4
    assert S.scan_grid((PTO_C, PTO_A), 0.3)[:2] == (14, 14)
    assert S.scan_grid((4.0, 4.0), 0.5) == (8, 8, 0.5, 0.5)  # exact divisor kept
    assert S.scan_grid((4.0, 6.0), (1.0, 0.5))[:2] == (4, 12)
    with pytest.raises(ValueError):
        S.scan_grid((4.0, 4.0), 0)


def test_scan_from_config():
    g = S.scan_from_config({"step_A": 0.4}, (B, A))
    assert g["shape"] == (16, 26) and g["periodic"] and g["origin_A"] == (0.0, 0.0)
    g = S.scan_from_config({"step_A": 0.5, "region": {"y_A": [1, 3], "x_A": [0, 4.9]}}, (B, A))
    assert g["shape"] == (5, 10) and not g["periodic"] and g["origin_A"] == (1.0, 0.0)
    with pytest.raises(ValueError):
        S.scan_from_config({"step_A": 0.5, "region": {"y_A": [3, 1], "x_A": [0, 1]}}, (B, A))
    with pytest.raises(ValueError):
        S.scan_from_config({"step": 0.5}, (B, A))


def test_sites_in_region_against_naive_tiling():
    sites = pd.DataFrame({"label": ["a", "b"], "y_A": [0.0, 1.5], "x_A": [0.5, 2.5],
                          "composition": ["A1", "B1"], "n_atoms": [1, 1]})
    cell = (2.0, 3.0)
    region = {"y_A": [-1.0, 3.0], "x_A": [2.0, 7.0]}
    got = S.sites_in_region(sites, cell, region)
    naive = sorted(
        (y + i * 2.0, x + j * 3.0) for i in range(-3, 4) for j in range(-3, 4)
        for y, x in zip(sites.y_A, sites.x_A, strict=True)
        if -1.0 <= y + i * 2.0 <= 3.0 and 2.0 <= x + j * 3.0 <= 7.0
    )
    assert sorted(zip(got.y_A, got.x_A, strict=True)) == naive
    back = got.y_A - got.tile_y * 2.0
    assert set(np.round(back, 9)) <= {0.0, 1.5}
    # margin adds the sites just outside
    wider = S.sites_in_region(sites, cell, region, margin_A=0.6)
    assert len(wider) > len(got)
    empty = S.sites_in_region(sites, cell, ((0.1, 0.2), (0.0, 0.1)))
    assert len(empty) == 0 and "tile_y" in empty
    with pytest.raises(ValueError):
        S.sites_in_region(sites, cell, ((1, 0), (0, 1)))


# ------------------------------------------------------------------------------- schema
def _cfg(structures):
    return {"name": "t", "seed": 0, "structures": structures}


def test_structures_schema_defaults_and_rejections():
    from tmask_validate.config import validate_config

    cfg = validate_config(_cfg({
        "LFP": {"builder": "LiFePO4", "thicknesses_nm": [20, 40], "scan": {"step_A": 0.4}},
        "DW": {"builder": "PbTiO3_DW", "thicknesses_nm": [10], "repeats": [1, 2],
               "scan": {"step_A": 0.3, "region": {"y_A": [0, 16], "x_A": [0, 16]}},
               "builder_options": {"n_cells": 8}},
    }))["structures"]
    assert cfg["LFP"]["repeats"] == [1, 1] and cfg["LFP"]["builder_options"] == {}
    assert cfg["LFP"]["scan"]["region"] == "cell"
    # every entry builds with its options
    for entry in cfg.values():
        at = S.build(entry["builder"], thickness_nm=min(entry["thicknesses_nm"]),
                     repeats=entry["repeats"], **entry["builder_options"])
        S.scan_from_config(entry["scan"], S.projected_cell_A(at))
    bad_entries = [
        {"builder": "Foo", "thicknesses_nm": [1], "scan": {"step_A": 0.3}},
        {"builder": "LiFePO4", "thicknesses_nm": [1], "scan": {"step_A": 0.3}, "extra": 1},
        {"builder": "LiFePO4", "thicknesses_nm": [-1], "scan": {"step_A": 0.3}},
        {"builder": "LiFePO4", "thicknesses_nm": [1], "scan": {"step_A": 0.3},
         "builder_options": {"n_cells": 8}},
        {"builder": "PbTiO3_DW", "thicknesses_nm": [1], "scan": {"step_A": 0.3},
         "builder_options": {"n_cells": 7}},
        {"builder": "PbTiO3", "thicknesses_nm": [1], "scan": {"step_A": 0.3, "region": "all"}},
        {"builder": "PbTiO3", "thicknesses_nm": [1], "scan": {"step_A": 0.3}, "repeats": [1]},
        {"builder": "PbTiO3", "thicknesses_nm": [1]},
    ]
    for entry in bad_entries:
        with pytest.raises(ValueError, match="structures"):
            validate_config(_cfg({"X": entry}))


def test_species_keep_mask_removes_only_that_column_type():
    a = S.lifepo4(thickness_nm=4, repeats=(1, 2))
    sym = np.array(a.get_chemical_symbols())
    col, lab = S.atom_columns(a)
    assert set(lab.tolist()) == {"Li", "Fe", "P+O", "O"}
    assert set(sym[lab == "P+O"].tolist()) == {"P", "O"}
    assert np.all(S.species_keep_mask(a, "Li", 1.0, seed=0))
    k0 = S.species_keep_mask(a, "Li", 0.0, seed=0)
    assert np.array_equal(~k0, sym == "Li")
    ko = S.species_keep_mask(a, "O", 0.0, seed=0)
    nz = a.info["n_repeats_z"]
    # only the pure O columns go; the O of the P+O columns (4 per cell and period) stay
    assert np.array_equal(~ko, lab == "O") and (sym[ko] == "O").sum() == 4 * 2 * nz
    # depth mode: every Li column keeps exactly half of its periods (blocks of 2 periods)
    k = S.species_keep_mask(a, "Li", 0.5, seed=1)
    for c in np.unique(col[lab == "Li"]):
        members = col == c
        assert members.sum() == nz
        assert k[members].sum() == nz // 2
    assert np.array_equal(k, S.species_keep_mask(a, "Li", 0.5, seed=1))
    assert not np.array_equal(k, S.species_keep_mask(a, "Li", 0.5, seed=2))
    assert np.all(k[sym != "Li"])
    # columns mode: occupancy varies from column to column around the mean
    b = S.lifepo4(thickness_nm=20, repeats=(2, 2))
    kc = S.species_keep_mask(b, "Li", 0.5, seed=1, mode="columns")
    cb, lb = S.atom_columns(b)
    occ = [kc[cb == c].mean() for c in np.unique(cb[lb == "Li"])]
    assert np.std(occ) > 0.02 and abs(np.mean(occ) - 0.5) < 0.1
    # Ti+O columns of PbTiO3 lose both elements
    p = S.pbtio3(thickness_nm=2)
    kp = S.species_keep_mask(p, "Ti+O", 0.0, seed=0)
    assert sorted(set(np.array(p.get_chemical_symbols())[~kp].tolist())) == ["O", "Ti"]
    with pytest.raises(ValueError, match="no column labelled"):
        S.species_keep_mask(a, "Ti", 0.0, seed=0)
    with pytest.raises(ValueError, match="occupancy"):
        S.species_keep_mask(a, "Li", 1.5, seed=0)
