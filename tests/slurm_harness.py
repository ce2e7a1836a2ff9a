"""A throw-away single-node SLURM cluster for tests.

The harness starts ``munged``, ``slurmctld`` and ``slurmd`` as root with everything (munge key and
socket, ``slurm.conf``, state/spool directories, logs, PID files) inside one temporary directory,
so nothing under ``/etc`` is touched and several clusters can coexist (free TCP ports are picked at
start). It is used by ``tests/test_slurm.py`` and can be reused from a shell::

    python tests/slurm_harness.py /tmp/myslurm      # start, print the env to source, wait for ^C

Known pitfalls this harness works around (see the project's field notes):

1. The Snakemake SLURM jobstep plugin strips ``SLURM_*`` variables (``SLURM_CONF`` included) from
   the environment of the nested ``srun`` it runs inside each job, so a configuration known only
   through ``SLURM_CONF`` makes every job fail with ``fetch_config: DNS SRV lookup failed``. The
   harness therefore writes small wrappers for ``srun``/``sbatch``/``squeue``/... that export
   ``SLURM_CONF`` and puts their directory first on ``PATH`` (``sbatch --export=ALL`` carries
   ``PATH`` into the job).
2. Without accounting ``sacct`` fails; callers must pass ``--slurm-status-command squeue`` and we
   set ``MinJobAge=3600`` so finished jobs stay visible to ``squeue``/``scontrol`` long enough.
3. ``DefMemPerCPU`` is set; without it a job that requests no memory gets the whole node and the
   jobs run one after the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: programs the harness needs (daemons + clients)
REQUIRED_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue",
                     "scontrol", "sinfo", "scancel")
#: Debian packages that provide them
DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: client programs that get a SLURM_CONF-exporting wrapper (pitfall 1)
WRAPPED_CLIENTS = ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "sacct")


def missing_programs() -> list[str]:
    """Return the names in :data:`REQUIRED_PROGRAMS` that are not on ``PATH`` (or in sbin dirs)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=search) is None]


def _which(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH or in the sbin directories")
    return path


def ensure_slurm_installed(*, update_timeout_s: float = 300,
                           install_timeout_s: float = 600) -> tuple[bool, str]:
    """Make sure SLURM and munge are installed, installing the Debian packages if we may.

    Installation is attempted only when programs are missing, we run as root, ``apt-get`` exists
    and ``TMASK_SLURM_NO_INSTALL`` is not set. While installing, a temporary
    ``/usr/sbin/policy-rc.d`` (if none exists) stops the packages from starting the system
    daemons, which we do not want (we start our own).

    Returns
    -------
    (ok, reason)
        ``ok`` is True when everything is available; otherwise ``reason`` says why not (use it as
        the pytest skip reason).
    """
    missing = missing_programs()
    if not missing:
        return True, "SLURM and munge present"
    why = f"missing {', '.join(missing)}"
    if os.environ.get("TMASK_SLURM_NO_INSTALL"):
        return False, f"{why} (TMASK_SLURM_NO_INSTALL set)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, f"{why}; not root, cannot install {' '.join(DEBIAN_PACKAGES)}"
    apt = shutil.which("apt-get")
    if apt is None:
        return False, f"{why}; no apt-get to install {' '.join(DEBIAN_PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    try:
        if not policy.exists():
            try:
                policy.write_text("#!/bin/sh\n# written by tmask_validate tests/slurm_harness.py\n"
                                  "exit 101\n")
                policy.chmod(0o755)
                made_policy = True
            except OSError:
                pass
        steps = [
            ([apt, "-qq", "update"], update_timeout_s),
            ([apt, "-y", "-qq", "--no-install-recommends", "install", *DEBIAN_PACKAGES],
             install_timeout_s),
        ]
        for cmd, limit in steps:
            try:
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
            except subprocess.TimeoutExpired:
                return False, f"{why}; `{' '.join(cmd)}` timed out after {limit:.0f} s"
            if res.returncode != 0:
                tail = (res.stdout + res.stderr)[-600:]
                return False, f"{why}; `{' '.join(cmd)}` failed ({res.returncode}): {tail}"
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    missing = missing_programs()
    if missing:
        return False, f"still missing {', '.join(missing)} after installing the packages"
    return True, "installed " + " ".join(DEBIAN_PACKAGES)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal not found in /proc/meminfo")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class SlurmCluster:
    """A single-node SLURM cluster living in ``root`` (created if needed).

    Parameters
    ----------
    root
        Directory for every file of the cluster. Use a fresh temporary directory; the munge socket
        path must stay short (< ~100 characters).
    cpus
        CPUs of the node; default ``os.cpu_count()``. More than the machine has is allowed
        (``SlurmdParameters=config_overrides``): SLURM then oversubscribes the real cores, which
        suits tests whose jobs mostly wait on Python start-up.
    real_memory_mb
        Memory of the node; default 90 % of MemTotal (SLURM drains a node that declares more than
        it has).
    def_mem_per_cpu_mb
        Memory given to a job that requests none, per CPU.
    partition
        Name of the (default) partition.
    """

    root: Path
    cpus: int | None = None
    real_memory_mb: int | None = None
    def_mem_per_cpu_mb: int = 1000
    partition: str = "debug"
    cluster_name: str = "tmasktest"
    _started: list[tuple[str, Path]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.cpus = int(self.cpus or os.cpu_count() or 1)
        self.real_memory_mb = int(self.real_memory_mb or int(0.9 * _mem_total_mb()))
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin_dir = self.root / "bin"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"

    # ------------------------------------------------------------------ configuration
    def slurm_conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        """Return the ``slurm.conf`` for this cluster."""
        r = self.root
        return "\n".join([
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.run_dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.def_mem_per_cpu_mb}",
            "MinJobAge=3600",  # finished jobs stay visible to squeue/scontrol for an hour
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            *(["SlurmdParameters=config_overrides"]
              if self.cpus > (os.cpu_count() or 1) else []),
            "KillWait=5",
            "Waittime=0",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients: ``SLURM_CONF`` set and the wrapper directory first on PATH."""
        path = os.pathsep.join([str(self.bin_dir), str(Path(sys.executable).parent),
                                os.environ.get("PATH", "/usr/bin:/bin")])
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=path)

    def _write_wrappers(self) -> None:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in WRAPPED_CLIENTS:
            real = shutil.which(name, path="/usr/bin:/bin:/usr/local/bin")
            if real is None:
                continue
            wrapper = self.bin_dir / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}"\nexport SLURM_CONF\n'
                               f'exec "{real}" "$@"\n')
            wrapper.chmod(0o755)

    # ------------------------------------------------------------------ lifecycle
    def _run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)

    def _start_daemon(self, name: str, cmd: list[str], pid_file: Path, timeout: float = 20) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        self._started.append((name, pid_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(pid_file)
            if pid is not None and _alive(pid):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start (rc={res.returncode}): {res.stdout}{res.stderr}"
                           f"\n{self.logs_tail()}")

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node accepts jobs."""
        if os.geteuid() != 0:
            raise PermissionError("the SLURM test cluster runs its daemons as root")
        for d in (self.root / "etc", self.root / "state", self.root / "spool", self.log_dir,
                  self.run_dir, self.munge_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o711)
        # munge with its own key and socket
        key = self.munge_dir / "munge.key"
        res = subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}", "--force"],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"mungekey failed: {res.stderr}")
        key.chmod(0o600)
        self._start_daemon("munged", [
            _which("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ], self.run_dir / "munged.pid")
        # slurm
        self.conf.write_text(self.slurm_conf_text(_free_port(), _free_port()))
        self._write_wrappers()
        self._start_daemon("slurmctld", [_which("slurmctld"), "-f", str(self.conf)],
                           self.run_dir / "slurmctld.pid")
        self._start_daemon("slurmd", [_which("slurmd"), "-f", str(self.conf)],
                           self.run_dir / "slurmd.pid")
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until the node reports ``idle`` (or ``mixed``/``allocated``)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            res = self._run([str(self.bin_dir / "sinfo"), "-h", "-N", "-o", "%t"])
            last = (res.stdout + res.stderr).strip()
            if res.returncode == 0 and last.split() and last.split()[0] in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node not ready after {timeout} s (sinfo: {last!r})\n"
                           f"{self.logs_tail()}")

    def stop(self, timeout: float = 20) -> None:
        """Cancel remaining jobs, then stop the daemons we started, by their PID files.

        Jobs are cancelled first because a job step (``slurmstepd`` and its children) outlives
        ``slurmd`` and would otherwise be left running.
        """
        ctld = _read_pid(self.run_dir / "slurmctld.pid")
        if ctld is not None and _alive(ctld) and self.conf.exists():
            try:
                self._run([str(self.bin_dir / "scancel"), "--full", "--state=RUNNING"], timeout=10)
                self._run([str(self.bin_dir / "scancel"), "--state=PENDING"], timeout=10)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    res = self._run([str(self.bin_dir / "squeue"), "-h", "-t",
                                     "RUNNING,COMPLETING,PENDING", "-o", "%i"], timeout=10)
                    if res.returncode != 0 or not res.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for _name, pid_file in reversed(self._started):
            pid = _read_pid(pid_file)
            if pid is None or not _alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._started.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def jobs(self) -> list[dict[str, str]]:
        """All jobs slurmctld still remembers (``MinJobAge`` keeps finished ones), as dicts."""
        res = self._run([str(self.bin_dir / "scontrol"), "show", "job", "-o"])
        if res.returncode != 0 or "No jobs" in res.stdout:
            return []
        jobs = []
        for line in res.stdout.splitlines():
            rec = {}
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    rec.setdefault(k, v)
            if rec:
                jobs.append(rec)
        return jobs

    def logs_tail(self, n_chars: int = 3000) -> str:
        """The ends of the daemon logs, for error messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-n_chars:]}")
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Start a cluster in the given directory and keep it up until interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/slurm_harness.py DIRECTORY", file=sys.stderr)
        return 2
    ok, reason = ensure_slurm_installed()
    if not ok:
        print(reason, file=sys.stderr)
        return 1
    cluster = SlurmCluster(Path(argv[0]))
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin_dir}:$PATH")
        print("cluster up; ^C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
