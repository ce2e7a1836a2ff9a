"""The Snakemake profiles parse and give the paper DAG the resources they promise (dry runs).

The workflow's own ``snakemake -n`` tests (smoke/default/paper) live with the workflow; here only
``--profile config/profiles/slurm --dry-run`` (and the local profile) are checked. Dry runs need
no SLURM: the executor is not started.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
SLURM_PROFILE = ROOT / "config" / "profiles" / "slurm"
LOCAL_PROFILE = ROOT / "config" / "profiles" / "local"
PAPER = ROOT / "config" / "paper.yaml"
SMOKE = ROOT / "config" / "smoke.yaml"

needs_workflow = pytest.mark.skipif(
    not SNAKEFILE.exists() or not PAPER.exists(), reason="Snakefile or config/paper.yaml missing")


def _ev(expr, **names):
    return eval(str(expr), {"min": min, "max": max}, names)  # noqa: S307 - our own profile


def dry_run(tmp_path: Path, *args: str) -> str:
    """``snakemake --dry-run`` in a scratch directory; returns stdout+stderr (asserts rc 0)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--directory", str(tmp_path), "--dry-run", "--nocolor", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    return out


def job_blocks(out: str, rule: str) -> list[str]:
    """The dry-run printout of every job of ``rule`` (blocks are separated by blank lines)."""
    return [b for b in out.split("\n\n")
            if re.search(rf"^(?:local)?rule {rule}:$", b, re.M)]


def _resources(block: str) -> dict[str, str]:
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    return dict(kv.strip().split("=", 1) for kv in line.split(":", 1)[1].split(","))


def test_slurm_profile_numbers_are_sane():
    prof = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    sim = prof["set-resources"]["simulate"]
    for structure in ("LiFePO4_001", "PbTiO3_100", "PbTiO3_DW"):
        w = type("W", (), {"structure": structure})()
        mem = _ev(sim["mem_mb"], attempt=1, wildcards=w)
        runtime = _ev(sim["runtime"], attempt=1, wildcards=w)
        assert 8000 <= mem <= 64000 and 60 <= runtime <= 48 * 60
        # a retry asks for more (time capped at 48 h)
        assert _ev(sim["mem_mb"], attempt=2, wildcards=w) == 2 * mem
        assert _ev(sim["runtime"], attempt=2, wildcards=w) == min(2 * runtime, 2880)
    assert _ev(prof["default-resources"]["mem_mb"], attempt=1) < 16000
    assert "cpus_per_task" not in prof["default-resources"], \
        "a default cpus_per_task would override every rule's threads"


@needs_workflow
def test_paper_dag_with_slurm_profile(tmp_path):
    """Paper DAG is valid under the SLURM profile and simulate jobs carry its resources."""
    out = dry_run(tmp_path, "--profile", str(SLURM_PROFILE), "--configfile", str(PAPER))
    cfg = yaml.safe_load(PAPER.read_text())
    ph = cfg["simulation"]["phonons"]
    n_chunks = -(-ph["configurations"] // ph.get("chunk_size", 1))
    structures = list(cfg["structures"])
    sims = job_blocks(out, "simulate")
    assert len(sims) == n_chunks * len(structures), len(sims)
    prof = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())["set-resources"]
    for block in sims:
        structure = re.search(r"structure=(\w+)", block).group(1)
        w = type("W", (), {"structure": structure})()
        res = _resources(block)
        assert int(res["mem_mb"]) == _ev(prof["simulate"]["mem_mb"], attempt=1, wildcards=w)
        assert int(res["runtime"]) == _ev(prof["simulate"]["runtime"], attempt=1, wildcards=w)
    for block in job_blocks(out, "analyse"):
        assert int(_resources(block)["mem_mb"]) == _ev(prof["analyse"]["mem_mb"], attempt=1)
    # no job asks for more than a big node has
    for m in re.findall(r"mem_mb=(\d+)", out):
        assert int(m) <= 64000


@needs_workflow
def test_slurm_profile_threads_reach_simulate(tmp_path):
    """set-threads of the profile (shown when the executor is swapped for the local one)."""
    out = dry_run(tmp_path, "--profile", str(SLURM_PROFILE), "--executor", "local",
                  "--cores", "8", "--configfile", str(PAPER))
    want = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())["set-threads"]["simulate"]
    blocks = job_blocks(out, "simulate")
    assert blocks and all(f"threads: {want}" in b for b in blocks)


@pytest.mark.skipif(not SNAKEFILE.exists() or not SMOKE.exists(), reason="no smoke workflow")
def test_local_profile_dry_run(tmp_path):
    """The laptop profile parses; no job needs more than its global memory budget."""
    out = dry_run(tmp_path, "--profile", str(LOCAL_PROFILE), "--configfile", str(SMOKE))
    budget = yaml.safe_load((LOCAL_PROFILE / "config.yaml").read_text())["resources"]["mem_mb"]
    assert job_blocks(out, "simulate")
    assert all(int(m) <= budget for m in re.findall(r"mem_mb=(\d+)", out))
