"""The optimisation machinery, built in one place: parameter groups and their learning rates, the schedule,
mixed precision and the DeepSpeed engine that holds them.

    build_engine(objective, cfg, device, total_steps) -> DeepSpeed engine (client GuardedAdamW +
    warmup-cosine;
                                                         the optimizer clips under ZeRO-0, DeepSpeed under
                                                         ZeRO-1/2)
    autocast(cfg, device)                             -> the forward's mixed-precision context (training's,
                                                      and the
                                                         text blocks' precomputation: the same arithmetic)
    apply_learning_rates(engine, cfg)                 -> after a resume, the config's rates win

Precision: bf16 runs as torch autocast over fp32 weights (fp32 master weights and optimizer state, fp32
BatchNorm statistics, the exported student fused from fp32 weights), not through DeepSpeed's `bf16`
section, which stores the model in bf16 and steps it with an unfused per-parameter optimizer. DeepSpeed
itself then runs in fp32 mode: it averages gradients, clips, checkpoints and partitions (ZeRO-1/2).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from mgn import devices, distributed
from mgn.config import Config
from mgn.train.guard import GuardedAdamW

log = logging.getLogger("mgn")


def learning_rates(cfg: Config, scale: float = 1.0) -> dict[str, float]:
    """The one map from parameter part to learning rate (times `scale`: the rollbacks' product,
    TrainState)."""
    return {"image": cfg.train.lr_image * scale, "text": cfg.train.lr_text * scale,
            "head": cfg.train.lr_head * scale}


def parameter_part(name: str) -> str:
    """Which learning rate a parameter of an objective takes: its image encoder, its text encoder, or the
    rest."""
    # Text first: a BERT's own layers are also named "...encoder...".
    if name.startswith("guide.text."):
        return "text"
    return "image" if name.startswith("student.encoder.") else "head"


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """One group per part and decay: separate learning rates, no weight decay on 1-d parameters (biases,
    norms)."""
    rates, buckets = learning_rates(cfg), {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((parameter_part(name), param.ndim > 1), []).append(param)
    return [{"name": part if decay else f"{part}_no_decay", "params": params, "lr": rates[part],
             "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (part, decay), params in sorted(buckets.items())]


def apply_learning_rates(engine, cfg: Config, scale: float = 1.0) -> list[str]:
    """After a resume, the config's learning rates win over the checkpoint's (a resume with a lower rate after
    a divergence must lower it): each group's base rate is reset and its current rate recomputed from the
    schedule's position. Logs and returns the changes."""
    rates, schedule, changes = learning_rates(cfg, scale), engine.lr_scheduler, []
    for index, group in enumerate(engine.client_optimizer.param_groups):
        base = rates[group["name"].removesuffix("_no_decay")]
        if schedule.base_lrs[index] != base:
            changes.append(f"{group['name']} {schedule.base_lrs[index]:g} -> {base:g}")
            schedule.base_lrs[index] = group["initial_lr"] = base
            group["lr"] = base * schedule.lr_lambdas[index](schedule.last_epoch)
    if changes:
        log.info("MGN: learning rates from this run's config%s, not the checkpoint's: %s",
                 f" x {scale:g} (rollbacks)" if scale != 1 else "", ", ".join(changes))
    return changes


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def precision(cfg: Config, device: torch.device) -> str:
    """'bf16' or 'fp32': `auto` is mgn.devices.default_precision (bf16 on a GPU, fp32 on the CPU)."""
    if cfg.train.precision == "auto":
        return devices.default_precision(device)
    return cfg.train.precision


def autocast(cfg: Config, device: torch.device):
    """The forward's mixed-precision context: bf16 autocast over fp32 weights, or nothing in fp32."""
    if precision(cfg, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deepspeed_config(cfg: Config) -> dict:
    """Per-rank micro-batch and accumulation only, so one config serves every world size. fp32 to DeepSpeed:
    mixed precision is autocast's (module docstring)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # ZeRO-0: GuardedAdamW clips (one fused pass); ZeRO-1/2: DeepSpeed, over the partitions. Explicit 0
        # rather than absent: DeepSpeed would otherwise clip at 1.0.
        "gradient_clipping": cfg.train.grad_clip if cfg.train.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # GuardedAdamW is torch's AdamW with a skip: ZeRO only knows the name
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(objective: nn.Module, cfg: Config, device: torch.device, total_steps: int):
    """DeepSpeed engine with a client fused AdamW (mgn.train.guard.GuardedAdamW) and the warmup-cosine
    schedule (saved in its checkpoints). Under ZeRO-1/2 each rank holds one partition of the gradients, so the
    optimizer's skip of a non-finite update is agreed across ranks (one decision for all, on the device);
    under ZeRO-0 every rank sees the same averaged gradients and decides alone."""
    import deepspeed  # heavy import, needed by training only

    agree = (lambda bad: distributed.max_over_ranks(bad.float()) > 0) if cfg.train.zero_stage > 0 else None
    optimizer = GuardedAdamW(param_groups(objective, cfg), agree=agree,
                             clip=cfg.train.grad_clip if cfg.train.zero_stage == 0 else 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps,
                                                                          total_steps))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg))
    if cfg.train.zero_stage == 0 and engine.world_size == 1:
        # Alone, DeepSpeed would still flatten every gradient into a bucket, "all-reduce" it with itself and
        # copy it back after each backward: two copies of the gradients per step for nothing (ZeRO-1/2 keep
        # the call: it moves the gradients into their partitions).
        engine.enable_backward_allreduce = False
    return engine
