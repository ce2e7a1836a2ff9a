"""Run workflows through a real (throw-away, single-node) SLURM with the project's SLURM profile.

The cluster comes from ``tests/slurm_harness.py``: SLURM and munge are installed with apt-get when
missing and we are root (otherwise the tests skip), the daemons run from a temporary directory and
are stopped by the fixture's finaliser. Snakemake runs with

    --profile config/profiles/slurm --profile <override>

where the override profile (written by the test) only caps the memory/CPU requests to what the
one test node has and adds the flags a cluster without accounting needs
(``--slurm-status-command squeue``, ``--slurm-no-account``). Everything the workflow writes goes to
a temporary directory (``--directory``), never to the repository's ``results/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_harness import SlurmCluster, ensure_slurm_installed  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "config" / "profiles" / "slurm"
SNAKEFILE = ROOT / "Snakefile"
SMOKE_CONFIG = ROOT / "config" / "smoke.yaml"

#: memory (MB) the override profile allows one job on the test node
TEST_JOB_MEM_MB = 1000

TINY_SNAKEFILE = r'''
# Three rules; the names match the real workflow's so that the profile's set-resources apply.
N = 3

rule all:
    input: "results/summary.txt"
    localrule: True

rule simulate:
    output: "results/simulate/part{i}.txt"
    shell:
        'echo "part={wildcards.i} job=$SLURM_JOB_ID '
        'cpus=${{SLURM_CPUS_PER_TASK:-unset}}" > {output}'

rule combine:
    input: expand("results/simulate/part{i}.txt", i=range(N))
    output: "results/summary.txt"
    shell: 'cat {input} > {output} && echo "combine job=$SLURM_JOB_ID" >> {output}'
'''


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node SLURM cluster, stopped (by PID files) when the module is done."""
    ok, reason = ensure_slurm_installed()
    if not ok:
        pytest.skip(f"no SLURM for the test: {reason}")
    if os.geteuid() != 0:
        pytest.skip("the throw-away SLURM runs its daemons as root")
    # twice the real cores: the smoke workflow's ~34 jobs each spend seconds starting Python
    # (snakemake jobstep + tmask-validate) and would otherwise queue behind each other
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2 * (os.cpu_count() or 1))
    try:
        cluster.start()
    except Exception as exc:  # pragma: no cover - environment-specific
        cluster.stop()
        pytest.fail(f"could not start the test SLURM: {exc}")
    yield cluster
    cluster.stop()


def _cap(value, cap):
    """An integer request capped at ``cap``; expressions (strings) become ``cap``."""
    return min(int(value), cap) if isinstance(value, int) else cap


def write_override_profile(directory: Path, cluster: SlurmCluster) -> Path:
    """A profile that fits the project profile's requests onto the one test node.

    Top-level keys of a later ``--profile`` replace those of an earlier one, so the complete
    ``default-resources`` and ``set-resources`` are written again with capped values.
    """
    project = yaml.safe_load((PROFILE / "config.yaml").read_text())
    mem_cap = min(TEST_JOB_MEM_MB, cluster.real_memory_mb // max(cluster.cpus, 1))
    default = dict(project.get("default-resources") or {})
    default.update(mem_mb=_cap(default.get("mem_mb", mem_cap), mem_cap), runtime=10)
    if "cpus_per_task" in default:
        default["cpus_per_task"] = _cap(default["cpus_per_task"], cluster.cpus)
    set_resources = {}
    for rule, res in (project.get("set-resources") or {}).items():
        res = dict(res)
        if "mem_mb" in res:
            res["mem_mb"] = _cap(res["mem_mb"], mem_cap)
        if "runtime" in res:
            res["runtime"] = 10
        if "cpus_per_task" in res:
            res["cpus_per_task"] = _cap(res["cpus_per_task"], cluster.cpus)
        set_resources[rule] = res
    set_threads = {rule: _cap(n, cluster.cpus)
                   for rule, n in (project.get("set-threads") or {}).items()}
    override = {
        "default-resources": default,
        "set-resources": set_resources,
        "set-threads": set_threads,
        "jobs": cluster.cpus,
        "latency-wait": 5,
        "retries": 0,
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-no-account": True,
        "slurm-keep-successful-logs": True,
        "slurm-logdir": str(directory / "slurm_logs"),
    }
    prof = directory / "test_profile"
    prof.mkdir(parents=True, exist_ok=True)
    (prof / "config.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    return prof


def run_snakemake(cluster: SlurmCluster, workdir: Path, snakefile: Path, *extra: str,
                  timeout_s: int = 240) -> subprocess.CompletedProcess:
    """Run snakemake with the SLURM executor (hard time limit: ``timeout -k``, see pitfall 3)."""
    override = write_override_profile(workdir / "_test", cluster)
    cmd = [
        "timeout", "-k", "10", str(timeout_s),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile), "--directory", str(workdir),
        "--profile", str(PROFILE), "--profile", str(override),
        "--nocolor", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=cluster.env,
                          cwd=str(workdir), timeout=timeout_s + 30)


def _failure(res: subprocess.CompletedProcess, cluster: SlurmCluster, workdir: Path) -> str:
    logs = []
    for log in sorted((workdir / "_test" / "slurm_logs").rglob("*.log"))[-6:]:
        logs.append(f"--- {log}\n{log.read_text(errors='replace')[-1500:]}")
    return (f"snakemake rc={res.returncode}\nSTDOUT\n{res.stdout[-4000:]}\nSTDERR\n"
            f"{res.stderr[-6000:]}\n" + "\n".join(logs) + "\n" + cluster.logs_tail(1500))


def test_tiny_workflow_runs_through_slurm(slurm_cluster, tmp_path):
    """Three rules, four SLURM jobs: outputs complete, every job really ran as a SLURM job."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(TINY_SNAKEFILE)
    t0 = time.monotonic()
    res = run_snakemake(slurm_cluster, tmp_path, snakefile, timeout_s=180)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, _failure(res, slurm_cluster, tmp_path)

    summary = (tmp_path / "results" / "summary.txt").read_text().splitlines()
    parts = sorted(line for line in summary if line.startswith("part="))
    assert [p.split()[0] for p in parts] == ["part=0", "part=1", "part=2"]
    # job ids written from inside the jobs (set by SLURM, not by snakemake)
    job_ids = {p.split()[1].removeprefix("job=") for p in parts}
    combine_id = summary[-1].split("job=")[1]
    assert all(j.isdigit() for j in job_ids | {combine_id}), summary
    assert len(job_ids | {combine_id}) == 4
    # the profile's set-threads reached sbatch as --cpus-per-task for simulate
    want_cpus = min(yaml.safe_load((PROFILE / "config.yaml").read_text())["set-threads"][
        "simulate"], slurm_cluster.cpus)
    assert all(p.split()[2] == f"cpus={want_cpus}" for p in parts), parts

    # slurmctld's own record (MinJobAge keeps finished jobs): 4 jobs, all COMPLETED
    jobs = {j["JobId"]: j for j in slurm_cluster.jobs()}
    ours = {jid: jobs[jid] for jid in job_ids | {combine_id}}
    assert all(j["JobState"] == "COMPLETED" for j in ours.values()), ours
    assert all(j["ExitCode"] == "0:0" for j in ours.values())
    assert {j["MinMemoryNode"] for jid, j in ours.items() if jid in job_ids} == {
        f"{min(TEST_JOB_MEM_MB, slurm_cluster.real_memory_mb // slurm_cluster.cpus)}M"}
    # snakemake noticed the jobs finishing through squeue, and the SLURM logs were kept
    logs = list((tmp_path / "_test" / "slurm_logs").rglob("*.log"))
    assert len(logs) >= 4, logs
    assert not (ROOT / "results" / "summary.txt").exists()
    print(f"tiny workflow through SLURM: {elapsed:.1f} s")


@pytest.mark.skipif(not SNAKEFILE.exists() or not SMOKE_CONFIG.exists(),
                    reason="the project's Snakefile / config/smoke.yaml are not there yet")
def test_smoke_workflow_runs_through_slurm(slurm_cluster, tmp_path):
    """The real smoke workflow, every non-local job submitted to SLURM, outputs in tmp_path."""
    t0 = time.monotonic()
    res = run_snakemake(slurm_cluster, tmp_path, SNAKEFILE, "--configfile", str(SMOKE_CONFIG),
                        timeout_s=800)  # < pytest-timeout (900 s): timeout -k ends it
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, _failure(res, slurm_cluster, tmp_path)
    results = tmp_path / "results"
    for target in ("report/report.html", "claims.csv", "metrics/metrics.csv"):
        assert (results / target).stat().st_size > 0, target
    assert "<html" in (results / "report" / "report.html").read_text().lower()

    # one SLURM log per submitted job: .../rule_<rule>/<wildcards>/<jobid>.log or group_<...>
    logs = list((tmp_path / "_test" / "slurm_logs").rglob("*.log"))
    by_rule: dict[str, int] = {}
    for log in logs:
        top = log.relative_to(tmp_path / "_test" / "slurm_logs").parts[0]
        by_rule[top] = by_rule.get(top, 0) + 1
    cfg = yaml.safe_load(SMOKE_CONFIG.read_text())
    ph = cfg["simulation"]["phonons"]
    n_structures = len(cfg["structures"])
    assert by_rule["rule_simulate"] == n_structures * -(-ph["configurations"]
                                                        // ph.get("chunk_size", 1))
    assert by_rule["rule_combine"] == n_structures
    assert by_rule.get("rule_noise", 0) >= n_structures and by_rule.get("rule_analyse", 0) > 0
    # the profile's `groups` made the summary rules one SLURM job
    assert sum(v for k, v in by_rule.items() if k.startswith("group_summary")) == 1, by_rule
    # slurmctld ran every one of them to completion
    submitted = {p.stem for p in logs}
    jobs = {j["JobId"]: j for j in slurm_cluster.jobs()}
    assert submitted <= set(jobs), (submitted, sorted(jobs))
    assert all(jobs[j]["JobState"] == "COMPLETED" for j in submitted), \
        {j: jobs[j]["JobState"] for j in submitted}
    print(f"smoke workflow through SLURM: {elapsed:.1f} s, {len(submitted)} SLURM jobs")


def test_harness_stops_daemons(tmp_path):
    """A second, short-lived cluster: started and stopped by PID files, no daemon left."""
    ok, reason = ensure_slurm_installed()
    if not ok:
        pytest.skip(f"no SLURM for the test: {reason}")
    cluster = SlurmCluster(tmp_path / "c")
    with cluster:
        pids = [int((cluster.run_dir / f"{n}.pid").read_text()) for n in
                ("munged", "slurmctld", "slurmd")]
        res = subprocess.run([shutil.which("sinfo", path=str(cluster.bin_dir)), "-h", "-o", "%P"],
                             capture_output=True, text=True, env=cluster.env, timeout=30)
        assert res.stdout.strip() == f"{cluster.partition}*"
    from slurm_harness import _alive
    assert not any(_alive(p) for p in pids)
