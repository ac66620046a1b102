"""Fault injection for the tests, through one seam the training loop calls once per micro-batch.

    MGN_INJECT_NAN="STEP[:RANK],..."   the loss of that rank (every rank when none is given) becomes NaN at the
                                       micro-batches of update STEP
    MGN_KEY_LEDGER=PATH                each rank appends "STEP key key ..." to PATH.rank<N>: the samples behind
                                       each update (the resume tests compare two runs' ledgers)
    MGN_INJECT_LR_SPIKE="STEP:FACTOR"  the learning rates of update STEP are multiplied by FACTOR, once per process
                                       (a loss spike as a rollback meets it; the schedule sets the next update's)

Unset (every real run), `FaultInjection.from_environment` returns None and the loop does nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class FaultInjection:
    nan_at: set[int]
    ledger: str  # '' = no ledger
    lr_spikes: dict[int, float]  # update -> factor; each fires once

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
        return cls(nan_at, ledger, lr_spikes) if nan_at or ledger or lr_spikes else None

    def __call__(self, step: int, output, batch: dict, optimizer) -> None:
        """At a micro-batch of update `step`: poison the loss, spike the learning rates, record the samples."""
        if step in self.nan_at:
            output.loss = output.loss * float("nan")
        factor = self.lr_spikes.pop(step, None)
        if factor is not None:
            for group in optimizer.param_groups:
                group["lr"] *= factor
        if self.ledger:
            with open(self.ledger, "a") as f:
                f.write(f"{step} {' '.join(batch['key'])}\n")
