"""Architecture checks: the layers import only what they may, and the code is lint-clean."""

from __future__ import annotations

import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tmask_validate

ROOT = Path(__file__).resolve().parents[1]
#: modules allowed to import abTEM/ASE (simulation layer) or Snakemake (the CLI's workflow runner)
HEAVY_OK = {"tmask_validate.simulate", "tmask_validate.structures"}
FORBIDDEN = ("abtem", "snakemake")


def _package_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(tmask_validate.__path__, prefix="tmask_validate."):
        if info.name.startswith("tmask_validate.commands") or info.name.startswith(
            "tmask_validate.workflow"
        ):
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("module", ["tmask_validate.core", "tmask_validate.templates",
                                    "tmask_validate.metrics"])
def test_core_layers_import_no_simulation_or_workflow(module):
    """The numerical core must not pull abTEM, ASE or Snakemake in (not even indirectly)."""
    code = (
        f"import sys, json, importlib; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('abtem', 'snakemake', 'ase'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_only_simulation_layer_imports_abtem_or_snakemake():
    """Static check over the whole package source."""
    offenders = []
    for path in (ROOT / "tmask_validate").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if mod in HEAVY_OK:
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            for name in FORBIDDEN:
                if s.startswith(f"import {name}") or s.startswith(f"from {name}"):
                    offenders.append(f"{mod}: {s}")
    assert offenders == []


def test_every_module_imports():
    for name in _package_modules():
        __import__(name)


def _ruff() -> str | None:
    local = Path(sys.executable).parent / "ruff"
    return str(local) if local.exists() else shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff not installed")
def test_ruff_clean():
    ruff = _ruff()
    res = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
