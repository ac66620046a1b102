"""Non-finite guard: a NaN or inf loss or gradient skips the update on every rank, and never reaches a file.

    GuardedAdamW        fused AdamW whose step is skipped, on the device, when the trainer says so (a rank's
                        loss or BatchNorm statistic went non-finite) or when a gradient it holds is not finite
    BatchNormSnapshot   BatchNorm running statistics as of the last accepted update; a forward pass that blew
                        up has already written into them, so a skipped update puts them back (on the device)
    UpdateGuard         the trainer's calls after each update: settle the statistics now; count the skip and
                        stop after too many, once the update's flags reach the host
    (mgn.model.finite: the check before any checkpoint, exported student or evaluation)

Every decision is made on the device, so an update costs the host no wait for the GPU: the ranks agree on
whether any saw a non-finite loss with one small all-reduce queued on the device (shared with the preemption
flag), the optimizer skips through fused AdamW's `found_inf`, and the statistics are put back with a select.
The host learns what happened one update later (mgn.devices.HostCopy), in time to count skips, stop a diverged
run and keep checkpoints clean. Under ZeRO-1/2 the optimizer also agrees on its gradient check (each rank
holds a partition), and DeepSpeed's own check of the global gradient norm may skip the step too; the trainer
counts those through `engine.skipped_steps`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from mgn import devices, distributed
from mgn.cli import EXIT_DIVERGED
from mgn.model.finite import NonFiniteError, non_finite

log = logging.getLogger("mgn")


class Diverged(NonFiniteError):
    """The run cannot go on as it is: `max_skipped_steps` updates in a row were skipped, or the model itself
    holds NaN/inf. The message names the step, what went non-finite, the last verified checkpoint and how to
    resume. Handled by train.on_divergence (mgn/train/recovery.py); a stopped run exits with code 3
    (mgn/cli.py). `step`: the update that diverged (the run learns of a skipped update one update later:
    mgn/train/loop.py)."""

    # one line on every rank, logged by the run itself (mgn/train/loop.py)
    exit_code, logged = EXIT_DIVERGED, True

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class GuardedAdamW(torch.optim.AdamW):
    """Fused AdamW that skips an update when told to or when a gradient it holds is not finite, and clips the
    others, deciding on the device: the skip is fused AdamW's `found_inf` (the kernel leaves weights, moments
    and step count as they were), so no step waits for the host to look at a norm.

    `skip_next_step` (set by the trainer) is a 0-d bool tensor on the device: some rank's loss or BatchNorm
    statistic was not finite. `agree(bad) -> bad` turns this rank's verdict into one for every rank (a device
    tensor, true if any rank's is): under ZeRO-1/2 each rank steps only its own partition of the gradients,
    and ranks that decided alone could apply a partial update. `skipped` is what the last step did, on the
    device.

    `clip` > 0 clips the gradients to that global L2 norm, as torch.nn.utils.clip_grad_norm_ does, from the
    norm the finite check computes anyway: one fused pass over the gradients where DeepSpeed's own ZeRO-0
    clipping loops over the parameters in Python (a norm and a multiply each) and all-reduces a norm that
    every rank already shares (mgn/train/engine.py leaves DeepSpeed's clipping to ZeRO-1/2, whose partitions
    need it).
    """

    def __init__(self, params, *, agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 clip: float = 0.0,
                 **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.agree, self.clip = agree, clip
        self.skip_next_step: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return super().step(closure)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        bad = ~torch.isfinite(total)
        if self.skip_next_step is not None:
            bad = bad | self.skip_next_step
        self.skipped = self.agree(bad) if self.agree is not None else bad
        # read by fused AdamW: a skipped step leaves every state untouched
        self.found_inf = self.skipped.float()
        if self.clip > 0:
            torch._foreach_mul_(grads, torch.clamp(self.clip / (total + 1e-6), max=1.0))
        return super().step(closure)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # a checkpoint written before the optimizer was fused says fused=False
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None


class BatchNormSnapshot:
    """Running statistics of every BatchNorm in `module`, as of the last accepted update: one flat copy per
    dtype (float statistics, integer batch counts), so keeping or putting them back is a few kernels, not one
    per layer."""

    def __init__(self, module: nn.Module):
        buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in buffers:
            self.groups.setdefault(buffer.dtype, []).append(buffer)
        self.saved = {dtype: self._flat(group).clone() for dtype, group in self.groups.items()}

    @staticmethod
    def _flat(group: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.detach().reshape(-1) for b in group])

    def _write(self, dtype: torch.dtype, flat: torch.Tensor) -> None:
        group = self.groups[dtype]
        torch._foreach_copy_(group, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in group]),
                                                                  group)])

    @torch.no_grad()
    def keep(self) -> None:
        for dtype, group in self.groups.items():
            self.saved[dtype].copy_(self._flat(group))

    @torch.no_grad()
    def settle(self, skipped: torch.Tensor) -> None:
        """After an update, on the device: where it was skipped the statistics are put back, where it was
        accepted they stay; either way they become the snapshot. `skipped`: a 0-d bool tensor."""
        for dtype, group in self.groups.items():
            chosen = torch.where(skipped, self.saved[dtype], self._flat(group))
            self.saved[dtype].copy_(chosen)
            self._write(dtype, chosen)

    @torch.no_grad()
    def non_finite(self) -> torch.Tensor:
        """A 0-d bool tensor on the buffers' device (no host sync): whether a forward pass wrote NaN or inf
        into any running statistic. A finite loss does not prove it: a huge update shows here first."""
        stats = [b for dtype, group in self.groups.items() if dtype.is_floating_point for b in group]
        if not stats:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(torch.stack(torch._foreach_norm(stats))).all()


class UpdateGuard:
    """After each update: settle its BatchNorm statistics on the device (`settle`); once its flags reach the
    host (`count`, an update later), count a skipped one and declare the run diverged after `limit` in a row
    (`hint()` says where to go on from)."""

    def __init__(self, module: nn.Module, limit: int, hint: Callable[[], str]):
        self.batchnorm, self.limit, self.hint = BatchNormSnapshot(module), limit, hint

    def accept(self) -> None:
        """The model as it is now is good (after a resume or a rollback)."""
        self.batchnorm.keep()

    def settle(self, skipped: torch.Tensor) -> None:
        self.batchnorm.settle(skipped)

    def count(self, skipped: bool, step: int, state) -> None:
        """Update `step` was (not) skipped. `state`: the run's TrainState (skipped_steps,
        consecutive_skips)."""
        if not skipped:
            state.consecutive_skips = 0
            return
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log.warning("MGN: step %d skipped: non-finite loss, gradient or BatchNorm statistic on some rank (%d "
                    "in a "
                    "row, %d in this run); weights unchanged", step, state.consecutive_skips,
                    state.skipped_steps)
        if state.consecutive_skips >= self.limit:
            raise Diverged(
                f"{self.limit} updates in a row (steps {step - self.limit + 1}-{step}) had a non-finite "
                f"loss, gradient or BatchNorm statistic (train.max_skipped_steps={self.limit}); the weights "
                "were not "
                f"updated by them. "
                f"{self.hint()}", step=step)

    def check_model(self, module: nn.Module, step: int) -> None:
        """Before a checkpoint or an evaluation: a model that holds NaN/inf means the run diverged."""
        bad = non_finite(module)
        if bad:
            raise Diverged(f"the model at step {step} holds NaN or inf in {len(bad)} tensors (e.g. "
                           f"{bad[:3]}); "
                           f"nothing was saved from it. {self.hint()}", step=step)


class UpdateFlags:
    """Each update's two flags, decided on the device and read by the host one update late: some rank was
    signalled (stop), the update was skipped (a non-finite loss, gradient or BatchNorm statistic on some
    rank). The one wait for the device per update, which by then has long passed (mgn.devices.HostCopy);
    `flush` reads the last one at once, before anything that must know it (an evaluation, a checkpoint, an
    epoch's end)."""

    def __init__(self, guard: UpdateGuard, device: torch.device, on_skip: Callable[[int, int], None]):
        self.guard, self.device, self.on_skip = guard, device, on_skip  # on_skip(step, skipped so far)
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        self.unread: tuple[int, devices.HostCopy] | None = None
        self.stop_requested = False

    def loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss: remembered, on the device, when it is not finite."""
        self.bad_loss |= ~torch.isfinite(loss.detach())

    def before_step(self, optimizer, signalled: bool) -> torch.Tensor:
        """At an update boundary: one all-reduce, queued, of this rank's signal and non-finite loss or
        statistic; the optimizer skips on any rank's. Returns the agreed signal flag (a device tensor)."""
        self.bad_loss |= self.guard.batchnorm.non_finite().to(self.device)
        signal = torch.full((), float(signalled), device=self.device)
        flags = distributed.max_over_ranks(torch.stack([signal, self.bad_loss.float()]))
        optimizer.skip_next_step = flags[1] > 0
        return flags[0]

    def after_step(self, step: int, signalled: torch.Tensor, skipped: torch.Tensor, state) -> None:
        """Update `step` done on the device: settle its statistics, send its flags on their way, read the last
        update's (`state`: the run's TrainState, counted in; may raise Diverged)."""
        self.bad_loss.zero_()
        self.guard.settle(skipped)
        earlier, self.unread = self.unread, (step, devices.HostCopy(torch.stack([signalled, skipped.float()]),
                                                                     self.device))
        if earlier is not None:
            self._read(*earlier, state)

    def flush(self, state) -> None:
        if self.unread is not None:
            earlier, self.unread = self.unread, None
            self._read(*earlier, state)

    def forget(self) -> None:
        """After a rollback: what was pending belongs to the abandoned stretch."""
        self.unread = None
        self.bad_loss.zero_()

    def _read(self, step: int, flags: devices.HostCopy, state) -> None:
        signalled, skipped = flags.read()
        self.stop_requested |= bool(signalled)
        if skipped:
            self.on_skip(step, state.skipped_steps + 1)
        self.guard.count(bool(skipped), step, state)
