"""Stopping on a signal with a checkpoint first: Slurm's warning (save and requeue), a cancellation or Ctrl-C
(save and stop), shared by train.py, the sbatch and the submitit paths.

Slurm (sbatch `--signal`, or submitit's USR2) signals before the time limit or on preemption,
often to one rank only, while DeepSpeed's save is collective. So the handler only sets a flag;
the train loop asks all ranks at each update (mgn/train/loop.py), all ranks save, and
rank 0 requeues the job with `requeue_slurm_job` (train.py for sbatch, slurm/submit.py for submitit:
`install` replaces submitit's own USR2 handler, which would requeue before the collective save).
Ctrl-C is a stop like SIGTERM; a second Ctrl-C stops at once, without saving. A stopped run ends with
`exit_code`: EXIT_STOPPED, unless Slurm will continue it.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess

from mgn.cli import EXIT_STOPPED, REQUEUE_SIGNALS, STOP_SIGNALS

log = logging.getLogger("mgn")


_received: list[str] = []
_installed_in = 0  # the pid of the process that installed the handler (forked children inherit it)
_previous: dict[str, object] = {}  # each signal's handler before install(), put back by restore()


def install() -> None:
    """Take the run's signals over (a run's start); forget the signals of an earlier run in this process."""
    global _installed_in
    _installed_in = os.getpid()
    _received.clear()
    for name in REQUEUE_SIGNALS + STOP_SIGNALS:
        _previous[name] = signal.signal(getattr(signal, name), _handler)


def restore() -> None:
    """Give the signals back as they were before install() (a run's end; received() still tells what came):
    a process that goes on after an in-process run (a notebook, a test session) gets its Ctrl-C and SIGTERM
    back."""
    for name, handler in _previous.items():
        signal.signal(getattr(signal, name), handler)
    _previous.clear()


def _handler(signum, _frame) -> None:
    """Record the signal, then say so. Recorded first: a second Ctrl-C may arrive as soon as the first line is
    out, and CPython runs a handler again inside the running one, so one that spoke before recording took
    the second Ctrl-C for a first and saved.

    A forked child inherits this handler until it sets its own. Ctrl-C reaches the whole process group, and
    the run's process speaks and acts for it: the child stays silent (a loader worker before its start
    ignores the run's signals). Any other signal is meant for the child itself (a pool's terminate, torch
    ending a worker): it gets what the signal did before install(), so it does not live on, ignored, while
    its parent waits for it."""
    name = signal.Signals(signum).name
    if os.getpid() != _installed_in:
        if name != "SIGINT":
            _as_before_install(signum, name)
        return
    again = name == "SIGINT" and name in _received
    _received.append(name)
    if again:  # said at once, on the terminal that pressed it (os.write: safe in a handler)
        os.write(2, b"MGN: Ctrl-C again: stopping now, without saving (checkpoints already written "
                    b"stay)\n")
        _end_children()
        os._exit(EXIT_STOPPED)
    if name == "SIGINT":
        os.write(2, b"MGN: Ctrl-C: saving a checkpoint at the end of this update, then stopping "
                    b"(Ctrl-C again stops at once, without saving)\n")


def _end_children() -> None:
    """Before the run's process ends at once: end its loader workers first. A worker that was handing a batch
    over when its reader vanished printed a ConnectionResetError traceback (seen in CI); they hold nothing
    a stop without saving would keep."""
    try:
        children = multiprocessing.active_children()
    except Exception:  # inside the handler: whatever multiprocessing was doing, the stop goes on
        return
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except OSError:
            pass


def _as_before_install(signum: int, name: str) -> None:
    previous = _previous.get(name, signal.SIG_DFL)
    if callable(previous):
        previous(signum, None)
    elif previous != signal.SIG_IGN:  # the default action (SIGTERM, SIGUSR1/2: the process ends)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def received() -> str:
    """The signals this process got, in order, for the log (e.g. 'SIGINT')."""
    return ", ".join(dict.fromkeys(_received)) or "none"


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


def exit_code(summary: dict | None) -> int:
    """How train.py ends: 0 for a finished run, and for one that Slurm continues (every rank, since srun
    --kill-on-bad-exit would stop rank 0 before its requeue if another rank exited non-zero); EXIT_STOPPED for
    a run a signal stopped before its end, so that `train.py && evaluate.py` does not go on with it."""
    if not requeue_if_asked(summary):
        return 0
    return 0 if summary.get("requeue") and os.environ.get("SLURM_JOB_ID") else EXIT_STOPPED


def requeue_if_asked(summary: dict | None) -> bool:
    """The ending of a run that a signal stopped (every launcher's): rank 0 requeues the Slurm job when the
    signal asked for it (a SIGTERM means Slurm itself is cancelling or requeueing). True when the run was
    stopped, so that the caller ends without reporting a result: that would tell a submitter the job is
    over."""
    if not summary or not summary.get("preempted"):
        return False
    if summary.get("requeue") and summary.get("rank", 0) == 0:
        requeue_slurm_job()
    return True
