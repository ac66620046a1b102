"""Save-and-requeue on Slurm's warning signal, shared by the sbatch and submitit paths.

Slurm (sbatch `--signal`, or submitit's USR2) signals before the time limit or on preemption,
often to one rank only, while DeepSpeed's save is collective. So the handler only sets a flag;
the train loop asks all ranks at each step boundary (`distributed.any_rank`), all ranks save, and
rank 0 requeues the job with `requeue_slurm_job` (train.py for sbatch, slurm/submit.py for submitit:
`install` replaces submitit's own USR2 handler, which would requeue before the collective save).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger("mgn")

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")  # time limit / preemption warning: save and come back
STOP_SIGNALS = ("SIGTERM",)  # cancellation: save and stop

_received: list[str] = []


def install() -> None:
    for name in REQUEUE_SIGNALS + STOP_SIGNALS:
        signal.signal(getattr(signal, name), _handler)


def _handler(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)


def requested() -> bool:
    """True once this process got a signal; agree across ranks before acting on it."""
    return bool(_received)


def wants_requeue() -> bool:
    return any(name in REQUEUE_SIGNALS for name in _received)


def requeue_slurm_job() -> None:
    """Put this Slurm job back in the queue (the next run resumes with --train.resume auto)."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.warning("MGN: requeue asked for outside Slurm; exiting without requeue")
        return
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    log.info("MGN: requeueing Slurm job %s", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def requeue_if_asked(summary: dict | None) -> bool:
    """The ending of a run that a signal stopped (every launcher's): rank 0 requeues the Slurm job when the
    signal asked for it (a SIGTERM means Slurm itself is cancelling or requeueing). True when the run was
    stopped, so that the caller ends without reporting a result: that would tell a submitter the job is over."""
    if not summary or not summary.get("preempted"):
        return False
    if summary.get("requeue") and summary.get("rank", 0) == 0:
        requeue_slurm_job()
    return True
