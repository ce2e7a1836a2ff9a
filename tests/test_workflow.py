"""The Snakemake workflow: DAGs of every config, the smoke run end to end, reruns.

The end-to-end test runs ``tmask-validate workflow --config config/smoke.yaml`` (abTEM smoke
simulations, noise, analysis, metrics, figures, claims, report) in a temporary directory, then
checks: the outputs exist; key metrics match tests/golden/smoke_metrics.csv within the stated
tolerances; a second dry run has nothing to do; changing one dose re-runs only what depends on it.

Golden tolerances (see tests/golden/README.md): noiseless datasets only (noisy ones add Poisson
draws whose exact values may change with numpy's generator implementation); |measured - golden|
<= ATOL + RTOL * |golden| with ATOL = 0.05 and RTOL = 0.05 -- the simulation is seeded (frozen
phonons) and deterministic on one platform, but float32 FFT/BLAS rounding differs between builds
and specificity/crosstalk are ratios of column contrasts, which amplifies that rounding where a
contrast is small; 5 % + 0.05 is far below the differences the claims are about.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "smoke_metrics.csv"
ATOL, RTOL = 0.05, 0.05
#: metrics compared with the golden file
GOLDEN_NAMES = ("tm_pcc_binary_", "tm_pcc_g", "abf_best", "abf", "adf", "icom", "eigen")
GOLDEN_METRICS = ("specificity", "cnr", "image_similarity", "mask_similarity")


def _cli() -> str:
    exe = shutil.which("tmask-validate") or str(Path(sys.executable).parent / "tmask-validate")
    return exe


def _run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # PATH deliberately left as it is: `tmask-validate workflow` must make the rules find the
    # CLI of its own installation even when the virtual environment is not activated (CI runs
    # `.venv/bin/python -m pytest` without activating it, as the README's quick start does).
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_workflow_env_puts_own_bin_first(monkeypatch):
    from tmask_validate.commands.workflow import workflow_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    first = workflow_env()["PATH"].split(os.pathsep)[0]
    assert first == str(Path(sys.executable).parent)


def _job_counts(text: str) -> dict[str, int]:
    """Parse snakemake's "Job stats" table."""
    counts: dict[str, int] = {}
    block = text.split("Job stats:", 1)
    if len(block) < 2:
        return counts
    for line in block[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.mark.parametrize("config", ["smoke", "default", "paper"])
def test_dry_run_dag_is_valid(config, tmp_path):
    res = _run([_cli(), "workflow", "--config", str(ROOT / "config" / f"{config}.yaml"),
                "--directory", str(tmp_path), "--cores", "2", "-n"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counts = _job_counts(res.stdout)
    cfg = yaml.safe_load((ROOT / "config" / f"{config}.yaml").read_text())
    n_struct = len(cfg["structures"])
    n_dose = len(cfg["dose"]["doses_e_per_A2"])
    n_thick = sum(len(s["thicknesses_nm"]) for s in cfg["structures"].values())
    ph = cfg["simulation"]["phonons"]
    n_chunks = -(-ph["configurations"] // ph.get("chunk_size", ph["configurations"]))
    assert counts["simulate"] == n_struct * n_chunks
    assert counts["combine"] == n_struct
    assert counts["noise"] == n_struct * n_dose
    assert counts["analyse"] == n_thick * (n_dose + 1)
    for rule in ("metrics", "figures", "claims", "report"):
        assert counts[rule] == 1


def test_config_is_the_users_file_not_merged_with_default(tmp_path):
    """Run as the README says, from a folder that has the repository's config/ (the repository
    root), without --directory: the Snakefile must not merge config/default.yaml under the
    user's file (it did: default.yaml's HAADF [64, 83] mrad failed the smoke config's 55.7 mrad
    antialiasing check). The effective config is exactly the user's file + schema defaults."""
    from tmask_validate.config import load_config

    shutil.copytree(ROOT / "config", tmp_path / "config")
    res = _run([_cli(), "workflow", "--config", "config/smoke.yaml", "--cores", "2", "-n"],
               cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    written = yaml.safe_load((tmp_path / "results" / "config" / "smoke.yaml").read_text())
    expected = load_config(ROOT / "config" / "smoke.yaml")
    assert "HAADF" not in written["simulation"]["detectors"]
    assert written == expected


def test_plain_snakemake_without_a_config_says_so(tmp_path):
    exe = Path(sys.executable).parent / "snakemake"
    res = _run([str(exe), "--snakefile", str(ROOT / "Snakefile"), "--cores", "1", "-n"],
               cwd=tmp_path)
    assert res.returncode != 0
    assert "no config given" in res.stdout + res.stderr


@pytest.mark.slow
def test_ctrl_c_releases_the_lock(tmp_path):
    """SIGINT to `tmask-validate workflow` while a job runs: the wrapper forwards it and waits,
    snakemake stops and unlocks, and the next run is not refused as 'Another Snakemake
    instance is running' (the wrapper used to kill snakemake, leaving the lock)."""
    import signal
    import time

    cmd = [_cli(), "workflow", "--config", str(ROOT / "config" / "smoke.yaml"),
           "--directory", str(tmp_path), "--cores", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    locks = tmp_path / ".snakemake" / "locks"
    t0 = time.time()
    while not (locks.is_dir() and any(locks.iterdir())):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 120, "snakemake never took its lock"
        time.sleep(0.2)
    time.sleep(2.0)  # a job is running now
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    res = _run(cmd + ["-n"], cwd=tmp_path)
    assert "Another Snakemake instance" not in res.stdout + res.stderr, "lock left behind"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (locks.is_dir() and any(locks.iterdir()))
    assert proc.returncode != 0 and "waiting for snakemake" in out, out[-3000:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    res = _run([_cli(), "workflow", "--config", str(ROOT / "config" / "smoke.yaml"),
                "--directory", str(work), "--cores", "2"], cwd=work, timeout=1200)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    return work, res


def _golden_subset(metrics: pd.DataFrame) -> pd.DataFrame:
    m = metrics[(metrics["dose_key"] == "noiseless") & metrics["metric"].isin(GOLDEN_METRICS)]
    m = m[m["name"].str.startswith(GOLDEN_NAMES)]
    m = m[~m["name"].str.startswith("abfsweep")]
    cols = ["structure", "dose_key", "thickness_config_nm", "name", "metric", "species", "value"]
    return (m[cols].sort_values(cols[:-1]).reset_index(drop=True))


@pytest.mark.slow
def test_smoke_workflow_end_to_end(smoke_run):
    work, res = smoke_run
    results = work / "results"
    for rel in ("report/report.html", "claims.csv", "metrics/metrics.csv", "metrics/metrics.nc",
                "metrics/mask_similarity.csv", "figures/figures.json"):
        assert (results / rel).is_file(), rel
    assert "Report:" in res.stdout
    html = (results / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Claims" in html
    claims = pd.read_csv(results / "claims.csv")
    assert {"claim", "measured", "threshold", "passed"} <= set(claims.columns)
    assert {"O_specific", "Li_specific", "FeP_crosstalk", "controls_not_specific",
            "Ti_binary_loses", "adf_is_eigen", "partial_reproduces"} <= set(claims["claim_id"])
    metrics = pd.read_csv(results / "metrics" / "metrics.csv", keep_default_na=False,
                          na_values=[""])
    assert np.all(np.isfinite(metrics["value"].to_numpy(float)))
    # every analysis has its log, which says what it wrote; no log holds a traceback or error
    logs = {p.relative_to(results / "logs"): p for p in (results / "logs").rglob("*.log")}
    analyses = sorted((results / "analysis").rglob("*.nc"))
    assert analyses
    for nc in analyses:
        log = logs.get(Path("analyse") / nc.relative_to(results / "analysis").with_suffix(".log"))
        assert log is not None, f"no log for {nc}"
        assert f"-> {nc.relative_to(work)}" in log.read_text(), log
    for rel, log in logs.items():
        text = log.read_text()
        assert "Traceback" not in text and "error:" not in text.lower(), (rel, text[-2000:])
    got = _golden_subset(metrics)
    if os.environ.get("TMASK_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        got.to_csv(GOLDEN, index=False, float_format="%.6g")
    gold = pd.read_csv(GOLDEN, keep_default_na=False, na_values=[""])
    key = ["structure", "dose_key", "thickness_config_nm", "name", "metric", "species"]
    merged = gold.merge(got, on=key, how="left", suffixes=("_gold", "_got"))
    missing = merged[merged["value_got"].isna()]
    assert missing.empty, missing[key].head(20).to_string()
    diff = np.abs(merged["value_got"] - merged["value_gold"])
    bad = merged[diff > ATOL + RTOL * np.abs(merged["value_gold"])]
    assert bad.empty, bad.head(30).to_string()


@pytest.mark.slow
def test_rerun_does_nothing(smoke_run):
    work, _ = smoke_run
    res = _run([_cli(), "workflow", "--config", str(ROOT / "config" / "smoke.yaml"),
                "--directory", str(work), "--cores", "2", "-n"], cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]


@pytest.mark.slow
def test_changing_one_dose_reruns_only_its_dependents(smoke_run):
    work, _ = smoke_run
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    doses = cfg["dose"]["doses_e_per_A2"]
    cfg["dose"]["doses_e_per_A2"] = [doses[0], 2.0 * doses[-1]]
    path = work / "smoke_changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        res = _run([_cli(), "workflow", "--config", str(path), "--directory", str(work),
                    "--cores", "2", "-n"], cwd=work)
    finally:
        # the dry run rewrote the effective config; put the original back for other tests
        _run([_cli(), "workflow", "--config", str(ROOT / "config" / "smoke.yaml"),
              "--directory", str(work), "--cores", "1", "-n"], cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = _job_counts(res.stdout)
    n_struct = len(cfg["structures"])
    n_thick = sum(len(s["thicknesses_nm"]) for s in cfg["structures"].values())
    assert counts.get("simulate", 0) == 0 and counts.get("combine", 0) == 0
    assert counts["noise"] == n_struct          # only the new dose
    assert counts["analyse"] == n_thick          # only the new dose's datasets
    assert counts["metrics"] == counts["claims"] == counts["report"] == 1


def test_experiments_enter_the_dag(tmp_path):
    """An experiments entry adds one analyse_experiment job whose file path is resolved
    relative to the config file."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 2, 4, 4), np.float32))
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["experiments"] = {"lab1": {"file": "scan.npy", "structure": "LiFePO4",
                                   "calibration": {"step_A": 0.4, "mrad_per_px": 1.0}}}
    path = tmp_path / "with_exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _run([_cli(), "workflow", "--config", str(path), "--directory", str(tmp_path / "w"),
                "--cores", "2", "-n"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _job_counts(res.stdout)["analyse_experiment"] == 1
    assert str(tmp_path / "scan.npy") in res.stdout
