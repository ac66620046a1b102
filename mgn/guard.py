"""Non-finite guard: a NaN or inf loss or gradient skips the update on every rank, and never reaches a file.

    GuardedAdamW        AdamW whose step() does nothing when told to skip, or when a gradient it holds is not
                        finite (ZeRO-0: the gradients are already averaged, so every rank sees the same ones)
    BatchNormSnapshot   BatchNorm running statistics as of the last accepted update; a forward pass that blew
                        up has already written into them, so a skipped update puts them back
    UpdateGuard         the trainer's one call after each update: keep or restore, count, stop after too many
    require_finite      the check before any checkpoint, exported student or evaluation

The trainer agrees across ranks, at each update boundary, whether any rank saw a non-finite loss (one
small all-reduce, shared with the preemption flag). Under ZeRO-1/2 the optimizer also agrees on its
gradient check (each rank holds a partition), and DeepSpeed's own check of the global gradient norm may
skip the step too; the trainer counts those through `engine.skipped_steps`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger("mgn")


class NonFiniteError(RuntimeError):
    """A model holds NaN or inf, or training cannot continue because of them."""


class Diverged(NonFiniteError):
    """The run cannot go on as it is: `max_skipped_steps` updates in a row were skipped, or the model itself holds
    NaN/inf. The message names the step, what went non-finite, the last verified checkpoint and how to resume.
    Handled by train.on_divergence (mgn/recovery.py); a stopped run exits with code 3 (mgn/cli.py)."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips an update when told to or when a gradient it holds is not finite, and clips the others.

    `agree(bad) -> bool`, when given, turns this rank's verdict into one for every rank (True if any rank's is
    bad): under ZeRO-1/2 each rank steps only its own partition of the gradients, and ranks that decided alone
    could apply a partial update.

    `clip` > 0 clips the gradients to that global L2 norm, as torch.nn.utils.clip_grad_norm_ does, from the
    norms the finite check computes anyway: one fused pass over the gradients where DeepSpeed's own ZeRO-0
    clipping loops over the parameters in Python (a norm and a multiply each) and all-reduces a norm that
    every rank already shares (mgn/engine.py leaves DeepSpeed's clipping to ZeRO-1/2, whose partitions need it).
    """

    def __init__(self, params, *, agree: Callable[[bool], bool] | None = None, clip: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.agree, self.clip = agree, clip
        self.skip_next_step = False  # set by the trainer when a rank saw a non-finite loss
        self.skipped = False  # what the last step() did

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        bad = self.skip_next_step or (total is not None and not bool(torch.isfinite(total)))
        self.skipped = self.agree(bad) if self.agree is not None else bad
        if self.skipped:
            return None
        if self.clip > 0 and grads:
            torch._foreach_mul_(grads, torch.clamp(self.clip / (total + 1e-6), max=1.0))
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

    @torch.no_grad()
    def non_finite(self) -> torch.Tensor:
        """A 0-d bool tensor on the buffers' device (no host sync): whether a forward pass wrote NaN or inf into
        any running statistic. A finite loss does not prove it: a huge update shows here first."""
        stats = [b for b in self.buffers if b.is_floating_point()]
        if not stats:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(torch.stack(torch._foreach_norm(stats))).all()


class UpdateGuard:
    """After each update: keep the BatchNorm statistics of an accepted one; after a skipped one put them back,
    count it, and declare the run diverged after `limit` in a row (`hint()` says where to go on from)."""

    def __init__(self, module: nn.Module, limit: int, hint: Callable[[], str]):
        self.batchnorm, self.limit, self.hint = BatchNormSnapshot(module), limit, hint

    def accept(self) -> None:
        """The model as it is now is good (after an accepted update, or a resume)."""
        self.batchnorm.keep()

    def after_update(self, skipped: bool, state) -> None:
        """`state`: the run's TrainState (step, skipped_steps, consecutive_skips), updated here."""
        if not skipped:
            self.accept()
            state.consecutive_skips = 0
            return
        self.batchnorm.restore()
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log.warning("MGN: step %d skipped: non-finite loss, gradient or BatchNorm statistic on some rank (%d in a "
                    "row, %d in this run); weights unchanged", state.step, state.consecutive_skips, state.skipped_steps)
        if state.consecutive_skips >= self.limit:
            raise Diverged(
                f"{self.limit} updates in a row (steps {state.step - self.limit + 1}-{state.step}) had a non-finite "
                f"loss, gradient or BatchNorm statistic (train.max_skipped_steps={self.limit}); the weights were not "
                f"updated by them. "
                f"{self.hint()}")

    def check_model(self, module: nn.Module, step: int) -> None:
        """Before a checkpoint or an evaluation: a model that holds NaN/inf means the run diverged."""
        bad = non_finite(module)
        if bad:
            raise Diverged(f"the model at step {step} holds NaN or inf in {len(bad)} tensors (e.g. {bad[:3]}); "
                           f"nothing was saved from it. {self.hint()}")


def non_finite(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `module` that hold a NaN or inf."""
    return [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def require_finite(module: nn.Module, what: str) -> None:
    bad = non_finite(module)
    if bad:
        raise NonFiniteError(f"refusing to use {what}: {len(bad)} tensors hold NaN or inf (e.g. {bad[:3]}); the "
                             f"weights diverged. Resume from an earlier checkpoint with a lower learning rate")
