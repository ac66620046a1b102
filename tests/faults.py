"""Fault injection for the tests, through the seam a run takes (mgn.train.loop.run's `faults`), installed by
tests/fault_train.py, which runs train.py with it, from these variables of the environment:

    MGN_INJECT_NAN="STEP[:RANK],..."   the loss of that rank (every rank when none is given) becomes NaN at
                                       the micro-batches of update STEP
    MGN_KEY_LEDGER=PATH                each rank appends "STEP key key ..." to PATH.rank<N>: the samples
                                       behind each update (the resume tests compare two runs' ledgers)
    MGN_INJECT_LR_SPIKE="STEP:FACTOR"  the learning rates of update STEP are multiplied by FACTOR, once per
                                       process (a loss spike as a rollback meets it; the schedule sets the
                                       next update's)
    MGN_FAIL_SAVE=RANK                 every file DeepSpeed writes for a checkpoint on that rank fails
                                       (ENOSPC), as a full disk or a quota on one node would
    MGN_SLOW_SAVE=SECONDS              every file DeepSpeed writes for a checkpoint waits that long first (a
                                       slow file system: a second Ctrl-C then always comes during the save)

Unset, `FaultInjection.from_environment` returns None and the run has no seam.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass


@dataclass
class FaultInjection:
    nan_at: set[int]
    ledger: str  # '' = no ledger
    lr_spikes: dict[int, float]  # update -> factor; each fires once
    fail_save: bool = False  # this rank's checkpoint writes fail
    slow_save_s: float = 0.0  # each checkpoint write waits this long first

    @classmethod
    def from_environment(cls, rank: int, env: dict[str, str] | None = None) -> "FaultInjection | None":
        env = os.environ if env is None else env
        nan_at = set()
        for item in filter(None, env.get("MGN_INJECT_NAN", "").split(",")):
            step, _, only = item.partition(":")
            if not only or int(only) == rank:
                nan_at.add(int(step))
        ledger = f"{env['MGN_KEY_LEDGER']}.rank{rank}" if env.get("MGN_KEY_LEDGER") else ""
        spikes = dict(item.split(":") for item in filter(None, env.get("MGN_INJECT_LR_SPIKE", "").split(",")))
        lr_spikes = {int(step): float(factor) for step, factor in spikes.items()}
        fail_save = env.get("MGN_FAIL_SAVE", "") == str(rank)
        slow_save_s = float(env.get("MGN_SLOW_SAVE", 0))
        wanted = nan_at or ledger or lr_spikes or fail_save or slow_save_s
        return cls(nan_at, ledger, lr_spikes, fail_save, slow_save_s) if wanted else None

    def install(self, engine) -> None:
        """Before training: make this rank's checkpoint writes fail, or slow, when asked."""
        if self.fail_save:
            def full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device (injected by MGN_FAIL_SAVE)")
            engine.checkpoint_engine.save = full_disk
        if self.slow_save_s:
            write = engine.checkpoint_engine.save

            def slow_disk(*args, **kwargs):
                time.sleep(self.slow_save_s)
                return write(*args, **kwargs)
            engine.checkpoint_engine.save = slow_disk

    def __call__(self, step: int, output, batch: dict, optimizer) -> None:
        """At a micro-batch of update `step`: poison the loss, spike the learning rates, record the
        samples."""
        if step in self.nan_at:
            output.loss = output.loss * float("nan")
        factor = self.lr_spikes.pop(step, None)
        if factor is not None:
            for group in optimizer.param_groups:
                group["lr"] *= factor
        if self.ledger:
            with open(self.ledger, "a") as f:
                f.write(f"{step} {' '.join(batch['key'])}\n")
