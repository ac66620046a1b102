"""What a diverged run does (`train.on_divergence`): stop with one clear message, or roll back and go on.

    stop      the Diverged error goes up to train.py: one line naming the step, what went non-finite, the last
              verified checkpoint and the command to resume from it with a lower learning rate; exit code 3
    rollback  PaLM's remedy for loss spikes (Chowdhery et al. 2022, section 5.1): load the newest verified
              checkpoint, skip the batches read since it (they led to the divergence) plus
              `rollback_skip_updates` more, optionally scale the learning rates, and go on; at most
              `max_rollbacks` times. Inside the job: no requeue, no new process.

The skipped samples are recorded per rank in `<run>/rollbacks/rollback_<n>.rank<r>.txt` (one key per line),
and each rollback in the TrainState (saved in later checkpoints and in summary.json) and TensorBoard.
Checkpoints hold no non-finite tensor (`UpdateGuard.check_model` refuses them) and none is written during a
run of skipped updates, so the newest verified one predates the divergence.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from mgn import distributed
from mgn.checkpoint import store
from mgn.checkpoint.store import TrainState
from mgn.config import Config
from mgn.train.guard import Diverged
from mgn.io.line_files import append_lines

log = logging.getLogger("mgn")


class Recovery:
    """The samples read since the last checkpoint, and the rollback itself."""

    def __init__(self, cfg: Config, rank: int):
        self.cfg, self.rank = cfg, rank
        self.ckpt_dir, self.paths = cfg.paths.checkpoints, cfg.paths
        self.keys_since_save: list[str] = []
        self.to_pass_over = 0  # micro-batches still to be read without training after a rollback
        self.keys_file: Path | None = None

    def read(self, keys: list[str]) -> None:
        """A micro-batch was trained on: remember its samples until the next checkpoint (only a run that may
        roll back needs them)."""
        if self.cfg.train.on_divergence == "rollback":
            self.keys_since_save.extend(keys)

    def saved(self) -> None:
        self.keys_since_save.clear()

    def passes_over(self, keys: list[str]) -> bool:
        """Whether this micro-batch is one of the margin after a rollback: read (its keys recorded), not
        trained."""
        if self.to_pass_over <= 0:
            return False
        self.to_pass_over -= 1
        self._record(keys)
        return True

    def roll_back(self, failure: Diverged, engine, state: TrainState, world_size: int) -> TrainState:
        """Every rank: the state to go on from after `failure`, or `failure` raised again when the run must
        stop (on_divergence=stop, no rollbacks left, or no verified checkpoint to go back to)."""
        train = self.cfg.train
        if train.on_divergence != "rollback":
            raise failure
        if len(state.rollbacks) >= train.max_rollbacks:
            raise Diverged(f"{failure} (train.max_rollbacks={train.max_rollbacks} rollbacks already made: "
                           f"stopping)") from failure
        tag = distributed.gather_objects(self._newest_intact_tag() if self.rank == 0 else None)[0]
        if tag is None:
            raise Diverged(f"{failure} (no verified checkpoint to roll back to yet)") from failure
        restored = store.load(engine, self.ckpt_dir, tag.name, rank=self.rank, world_size=world_size,
                                   cfg=self.cfg)
        number = len(state.rollbacks) + 1
        record = {"number": number, "at_step": state.step if failure.step is None else failure.step,
                  "reason": str(failure).split(". ")[0],
                  "to_checkpoint": str(tag), "resumed_step": restored.step,
                  "skipped_micro_batches": (state.step - restored.step) * train.grad_accum,
                  "margin_micro_batches": train.rollback_skip_updates * train.grad_accum,
                  "lr_scale": state.lr_scale * train.rollback_lr_scale,
                  "keys": str(self.paths.rollback_keys(number, "*"))}
        self.keys_file = self.paths.rollback_keys(number, self.rank)
        self._record(self.keys_since_save)
        self.keys_since_save = []
        self.to_pass_over = record["margin_micro_batches"]
        log.warning("MGN: rollback %d/%d: %s; back to %s (step %d), skipping the %d micro-batches read since "
                    "it and "
                    "%d more, learning rates x %g; skipped keys in %s", number, train.max_rollbacks,
                    record["reason"], tag, restored.step, record["skipped_micro_batches"],
                    record["margin_micro_batches"], record["lr_scale"], record["keys"])
        # Weights, optimizer and schedule from the checkpoint; the data position from the failure, so the
        # batches that led there are not read again; the counts of what happened since stay.
        return replace(restored, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch,
                       skipped_steps=state.skipped_steps, consecutive_skips=0, lr_scale=record["lr_scale"],
                       rollbacks=[*state.rollbacks, record], train_seconds=state.train_seconds)

    def _newest_intact_tag(self) -> Path | None:
        """Rank 0's choice, which every rank then loads: ranks that each listed the folder could disagree (a
        stale listing on a shared filesystem), load different weights, and ZeRO-0 never broadcasts them
        again."""
        try:
            return store.newest_intact_tag(self.ckpt_dir) if store.has_checkpoints(self.ckpt_dir) else None
        except store.CheckpointError:
            return None

    def _record(self, keys: list[str]) -> None:
        if self.keys_file is None or not keys:
            return
        append_lines(self.keys_file, keys)  # a resumed run may append to the file a crash cut
