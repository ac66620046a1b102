"""The training run: setup, one visible loop, evaluation, checkpoints, the exported student.

    run(cfg) -> summary dict
      distributed setup -> model -> DeepSpeed engine -> (resume) -> for each epoch:
        for each micro-batch: forward, loss, backward, step; at each update: log, evaluate, checkpoint as due;
        stop cleanly (checkpoint first) when any rank got a stop signal
      final checkpoint -> final student export -> summary.json

An update costs the host no wait for the device: whether it was skipped (a non-finite loss, gradient or
BatchNorm statistic on any rank) and whether a rank was signalled are decided on the device, and the host
reads those flags one update late (mgn.devices.HostCopy), or at once before anything that must know them (an
evaluation, a checkpoint, the end of an epoch).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mgn import devices, distributed
from mgn.checkpoint import store
from mgn.train import preemption, run_folder, text_blocks
from mgn.checkpoint.read import init_student
from mgn.data.captions import read_report, report_run
from mgn.checkpoint.store import TrainState
from mgn.config import Config
from mgn.data.loader import build_loader
from mgn.data.decode import ModelInputs, image_normalisation
from mgn.train.engine import apply_learning_rates, autocast, build_engine, precision
from mgn.model.export import ARTIFACT_NAME, export_student
from mgn.train.guard import Diverged, UpdateFlags, UpdateGuard
from mgn.train.monitor import (
    Progress,
    StepTimer,
    TensorBoard,
    done_line,
    log_balance,
    setup_logging,
    size_line,
    log_training,
)
from mgn.model.objectives import Objective, build_objective
from mgn.train.evaluation import RunEvaluation
from mgn.train.recovery import Recovery

log = logging.getLogger("mgn")


class Faults(Protocol):
    """The tests' seam into a run (tests/faults.py): a NaN loss, a learning-rate spike, a failing disk, a
    ledger of the samples behind each update. Installed by the caller of `run`, never read from the
    environment here."""

    def install(self, engine) -> None:
        """Once, when the engine is built."""

    def __call__(self, step: int, output, batch: dict, optimizer) -> None:
        """At every micro-batch of update `step`, after its forward."""


def run(cfg: Config, *, faults: Faults | None = None) -> dict:
    """Train as configured; every rank calls this. Returns the run summary (rank 0's view).

    The process group is this call's when it starts it, and then taken down at the end; a caller that runs
    several trainings in one process (the comparison's stages: DeepSpeed cannot build its groups twice) starts
    it first (mgn.distributed.init_distributed) and keeps it. `faults`: the tests' seam (tests/faults.py).
    """
    world = distributed.detect_world()
    ours = not distributed.is_initialized()
    device = distributed.init_distributed(world, cfg.train.dist_timeout_s, cfg.train.device)
    threads = distributed.set_threads(world, cfg.data.num_workers, device)
    devices.configure_kernels(device, cfg.train.deterministic)
    lock = None
    try:
        # rank 0 creates a new folder named after its clock; every rank writes there
        if not cfg.train.run_name:
            cfg.train.run_name = distributed.gather_objects(run_folder.new_run_name(cfg) if world.is_main
                                                            else None)[0]
        store.check_resume_allowed(cfg)
        # rank 0 holds it for the run; every rank stops if another does
        lock = run_folder.RunLock(cfg.paths.lock)
        took_over = distributed.gather_objects(_acquire(lock) if world.is_main else None)[0]
        if isinstance(took_over, run_folder.RunFolderBusy):
            raise took_over
        return _run(cfg, world, device, threads, took_over, faults)
    finally:
        if lock is not None:
            lock.release()
        if ours:
            distributed.shutdown()


def _acquire(lock: run_folder.RunLock) -> str | None | run_folder.RunFolderBusy:
    try:
        return lock.acquire()
    except run_folder.RunFolderBusy as busy:
        return busy


def _run(cfg: Config, world: distributed.World, device: torch.device, threads: str, took_over: str | None,
         faults: Faults | None) -> dict:
    """The run in its locked folder: logging, the saved config, the demo's shards, then the Trainer."""
    setup_logging(cfg.paths.log, world.rank)
    if took_over:
        log.warning("MGN: %s", took_over)
    master = f", master {world.master_addr}:{world.master_port}" if world.world_size > 1 else ""
    log.info("MGN: %d rank(s) from %s%s, rank 0 on %s, %s", world.world_size, world.source, master, device,
             threads)
    torch.manual_seed(cfg.train.seed + world.rank)
    np.random.seed(cfg.train.seed + world.rank)
    if world.is_main:
        cfg.save(cfg.paths.config)
        run_folder.point_latest(cfg.run_dir)
        log.info("MGN: config\n%s", cfg.to_json())
        run_folder.ensure_demo_shards(cfg)
    distributed.barrier()
    preemption.install()
    try:
        trainer = Trainer(cfg, world, device, faults)
        try:
            # before training: do the captions reach the model whole? (log, TensorBoard, summary)
            if world.is_main:
                report_run(cfg, trainer.tensorboard, trainer.state.step)
            return trainer.fit()
        except Diverged as failure:
            log.error("MGN: stopped: %s", failure)  # one line on every rank; train.py exits with code 3
            raise
        finally:
            trainer.close()
    finally:
        preemption.restore()


def build_model(cfg: Config, world: distributed.World, device: torch.device) -> tuple[Objective, dict]:
    """The objective to train (its student from `train.init_from` when given) in the device's layout, and the
    evidence that runs of one seed start alike: the digest of the initial student (start.json)."""
    objective = build_objective(cfg)
    if cfg.train.init_from:
        log.info("MGN: initialised %s", init_student(objective.student, cfg))
    start_record = {"student_sha256": weights_digest(objective.student)}
    objective = devices.sync_batchnorm(objective, device, world.world_size, cfg.train.sync_batchnorm)
    return objective.to(memory_format=devices.memory_format(device)), start_record


@dataclass(frozen=True)
class Due:
    """What is due at a point of the run (Schedule)."""
    log: bool = False
    evaluate: bool = False
    checkpoint: bool = False


@dataclass(frozen=True)
class Schedule:
    """When to log, evaluate and checkpoint: the run's interval policy, in one place. At an epoch's last
    update the checkpoint waits for the epoch's evaluation, so a resume from it never repeats that step's
    work."""
    log_every: int
    eval_every: int  # 0: after each epoch; -1: never during training
    ckpt_every: int  # 0: only at the end (and on a stop signal)

    def after_update(self, step: int, last_of_epoch: bool) -> Due:
        return Due(log=step % self.log_every == 0,
                   evaluate=self.eval_every > 0 and step % self.eval_every == 0,
                   checkpoint=self._checkpoint(step) and not last_of_epoch)

    def after_epoch(self, step: int) -> Due:
        return Due(evaluate=self.eval_every == 0, checkpoint=self._checkpoint(step))

    def _checkpoint(self, step: int) -> bool:
        return self.ckpt_every > 0 and step % self.ckpt_every == 0


class Trainer:
    """One run's objective, DeepSpeed engine, loaders and position; `fit` trains to the end or a stop."""

    def __init__(self, cfg: Config, world: distributed.World, device: torch.device,
                 faults: Faults | None = None):
        self.cfg, self.world, self.device, self.faults = cfg, world, device, faults
        self.ckpt_dir = cfg.paths.checkpoints
        objective, self.start_record = build_model(cfg, world, device)
        if cfg.data.text_blocks and cfg.uses_captions:  # the captions' blocks, once, before any loader
            text_blocks.ensure(cfg, objective.guide.text, device)
        form, pin = devices.batch_form(cfg.data.batch_form, device), devices.pins_batches(device)
        loaders = dict(rank=world.rank, world_size=world.world_size, batch_form=form, pin=pin,
                       persistent=True)
        self.train_batches = build_loader(cfg, "train", **loaders)  # its length: the epoch plan's batches
        self.updates_per_epoch = len(self.train_batches) // cfg.train.grad_accum
        if self.updates_per_epoch < 1:
            raise ValueError(f"{len(self.train_batches)} batches per epoch < "
                             f"train.grad_accum={cfg.train.grad_accum}")
        self.total_steps = self.updates_per_epoch * cfg.train.epochs
        self.engine = build_engine(objective, cfg, device, self.total_steps)
        if faults:
            faults.install(self.engine)
        self.guard = UpdateGuard(self.engine.module, cfg.train.max_skipped_steps,
                                 lambda: store.resume_hint(self.ckpt_dir, cfg.train.run_name))
        self.recovery = Recovery(cfg, world.rank)
        self.schedule = Schedule(cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every)
        resumed = store.resume(self.engine, cfg, world.rank, world.world_size)
        if resumed:
            self.guard.accept()
            apply_learning_rates(self.engine, cfg, resumed.lr_scale)
        self.state = resumed or TrainState()
        self.tensorboard = TensorBoard(cfg.paths.tensorboard, world.is_main,
                                       self.state.step if resumed else None)
        self.flags = UpdateFlags(self.guard, device, lambda step, skipped: self.tensorboard.scalars(
            {"train/skipped_steps": skipped}, step))
        self.inputs = ModelInputs(*image_normalisation(cfg.model), device, captions=cfg.uses_captions)
        self.evaluation = RunEvaluation(cfg, world, self.inputs, self.tensorboard,
                                        build_loader(cfg, "test", **loaders))
        self.timer, self.first_step = StepTimer(), self.state.step
        self.started = self.fit_started = time.perf_counter()  # this segment's start (before: train_seconds)
        if world.is_main and not resumed:
            self.tensorboard.text("config", f"```\n{cfg.to_json()}\n```")
        log.info("%s", size_line(objective, world.world_size, self.updates_per_epoch, self.total_steps, cfg,
                                 precision(cfg, device)))

    @property
    def objective(self) -> Objective:
        return self.engine.module

    def close(self) -> None:
        self.tensorboard.close()
        self.train_batches.close()
        self.evaluation.batches.close()

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict:
        progress = Progress(self.total_steps, self.state.step, self.world.is_main)
        while self.state.epoch < self.cfg.train.epochs and not self.flags.stop_requested:
            try:
                self._train_epoch(progress)
            except Diverged as failure:  # stop (raised again), or roll back and go on
                self.state = self.recovery.roll_back(failure, self.engine, self.state, self.world.world_size)
                self.guard.accept()
                self.flags.forget()
                self.timer.reset()
                apply_learning_rates(self.engine, self.cfg, self.state.lr_scale)
                self.tensorboard.scalars({"train/rollbacks": len(self.state.rollbacks)}, self.state.step)
        progress.close()
        return self._stop_for_signal() if self.flags.stop_requested else self._finish()

    def _train_epoch(self, progress: Progress) -> None:
        """The rest of the current epoch (all of it, or from where a resume left it), or up to a stop signal.

        Resume mid-epoch: the stream is deterministic per (seed, epoch, rank); the loader skips the consumed
        batches as raw samples, without decoding them. Whole updates only: no spill into the next epoch.
        """
        state, timer = self.state, self.timer
        self.engine.train()
        batches = self.train_batches.epoch(state.epoch, skip_batches=state.batch_in_epoch)
        if state.batch_in_epoch == 0:
            log_balance(batches.balance, state.epoch)
        usable = self.updates_per_epoch * self.cfg.train.grad_accum
        tick = time.perf_counter()
        for batch in batches:
            if state.batch_in_epoch >= usable:
                continue  # read the stream to its end (its skip report), train on none of the rest
            if self.recovery.passes_over(batch["key"]):
                # after a rollback: the margin past the failure is read, not trained
                state.batch_in_epoch += 1
                continue
            fetched = time.perf_counter()
            updated = self._micro_batch(batch)
            now = time.perf_counter()
            timer.data, timer.total, tick = timer.data + fetched - tick, timer.total + now - tick, now
            if updated:
                progress.update()
                self._do(self.schedule.after_update(state.step, last_of_epoch=state.batch_in_epoch >= usable))
                if self.flags.stop_requested:
                    return
                tick = time.perf_counter()
        self.flags.flush(state)  # the epoch's last update too: a stop signal there stops the epoch
        if self.flags.stop_requested:
            return
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self._do(self.schedule.after_epoch(state.step))

    def _micro_batch(self, batch: dict) -> bool:
        """Forward, backward and step on one micro-batch; True at an update boundary (the update counted, its
        flags on their way to the host, the one before it read)."""
        state, engine, optimizer = self.state, self.engine, self.engine.client_optimizer
        if state.step == 0 and state.batch_in_epoch == 0 and state.epoch == 0 and self.world.is_main:
            record_start(self.cfg, self.start_record, batch)
        labels = batch["label"].to(self.device, non_blocking=True)
        with autocast(self.cfg, self.device):
            output = engine(**self.inputs(batch), label=labels)
        if self.faults:
            self.faults(state.step + 1, output, batch, optimizer)
        self.recovery.read(batch["key"])
        self.flags.loss(output.loss)
        engine.backward(output.loss)
        boundary = (state.batch_in_epoch + 1) % self.cfg.train.grad_accum == 0
        if boundary:
            signalled = self.flags.before_step(optimizer, preemption.requested())
            skipped_before = engine.skipped_steps
        engine.step()
        self.timer.add(output, labels)
        state.batch_in_epoch += 1
        if boundary:
            state.step += 1
            self.timer.updates += 1
            skipped = optimizer.skipped | (engine.skipped_steps > skipped_before)  # or DeepSpeed's (ZeRO-1/2)
            self.flags.after_step(state.step, signalled, skipped, state)
        return boundary

    def _do(self, due: Due) -> None:
        if due.log:
            log_training(self.timer, self.engine.optimizer, self.tensorboard, self.device, self.state.step,
                         self.total_steps, self.state.epoch,
                         (time.perf_counter() - self.fit_started) / (self.state.step - self.first_step))
        if due.evaluate:
            self.evaluate()
            self.engine.train()
        if due.checkpoint:
            self.flags.flush(self.state)
            if not self.state.consecutive_skips:  # never amid skipped updates: a rollback must predate it
                self.save()

    # --- evaluation, checkpoints and the end ---------------------------------------------------------------
    def evaluate(self) -> dict:
        """The student (image-only, as deployed) and, where captions are read, the teacher, on the test
        set."""
        self.flags.flush(self.state)
        distributed.sync_batchnorm_buffers(self.objective)
        self.guard.check_model(self.objective, self.state.step)
        return self.evaluation(self.objective, self.state)

    def _train_seconds(self) -> float:
        """Wall time of the whole run: the segments before the last resume (saved in checkpoints) and this
        one."""
        return self.state.train_seconds + time.perf_counter() - self.started

    def save(self) -> None:
        self.flags.flush(self.state)
        self.state.train_seconds, self.started = self._train_seconds(), time.perf_counter()
        distributed.sync_batchnorm_buffers(self.engine.module)
        self.guard.check_model(self.engine.module, self.state.step)
        tag = store.save(self.engine, self.ckpt_dir, self.state, self.cfg.to_dict(), self.cfg.train.keep_last,
                         self.world.rank, self.world.world_size)
        self.recovery.saved()
        self.tensorboard.flush()
        log.info("MGN: checkpoint %s", self.ckpt_dir / tag)

    def _stop_for_signal(self) -> dict:
        log.info("MGN: stop requested by signal (%s on this rank) at step %d; saving and exiting",
                 preemption.received(), self.state.step)
        # The warning may have reached any one rank; rank 0 requeues, so all must agree on it.
        requeue = distributed.any_rank(preemption.wants_requeue(), self.device)
        if not store.has_tag(self.ckpt_dir, self.state.step):  # saved at this very step already
            self.save()
        self.tensorboard.flush()
        log.info("MGN: stopped at step %d of %d; checkpoint %s; to continue: --train.run_name %s "
                 "--train.resume "
                 "auto", self.state.step, self.total_steps, self.ckpt_dir / store.tag_for(self.state.step),
                 self.cfg.train.run_name)
        return {"step": self.state.step, "rank": self.world.rank, "preempted": True, "requeue": requeue}

    def _finish(self) -> dict:
        self.flags.flush(self.state)
        if not store.has_tag(self.ckpt_dir, self.state.step):
            self.save()  # refuses a non-finite model, so the export below never sees one
        summary = run_summary(self.state, self.cfg, self.world.world_size, self._train_seconds(),
                              self.evaluation.last_student_accuracy)
        if self.world.is_main:
            summary["student"] = str(export_student(self.objective.student, self.cfg, self.cfg.paths.student))
            self.cfg.paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
            log.info("%s", done_line(summary))
        distributed.barrier()
        return summary


def record_start(cfg: Config, start_record: dict, batch: dict) -> None:
    """`start.json`: a digest of the initial student and the first batch's sample keys. Runs that differ only
    in their objective must agree on both (the comparison runner checks it: mgn/compare/significance.py)."""
    cfg.paths.start.write_text(json.dumps({**start_record, "first_batch_keys": list(batch["key"])},
                                          indent=2) + "\n")


def run_summary(state: TrainState, cfg: Config, world_size: int, train_seconds: float,
                student_accuracy: float | None) -> dict:
    """`summary.json`: where the run's files are and how its students scored."""
    paths, evaluated = cfg.paths, state.best_metric > float("-inf")
    return {"step": state.step, "epochs": state.epoch, "world_size": world_size,
            "train_seconds": round(train_seconds, 2), "run_dir": str(paths.root),
            "checkpoints": str(paths.checkpoints), "tensorboard": str(paths.tensorboard.parent),
            "preempted": False,
            "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks,
            "student_accuracy": student_accuracy,  # of the final student, at the last evaluation
            "student_best": str(paths.student_best / ARTIFACT_NAME) if evaluated else None,
            "best_student_accuracy": state.best_metric if evaluated else None,
            "best_student_step": state.best_step if evaluated else None,
            "captions": read_report(paths.captions)}  # truncated captions per split (mgn/data/captions.py)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
