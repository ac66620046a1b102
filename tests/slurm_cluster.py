"""A real local Slurm cluster for the tests: a session fixture and bounded helpers around it.

`slurm_cluster` installs the Debian packages if needed (slurm/cluster/install.sh), starts munge,
MariaDB + slurmdbd, slurmctld and two slurmd nodes (n1, n2, gpu:2 each) with slurm/cluster/start.sh
in a temporary directory, points SLURM_CONF at it for the session, and at the end stops every daemon
by its pid (slurm/cluster/stop.sh) and checks that none is left. Every wait here is bounded: a hang
fails a test instead of CI.

Skipped, with the reason, where Slurm cannot run (not root, no apt-get to install it); under CI=true
that is a failure instead.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPTS = REPO / "slurm" / "cluster"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm test cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"Slurm test cluster unavailable: {reason}")


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


@dataclass
class SlurmCluster:
    """Handle on the running test cluster; commands use its SLURM_CONF (also set in os.environ)."""
    dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, **kwargs) -> str:
        result = _run(list(cmd), timeout, env=self.env, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, *args: str, cwd: Path | str = REPO) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} once forgotten."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        info = {}
        for field in out.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)
        return info

    def is_over(self, job_id: str) -> bool:
        """In a final state (a requeued job passes through REQUEUED/PENDING, which are not)."""
        return self.job(job_id).get("JobState") in TERMINAL_STATES

    def wait_until(self, predicate, timeout: float, what, interval: float = 0.5):
        """Poll `predicate()` until it returns something truthy; fail the test after `timeout` s.
        `what` (a string, or a function giving one at that moment) says what was awaited."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                what = what() if callable(what) else what
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}",
                            pytrace=False)
            time.sleep(interval)

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job is over (any terminal state); cancel it and fail on timeout."""
        def over():
            info = self.job(job_id)
            return info if info.get("JobState") in TERMINAL_STATES else None

        try:
            return self.wait_until(over, timeout, f"job {job_id} to end")
        except pytest.fail.Exception:
            self.run("scancel", job_id, check=False)
            raise

    def diagnostics(self) -> str:
        queue = self.run("squeue", "-o", "%i %j %T %r %M %N", check=False)
        log = self.dir / "log" / "slurmctld.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        return f"squeue:\n{queue}\nslurmctld.log (tail):\n{tail}"

    def task_pids(self, job_id: str, procid: int) -> list[int]:
        """Pids of the job's processes that are task `procid` (read from /proc: every node is local)."""
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                env = dict(item.split("=",
                                      1) for item in environ.read_bytes().decode(errors="replace").split("\0")
                           if "=" in item)
            except OSError:
                continue
            if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid) \
                    and "SLURM_STEP_ID" in env and env.get("SLURM_STEP_ID") != "batch":
                pids.append(int(environ.parent.name))
        return pids


def _free_port_base(first: int = 16817, ports: int = 5, tries: int = 20) -> int:
    """First of `ports` consecutive ports nothing listens on (start.sh's five), so a cluster left
    running elsewhere on the default ports does not stop this one."""
    def listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    for base in range(first, first + 10 * tries, 10):
        if not any(listening(port) for port in range(base, base + ports)):
            return base
    pytest.fail(f"no {ports} consecutive free ports in {first}..{first + 10 * tries}")


def _daemon_pids(cluster_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text().strip()) for p in (cluster_dir / "pids").glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waiting for init is gone for us


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    if os.geteuid() != 0:
        _unavailable("the test cluster's daemons and jobs run as root; run the tests as root")
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin
    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd")
               if not shutil.which(exe, path=path)]
    if missing:
        if shutil.which("apt-get") is None:
            _unavailable(f"{', '.join(missing)} not installed and there is no apt-get to install them")
        result = _run(["bash", str(CLUSTER_SCRIPTS / "install.sh")], timeout=600)
        if result.returncode != 0:
            pytest.fail(f"slurm/cluster/install.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    cluster_dir = tmp_path_factory.mktemp("slurm-cluster")
    env = {**os.environ, "MGN_SLURM_PORT_BASE": str(_free_port_base())}
    result = _run(["bash", str(CLUSTER_SCRIPTS / "start.sh"), str(cluster_dir)], timeout=180, env=env)
    pids = _daemon_pids(cluster_dir)
    try:
        if result.returncode != 0:
            pytest.fail(f"slurm/cluster/start.sh failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
        try:
            yield SlurmCluster(cluster_dir)
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
    finally:
        stop = _run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(cluster_dir)], timeout=180)
        survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
        for pid in survivors.values():  # last resort, still by pid
            os.kill(pid, 9)
        if stop.returncode != 0 or survivors:
            pytest.fail(f"stopping the Slurm test cluster left {survivors or 'processes'}:\n"
                        f"{stop.stdout}\n{stop.stderr}")
