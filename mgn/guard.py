"""Non-finite guard: a NaN or inf loss or gradient skips the update on every rank, and never reaches a file.

    GuardedAdamW        AdamW whose step() does nothing when told to skip, or when a gradient it holds is not
                        finite (ZeRO-0: the gradients are already averaged, so every rank sees the same ones)
    BatchNormSnapshot   BatchNorm running statistics as of the last accepted update; a forward pass that blew
                        up has already written into them, so a skipped update puts them back
    require_finite      the check before any checkpoint, exported student or evaluation

The trainer agrees across ranks, at each update boundary, whether any rank saw a non-finite loss (one
small all-reduce, shared with the preemption flag). Under ZeRO-1/2, DeepSpeed's own check of the global
gradient norm also skips the step; the trainer counts those through `engine.skipped_steps`.
"""
from __future__ import annotations

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """Training cannot continue (too many non-finite updates in a row) or a model holds NaN/inf."""


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.skip_next_step = False  # set by the trainer when a rank saw a non-finite loss
        self.skipped = False  # what the last step() did

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        self.skipped = self.skip_next_step or not finite
        if self.skipped:
            return None
        return super().step(closure)


class BatchNormSnapshot:
    """Running statistics of every BatchNorm in `module`, copied after each accepted update."""

    def __init__(self, module: nn.Module):
        self.buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def keep(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)


def non_finite(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `module` that hold a NaN or inf."""
    return [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def require_finite(module: nn.Module, what: str) -> None:
    bad = non_finite(module)
    if bad:
        raise NonFiniteError(f"refusing to use {what}: {len(bad)} tensors hold NaN or inf (e.g. {bad[:3]}); the "
                             f"weights diverged. Resume from an earlier checkpoint with a lower learning rate")
