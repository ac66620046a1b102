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
import math
import os
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import timm
import torch

from mgn import checkpoint, distributed, preemption
from mgn.checkpoint import TrainState
from mgn.config import Config
from mgn.data import BALANCE_WARNING, build_loader, class_names
from mgn.export import ARTIFACT_NAME, export_student
from mgn.guard import BatchNormSnapshot, GuardedAdamW, NonFiniteError, require_finite
from mgn.metrics import classification_metrics
from mgn.monitor import Progress, TensorBoard, append_metrics, point_latest, setup_logging, tensorboard_dir
from mgn.pictures import attention_figure, samples_from_batch
from mgn.objectives import Objective, StepOutput, build_objective

log = logging.getLogger("mgn")


def run(cfg: Config, *, keep_process_group: bool = False) -> dict:
    """Train as configured; every rank calls this. Returns the run summary (rank 0's view).

    `keep_process_group`: leave the process group up for another run in this process (the comparison
    runner's stages); DeepSpeed caches its groups, so a torn-down group cannot be built a second time.
    """
    world = distributed.detect_world()
    device = distributed.init_distributed(world, cfg.train.dist_timeout_s)
    threads = distributed.set_threads(world)
    if not cfg.train.run_name:  # rank 0 creates a new folder named after its clock; every rank writes there
        cfg.train.run_name = distributed.gather_objects(new_run_name(cfg) if world.is_main else None)[0]
    run_dir = cfg.run_dir
    outside = cfg.train.resume not in ("", "auto") and not Path(cfg.train.resume).resolve().is_relative_to(
        run_dir.resolve())
    if outside and not cfg.train.trust_checkpoint:
        raise checkpoint.UntrustedCheckpointError(
            f"train.resume={cfg.train.resume!r} is outside this run's folder {run_dir}; DeepSpeed loads a checkpoint "
            f"by unpickling it: {checkpoint.TRUST_HINT} (or start from its weights alone, read without unpickling: "
            f"--train.init_from)")
    if not cfg.train.resume and checkpoint.has_checkpoints(run_dir / "checkpoints"):
        raise FileExistsError(f"{run_dir} already holds a run with checkpoints: pass --train.resume auto to "
                              "continue it, or another --train.run_name")
    setup_logging(run_dir, world.rank)
    log.info("MGN: %d rank(s) from %s, master %s:%s, rank 0 on %s, %s", world.world_size, world.source,
             world.master_addr, world.master_port, device, threads)
    torch.manual_seed(cfg.train.seed + world.rank)
    np.random.seed(cfg.train.seed + world.rank)
    if world.is_main:
        cfg.save(run_dir / "config.json")
        point_latest(run_dir)
        log.info("MGN: config\n%s", cfg.to_json())
        ensure_demo_shards(cfg)
    distributed.barrier()
    preemption.install()

    trainer = Trainer(cfg, world, device)
    try:
        return trainer.fit()
    finally:
        trainer.tensorboard.close()
        if not keep_process_group:
            distributed.shutdown()


def new_run_name(cfg: Config) -> str:
    """A name for a new run folder, created here so that two runs started in the same second never share one."""
    base = datetime.now().strftime(f"%Y%m%d-%H%M%S-{cfg.objective.name}")
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        name = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (Path(cfg.train.output_dir) / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name under {cfg.train.output_dir} for {base}")


def ensure_demo_shards(cfg: Config) -> None:
    """Create the synthetic shards the demo preset points at, if they are not there yet."""
    if cfg.data.synthetic_samples <= 0:
        return
    out_dir = Path(cfg.data.train_shards).parent
    if (out_dir / "sizes.json").exists():
        return
    from mgn.shards import write_synthetic  # noqa: PLC0415

    log.info("MGN: writing %d synthetic samples to %s", cfg.data.synthetic_samples, out_dir)
    # The data seed is fixed: runs with different `train.seed` must see the same dataset.
    write_synthetic(out_dir, samples=cfg.data.synthetic_samples, image_size=cfg.model.image_size, seed=0)


def deepspeed_config(cfg: Config, device: torch.device) -> dict:
    """Per-rank micro-batch and accumulation only, so one config serves every world size."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,  # explicit: DeepSpeed would otherwise clip at 1.0
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # GuardedAdamW is torch's AdamW with a skip: ZeRO only knows the name
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        ds[precision] = {"enabled": True}
        # Without this, BatchNorm buffers stay fp32 and bf16 activations fail in batch_norm.
        ds["data_types"] = {"buffer_dtype": precision}
    return ds


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Separate learning rates for image encoder, text encoder and the rest; no decay on 1-d params."""
    lrs = {"image": cfg.train.lr_image, "text": cfg.train.lr_text, "head": cfg.train.lr_head}
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Text first: a BERT's own layers are also named "...encoder...".
        part = "text" if name.startswith("guide.text.") else "image" if name.startswith("student.encoder.") \
            else "head"
        buckets.setdefault((part, param.ndim > 1), []).append(param)
    return [{"name": part if decay else f"{part}_no_decay", "params": params, "lr": lrs[part],
             "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (part, decay), params in sorted(buckets.items())]


def apply_learning_rates(engine, cfg: Config) -> list[str]:
    """After a resume, the config's learning rates win over the checkpoint's (a resume with a lower rate after a
    divergence must lower it): each group's base rate is reset and its current rate recomputed from the
    schedule's position. Returns the changes, for the log."""
    rates = {"image": cfg.train.lr_image, "text": cfg.train.lr_text, "head": cfg.train.lr_head}
    schedule, changes = engine.lr_scheduler, []
    for index, group in enumerate(engine.client_optimizer.param_groups):
        base = rates[group["name"].removesuffix("_no_decay")]
        if schedule.base_lrs[index] != base:
            changes.append(f"{group['name']} {schedule.base_lrs[index]:g} -> {base:g}")
            schedule.base_lrs[index] = group["initial_lr"] = base
            group["lr"] = base * schedule.lr_lambdas[index](schedule.last_epoch)
    return changes


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_engine(model: torch.nn.Module, cfg: Config, device: torch.device, total_steps: int):
    """DeepSpeed engine with a client AdamW and the warmup-cosine schedule (saved in its checkpoints)."""
    import deepspeed  # noqa: PLC0415 - heavy import

    optimizer = GuardedAdamW(param_groups(model, cfg))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, device))
    return engine


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype, captions: bool) -> dict:
    """The objective's keyword arguments; images in the engine's dtype (bf16 engines do not cast inputs)."""
    inputs = {"image": batch["image"].to(device, dtype, non_blocking=True)}
    if captions:
        inputs["input_ids"] = batch["input_ids"].to(device, non_blocking=True)
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    return inputs


@dataclass
class StepTimer:
    """Splits wall time into waiting for data and computing, between log lines; counts what was trained."""
    data: float = 0.0
    total: float = 0.0
    samples: int = 0
    updates: int = 0
    terms: dict = field(default_factory=dict)  # name -> per-micro-batch values (tensors: no device sync per step)

    def add(self, output: StepOutput, labels: torch.Tensor) -> None:
        self.samples += len(labels)
        correct = (output.logits.detach().argmax(-1) == labels).float().mean()
        for name, value in {"loss": output.loss, **output.terms, "accuracy": correct}.items():
            self.terms.setdefault(name, []).append(value.detach().float())

    def reset(self) -> None:
        self.__init__()


class Trainer:
    def __init__(self, cfg: Config, world: distributed.World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        pretrained = timm.get_pretrained_cfg(cfg.model.image_model).to_dict()
        self.mean, self.std = pretrained["mean"], pretrained["std"]

        objective = build_objective(cfg)
        if cfg.train.init_from:
            log.info("MGN: initialised %s", checkpoint.init_student(objective.student, cfg))
        self.start_record = {"student_sha256": weights_digest(objective.student)}  # pairing evidence, see fit()
        if device.type == "cuda" and world.world_size > 1:
            objective = timm.layers.convert_sync_batchnorm(objective)  # keeps timm's BatchNormAct2d activations
        self.batches_per_epoch = len(self._train_batches(epoch=0))
        self.updates_per_epoch = self.batches_per_epoch // cfg.train.grad_accum
        if self.updates_per_epoch < 1:
            raise ValueError(f"{self.batches_per_epoch} batches per epoch < train.grad_accum={cfg.train.grad_accum}")
        self.total_steps = self.updates_per_epoch * cfg.train.epochs
        self.engine = build_engine(objective, cfg, device, self.total_steps)
        self.dtype = next(p for p in self.engine.module.parameters()).dtype
        self.batchnorm = BatchNormSnapshot(self.engine.module)
        self.inject_nan_at = nan_injection(os.environ.get("MGN_INJECT_NAN", ""), world.rank)
        self.ledger = f"{os.environ['MGN_KEY_LEDGER']}.rank{world.rank}" if os.environ.get("MGN_KEY_LEDGER") else ""
        self.state = TrainState()
        # Rank 0 checks the tags (checksums) and every rank loads the one it chose.
        resume = distributed.gather_objects(checkpoint.find_resume_tag(self.ckpt_dir, cfg.train.resume)
                                            if world.is_main else None)[0]
        if resume:
            self.state = checkpoint.load(self.engine, *resume, rank=world.rank, world_size=world.world_size,
                                         cfg=cfg)
            self.batchnorm.keep()
            changed = apply_learning_rates(self.engine, cfg)
            if changed:
                log.info("MGN: learning rates from this run's config, not the checkpoint's: %s", ", ".join(changed))
        elif cfg.train.resume == "auto":
            log.info("MGN: train.resume=auto found no checkpoint in %s: starting this run from the beginning",
                     self.ckpt_dir)
        self.tensorboard = TensorBoard(tensorboard_dir(cfg.run_dir), world.is_main,
                                       self.state.step if resume else None)
        self.class_names = class_names(cfg.data.test_shards)
        self.last_student_accuracy = None
        if world.is_main and not resume:
            self.tensorboard.text("config", f"```\n{cfg.to_json()}\n```")
        n_params = sum(p.numel() for p in objective.parameters())
        n_student = sum(p.numel() for p in objective.student.parameters())
        log.info("MGN: objective %s, %.2fM parameters (%.2fM in the deployed student); %d ranks x %d x %d = %d "
                 "samples per update; %d updates per epoch, %d total", cfg.objective.name, n_params / 1e6,
                 n_student / 1e6, world.world_size, cfg.train.micro_batch, cfg.train.grad_accum,
                 world.world_size * cfg.train.micro_batch * cfg.train.grad_accum, self.updates_per_epoch,
                 self.total_steps)

    @property
    def objective(self) -> Objective:
        return self.engine.module

    # --- data -------------------------------------------------------------------------------------------
    def _train_batches(self, epoch: int, skip: int = 0):
        return build_loader(self.cfg, "train", rank=self.world.rank, world_size=self.world.world_size, epoch=epoch,
                            skip_batches=skip)

    def _eval_batches(self):
        return build_loader(self.cfg, "test", rank=self.world.rank, world_size=self.world.world_size)

    def _inputs(self, batch: dict) -> dict:
        return model_inputs(batch, self.device, self.dtype, self.cfg.uses_captions)

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, state, engine = self.cfg, self.state, self.engine
        timer = StepTimer()
        stopped_by_signal = False
        self.started = fit_started = time.perf_counter()  # since the last save; state.train_seconds: before it
        first_step = state.step
        self.progress = Progress(self.total_steps, state.step, self.world.is_main)
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        while state.epoch < cfg.train.epochs and not stopped_by_signal:
            engine.train()
            # Resume mid-epoch: the stream is deterministic per (seed, epoch, rank); the loader skips the
            # consumed batches as raw samples, without decoding them.
            batches = self._train_batches(state.epoch, skip=state.batch_in_epoch)
            if state.batch_in_epoch == 0:
                self._log_balance(batches.balance)
            usable = self.updates_per_epoch * cfg.train.grad_accum  # whole updates only: no spill into the next epoch
            tick = time.perf_counter()
            for batch in batches:
                if state.batch_in_epoch >= usable:
                    continue  # read the stream to its end (its skip report), train on none of the rest
                fetched = time.perf_counter()
                if state.step == 0 and state.batch_in_epoch == 0 and state.epoch == 0:
                    self._record_start(batch)
                labels = batch["label"].to(self.device, non_blocking=True)
                output = engine(**self._inputs(batch), label=labels)
                if state.step + 1 in self.inject_nan_at:
                    output.loss = output.loss * float("nan")  # fault injection for tests (MGN_INJECT_NAN)
                if self.ledger:  # the samples behind each update, per rank, for the resume tests (MGN_KEY_LEDGER)
                    with open(self.ledger, "a") as f:
                        f.write(f"{state.step + 1} {' '.join(batch['key'])}\n")
                bad_loss |= ~torch.isfinite(output.loss.detach())
                engine.backward(output.loss)
                boundary = (state.batch_in_epoch + 1) % cfg.train.grad_accum == 0
                if boundary:  # one collective per update: any rank's stop signal, any rank's non-finite loss
                    stop, bad = distributed.any_rank_each([preemption.requested(), bad_loss], self.device)
                    engine.client_optimizer.skip_next_step = bad
                    skipped_before = engine.skipped_steps
                engine.step()
                timer.add(output, labels)
                state.batch_in_epoch += 1
                now = time.perf_counter()
                timer.data += fetched - tick
                timer.total += now - tick
                tick = now
                if not boundary:
                    continue
                self._after_update(skipped=engine.client_optimizer.skipped or engine.skipped_steps > skipped_before)
                bad_loss.zero_()
                timer.updates += 1
                if state.step % cfg.train.log_every == 0:
                    self._log_train(timer, (time.perf_counter() - fit_started) / (state.step - first_step))
                    timer.reset()
                if cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0:
                    self.evaluate()
                    engine.train()
                # At an epoch's last update the checkpoint waits for the epoch's evaluation (below), so that a
                # resume from it never evaluates, logs or exports that step twice.
                if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0 and state.batch_in_epoch < usable:
                    self.save()
                if stop:
                    stopped_by_signal = True
                    break
                tick = time.perf_counter()
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                if cfg.train.eval_every == 0:
                    self.evaluate()
                if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0:
                    self.save()
        self.progress.close()
        if stopped_by_signal:
            log.info("MGN: stop requested by signal at step %d; saving and exiting", state.step)
            # The warning may have reached any one rank; rank 0 requeues, so all must agree on it.
            requeue = distributed.any_rank(preemption.wants_requeue(), self.device)
            if not (self.ckpt_dir / checkpoint.tag_for(state.step)).exists():  # saved at this very step already
                self.save()
            self.tensorboard.flush()
            return {"step": state.step, "rank": self.world.rank, "preempted": True, "requeue": requeue}
        return self._finish()

    def _after_update(self, skipped: bool) -> None:
        """Count the update; after a skipped one, put BatchNorm statistics back and stop after too many in a row."""
        state = self.state
        state.step += 1
        self.progress.update()
        if not skipped:
            self.batchnorm.keep()
            state.consecutive_skips = 0
            return
        self.batchnorm.restore()
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.tensorboard.scalars({"train/skipped_steps": state.skipped_steps}, state.step)
        log.warning("MGN: step %d skipped: non-finite loss or gradient on some rank (%d in a row, %d in this run); "
                    "weights unchanged", state.step, state.consecutive_skips, state.skipped_steps)
        limit = self.cfg.train.max_skipped_steps
        if state.consecutive_skips >= limit:
            latest = self.ckpt_dir / "latest"
            good = self.ckpt_dir / latest.read_text().strip() if latest.exists() else None
            raise NonFiniteError(
                f"{limit} updates in a row (steps {state.step - limit + 1}-{state.step}) had a non-finite loss or "
                f"gradient (train.max_skipped_steps={limit}); the weights were not updated by them. Last good "
                f"checkpoint: {good or 'none yet'}. Lower the learning rate and " + (
                    f"resume from it: --train.run_name {self.cfg.train.run_name} --train.resume auto --train.lr_... "
                    f"(the config's rates replace the checkpoint's)" if good else "start afresh"))

    def _log_balance(self, balance: dict) -> None:
        log.info("MGN: epoch %d reads every training sample once, except %.1f%% repeated and %.1f%% not seen "
                 "(ranks and workers balanced by sample count)", self.state.epoch + 1,
                 100 * balance["repeated_fraction"], 100 * balance["unseen_fraction"])
        if max(balance.values()) > BALANCE_WARNING:
            log.warning("MGN: more than %.0f%% of epoch %d is repeated or never seen: more samples per rank, or a "
                        "smaller micro_batch x ranks, fixes it", 100 * BALANCE_WARNING, self.state.epoch + 1)

    def _record_start(self, batch: dict) -> None:
        """`start.json`: a digest of the initial student and the first batch's sample keys. Runs that differ only
        in their objective must agree on both (the comparison runner checks it: mgn/verdict.py)."""
        if self.world.is_main:
            record = {**self.start_record, "first_batch_keys": list(batch["key"])}
            (self.cfg.run_dir / "start.json").write_text(json.dumps(record, indent=2) + "\n")

    def _log_train(self, timer: StepTimer, seconds_per_update: float) -> None:
        names = sorted(timer.terms)
        means = distributed.all_reduce_mean(torch.stack([torch.stack(timer.terms[n]).mean() for n in names]))
        throughput = distributed.all_reduce_mean(torch.tensor([timer.samples / max(timer.total, 1e-9)]))
        samples_per_s = throughput.item() * self.world.world_size
        data_wait = timer.data / max(timer.total, 1e-9)
        terms = dict(zip(names, means.tolist()))  # loss, its terms, and training accuracy of the trained logits
        values = {f"train/{name}": value for name, value in terms.items()}
        values |= {"train/samples_per_s": samples_per_s, "train/data_wait_fraction": data_wait,
                   "train/peak_memory_mb": peak_memory_mb(self.device),
                   "train/seconds_per_step": timer.total / max(timer.updates, 1)}
        for group in self.engine.optimizer.param_groups:
            values[f"lr/{group.get('name', 'group')}"] = group["lr"]
        self.tensorboard.scalars(values, self.state.step)
        remaining = (self.total_steps - self.state.step) * seconds_per_update
        parts = " ".join(f"{name} {terms[name]:.4f}" for name in names if name not in ("loss", "accuracy"))
        log.info("MGN: step %d/%d epoch %d loss %.4f (%s) acc %.3f | %.2f s/step, ETA %s | %.1f samples/s | "
                 "data wait %.0f%% | peak mem %.0f MB", self.state.step, self.total_steps, self.state.epoch,
                 terms["loss"], parts, terms["accuracy"], values["train/seconds_per_step"],
                 format_duration(remaining), samples_per_s, 100 * data_wait, values["train/peak_memory_mb"])

    # --- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Student (image-only, as deployed) and, for objectives that read captions, teacher metrics."""
        objective = self.objective
        distributed.sync_batchnorm_buffers(objective)
        require_finite(objective, f"the model at step {self.state.step} for evaluation")
        objective.eval()
        labels, student_probs, teacher_probs = [], [], []
        grid_batch = None
        for batch in self._eval_batches():
            labels.append(batch["label"])
            prediction = objective.predict(**self._inputs(batch))
            student_probs.append(prediction.student.float().softmax(-1).cpu())
            if prediction.teacher is not None:
                teacher_probs.append(prediction.teacher.float().softmax(-1).cpu())
            if grid_batch is None and prediction.attention is not None:
                grid_batch = samples_from_batch(batch["image"], prediction.attention, batch["label"],
                                                prediction.teacher, prediction.student, batch.get("caption", []),
                                                self.mean, self.std, self.class_names)
        gathered = distributed.gather_objects((_cat(labels), _cat(student_probs), _cat(teacher_probs)))
        results = {}
        if self.world.is_main:
            all_labels = torch.cat([g[0] for g in gathered])
            if len(all_labels) == 0:
                raise RuntimeError(f"no test samples read from data.test_shards={self.cfg.data.test_shards!r}")
            for role, index in (("student", 1), ("teacher", 2)):
                probs = torch.cat([g[index] for g in gathered])
                if len(probs) == 0:
                    continue
                results[role] = classification_metrics(all_labels.numpy(), probs.numpy())
                self.tensorboard.scalars({f"eval/{role}_{k}": v for k, v in results[role].items()
                                          if isinstance(v, float)}, self.state.step)
                if probs.shape[1] == 2:
                    self.tensorboard.pr_curve(f"eval/{role}_pr", all_labels, probs[:, 1], self.state.step)
            self._log_eval(results)
            append_metrics(self.cfg.run_dir, self.state.step, self.state.epoch, results)
            if grid_batch is not None and self.state.attention_grids < self.cfg.train.attention_images:
                self._write_attention_picture(grid_batch)
        results = distributed.gather_objects(results)[0] if self.world.world_size > 1 else results
        score = results["student"]["accuracy"]
        if score > self.state.best_metric:
            self.state.best_metric = score
            self.state.best_step = self.state.step
            if self.world.is_main:
                export_student(objective.student, self.cfg, self.cfg.run_dir / "student_best")
                log.info("MGN: new best student accuracy %.4f, exported to %s", score,
                         self.cfg.run_dir / "student_best")
        self.last_student_accuracy = score
        self.tensorboard.flush()
        return results

    def _write_attention_picture(self, samples) -> None:
        """The picture (mgn/pictures.py) to TensorBoard and to <run>/attention/step_N.png."""
        self.state.attention_grids += 1
        picture = attention_figure(samples, f"{self.cfg.train.run_name}, step {self.state.step}: test samples, "
                                            f"{self.cfg.objective.name} objective")
        self.tensorboard.image("attention/cross_modality", picture, self.state.step)
        folder = self.cfg.run_dir / "attention"
        folder.mkdir(exist_ok=True)
        from PIL import Image  # noqa: PLC0415

        Image.fromarray(picture).save(folder / f"step_{self.state.step:08d}.png")

    def _log_eval(self, results: dict) -> None:
        for role, m in results.items():
            log.info("MGN: eval step %d %-7s acc %.4f  P %.4f  R %.4f  F1 %.4f  AUROC %.4f  (%d samples)",
                     self.state.step, role, m["accuracy"], m["precision"], m["recall"], m["f1"], m["auroc"],
                     m["samples"])

    # --- checkpoints and the end -----------------------------------------------------------------------
    def _train_seconds(self) -> float:
        """Wall time of the whole run: the segments before the last resume (saved in checkpoints) and this one."""
        return self.state.train_seconds + time.perf_counter() - self.started

    def save(self) -> None:
        self.state.train_seconds, self.started = self._train_seconds(), time.perf_counter()
        distributed.sync_batchnorm_buffers(self.engine.module)
        require_finite(self.engine.module, f"the model at step {self.state.step} for a checkpoint")
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state, self.cfg.to_dict(),
                              self.cfg.train.keep_last, self.world.rank, self.world.world_size)
        self.tensorboard.flush()
        log.info("MGN: checkpoint %s", self.ckpt_dir / tag)

    def _finish(self) -> dict:
        if not (self.ckpt_dir / checkpoint.tag_for(self.state.step)).exists():
            self.save()  # refuses a non-finite model, so the export below never sees one
        evaluated = self.state.best_metric > float("-inf")
        best = self.cfg.run_dir / "student_best" / ARTIFACT_NAME
        summary = {"step": self.state.step, "epochs": self.state.epoch, "world_size": self.world.world_size,
                   "train_seconds": round(self._train_seconds(), 2),
                   "run_dir": str(self.cfg.run_dir), "checkpoints": str(self.ckpt_dir),
                   "tensorboard": str(self.cfg.run_dir / "tb"), "preempted": False,
                   "skipped_steps": self.state.skipped_steps,
                   "student_accuracy": self.last_student_accuracy,  # of the final student, at the last evaluation
                   "student_best": str(best) if evaluated else None,
                   "best_student_accuracy": self.state.best_metric if evaluated else None,
                   "best_student_step": self.state.best_step if evaluated else None}
        if self.world.is_main:
            summary["student"] = str(export_student(self.objective.student, self.cfg, self.cfg.run_dir / "student"))
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            final = f"acc {summary['student_accuracy']:.4f}" if summary["student_accuracy"] is not None \
                else "not evaluated"
            best_part = (f" | best student (step {summary['best_student_step']}, acc "
                         f"{summary['best_student_accuracy']:.4f}; chosen on the test set) {best}") if evaluated else ""
            log.info("MGN: done step=%d. run dir %s | TensorBoard: tensorboard --logdir %s | final student (%s) %s%s",
                     self.state.step, self.cfg.run_dir, summary["tensorboard"], final, summary["student"], best_part)
        distributed.barrier()
        return summary


def nan_injection(spec: str, rank: int) -> set[int]:
    """Fault injection for the tests: MGN_INJECT_NAN="STEP[:RANK],..." makes the loss NaN on that rank (every
    rank when none is given) at the micro-batches of update STEP."""
    steps = set()
    for item in filter(None, spec.split(",")):
        step, _, only = item.partition(":")
        if not only or int(only) == rank:
            steps.add(int(step))
    return steps


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.empty(0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
