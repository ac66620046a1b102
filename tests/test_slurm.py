"""The Slurm launch paths against a real local cluster (two nodes x two ranks, CPU only).

  * `sbatch slurm/train.sh`: the job completes with 4 ranks, checkpoints and TensorBoard logs.
  * a job whose rank on the second node gets Slurm's warning signal (USR2) requeues itself, and a job
    requeued from outside (`scontrol requeue`) saves and comes back; both resume and end on the
    uninterrupted step count.
  * `slurm/submit.py` (submitit): interrupted with submitit's `_interrupt()` (SIGTERM then USR2 to
    every task, as Slurm delivers them), the job requeues, resumes and its result comes back.
  * a rank that dies takes the job down at once, with the error in the log, instead of a hang.

The cluster comes from tests/slurm_cluster.py; every wait is bounded. Without a cluster, one test checks
the job script that `slurm/submit.py` builds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from slurm_cluster import SlurmCluster

pytest_plugins = ["slurm_cluster"]  # the session fixture `slurm_cluster` (tests/slurm_cluster.py)
REPO = Path(__file__).resolve().parent.parent

# Two nodes x two tasks, fake GPUs; the tiny preset: 1 epoch, 9 updates of 4 ranks x 8 samples.
SBATCH_WORLD = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 300  # a whole job, restarts included; far above the ~1-2 min these take


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Shards shared by every run here (at least one per rank), and a folder for the runs."""
    from mgn.data.writer import write_synthetic

    root = tmp_path_factory.mktemp("slurm-runs")
    write_synthetic(root / "shards", samples=320, image_size=64, seed=0, max_samples=32)
    return root


def train_args(work: Path, *extra: str) -> list[str]:
    """train.py flags shared by every run, so step counts compare. The test cluster allocates GPUs (gres) on
    nodes without CUDA: the run must say it trains on the CPU on purpose (a GPU job without CUDA is refused
    otherwise)."""
    return ["--preset", "tiny", "--train.device", "cpu", "--data.train_shards",
            str(work / "shards" / "train-*.tar"),
            "--data.test_shards", str(work / "shards" / "test-*.tar"), "--data.synthetic_samples", "0",
            "--train.log_every", "1", "--train.output_dir", str(work / "runs"), *extra]


def submit_train_sh(cluster: SlurmCluster, work: Path, name: str, *sbatch: str) -> tuple[str, Path]:
    """sbatch slurm/train.sh as a user would (logs in the run dir); returns (job id, run dir)."""
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    job_id = cluster.sbatch(f"--job-name={name}", *SBATCH_WORLD, "--time=10",
                            f"--output={run_dir}/slurm-%j.out",
                            f"--error={run_dir}/slurm-%j.err", *sbatch, "slurm/train.sh", *train_args(work))
    return job_id, run_dir


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_line(cluster: SlurmCluster, path: Path, pattern: str, job_id: str, timeout: float = 180,
                  start: int = 0) -> re.Match:
    """First match of `pattern` in the log at `path` after character `start`; fails at once if the
    job ends first."""
    def found():
        match = re.search(pattern, read(path)[start:], re.MULTILINE)
        if match or not cluster.is_over(job_id):
            return match
        match = re.search(pattern, read(path)[start:], re.MULTILINE)  # written just before the end?
        if not match:
            info = cluster.job(job_id)
            pytest.fail(f"job {job_id} ended ({info.get('JobState')}, restarts {info.get('Restarts')}) "
                        "before "
                        f"/{pattern}/ appeared in {path}\n--- log tail ---\n{read(path)[-3000:]}",
                        pytrace=False)
        return match

    return cluster.wait_until(found, timeout, lambda: f"/{pattern}/ in {path}\n--- log tail "
                                                      f"---\n{read(path)[-2000:]}")


def steps_of(run_dir: Path) -> int:
    return json.loads((run_dir / "summary.json").read_text())["step"]


def world_sizes_in(log: str) -> set[str]:
    """World sizes rank 0 reported after every rank joined the process group (from Slurm's variables
    under sbatch, from the RANK/WORLD_SIZE that submitit's helper sets under submitit)."""
    return set(re.findall(r"\[rank 0\] MGN: (\d+) rank\(s\) from (?:slurm|launcher),", log))


def latest_tag(run_dir: Path) -> str:
    return read(run_dir / "checkpoints" / "latest").strip()


@pytest.fixture(scope="module")
def reference(slurm_cluster, work) -> dict:
    """An uninterrupted `sbatch slurm/train.sh` run; later tests compare their step counts to it."""
    job_id, run_dir = submit_train_sh(slurm_cluster, work, "reference")
    info = slurm_cluster.wait_job(job_id, JOB_TIMEOUT_S)
    return {"job": job_id, "info": info, "run_dir": run_dir, "out": read(run_dir / f"slurm-{job_id}.out"),
            "err": read(run_dir / f"slurm-{job_id}.err")}


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_two_nodes_four_ranks_complete_with_checkpoint_and_tensorboard(reference):
    run_dir, out = reference["run_dir"], reference["out"]
    assert reference["info"]["JobState"] == "COMPLETED", out[-3000:] + reference["err"][-3000:]
    assert re.search(r"MGN slurm: world nodes=2 \(n\[1-2\]\) ranks=4 .* master=n1:\d+", out), out[:2000]
    assert world_sizes_in(out) == {"4"}
    assert re.search(r"^\S+ \[rank 0\] MGN: done step=\d+", out, re.MULTILINE)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["step"] > 0
    assert latest_tag(run_dir) == f"step_{summary['step']:08d}"
    assert (run_dir / "checkpoints" / latest_tag(run_dir)).is_dir()
    assert list((run_dir / "tb" / run_dir.name).glob("events.out.tfevents.*"))
    assert (run_dir / "config.json").exists() and (run_dir / "train.log").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_signal_requeues_itself_and_outside_requeue_resumes_to_the_same_steps(slurm_cluster, work,
                                                                                     reference):
    """USR2 to one rank on the other node: all ranks agree, save, rank 0 requeues, the job resumes.
    Then `scontrol requeue` from outside (SIGTERM to the tasks): save, stop, Slurm restarts it, resume."""
    cluster = slurm_cluster
    job_id, run_dir = submit_train_sh(cluster, work, "requeued")
    out = run_dir / f"slurm-{job_id}.out"

    wait_for_line(cluster, out, r"\[rank 0\] MGN: step 3/", job_id)
    rank2 = cluster.task_pids(job_id, procid=2)  # on n2; `scancel --signal=USR2` would reach every rank
    assert rank2, "rank 2's process not found"
    for pid in rank2:
        os.kill(pid, signal.SIGUSR2)
    second_start = wait_for_line(cluster, out, rf"MGN slurm: job {job_id} 'requeued' start 2 ", job_id).end()
    first_stop = read(out)[:second_start]
    assert ("stop requested by signal" in first_stop
            and "requeueing Slurm job" in first_stop), first_stop[-3000:]
    resumed = wait_for_line(cluster, out, r"MGN: resumed from \S+/step_(\d+)", job_id, start=second_start)
    assert int(resumed.group(1)) >= 3

    wait_for_line(cluster, out, rf"\[rank 0\] MGN: step {int(resumed.group(1)) + 2}/", job_id,
                  start=second_start)
    cluster.run("scontrol", "requeue", job_id)
    third_start = wait_for_line(cluster, out, rf"MGN slurm: job {job_id} 'requeued' start 3 ", job_id).end()
    second_stop = read(out)[second_start:third_start]
    assert "stop requested by signal" in second_stop, second_stop[-3000:]
    resumed_again = wait_for_line(cluster, out, r"MGN: resumed from \S+/step_(\d+)", job_id,
                                  start=third_start)
    assert int(resumed_again.group(1)) > int(resumed.group(1))

    info = cluster.wait_job(job_id, JOB_TIMEOUT_S)
    log = read(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", \
        log[-3000:] + read(out.with_suffix(".err"))[-2000:]
    assert steps_of(run_dir) == steps_of(reference["run_dir"])
    assert world_sizes_in(log[third_start:]) == {"4"}


def load_submit_module():
    spec = importlib.util.spec_from_file_location("mgn_slurm_submit", REPO / "slurm" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_submit_py_gives_each_rank_its_cpus_through_srun_too(tmp_path, sbatch_script):
    """srun does not inherit --cpus-per-task from the job (Slurm >= 22.05): the job's srun passes it."""
    submit = load_submit_module()
    args = submit.build_parser().parse_args([
        "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--time", "60", "--preset", "tiny",
        "--train.output_dir", str(tmp_path), "--train.run_name", "cpus"])
    script = sbatch_script(submit.build_executor(submit.job_config(args), args))
    assert "#SBATCH --cpus-per-task=6\n" in script and "#SBATCH --ntasks-per-node=4\n" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=6" in srun.split() and "--kill-on-bad-exit=1" in srun.split()


def test_the_launchers_leave_a_ranks_thread_count_to_train_py(tmp_path, sbatch_script):
    """Both launchers once exported OMP_NUM_THREADS = --cpus-per-task, which train.py obeys before its own
    rule (a GPU rank's CPUs minus its loader workers): 8 torch threads beside 6 workers on 8 CPUs. train.sh
    runs here with stand-ins for srun and scontrol that record what a task would be started with."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun-args\n"
                                  f"env > {tmp_path}/task-env\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("SLURM_")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "mgn",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "8",
            "SLURM_TASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "MGN_REPO": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "--preset", "tiny"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--cpus-per-task=8" in (tmp_path / "srun-args").read_text().split()
    task_env = dict(line.split("=", 1) for line in (tmp_path / "task-env").read_text().splitlines()
                    if "=" in line)
    assert "OMP_NUM_THREADS" not in task_env and task_env["SLURM_CPUS_PER_TASK"] == "8"

    submit = load_submit_module()
    args = submit.build_parser().parse_args(["--nodes", "1", "--gpus-per-node", "8", "--cpus-per-task", "8",
                                             "--train.output_dir", str(tmp_path), "--train.run_name", "t"])
    assert "OMP_NUM_THREADS" not in sbatch_script(submit.build_executor(submit.job_config(args), args))


@pytest.mark.slow
@pytest.mark.slurm
def test_submitit_job_interrupted_requeues_resumes_and_returns_its_result(slurm_cluster, work, reference,
                                                                          monkeypatch):
    # sbatch exports the submitting shell's environment: rank variables left there (CI's had MASTER_PORT) once
    # made submitit refuse to export the job's own, and every rank failed at its start
    monkeypatch.setenv("MASTER_PORT", "54243")
    monkeypatch.setenv("RANK", "0")
    submit = load_submit_module()
    args = submit.build_parser().parse_args([
        "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "10",
        *train_args(work, "--train.run_name", "submitit")])
    cfg = submit.job_config(args)
    job = submit.submit(cfg, args)
    try:
        rank0_log = cfg.run_dir / "submitit" / f"{job.job_id}_0_log.out"
        wait_for_line(slurm_cluster, rank0_log, r"\[rank 0\] MGN: step 3/", job.job_id)
        job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
        restarted = slurm_cluster.wait_until(lambda: slurm_cluster.job(job.job_id).get("Restarts") == "1",
                                             120,
                                             f"submitit job {job.job_id} to requeue")
        assert restarted
        slurm_cluster.wait_until(lambda: job.done(force_check=True), JOB_TIMEOUT_S, "submitit job "
                                                                                    f"{job.job_id}",
                                 interval=2)
        results = job.results()  # done: returns at once
    finally:
        if not job.done():
            job.cancel(check=False)
    logs = "".join(read(cfg.run_dir / "submitit" / f"{job.job_id}_{t}_log.out") for t in range(4))
    assert "MGN: resumed from" in logs, logs[-3000:]
    assert world_sizes_in(logs) == {"4"}
    assert len(results) == 4 and results[0]["world_size"] == 4 and not results[0]["preempted"]
    assert results[0]["step"] == steps_of(reference["run_dir"]) == steps_of(cfg.run_dir)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_crashed_rank_fails_the_job_at_once_with_the_error_in_the_log(slurm_cluster, work):
    cluster = slurm_cluster
    job_id, run_dir = submit_train_sh(cluster, work, "crash")
    out, err = run_dir / f"slurm-{job_id}.out", run_dir / f"slurm-{job_id}.err"
    wait_for_line(cluster, out, r"\[rank 0\] MGN: step 2/", job_id)
    victims = cluster.task_pids(job_id, procid=1)
    assert victims, "rank 1's process not found"
    killed_at = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # The trainer's collective timeout is 120 s (tiny preset): ending well before it means srun stopped
    # the other ranks, not a timeout.
    info = cluster.wait_job(job_id, 60)
    assert time.monotonic() - killed_at < 60
    assert info["JobState"] == "FAILED"
    log = read(err)
    assert re.search(r"srun: error: n1: task 1: Killed", log), log[-3000:]
    assert "MGN slurm: FAILED: srun exited with status" in log
    assert not (run_dir / "summary.json").exists()
