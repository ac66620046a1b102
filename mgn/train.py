"""The training run: setup, one visible loop, evaluation, checkpoints, the exported student.

    run(cfg) -> summary dict
      distributed setup -> model -> DeepSpeed engine -> (resume) -> for each epoch:
        for each micro-batch: forward, loss, backward, step; log; maybe evaluate; maybe checkpoint;
        stop cleanly (checkpoint first) when any rank got Slurm's warning signal
      final checkpoint -> final student export -> summary.json
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import timm
import torch

from mgn import checkpoint, distributed, preemption, run_folder, text_blocks
from mgn.artifacts import init_student
from mgn.captions import read_report, report_run
from mgn.checkpoint import TrainState
from mgn.config import GROUND_TRUTH_FIELDS, Config
from mgn.data import build_loader
from mgn.decode import Batch, DeviceNormaliser
from mgn.engine import apply_learning_rates, autocast, build_engine, configure_kernels, precision
from mgn.export import ARTIFACT_NAME, export_student
from mgn.faults import FaultInjection
from mgn.guard import Diverged, UpdateGuard
from mgn.model import image_normalisation
from mgn.monitor import (
    Progress,
    StepTimer,
    TensorBoard,
    done_line,
    log_balance,
    report_evaluation,
    setup_logging,
    size_line,
    tensorboard_dir,
    train_line,
)
from mgn.objectives import Objective, build_objective
from mgn.pictures import attention_figure, samples_from_batch, save_picture
from mgn.predictions import collect, merge
from mgn.recovery import Recovery
from mgn.shard_sets import class_names

log = logging.getLogger("mgn")


def run(cfg: Config, *, keep_process_group: bool = False) -> dict:
    """Train as configured; every rank calls this. Returns the run summary (rank 0's view).

    `keep_process_group`: leave the process group up for another run in this process (the comparison
    runner's stages); DeepSpeed caches its groups, so a torn-down group cannot be built a second time.
    """
    world = distributed.detect_world()
    device = distributed.init_distributed(world, cfg.train.dist_timeout_s, cfg.train.device)
    threads = distributed.set_threads(world)
    configure_kernels(cfg, device)
    if not cfg.train.run_name:  # rank 0 creates a new folder named after its clock; every rank writes there
        cfg.train.run_name = distributed.gather_objects(run_folder.new_run_name(cfg) if world.is_main else None)[0]
    run_dir = cfg.run_dir
    checkpoint.check_resume_allowed(cfg)
    setup_logging(run_dir, world.rank)
    log.info("MGN: %d rank(s) from %s, master %s:%s, rank 0 on %s, %s", world.world_size, world.source,
             world.master_addr, world.master_port, device, threads)
    torch.manual_seed(cfg.train.seed + world.rank)
    np.random.seed(cfg.train.seed + world.rank)
    if world.is_main:
        cfg.save(run_dir / "config.json")
        run_folder.point_latest(run_dir)
        log.info("MGN: config\n%s", cfg.to_json())
        run_folder.ensure_demo_shards(cfg)
    distributed.barrier()
    preemption.install()

    trainer = Trainer(cfg, world, device)
    try:
        if world.is_main:  # before training: do the captions reach the model whole? (log, TensorBoard, summary)
            report_run(cfg, trainer.tensorboard, trainer.state.step)
        return trainer.fit()
    except Diverged as failure:
        log.error("MGN: stopped: %s", failure)  # one line on every rank; train.py exits with code 3
        raise
    finally:
        trainer.tensorboard.close()
        if not keep_process_group:
            distributed.shutdown()


def build_model(cfg: Config, world: distributed.World, device: torch.device) -> tuple[Objective, dict]:
    """The objective to train (its student from `train.init_from` when given), and the evidence that runs of one
    seed start alike: the digest of the initial student (start.json)."""
    objective = build_objective(cfg)
    if cfg.train.init_from:
        log.info("MGN: initialised %s", init_student(objective.student, cfg))
    start_record = {"student_sha256": weights_digest(objective.student)}
    if device.type == "cuda" and world.world_size > 1 and cfg.train.sync_batchnorm:
        objective = timm.layers.convert_sync_batchnorm(objective)  # keeps timm's BatchNormAct2d activations
    return objective, start_record


class Trainer:
    """One run's objective, DeepSpeed engine and position; `fit` trains to the end or to a stop signal."""

    def __init__(self, cfg: Config, world: distributed.World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        objective, self.start_record = build_model(cfg, world, device)
        if cfg.data.text_blocks and cfg.uses_captions:  # the captions' blocks, computed once, before any loader
            text_blocks.ensure(cfg, objective.guide.text, device)
        batches_per_epoch = len(self._train_batches(epoch=0))
        self.updates_per_epoch = batches_per_epoch // cfg.train.grad_accum
        if self.updates_per_epoch < 1:
            raise ValueError(f"{batches_per_epoch} batches per epoch < train.grad_accum={cfg.train.grad_accum}")
        self.total_steps = self.updates_per_epoch * cfg.train.epochs
        self.engine = build_engine(objective, cfg, device, self.total_steps)
        self.guard = UpdateGuard(self.engine.module, cfg.train.max_skipped_steps,
                                 lambda: checkpoint.resume_hint(self.ckpt_dir, cfg.train.run_name))
        self.faults = FaultInjection.from_environment(world.rank)
        self.recovery = Recovery(cfg, world.rank)
        self.state = checkpoint.resume(self.engine, cfg, world.rank, world.world_size)
        resumed = self.state is not None
        if resumed:
            self.guard.accept()
            apply_learning_rates(self.engine, cfg, self.state.lr_scale)
        self.state = self.state or TrainState()
        self.tensorboard = TensorBoard(tensorboard_dir(cfg.run_dir), world.is_main,
                                       self.state.step if resumed else None)
        self.class_names = class_names(cfg.data.test_shards)
        self.mean, self.std = image_normalisation(cfg.model.image_model)  # to draw test images in the picture
        on_gpu = device.type == "cuda"  # uint8 batches normalised on the GPU, the test loader's workers kept
        self.normaliser = DeviceNormaliser(self.mean, self.std, device) if on_gpu else None
        self.eval_batches = build_loader(cfg, "test", rank=world.rank, world_size=world.world_size, on_device=on_gpu,
                                         persistent=True)
        self.last_student_accuracy = None
        if world.is_main and not resumed:
            self.tensorboard.text("config", f"```\n{cfg.to_json()}\n```")
        log.info("%s", size_line(objective, world.world_size, self.updates_per_epoch, self.total_steps, cfg,
                                 precision(cfg, device)))

    @property
    def objective(self) -> Objective:
        return self.engine.module

    def _train_batches(self, epoch: int, skip: int = 0):
        return build_loader(self.cfg, "train", rank=self.world.rank, world_size=self.world.world_size, epoch=epoch,
                            skip_batches=skip, on_device=self.device.type == "cuda")

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict:
        self.started = self.fit_started = time.perf_counter()  # since the last save; state.train_seconds: before
        self.first_step = self.state.step
        self.progress = Progress(self.total_steps, self.state.step, self.world.is_main)
        self.timer = StepTimer()
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        stopped_by_signal = False
        while self.state.epoch < self.cfg.train.epochs and not stopped_by_signal:
            try:
                stopped_by_signal = self._train_epoch()
            except Diverged as failure:  # stop (raised again), or roll back and go on
                self.state = self.recovery.roll_back(failure, self.engine, self.state, self.world.world_size)
                self.guard.accept()
                self.bad_loss.zero_()
                self.timer.reset()
                apply_learning_rates(self.engine, self.cfg, self.state.lr_scale)
                self.tensorboard.scalars({"train/rollbacks": len(self.state.rollbacks)}, self.state.step)
        self.progress.close()
        return self._stop_for_signal() if stopped_by_signal else self._finish()

    def _train_epoch(self) -> bool:
        """The rest of the current epoch (all of it, or from where a resume left it); True if a signal stopped it.

        Resume mid-epoch: the stream is deterministic per (seed, epoch, rank); the loader skips the consumed
        batches as raw samples, without decoding them. Whole updates only: no spill into the next epoch.
        """
        state, timer = self.state, self.timer
        self.engine.train()
        batches = self._train_batches(state.epoch, skip=state.batch_in_epoch)
        if state.batch_in_epoch == 0:
            log_balance(batches.balance, state.epoch)
        usable = self.updates_per_epoch * self.cfg.train.grad_accum
        tick = time.perf_counter()
        for batch in batches:
            if state.batch_in_epoch >= usable:
                continue  # read the stream to its end (its skip report), train on none of the rest
            if self.recovery.passes_over(batch["key"]):
                state.batch_in_epoch += 1  # after a rollback: the margin past the failure is read, not trained
                continue
            fetched = time.perf_counter()
            update = self._micro_batch(batch)
            now = time.perf_counter()
            timer.data, timer.total, tick = timer.data + fetched - tick, timer.total + now - tick, now
            if update is None:
                continue
            stop, skipped = update
            self._after_update(skipped, last_of_epoch=state.batch_in_epoch >= usable)
            if stop:
                return True
            tick = time.perf_counter()
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if self.cfg.train.eval_every == 0:
            self.evaluate()
        if self.cfg.train.ckpt_every and state.step % self.cfg.train.ckpt_every == 0 and not state.consecutive_skips:
            self.save()
        return False

    def _micro_batch(self, batch: dict) -> tuple[bool, bool] | None:
        """Forward, backward and step on one micro-batch; at an update boundary (stop signal, update skipped)."""
        state, engine = self.state, self.engine
        if state.step == 0 and state.batch_in_epoch == 0 and state.epoch == 0:
            self._record_start(batch)
        labels = batch["label"].to(self.device, non_blocking=True)
        with autocast(self.cfg, self.device):
            output = engine(**model_inputs(batch, self.device, self.cfg.uses_captions, self.normaliser), label=labels)
        if self.faults:
            self.faults(state.step + 1, output, batch, engine.client_optimizer)
        self.recovery.read(batch["key"])
        self.bad_loss |= ~torch.isfinite(output.loss.detach())
        engine.backward(output.loss)
        boundary = (state.batch_in_epoch + 1) % self.cfg.train.grad_accum == 0
        if boundary:  # one collective per update: any rank's stop signal, non-finite loss or BatchNorm statistic
            self.bad_loss |= self.guard.batchnorm.non_finite().to(self.device)
            stop, bad = distributed.any_rank_each([preemption.requested(), self.bad_loss], self.device)
            engine.client_optimizer.skip_next_step = bad
            skipped_before = engine.skipped_steps
        engine.step()
        self.timer.add(output, labels)
        state.batch_in_epoch += 1
        if not boundary:
            return None
        self.bad_loss.zero_()
        return stop, engine.client_optimizer.skipped or engine.skipped_steps > skipped_before

    def _after_update(self, skipped: bool, last_of_epoch: bool) -> None:
        """Count the update, guard it, then log, evaluate and save as configured. At an epoch's last update the
        checkpoint waits for the epoch's evaluation, so a resume from it never repeats that step's work."""
        cfg, state = self.cfg, self.state
        state.step += 1
        self.progress.update()
        if skipped:
            self.tensorboard.scalars({"train/skipped_steps": state.skipped_steps + 1}, state.step)
        self.guard.after_update(skipped, state)
        self.timer.updates += 1
        if state.step % cfg.train.log_every == 0:
            self._log_train()
        if cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0:
            self.evaluate()
            self.engine.train()
        if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0 and not last_of_epoch \
                and not state.consecutive_skips:  # never in a run of skipped updates: a rollback must predate it
            self.save()

    def _record_start(self, batch: dict) -> None:
        """`start.json`: a digest of the initial student and the first batch's sample keys. Runs that differ only
        in their objective must agree on both (the comparison runner checks it: mgn/verdict.py)."""
        if self.world.is_main:
            record = {**self.start_record, "first_batch_keys": list(batch["key"])}
            (self.cfg.run_dir / "start.json").write_text(json.dumps(record, indent=2) + "\n")

    def _log_train(self) -> None:
        values = self.timer.scalars(self.device)
        for group in self.engine.optimizer.param_groups:
            values[f"lr/{group.get('name', 'group')}"] = group["lr"]
        self.tensorboard.scalars(values, self.state.step)
        per_update = (time.perf_counter() - self.fit_started) / (self.state.step - self.first_step)
        log.info("%s", train_line(values, self.state.step, self.total_steps, self.state.epoch,
                                  (self.total_steps - self.state.step) * per_update))
        self.timer.reset()

    # --- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Student (image-only, as deployed) and, for objectives that read captions, teacher metrics, computed by
        the evaluation core (mgn/predictions.py) from the model being trained; logged, and the best exported."""
        objective, picture = self.objective, []
        distributed.sync_batchnorm_buffers(objective)
        self.guard.check_model(objective, self.state.step)
        objective.eval()

        def forward(batch: dict):
            with autocast(self.cfg, self.device):
                out = objective.predict(**model_inputs(batch, self.device, self.cfg.uses_captions, self.normaliser))
            if not picture and out.attention is not None:
                picture.append(samples_from_batch(batch["image"], out.attention, batch["label"], out.teacher,
                                                  out.student, batch.get("caption", []), self.mean, self.std,
                                                  self.class_names))
            return out.student, out.teacher

        preds = merge(distributed.gather_objects(collect(self.eval_batches, forward, self.cfg.model.num_classes,
                                                         allow_empty=True)))
        if len(preds.labels) == 0:
            raise RuntimeError(f"no test samples read from data.test_shards={self.cfg.data.test_shards!r}")
        results = self._report(preds, picture[0] if picture else None) if self.world.is_main else {}
        results = distributed.gather_objects(results)[0]
        score = results["student"]["accuracy"]
        if score > self.state.best_metric:
            self.state.best_metric, self.state.best_step = score, self.state.step
            if self.world.is_main:
                export_student(objective.student, self.cfg, self.cfg.run_dir / "student_best")
                log.info("MGN: new best student accuracy %.4f, exported to %s", score,
                         self.cfg.run_dir / "student_best")
        self.last_student_accuracy = score
        self.tensorboard.flush()
        return results

    def _report(self, preds, picture_samples) -> dict:
        """Rank 0: metrics to the log, TensorBoard and metrics.csv; the attention picture, up to its cap."""
        step = self.state.step
        results = report_evaluation(preds, self.tensorboard, self.cfg.run_dir, step, self.state.epoch)
        if picture_samples is not None and self.state.attention_grids < self.cfg.train.attention_images:
            self.state.attention_grids += 1
            picture = attention_figure(picture_samples, f"{self.cfg.train.run_name}, step {step}: test samples, "
                                                        f"{self.cfg.objective.name} objective")
            self.tensorboard.image("attention/cross_modality", picture, step)
            save_picture(picture, self.cfg.run_dir / "attention" / f"step_{step:08d}.png")
        return results

    # --- checkpoints and the end -----------------------------------------------------------------------
    def _train_seconds(self) -> float:
        """Wall time of the whole run: the segments before the last resume (saved in checkpoints) and this one."""
        return self.state.train_seconds + time.perf_counter() - self.started

    def save(self) -> None:
        self.state.train_seconds, self.started = self._train_seconds(), time.perf_counter()
        distributed.sync_batchnorm_buffers(self.engine.module)
        self.guard.check_model(self.engine.module, self.state.step)
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state, self.cfg.to_dict(),
                              self.cfg.train.keep_last, self.world.rank, self.world.world_size)
        self.recovery.saved()
        self.tensorboard.flush()
        log.info("MGN: checkpoint %s", self.ckpt_dir / tag)

    def _stop_for_signal(self) -> dict:
        log.info("MGN: stop requested by signal at step %d; saving and exiting", self.state.step)
        # The warning may have reached any one rank; rank 0 requeues, so all must agree on it.
        requeue = distributed.any_rank(preemption.wants_requeue(), self.device)
        if not checkpoint.has_tag(self.ckpt_dir, self.state.step):  # saved at this very step already
            self.save()
        self.tensorboard.flush()
        return {"step": self.state.step, "rank": self.world.rank, "preempted": True, "requeue": requeue}

    def _finish(self) -> dict:
        if not checkpoint.has_tag(self.ckpt_dir, self.state.step):
            self.save()  # refuses a non-finite model, so the export below never sees one
        summary = run_summary(self.state, self.cfg, self.world.world_size, self._train_seconds(),
                              self.last_student_accuracy)
        if self.world.is_main:
            summary["student"] = str(export_student(self.objective.student, self.cfg, self.cfg.run_dir / "student"))
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("%s", done_line(summary))
        distributed.barrier()
        return summary


def run_summary(state: TrainState, cfg: Config, world_size: int, train_seconds: float,
                student_accuracy: float | None) -> dict:
    """`summary.json`: where the run's files are and how its students scored."""
    run_dir, evaluated = cfg.run_dir, state.best_metric > float("-inf")
    return {"step": state.step, "epochs": state.epoch, "world_size": world_size,
            "train_seconds": round(train_seconds, 2), "run_dir": str(run_dir),
            "checkpoints": str(run_dir / "checkpoints"), "tensorboard": str(run_dir / "tb"), "preempted": False,
            "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks,
            "student_accuracy": student_accuracy,  # of the final student, at the last evaluation
            "student_best": str(run_dir / "student_best" / ARTIFACT_NAME) if evaluated else None,
            "best_student_accuracy": state.best_metric if evaluated else None,
            "best_student_step": state.best_step if evaluated else None,
            "captions": read_report(run_dir)}  # truncated captions per split (mgn/captions.py)


def model_inputs(batch: Batch, device: torch.device, captions: bool,
                 normaliser: DeviceNormaliser | None = None) -> dict:
    """The objective's keyword arguments, on the rank's device (fp32 images: autocast casts inside); uint8
    batches (a GPU run's loader) are normalised there by `normaliser`."""
    image = batch["image"]
    inputs = {"image": normaliser(image) if image.dtype == torch.uint8 else image.to(device, torch.float32,
                                                                                      non_blocking=True)}
    if captions and "text_block" in batch:  # precomputed (data.text_blocks): no tokens, no text encoder
        inputs["text_block"] = batch["text_block"].to(device, non_blocking=True)
    elif captions:
        inputs["input_ids"] = batch["input_ids"].to(device, non_blocking=True)
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    for name in GROUND_TRUTH_FIELDS:  # the positive controls' per-sample ground truth (training batches only)
        if name in batch:
            inputs[name] = torch.as_tensor(batch[name]).to(device, non_blocking=True)
    return inputs


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
