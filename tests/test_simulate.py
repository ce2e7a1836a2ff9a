"""abTEM ground truth (tmask_validate.simulate) at smoke scale: physics and bookkeeping checks.

Tolerances used (measured values in comments; all runs are float32 inside abTEM):
- virtual detectors (core masks on the 4D data) vs abTEM's own annular detectors of the same
  run: max |diff| <= 1e-5 x max(image) (measured ~1e-7: identical pixels, float32 sums);
- core CoM vs abTEM CoM (both normalised by the pattern intensity): <= 1e-5 x max|CoM|
  (measured 2e-7 relative); iCoM (periodic integration, mean removed) likewise;
- thickness series (exit planes) vs separate runs: <= 1e-5 x max for infinite and finite
  projection (measured 0 and <= 8.5e-7: the finite-projection tails of atoms below an exit
  plane barely reach the slice above it);
- combine(chunks) vs all-at-once: <= 1e-6 x max (float32 rounding of the chunk means).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tmask_validate import core
from tmask_validate import simulate as S
from tmask_validate.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STRUCT = "LiFePO4_001"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config(ROOT / "config" / "smoke.yaml")


@pytest.fixture(scope="module")
def store(cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / f"{STRUCT}.zarr"
    return S.simulate_structure(cfg, STRUCT, out, progress=False)


@pytest.fixture(scope="module")
def ds(store) -> xr.Dataset:
    return S.load_store(store).load()


@pytest.fixture(scope="module")
def setup(cfg) -> dict:
    return S._structure_setup(cfg, STRUCT)


def _run(cfg, setup, atoms=None, sim=None, planes=None, slices=None) -> dict:
    scan = setup["scan"]
    return S.run_configuration(
        setup["atoms"] if atoms is None else atoms,
        cfg["simulation"] if sim is None else sim,
        scan_start_A=scan["start_A"], scan_step_A=scan["step_A"], scan_shape=scan["shape"],
        exit_planes=setup["planes"] if planes is None else planes,
        slices_A=setup["slices"] if slices is None else slices,
    )


# ------------------------------------------------------------------------------ pure helpers
def _smooth_numbers(limit):
    """Every 2^a 3^b 5^c 7^d <= limit, by enumerating the exponents (not by trial division)."""
    out = set()
    for a in range(limit.bit_length() + 1):
        for b in range(12):
            for c in range(9):
                for d in range(8):
                    v = 2**a * 3**b * 5**c * 7**d
                    if v <= limit:
                        out.add(v)
    return sorted(out)


def test_fft_friendly_size():
    import bisect

    assert S.fft_friendly_size(1133) == 1134  # 2 * 3^4 * 7 instead of 11 * 103
    # hand-checked: 11 -> 12, 13 -> 14, 17 -> 18, 19 -> 20, 23 -> 24, 29 -> 30, 31 -> 32,
    # 37 -> 40, 41 -> 42, 43 -> 45, 47 -> 48, 97 -> 98, 101 -> 105, 211 -> 216, 1021 -> 1024
    known = {1: 1, 2: 2, 11: 12, 13: 14, 17: 18, 19: 20, 23: 24, 29: 30, 31: 32, 37: 40,
             41: 42, 43: 45, 47: 48, 97: 98, 101: 105, 211: 216, 1021: 1024}
    for n, want in known.items():
        assert S.fft_friendly_size(n) == want, n
    smooth = _smooth_numbers(5000)
    assert smooth[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14]
    for n in range(1, 4000):
        assert S.fft_friendly_size(n) == smooth[bisect.bisect_left(smooth, n)], n
    assert S.grid_gpts((80.0, 10.33), 0.073) == (1120, 144)  # 1096 -> 2^5*5*7; 142 -> 144
    with pytest.raises(ValueError):
        S.grid_gpts((10.0, 10.0), 0.0)


def test_thickness_series_planes():
    slices, planes, t_nm = S.thickness_series([2, 4], 4.692, 2.4)
    assert len(slices) == 18 and np.allclose(slices, 2.346)
    assert planes == (7, 17)  # after 4 and 9 cells (0-based slice index)
    assert np.allclose(t_nm, [4 * 0.4692, 9 * 0.4692])
    # exit thickness = sum of the slices up to and including the plane
    assert np.allclose([sum(slices[: p + 1]) / 10 for p in planes], t_nm)
    with pytest.raises(ValueError, match="increasing"):
        S.thickness_series([4, 2], 4.692, 2.4)
    with pytest.raises(ValueError, match="same number"):
        S.thickness_series([2.0, 2.1], 4.692, 2.4)


def test_parse_range():
    assert S.parse_range(None, 5) == (0, 5)
    assert S.parse_range("1:3", 5) == (1, 3)
    assert S.parse_range(":2", 5) == (0, 2)
    for bad in ("3:1", "0:9", "a:b", "2"):
        with pytest.raises(ValueError):
            S.parse_range(bad, 5)


def test_phonon_seeds_and_displacements(setup, cfg):
    rms = cfg["simulation"]["phonons"]["rms_displacement_A"]
    seeds = [S.phonon_seed(1, STRUCT, k) for k in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [S.phonon_seed(1, STRUCT, k) for k in range(4)]  # chunk independent
    assert S.phonon_seed(2, STRUCT, 0) != seeds[0]
    atoms = setup["atoms"]
    a = S.displaced_atoms(atoms, rms, seeds[0])
    b = S.displaced_atoms(atoms, rms, seeds[0])
    c = S.displaced_atoms(atoms, rms, seeds[1])
    assert np.array_equal(a.positions, b.positions)
    assert not np.allclose(a.positions, c.positions)
    # per-species RMS displacement per direction matches the config (many atoms)
    d = a.positions - atoms.positions
    for sp in ("Li", "O"):
        sel = np.array(atoms.get_chemical_symbols()) == sp
        assert np.std(d[sel]) == pytest.approx(rms[sp], rel=0.2)
    with pytest.raises(ValueError, match="lacks species"):
        S.displaced_atoms(atoms, {"Li": 0.1}, 0)


# ------------------------------------------------------------------------------ the store
def test_store_layout(ds, cfg, setup):
    sim = cfg["simulation"]
    assert ds.intensity.dims == ("thickness", "scan_y", "scan_x", "ky", "kx")
    assert ds.intensity.dtype == np.float32
    ny, nx = setup["scan"]["shape"]
    assert ds.intensity.shape[:3] == (2, ny, nx)
    assert np.allclose(ds.thickness, setup["thickness_nm"])
    cal = S.store_calibration(ds)
    assert np.allclose(ds.scan_y, np.arange(ny) * cal.step_A[0])
    assert np.allclose(ds.scan_x, np.arange(nx) * cal.step_A[1])
    # one-cell periodic scan: the step divides the projected cell (b along y, a along x)
    assert ny * cal.step_A[0] == pytest.approx(ds.attrs["cell_A"][0])
    assert nx * cal.step_A[1] == pytest.approx(ds.attrs["cell_A"][1])
    assert ds.attrs["periodic"] is True
    # detector: zero angle at the centre pixel, pixel = lambda / slab size, to max_angle
    cy, cx = cal.center_px
    assert ds.ky.values[int(cy)] == 0 and ds.kx.values[int(cx)] == 0
    lam_mrad = S.wavelength_A(200) * 1e3
    ly, lx = setup["atoms"].cell[1, 1], setup["atoms"].cell[0, 0]
    assert cal.mrad_per_px == pytest.approx((lam_mrad / ly, lam_mrad / lx), rel=1e-6)
    assert abs(ds.ky).max() >= sim["max_angle_mrad"] - cal.mrad_per_px[0]
    for name in sim["detectors"]:
        assert ds[f"detector_{name}"].dims == ("thickness", "scan_y", "scan_x")
    assert set(ds.site_label.values) == {"Li", "Fe", "P+O", "O"}
    assert int(ds.site_n_atoms.sum()) == 28
    assert ds.attrs["complete"] is True and ds.attrs["dose_e_per_A2"] is None
    assert ds.attrs["n_configurations"] == 2
    assert json.loads(ds.attrs["seeds"]) == [S.phonon_seed(1, STRUCT, k) for k in range(2)]
    assert json.loads(ds.attrs["versions"])["abtem"].startswith("1.")
    assert ds.attrs["wall_time_s"] > 0
    assert json.loads(ds.attrs["config"])["simulation"] == sim
    sites = S.store_sites(ds)
    assert list(sites.columns[:5]) == ["label", "y_A", "x_A", "composition", "n_atoms"]


def test_orientation_scan_y_is_cell_y(ds):
    """The data are periodic with the cell along scan_y = b (6.01 Å) and scan_x = a (10.33 Å);
    the LiFePO4 [001] projection has mirror lines x = a/4 and y = b/4 (Pnma), so the ADF image
    is symmetric about y = b/4 (rows) — test that the axes were not swapped by checking the
    image shape against the cell and the Fe column positions against the ADF maxima."""
    img = ds.detector_ADF.values[-1]
    sites = S.store_sites(ds)
    fe = sites[sites.label == "Fe"]
    cal = S.store_calibration(ds)
    iy = np.round(fe.y_A.values / cal.step_A[0]).astype(int) % img.shape[0]
    ix = np.round(fe.x_A.values / cal.step_A[1]).astype(int) % img.shape[1]
    li = sites[sites.label == "Li"]
    jy = np.round(li.y_A.values / cal.step_A[0]).astype(int) % img.shape[0]
    jx = np.round(li.x_A.values / cal.step_A[1]).astype(int) % img.shape[1]
    # heavy Fe columns are bright in ADF, Li columns are dark
    assert img[iy, ix].mean() > 1.5 * img[jy, jx].mean()


def test_virtual_detectors_match_abtem(ds, cfg):
    """Core masks applied to the 4D data reproduce abTEM's own annular detectors."""
    cal = S.store_calibration(ds)
    dets = cfg["simulation"]["detectors"]
    masks = core.virtual_detector_masks(ds.intensity.shape[-2:], dets,
                                        center_px=cal.center_px, mrad_per_px=cal.mrad_per_px)
    for it in range(ds.sizes["thickness"]):
        virtual = core.virtual_images(ds.intensity.values[it], masks)
        for name in dets:
            ref = ds[f"detector_{name}"].values[it].astype(np.float64)
            err = np.abs(virtual[name] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (name, it, err)


def test_intensity_conservation(cfg, setup, ds):
    """Pixelated + scattered beyond the detector = what abTEM keeps (<= 1 per probe)."""
    sim = copy.deepcopy(cfg["simulation"])
    lam = S.wavelength_A(sim["energy_keV"])
    gpts = S.grid_gpts((setup["atoms"].cell[0, 0], setup["atoms"].cell[1, 1]), sim["sampling_A"])
    samp = min(setup["atoms"].cell[0, 0] / gpts[0], setup["atoms"].cell[1, 1] / gpts[1])
    cutoff = 2 / 3 * lam / (2 * samp) * 1e3
    sim["detectors"] = {"ALL": [0, cutoff * 0.999]}
    sim["phonons"]["rms_displacement_A"] = {k: 0.0 for k in sim["phonons"]["rms_displacement_A"]}
    res = _run(cfg, setup, sim=sim)
    on_det = res["intensity"].sum(axis=(-2, -1), dtype=np.float64)
    total = res["detector_ALL"].astype(np.float64)
    beyond = total - on_det
    lost = 1.0 - total
    print(f"fraction beyond the {sim['max_angle_mrad']} mrad detector (mean per thickness): "
          f"{beyond.mean(axis=(1, 2))}; lost beyond the {cutoff:.1f} mrad antialias cutoff: "
          f"{lost.mean(axis=(1, 2))}")
    assert np.all(total <= 1 + 1e-5)
    assert np.all(beyond >= -1e-5)
    assert np.all(beyond.mean(axis=(1, 2)) < 0.01)  # measured 7e-6 and 1.8e-5
    # more scattering out of the detector for the thicker crystal
    assert beyond[1].mean() > beyond[0].mean()
    # measured 0.11 % and 0.35 % lost beyond the cutoff at 1.9 and 4.2 nm
    assert np.all(lost >= -1e-5) and np.all(lost.mean(axis=(1, 2)) < 0.02)
    # the stored (phonon-averaged) data show the same budget
    stored = ds.intensity.values.sum(axis=(-2, -1), dtype=np.float64)
    assert np.all(stored <= 1 + 1e-5)
    assert np.all(1 - stored.mean(axis=(1, 2)) < 0.05)


def test_same_seed_identical_different_seed_differs(cfg, setup):
    rms = cfg["simulation"]["phonons"]["rms_displacement_A"]
    a = S.displaced_atoms(setup["atoms"], rms, 11)
    r1 = _run(cfg, setup, atoms=a)
    r2 = _run(cfg, setup, atoms=S.displaced_atoms(setup["atoms"], rms, 11))
    r3 = _run(cfg, setup, atoms=S.displaced_atoms(setup["atoms"], rms, 12))
    assert np.array_equal(r1["intensity"], r2["intensity"])
    assert np.array_equal(r1["detector_ADF"], r2["detector_ADF"])
    diff = np.abs(r1["intensity"] - r3["intensity"]).max() / r1["intensity"].max()
    assert diff > 1e-4


@pytest.mark.parametrize("projection, tol", [("infinite", 1e-5), ("finite", 1e-5)])
def test_thickness_series_equals_separate_runs(cfg, setup, projection, tol):
    from tmask_validate import structures

    sim = copy.deepcopy(cfg["simulation"])
    sim["projection"] = projection
    sim["phonons"]["rms_displacement_A"] = {k: 0.0 for k in sim["phonons"]["rms_displacement_A"]}
    series = _run(cfg, setup, sim=sim)
    entry = cfg["structures"][STRUCT]
    per = len(setup["slices"]) // setup["atoms"].info["n_repeats_z"]
    for it, t_nm in enumerate(setup["thickness_nm"]):
        atoms = structures.build(entry["builder"], thickness_nm=float(t_nm),
                                 repeats=tuple(entry["repeats"]))
        n = atoms.info["n_repeats_z"]
        single = _run(cfg, setup, atoms=atoms, sim=sim, planes=(n * per - 1,),
                      slices=setup["slices"][: n * per])
        for key in ("intensity", "detector_ABF", "detector_ADF"):
            a, b = series[key][it], single[key][0]
            err = np.abs(a - b).max() / np.abs(b).max()
            print(f"{projection} {t_nm:.3f} nm {key}: max rel diff {err:.2e}")
            assert err <= tol, (key, t_nm, err)


def test_center_of_mass_matches_abtem(ds):
    """core CoM/iCoM vs abTEM's (normalised) CoM/iCoM on the same simulated data.

    Orientation verified: abTEM arrays are (scan_x, scan_y, kx, ky) and its CoM is complex
    x + iy; transposing to (scan_y, scan_x) and taking (imag, real) gives core's (y, x)."""
    cal = S.store_calibration(ds)
    for it in range(ds.sizes["thickness"]):
        data = ds.intensity.values[it]
        com = core.center_of_mass(data, center_px=cal.center_px, mrad_per_px=cal.mrad_per_px)
        ref = S.abtem_center_of_mass(data, cal.mrad_per_px)
        assert np.abs(com - ref).max() <= 1e-5 * np.abs(com).max()
        icom = core.integrated_center_of_mass(com, step_A=cal.step_A, pad=None)
        ref_i = S.abtem_integrated_center_of_mass(data, cal.mrad_per_px, cal.step_A)
        icom, ref_i = icom - icom.mean(), ref_i - ref_i.mean()
        assert np.abs(icom - ref_i).max() <= 1e-5 * np.abs(icom).max()


def test_center_of_mass_orientation_on_shifted_pattern():
    """A pattern shifted by +2 px along kx and -3 px along ky: both agree on signs/axes."""
    d = np.zeros((2, 3, 9, 11), np.float32)
    d[:, :, 4 - 3, 5 + 2] = 2.0  # total intensity 2 (tests the normalisation too)
    d[1, 2] = 0.0
    d[1, 2, 4, 5] = 1.0
    ref = S.abtem_center_of_mass(d, (1.0, 0.5))
    ours = core.center_of_mass(d, center_px=(4, 5), mrad_per_px=(1.0, 0.5))
    assert np.allclose(ref[:, 0, 0], [-3.0, 1.0])
    assert np.allclose(ref[:, 1, 2], [0.0, 0.0])
    assert np.allclose(ref, ours)


# ------------------------------------------------------------------------------ store I/O
def test_store_round_trip(ds, tmp_path):
    out = S.write_store(ds, tmp_path / "copy.zarr")
    back = S.load_store(out).load()
    xr.testing.assert_identical(back.drop_attrs(), ds.drop_attrs())
    for key in ("calibration", "config", "seeds", "cell_A", "periodic", "n_configurations"):
        assert back.attrs[key] == ds.attrs[key]
    assert S.store_calibration(back) == S.store_calibration(ds)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_failed_write_leaves_no_complete_store(ds, tmp_path, monkeypatch):
    target = tmp_path / "s.zarr"
    S.write_store(ds, target)  # an existing good store must survive a failed rewrite
    before = S.load_store(target).intensity.values

    def boom(self, *args, **kwargs):
        store = args[0] if args else kwargs["store"]
        Path(store).mkdir(parents=True, exist_ok=True)
        (Path(store) / "zarr.json").write_text("{}")  # a half-written store
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", boom)
    with pytest.raises(OSError, match="disk full"):
        S.write_store(ds, target)
    with pytest.raises(OSError):
        S.write_store(ds, tmp_path / "new.zarr")
    monkeypatch.undo()
    assert not (tmp_path / "new.zarr").exists()
    assert not list(tmp_path.glob("*.tmp-*"))
    assert np.array_equal(S.load_store(target).intensity.values, before)


def test_incomplete_store_is_rejected(ds, tmp_path):
    import zarr

    path = S.write_store(ds, tmp_path / "x.zarr")
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete"):
        S.load_store(path)
    with pytest.raises(FileNotFoundError):
        S.load_store(tmp_path / "missing.zarr")


def test_combine_chunks_equals_all_at_once(cfg, store, ds, tmp_path):
    a = S.simulate_structure(cfg, STRUCT, tmp_path / "a.zarr", configurations="0:1",
                             progress=False)
    b = S.simulate_structure(cfg, STRUCT, tmp_path / "b.zarr", configurations=(1, 2),
                             progress=False)
    c = S.combine_stores([b, a], tmp_path / "c.zarr")
    comb = S.load_store(c)
    for name in ("intensity", "detector_ABF", "detector_ADF", "detector_BF"):
        x, y = comb[name].values, ds[name].values
        assert np.abs(x - y).max() <= 1e-6 * np.abs(y).max(), name
    assert comb.attrs["n_configurations"] == 2
    assert json.loads(comb.attrs["seeds"]) == json.loads(ds.attrs["seeds"])
    assert json.loads(comb.attrs["configurations"]) == [0, 1]
    with pytest.raises(ValueError, match="appear in two inputs"):
        S.combine_stores([a, a], tmp_path / "d.zarr")


def test_resume_skips_finished_configurations(cfg, tmp_path, monkeypatch):
    calls = []
    real = S.run_configuration

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies during the second configuration
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "run_configuration", flaky)
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        S.simulate_structure(cfg, STRUCT, out, progress=False)
    assert not out.exists()
    state = json.loads((tmp_path / "r.zarr.partial" / "state.json").read_text())
    assert state["done"] == [0]
    calls.clear()
    monkeypatch.setattr(S, "run_configuration", real)
    counting = []

    def count(*args, **kwargs):
        counting.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "run_configuration", count)
    S.simulate_structure(cfg, STRUCT, out, progress=False)
    assert len(counting) == 1  # only configuration 1 was computed
    assert S.load_store(out).attrs["n_configurations"] == 2
    assert not (tmp_path / "r.zarr.partial").exists()


def test_domain_wall_region_scan(cfg, tmp_path):
    out = S.simulate_structure(cfg, "PbTiO3_DW", tmp_path / "dw.zarr", progress=False)
    dw = S.load_store(out)
    assert dw.attrs["periodic"] is False
    assert dw.sizes["scan_y"] == 8 and dw.sizes["scan_x"] == 8
    assert set(np.unique(dw.site_domain.values)) == {1, 2}
    y, x = dw.site_y_A.values, dw.site_x_A.values
    assert y.min() >= 0 and y.max() <= 7 and x.max() <= 7


def test_cli_simulate_combine_noise(tmp_path):
    from tmask_validate.cli import main

    cfgp = str(ROOT / "config" / "smoke.yaml")
    for rng in ("0:1", "1:2"):
        assert main(["simulate", "--config", cfgp, "--structure", "PbTiO3_100",
                     "--configurations", rng, "--quiet",
                     "--out", str(tmp_path / f"p{rng[0]}.zarr")]) == 0
    assert main(["combine", str(tmp_path / "p0.zarr"), str(tmp_path / "p1.zarr"),
                 "--out", str(tmp_path / "p.zarr")]) == 0
    assert main(["noise", str(tmp_path / "p.zarr"), "--dose", "1e5", "--seed", "3",
                 "--out", str(tmp_path / "n.zarr")]) == 0
    noisy = S.load_store(tmp_path / "n.zarr")
    assert noisy.intensity.dtype == np.uint32 and noisy.attrs["dose_e_per_A2"] == 1e5
    assert main(["simulate", "--config", cfgp, "--structure", "nope", "--quiet",
                 "--out", str(tmp_path / "x.zarr")]) == 2


def test_probe_soft_edge_profile():
    """The aperture is 1 inside cutoff - soft_edge, a cosine taper to 0 at the cutoff."""
    sim = {"energy_keV": 200, "semiangle_mrad": 23.5, "soft_edge_mrad": 4, "Cs_um": 3,
           "defocus_nm": 0}
    probe = S.make_probe(sim)
    probe.gpts, probe.extent = (256, 256), (60.0, 60.0)
    dp = probe.build().diffraction_patterns(max_angle=40, fftshift=True)
    a = np.asarray(dp.array)
    row = a[a.shape[0] // 2, a.shape[1] // 2:] / a[a.shape[0] // 2, a.shape[1] // 2]
    k = np.arange(row.size) * dp.angular_sampling[1]
    amp = 0.5 * (1 + np.cos(np.pi * np.clip((k - 19.5) / 4.0, 0, 1)))
    sel = k < 30
    assert np.allclose(row[sel], amp[sel] ** 2, atol=1e-5)
    assert row[(k > 21) & (k < 22)].max() < 0.5  # really tapered, not a one-pixel edge


# ------------------------------------------------------------------------------ evidence variants
def test_variant_shares_phonon_displacements_with_its_partner(setup, cfg):
    """A species-removed control and its partner: same seed, and every shared atom at the SAME
    displaced position (the full crystal is displaced first, then atoms are removed)."""
    from tmask_validate import structures as st

    rms = cfg["simulation"]["phonons"]["rms_displacement_A"]
    atoms = setup["atoms"]
    seed = S.phonon_seed(int(cfg["seed"]), STRUCT, 0)
    keep = st.species_keep_mask(atoms, "Li", 0.0, seed=0)
    assert 0 < (~keep).sum() < len(atoms)
    partner = S.variant_configuration(atoms, np.ones(len(atoms), bool), rms, seed)
    control = S.variant_configuration(atoms, keep, rms, seed)
    assert np.array_equal(partner.positions, S.displaced_atoms(atoms, rms, seed).positions)
    assert len(control) == keep.sum()
    assert control.get_chemical_symbols() == [s for s, k in zip(
        partner.get_chemical_symbols(), keep, strict=True) if k]
    assert np.array_equal(control.positions, partner.positions[keep])
    assert "Li" not in control.get_chemical_symbols()
    # what the naive way (displace the reduced crystal) would give: other draws for shared atoms
    naive = S.displaced_atoms(atoms[keep], rms, seed)
    assert not np.allclose(naive.positions, partner.positions[keep])
    # a partial-occupancy variant shares them too
    half = st.species_keep_mask(atoms, "Li", 0.5, seed=3)
    assert np.array_equal(S.variant_configuration(atoms, half, rms, seed).positions,
                          partner.positions[half])
    with pytest.raises(ValueError, match="keep must be"):
        S.variant_configuration(atoms, keep[:-1], rms, seed)


def test_variant_setup_thickness_and_occupancy(cfg):
    var = {"name": "Li-x0.5", "species": "Li", "occupancy": 0.5, "thicknesses_nm": [2.0],
           "seed": 5, "mode": "depth"}
    st_v = S._structure_setup(cfg, STRUCT, var)
    st_0 = S._structure_setup(cfg, STRUCT, dict(var, species=None))
    assert np.array_equal(st_v["atoms"].positions, st_0["atoms"].positions)
    assert st_v["atoms"].info["n_repeats_z"] == 4  # 2 nm of 4.69 Å periods
    sym = np.array(st_v["atoms"].get_chemical_symbols())
    li = sym == "Li"
    assert st_v["keep"][li].mean() == pytest.approx(0.5)
    assert st_v["keep"][~li].all() and st_0["keep"].all()
    assert st_v["occupancy_realised"] == [pytest.approx(0.5)]
    assert st_v["planes"] == (7,) and len(st_v["slices"]) == 8


# ---- streaming (issue 13): scan blocks, per-configuration files, chunked combine ----------


def _in_memory_combine(paths) -> dict[str, np.ndarray]:
    """The pre-streaming combine: a whole float64 accumulator per variable (reference)."""
    stores = [S.load_store(p) for p in paths]
    w = np.array([float(ds.attrs["n_configurations"]) for ds in stores])
    w = w / w.sum()
    out = {}
    for name, var in stores[0].data_vars.items():
        if "thickness" not in var.dims:
            continue
        acc = np.zeros(var.shape, dtype=np.float64)
        for wi, ds in zip(w, stores, strict=True):
            for it in range(var.shape[0]):
                acc[it] += wi * ds[name][it].values.astype(np.float64)
        out[name] = acc.astype(np.float32)
    return out


def test_scan_block_rows():
    assert S.scan_block_rows(7, 10, 25) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert S.scan_block_rows(3, 100, 1) == [(0, 1), (1, 2), (2, 3)]  # >= one row per block
    assert S.scan_block_rows(3, 10, 10**9) == [(0, 3)]
    with pytest.raises(ValueError):
        S.scan_block_rows(0, 10, 10)


def test_simulate_mean_equals_naive_running_mean(cfg, setup, ds):
    """The streamed store equals a float64 running mean of whole-scan runs, bit for bit."""
    sim = cfg["simulation"]
    runs = []
    for k in range(2):
        atoms = S.displaced_atoms(setup["atoms"], sim["phonons"]["rms_displacement_A"],
                                  S.phonon_seed(cfg["seed"], STRUCT, k))
        runs.append(_run(cfg, setup, atoms=atoms))
    for name in ("intensity", "detector_ADF"):
        m = runs[0][name].astype(np.float64)
        m += (runs[1][name] - m) / 2
        np.testing.assert_array_equal(ds[name].values, m.astype(np.float32), err_msg=name)


def test_simulate_in_scan_blocks_equals_one_block(cfg, ds, tmp_path):
    """One scan row per block (7 blocks) gives the one-block result (float32 rounding)."""
    one_row = 2 * 11 * S._pattern_px_bound(S._structure_setup(cfg, STRUCT)["atoms"],
                                           cfg["simulation"]) * 4
    out = S.simulate_structure(cfg, STRUCT, tmp_path / "blk.zarr", progress=False,
                               block_bytes=one_row, keep_checkpoint=True)
    state = json.loads((tmp_path / "blk.zarr.partial" / "state.json").read_text())
    assert len(state["meta"]["scan_blocks"]) == ds.sizes["scan_y"] == 7
    blk = S.load_store(out)
    for name in ("intensity", "detector_ABF", "detector_ADF", "detector_BF"):
        x, y = blk[name].values, ds[name].values
        # measured: identical (each probe position is propagated on its own)
        assert np.abs(x - y).max() <= 1e-6 * np.abs(y).max(), name
    # the per-configuration results are kept (convergence studies use them)
    c0 = np.load(tmp_path / "blk.zarr.partial" / "config-0" / "intensity.npy")
    assert c0.shape == ds.intensity.shape and c0.dtype == np.float32


def test_resume_inside_a_configuration(cfg, ds, tmp_path, monkeypatch):
    """Killed in the middle of configuration 1's scan blocks: the rerun keeps configuration 0,
    recomputes configuration 1 from its first block and gives the uninterrupted result."""
    setup = S._structure_setup(cfg, STRUCT)
    two_rows = 2 * 2 * 11 * S._pattern_px_bound(setup["atoms"], cfg["simulation"]) * 4
    calls = []
    real = S.run_configuration

    def flaky(*args, **kwargs):
        calls.append(kwargs["scan_start_A"])
        if len(calls) == 6:  # 4 blocks per configuration: dies in configuration 1's 2nd
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "run_configuration", flaky)
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        S.simulate_structure(cfg, STRUCT, out, progress=False, block_bytes=two_rows)
    ckpt = tmp_path / "r.zarr.partial"
    assert not out.exists()
    assert json.loads((ckpt / "state.json").read_text())["done"] == [0]
    assert not (ckpt / "config-1").exists()  # the half-done configuration is not "done"
    calls.clear()
    monkeypatch.setattr(S, "run_configuration", lambda *a, **k: calls.append(1) or real(*a, **k))
    S.simulate_structure(cfg, STRUCT, out, progress=False, block_bytes=two_rows)
    assert len(calls) == 4  # configuration 1 only, 4 blocks
    res = S.load_store(out)
    assert res.attrs["n_configurations"] == 2 and not ckpt.exists()
    x, y = res.intensity.values, ds.intensity.values
    assert np.abs(x - y).max() <= 1e-6 * np.abs(y).max()


def test_old_checkpoint_layout_restarts(cfg, tmp_path, monkeypatch):
    """A checkpoint of the old layout (running mean .npy, no format) is discarded."""
    ckpt = tmp_path / "o.zarr.partial"
    ckpt.mkdir()
    np.save(ckpt / "intensity.npy", np.full((2, 2), 7.0))
    (ckpt / "state.json").write_text(json.dumps({"fingerprint": "x", "done": [0, 1]}))
    assert S._load_checkpoint(ckpt, "x") is None
    assert not ckpt.exists()


def test_combine_streamed_equals_in_memory_combine_exactly(cfg, tmp_path, monkeypatch):
    """Chunk-by-chunk combine == the whole-array float64 combine, bit for bit, for unequal
    weights (1 + 2 configurations) and a 4D variable split into several zarr chunks."""
    c3 = copy.deepcopy(cfg)
    c3["simulation"]["phonons"]["configurations"] = 3
    a = S.simulate_structure(c3, "PbTiO3_100", tmp_path / "a.zarr", configurations="0:1",
                             progress=False)
    b = S.simulate_structure(c3, "PbTiO3_100", tmp_path / "b.zarr", configurations="1:3",
                             progress=False)
    sizes = S.load_store(a).sizes
    # one scan row per zarr chunk: several chunks per thickness
    monkeypatch.setattr(S, "_CHUNK_BYTES", sizes["scan_x"] * sizes["ky"] * sizes["kx"] * 4)
    c = S.combine_stores([a, b], tmp_path / "c.zarr")
    import zarr

    assert zarr.open_group(str(c), mode="r")["intensity"].chunks[1] == 1
    ref = _in_memory_combine([a, b])
    comb = S.load_store(c)
    for name, arr in ref.items():
        np.testing.assert_array_equal(comb[name].values, arr, err_msg=name)
    assert comb.attrs["n_configurations"] == 3
