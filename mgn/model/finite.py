"""Whether a model holds NaN or inf: the check before any checkpoint, exported student or evaluation uses it,
so nothing non-finite reaches a file or a score."""
from __future__ import annotations

import torch
from torch import nn

from mgn.cli import UserError


class NonFiniteError(UserError, RuntimeError):
    """A model holds NaN or inf, or training cannot continue because of them."""


def non_finite(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `module` that hold a NaN or inf."""
    return [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def require_finite(module: nn.Module, what: str) -> None:
    bad = non_finite(module)
    if bad:
        raise NonFiniteError(f"refusing to use {what}: {len(bad)} tensors hold NaN or inf (e.g. {bad[:3]}); "
                             "the "
                             f"weights diverged. Resume from an earlier checkpoint with a lower "
                             "learning rate")
