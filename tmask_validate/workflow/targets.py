"""Paths, keys and per-rule parameters of the workflow, computed from a validated config.

Every output path of the workflow is built here from config keys (structure names, thickness
keys such as ``t20nm`` formatted from ``thicknesses_nm``, dose keys such as ``d10000`` formatted
from ``doses_e_per_A2``, phonon chunk keys such as ``c0-5``), so the Snakefile never pastes
numbers into paths. Rule parameters (``*_params``) hold only the config values a job depends on,
so Snakemake's ``params`` rerun trigger re-runs exactly the jobs whose inputs changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "NOISELESS",
    "thickness_key",
    "dose_key",
    "chunk_keys",
    "structures",
    "thickness_keys",
    "dose_keys",
    "datasets",
    "resources",
    "write_if_changed",
]

#: dose key of the noiseless (simulated) data
NOISELESS = "noiseless"
#: rules that have a resources entry in the workflow section
RULES = ("simulate", "combine", "noise", "analyse", "analyse_experiment", "metrics", "figures",
         "claims", "report", "simulate_variant", "evidence", "evidence_table")


def _num(value: float) -> str:
    """Compact, path-safe text of a number: 20 -> '20', 72.5 -> '72.5', 1e12 -> '1e12'."""
    text = format(float(value), "g").replace("+", "")
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def thickness_key(thickness_nm: float) -> str:
    """Path key of a thickness from the config, e.g. ``20 -> 't20nm'``, ``72.5 -> 't72.5nm'``."""
    return f"t{_num(thickness_nm)}nm"


def dose_key(dose_e_per_A2: float | None) -> str:
    """Path key of a dose (e-/Å²), e.g. ``1e4 -> 'd10000'``; None -> ``'noiseless'``."""
    if dose_e_per_A2 is None:
        return NOISELESS
    return f"d{_num(dose_e_per_A2)}"


def structures(cfg: Mapping[str, Any]) -> list[str]:
    """Structure names of the config, in config order."""
    return list(cfg.get("structures", {}))


def thickness_values(cfg: Mapping[str, Any], structure: str) -> dict[str, float]:
    """``{thickness key: thickness_nm}`` of one structure."""
    return {thickness_key(t): float(t) for t in cfg["structures"][structure]["thicknesses_nm"]}


def thickness_keys(cfg: Mapping[str, Any], structure: str) -> list[str]:
    """Thickness keys of one structure, in config order."""
    return list(thickness_values(cfg, structure))


def dose_values(cfg: Mapping[str, Any]) -> dict[str, float]:
    """``{dose key: dose}`` of the config's dose series (noiseless excluded)."""
    return {dose_key(d): float(d) for d in cfg.get("dose", {}).get("doses_e_per_A2", [])}


def dose_keys(cfg: Mapping[str, Any], *, include_noiseless: bool | None = None) -> list[str]:
    """Dose keys analysed: ``noiseless`` (if ``workflow.analyse_noiseless``) then each dose."""
    if include_noiseless is None:
        include_noiseless = cfg.get("workflow", {}).get("analyse_noiseless", True)
    keys = [NOISELESS] if include_noiseless else []
    return keys + list(dose_values(cfg))


def chunk_ranges(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{chunk key: 'i:j'}`` of the frozen-phonon configuration chunks (one job each)."""
    ph = cfg.get("simulation", {}).get("phonons", {})
    n = int(ph.get("configurations", 1) or 1)
    size = int(ph.get("chunk_size", n) or n)
    out = {}
    for i in range(0, n, size):
        j = min(n, i + size)
        out[f"c{i}-{j}"] = f"{i}:{j}"
    return out


def chunk_keys(cfg: Mapping[str, Any]) -> list[str]:
    """Chunk keys, e.g. ``['c0-1', 'c1-2']``."""
    return list(chunk_ranges(cfg))


def datasets(cfg: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Every analysed dataset as ``(structure, dose key, thickness key)``."""
    return [(s, d, t) for s in structures(cfg) for d in dose_keys(cfg)
            for t in thickness_keys(cfg, s)]


def resources(cfg: Mapping[str, Any], rule: str) -> dict[str, int]:
    """``mem_mb``/``runtime``/``threads`` of a rule (workflow.resources over default_resources)."""
    wf = cfg.get("workflow", {})
    out = {"mem_mb": 2000, "runtime": 30, "threads": 1}
    out.update(wf.get("default_resources", {}))
    out.update(wf.get("resources", {}).get(rule, {}))
    return {k: int(v) for k, v in out.items()}


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def simulate_params(cfg: Mapping[str, Any], structure: str) -> str:
    """What a simulation job depends on: seed, simulation section, the structure entry."""
    return _dump({"seed": cfg.get("seed"), "simulation": cfg.get("simulation", {}),
                  "structure": cfg["structures"][structure]})


def noise_params(cfg: Mapping[str, Any], dose: str) -> str:
    """What a noise job depends on: the dose value and the noise seed."""
    return _dump({"dose_e_per_A2": dose_values(cfg)[dose],
                  "seed": cfg.get("dose", {}).get("seed", 0)})


def analysis_params(cfg: Mapping[str, Any]) -> str:
    """The analysis section without the figure/claim settings (those do not change datasets)."""
    sec = {k: v for k, v in cfg.get("analysis", {}).items() if k not in ("figures", "claims")}
    return _dump(sec)


def experiments(cfg: Mapping[str, Any]) -> list[str]:
    """Names of the experimental datasets of the config."""
    return list(cfg.get("experiments", {}) or {})


def resolve_experiment_paths(cfg: dict, base_dir: str | Path) -> dict:
    """Make the relative paths of the experiments section (file, calibration, sites CSV)
    absolute, relative to ``base_dir`` (the folder of the config file), in place."""
    base = Path(base_dir).resolve()
    for ent in (cfg.get("experiments") or {}).values():
        for key in ("file", "calibration", "sites"):
            val = ent.get(key)
            if isinstance(val, str) and val != "fit" and not Path(val).is_absolute():
                ent[key] = str(base / val)
    return cfg


def experiment_params(cfg: Mapping[str, Any], name: str) -> str:
    """What an experiment's analysis depends on: its entry and the analysis settings."""
    return _dump({"experiment": cfg["experiments"][name], "analysis": analysis_params(cfg)})


def write_if_changed(path: str | Path, cfg: Mapping[str, Any]) -> Path:
    """Write ``cfg`` as YAML to ``path`` unless the file already holds exactly that text.

    The workflow passes this *effective* config (config file + ``--config`` overrides, defaults
    filled) to every ``tmask-validate`` command; keeping its mtime when nothing changed keeps
    reruns minimal (rules do not list it as an input; their ``params`` carry what they use).
    """
    path = Path(path)
    text = yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- species evidence
def evidence_structures(cfg: Mapping[str, Any]) -> list[str]:
    """Structures with an ``evidence.structures`` entry, in config order."""
    return list((cfg.get("evidence", {}) or {}).get("structures", {}) or {})


def evidence_variants(cfg: Mapping[str, Any], structure: str) -> list[str]:
    """Variant keys (``crystal``, ``Li-x0``, ``Li-x0.5``, ...) of a structure's evidence."""
    from tmask_validate.evidence import variants_from_config

    return list(variants_from_config(cfg, structure))


def all_evidence_variants(cfg: Mapping[str, Any]) -> list[str]:
    """Every variant key of every evidence structure (for the wildcard constraint)."""
    return sorted({v for s in evidence_structures(cfg) for v in evidence_variants(cfg, s)})


def evidence_chunk_ranges(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{chunk key: 'k:k+1'}``: one job (and store) per phonon configuration of a variant."""
    n = int((cfg.get("evidence", {}) or {}).get("phonon_configurations", 1))
    return {f"c{k}-{k + 1}": f"{k}:{k + 1}" for k in range(n)}


def variant_params(cfg: Mapping[str, Any], structure: str, variant: str) -> str:
    """What a variant simulation depends on: the simulate params plus the variant itself."""
    from tmask_validate.evidence import variants_from_config

    return _dump({"simulate": simulate_params(cfg, structure),
                  "variant": variants_from_config(cfg, structure)[variant]})


def evidence_thickness_values(cfg: Mapping[str, Any], structure: str) -> dict[str, float]:
    """``{thickness key: thickness_nm}`` of a structure's evidence series."""
    ent = cfg["evidence"]["structures"][structure]
    return {thickness_key(t): float(t) for t in ent["thicknesses_nm"]}


def evidence_jobs(cfg: Mapping[str, Any], results_dir: str | Path, ext: str) -> list[str]:
    """Outputs ``evidence/<structure>/<thickness>.<ext>`` of every evidence job."""
    return [str(Path(results_dir) / "evidence" / s / f"{t}.{ext}")
            for s in evidence_structures(cfg) for t in evidence_thickness_values(cfg, s)]


def evidence_params(cfg: Mapping[str, Any]) -> str:
    """The evidence section (what every evidence job depends on)."""
    return _dump(cfg.get("evidence", {}))


def species_evidence_table(cfg: Mapping[str, Any], results_dir: str | Path) -> list[str]:
    """``[results/species_evidence.csv]`` when the config has an evidence stage, else ``[]``."""
    if not evidence_structures(cfg):
        return []
    return [str(Path(results_dir) / "species_evidence.csv")]
