"""Config files and the simulation/dose schemas: the shipped configs validate, bad input fails
with a message naming the offending path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tmask_validate.config import load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["smoke", "default", "paper"]


@pytest.fixture(scope="module")
def smoke() -> dict:
    return load_config(ROOT / "config" / "smoke.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "config" / f"{name}.yaml")
    sim = cfg["simulation"]
    assert cfg["name"] == name
    assert sim["energy_keV"] == 200 and sim["semiangle_mrad"] == 23.5
    assert sim["Cs_um"] == 3 and sim["defocus_nm"] == 0
    assert sim["projection"] == "finite" and sim["parametrization"] == "kirkland"
    assert {"ABF", "ADF"} <= set(sim["detectors"])
    # every species of every structure has an RMS displacement
    species = {"LiFePO4": {"Li", "Fe", "P", "O"}, "PbTiO3": {"Pb", "Ti", "O"},
               "PbTiO3_DW": {"Pb", "Ti", "O"}}
    for entry in cfg["structures"].values():
        assert species[entry["builder"]] <= set(sim["phonons"]["rms_displacement_A"])
    assert all(d > 0 for d in cfg["dose"]["doses_e_per_A2"])


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_runtime_checks(name):
    from tmask_validate.simulate import check_simulation

    check_simulation(load_config(ROOT / "config" / f"{name}.yaml")["simulation"])


def test_paper_config_matches_table1():
    sim = load_config(ROOT / "config" / "paper.yaml")["simulation"]
    assert sim["sampling_A"] == 0.073
    assert sim["slice_thickness_A"] == 4.692
    assert sim["phonons"]["configurations"] == 20
    assert sim["max_angle_mrad"] == 64.2
    assert sim["soft_edge_mrad"] == 4


def test_defaults_filled():
    cfg = validate_config({"name": "x", "seed": 0, "simulation": {}, "dose": {}})
    sim = cfg["simulation"]
    assert sim["energy_keV"] == 200 and sim["projection"] == "finite"
    assert sim["phonons"]["configurations"] >= 1
    assert sim["detectors"]["ABF"] == [11, 23.5]
    assert cfg["dose"] == {"doses_e_per_A2": [], "seed": 0}


def _error(cfg: dict) -> str:
    with pytest.raises(ValueError) as exc:
        validate_config(cfg)
    return str(exc.value)


def test_unknown_key_names_path(smoke):
    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["semiangle"] = 20
    msg = _error(cfg)
    assert "simulation" in msg and "semiangle" in msg and "not allowed" in msg

    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["phonons"]["seeds"] = 3
    msg = _error(cfg)
    assert "simulation.phonons" in msg and "seeds" in msg

    cfg = copy.deepcopy(smoke)
    cfg["dose"]["dose"] = [1]
    assert "dose" in _error(cfg)


def test_negative_semiangle_names_path(smoke):
    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["semiangle_mrad"] = -1
    msg = _error(cfg)
    assert "simulation.semiangle_mrad" in msg and "-1" in msg


def test_wrong_type_names_path(smoke):
    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["sampling_A"] = "0.1"
    msg = _error(cfg)
    assert "simulation.sampling_A" in msg and "not of type 'number'" in msg

    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["phonons"]["configurations"] = 2.5
    assert "simulation.phonons.configurations" in _error(cfg)

    cfg = copy.deepcopy(smoke)
    cfg["simulation"]["detectors"]["ABF"] = [11]
    assert "simulation.detectors.ABF" in _error(cfg)

    cfg = copy.deepcopy(smoke)
    cfg["dose"]["doses_e_per_A2"] = [0]
    assert "dose.doses_e_per_A2.0" in _error(cfg)


def test_enums(smoke):
    for key, bad in (("projection", "exact"), ("parametrization", "peng"), ("device", "tpu")):
        cfg = copy.deepcopy(smoke)
        cfg["simulation"][key] = bad
        assert f"simulation.{key}" in _error(cfg)


def test_runtime_checks_name_the_key(smoke):
    from tmask_validate.simulate import check_simulation

    sim = copy.deepcopy(smoke["simulation"])
    sim["detectors"]["ABF"] = [23.5, 11]
    with pytest.raises(ValueError, match=r"simulation\.detectors\.ABF"):
        check_simulation(sim)
    sim = copy.deepcopy(smoke["simulation"])
    sim["max_angle_mrad"] = 80  # beyond the 56 mrad cutoff of 0.15 Å sampling
    with pytest.raises(ValueError, match=r"simulation\.max_angle_mrad.*cutoff"):
        check_simulation(sim)


# ------------------------------------------------------------------------------ evidence section
def test_evidence_defaults_and_variants(smoke):
    from tmask_validate import evidence

    ev = smoke["evidence"]
    assert ev["z_min"] == 3.0 and ev["p_max"] == 0.05 and ev["null_min_distance_A"] == 0.7
    assert ev["structures"]["LiFePO4_001"]["templates"] == ["binary"]
    v = evidence.variants_from_config(smoke, "LiFePO4_001")
    assert list(v) == ["crystal", "Li-x0", "Li-x0.5"]
    assert v["Li-x0"]["occupancy"] == 0.0 and v["crystal"]["species"] is None
    assert v["Li-x0.5"]["thicknesses_nm"] == [2.0, 4.0]
    cmp_ = evidence.comparisons_from_config(smoke, "LiFePO4_001")
    assert [(c.present, c.absent, c.occupancy) for c in cmp_] == [
        ("crystal", "Li-x0", 1.0), ("Li-x0.5", "Li-x0", 0.5)]
    none = validate_config({"name": "x", "seed": 0})
    assert none["evidence"]["structures"] == {}


@pytest.mark.parametrize("edit, match", [
    (lambda e: e["structures"].__setitem__("nope", {"species": ["Li"], "thicknesses_nm": [2]}),
     "evidence.structures.nope: no such structure"),
    (lambda e: e["structures"]["LiFePO4_001"]["occupancy"].__setitem__("species", "O"),
     "occupancy.species"),
    (lambda e: e["structures"]["LiFePO4_001"]["occupancy"].__setitem__("values", [1.0]),
     "evidence.structures.LiFePO4_001.occupancy.values"),
    (lambda e: e["structures"]["LiFePO4_001"]["occupancy"].__setitem__("mode", "columns"),
     "set scan_cells"),
    (lambda e: e["structures"]["LiFePO4_001"].__setitem__("scan_cells", [2, 2]),
     "must be \\[1, 1\\] or equal evidence.cells"),
    (lambda e: e.__setitem__("phonon_configurations", 5), "exceeds"),
    (lambda e: e.__setitem__("cells", [1, 4]), "evidence.cells"),
    (lambda e: e.__setitem__("p_max", 2), "evidence.p_max"),
    (lambda e: e.__setitem__("zmin", 2), "evidence: Additional properties"),
    (lambda e: e["structures"]["LiFePO4_001"].__setitem__("templates", ["round"]),
     "templates"),
])
def test_evidence_config_rejections(smoke, edit, match):
    cfg = copy.deepcopy(smoke)
    edit(cfg["evidence"])
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)
