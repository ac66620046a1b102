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
from mgn.config import Config, resolve_text_model
from mgn.data import eval_loader, train_loader
from mgn.export import export_student
from mgn.metrics import classification_metrics
from mgn.monitor import TensorBoard, setup_logging
from mgn.objectives import Objective, StepOutput, build_objective

log = logging.getLogger("mgn")


def run(cfg: Config, *, keep_process_group: bool = False) -> dict:
    """Train as configured; every rank calls this. Returns the run summary (rank 0's view).

    `keep_process_group`: leave the process group up for another run in this process (the comparison
    runner's stages); DeepSpeed caches its groups, so a torn-down group cannot be built a second time.
    """
    world = distributed.detect_world()
    device = distributed.init_distributed(world, cfg.train.dist_timeout_s)
    if not cfg.train.run_name:  # rank 0's clock names the run, so every rank writes to the same new folder
        cfg.train.run_name = distributed.gather_objects(
            datetime.now().strftime(f"%Y%m%d-%H%M%S-{cfg.objective.name}"))[0]
    run_dir = cfg.run_dir
    if not cfg.train.resume and checkpoint.find_resume_tag(run_dir / "checkpoints", "auto"):
        raise FileExistsError(f"{run_dir} already holds a run with checkpoints: pass --train.resume auto to "
                              "continue it, or another --train.run_name")
    setup_logging(run_dir, world.rank)
    log.info("MGN: %d rank(s) from %s, master %s:%s, rank 0 on %s", world.world_size, world.source,
             world.master_addr, world.master_port, device)
    torch.manual_seed(cfg.train.seed + world.rank)
    np.random.seed(cfg.train.seed + world.rank)
    if world.is_main:
        cfg.save(run_dir / "config.json")
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

    optimizer = torch.optim.AdamW(param_groups(model, cfg))
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
        self.tokenizer = resolve_text_model(cfg.model.text_model) if cfg.uses_captions else None

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
        self.state = TrainState()
        resume = checkpoint.find_resume_tag(self.ckpt_dir, cfg.train.resume)
        if resume:
            self.state = checkpoint.load(self.engine, *resume, rank=world.rank)
        self.tensorboard = TensorBoard(cfg.run_dir / "tb", world.is_main, self.state.step if resume else None)
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
    def _train_batches(self, epoch: int):
        c = self.cfg
        return train_loader(c.data, image_size=c.model.image_size, mean=self.mean, std=self.std,
                            tokenizer_name=self.tokenizer, seq_len=c.model.seq_len, batch_size=c.train.micro_batch,
                            rank=self.world.rank, world_size=self.world.world_size, seed=c.train.seed, epoch=epoch)

    def _eval_batches(self):
        c = self.cfg
        return eval_loader(c.data, image_size=c.model.image_size, mean=self.mean, std=self.std,
                           tokenizer_name=self.tokenizer, seq_len=c.model.seq_len, batch_size=c.train.micro_batch,
                           rank=self.world.rank, world_size=self.world.world_size)

    def _inputs(self, batch: dict) -> dict:
        return model_inputs(batch, self.device, self.dtype, self.cfg.uses_captions)

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, state, engine = self.cfg, self.state, self.engine
        timer = StepTimer()
        stopped_by_signal = False
        self.started, first_step = time.perf_counter(), state.step
        while state.epoch < cfg.train.epochs and not stopped_by_signal:
            engine.train()
            batches = iter(self._train_batches(state.epoch))
            consumed = state.batch_in_epoch
            for _ in range(consumed):  # resume mid-epoch: the stream is deterministic per (seed, epoch, rank)
                next(batches)
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
                engine.backward(output.loss)
                engine.step()
                timer.add(output, labels)
                state.batch_in_epoch += 1
                now = time.perf_counter()
                timer.data += fetched - tick
                timer.total += now - tick
                tick = now
                if not engine.is_gradient_accumulation_boundary():
                    continue
                state.step += 1
                timer.updates += 1
                if state.step % cfg.train.log_every == 0:
                    self._log_train(timer, (time.perf_counter() - self.started) / (state.step - first_step))
                    timer.reset()
                if cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0:
                    self.evaluate()
                    engine.train()
                if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0:
                    self.save()
                if distributed.any_rank(preemption.requested(), self.device):
                    stopped_by_signal = True
                    break
                tick = time.perf_counter()
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                if cfg.train.eval_every == 0:
                    self.evaluate()
        if stopped_by_signal:
            log.info("MGN: stop requested by signal at step %d; saving and exiting", state.step)
            # The warning may have reached any one rank; rank 0 requeues, so all must agree on it.
            requeue = distributed.any_rank(preemption.wants_requeue(), self.device)
            self.save()
            self.tensorboard.flush()
            return {"step": state.step, "rank": self.world.rank, "preempted": True, "requeue": requeue}
        return self._finish()

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
                grid_batch = (batch["image"][:16], prediction.attention[:16])
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
            if grid_batch is not None and self.state.attention_grids < self.cfg.train.attention_images:
                self.state.attention_grids += 1
                self.tensorboard.attention_grid("attention/cross_modality", *grid_batch, self.mean, self.std,
                                                self.state.step)
        results = distributed.gather_objects(results)[0] if self.world.world_size > 1 else results
        score = results["student"]["accuracy"]
        if score > self.state.best_metric:
            self.state.best_metric = score
            if self.world.is_main:
                export_student(objective.student, self.cfg, self.cfg.run_dir / "student_best")
                log.info("MGN: new best student accuracy %.4f, exported to %s", score,
                         self.cfg.run_dir / "student_best")
        self.tensorboard.flush()
        return results

    def _log_eval(self, results: dict) -> None:
        for role, m in results.items():
            log.info("MGN: eval step %d %-7s acc %.4f  P %.4f  R %.4f  F1 %.4f  AUROC %.4f  (%d samples)",
                     self.state.step, role, m["accuracy"], m["precision"], m["recall"], m["f1"], m["auroc"],
                     m["samples"])

    # --- checkpoints and the end -----------------------------------------------------------------------
    def save(self) -> None:
        distributed.sync_batchnorm_buffers(self.engine.module)
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state, self.cfg.to_dict(),
                              self.cfg.train.keep_last, self.world.rank)
        self.tensorboard.flush()
        log.info("MGN: checkpoint %s", self.ckpt_dir / tag)

    def _finish(self) -> dict:
        if not (self.ckpt_dir / checkpoint.tag_for(self.state.step)).exists():
            self.save()
        summary = {"step": self.state.step, "epochs": self.state.epoch, "world_size": self.world.world_size,
                   "train_seconds": round(time.perf_counter() - self.started, 2),
                   "best_student_accuracy": self.state.best_metric, "run_dir": str(self.cfg.run_dir),
                   "checkpoints": str(self.ckpt_dir), "tensorboard": str(self.cfg.run_dir / "tb"),
                   "preempted": False}
        if self.world.is_main:
            summary["student"] = str(export_student(self.objective.student, self.cfg, self.cfg.run_dir / "student"))
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("MGN: done step=%d. run dir %s | TensorBoard: tensorboard --logdir %s | checkpoints %s | "
                     "student %s", self.state.step, self.cfg.run_dir, summary["tensorboard"], self.ckpt_dir,
                     summary["student"])
        distributed.barrier()
        return summary


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
