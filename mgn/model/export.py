"""Turn a trained model into the deployable student: fused MobileOne + head (another backbone as trained).

The artifact is `student.safetensors`: fused weights, with `config.json` and `export.json` in its
metadata; loading it (mgn.checkpoint.store) runs no code. Beside it, the same student as a `torch.export`
program (`student.pt2`) and as ONNX, for runtimes that want a graph, from sources you trust.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from timm.models.byobnet import MobileOneBlock
from timm.utils import reparameterize_model
from torch import nn

from mgn.config import Config
from mgn.data.decode import image_normalisation
from mgn.model.networks import ImageClassifier

log = logging.getLogger("mgn")

ARTIFACT_NAME = "student.safetensors"  # the deployable student: weights and config, no code
PROGRAM_NAME = "student.pt2"  # the same student as a torch.export program: for trusted sources only
FORMAT_VERSION = 1


def fuse_student(student: ImageClassifier) -> ImageClassifier:
    """A reparameterized copy in eval mode; the trained model is left untouched.

    timm's `reparameterize_model` does not switch to eval: fusing a train-mode model would fold
    batch statistics instead of running statistics, so eval comes first.
    """
    fused = reparameterize_model(plain_batchnorm(copy.deepcopy(student)).eval())
    return fused.eval()


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo timm's `convert_sync_batchnorm` (multi-GPU training), sharing the same tensors.

    MobileOne's fusion accepts only `nn.BatchNorm2d` branches, and inference has no process group.
    """
    converted = module
    if isinstance(module, nn.SyncBatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if isinstance(module, SyncBatchNormAct):
            converted = BatchNormAct2d(*args)
            converted.act, converted.drop = module.act, module.drop
        else:
            converted = nn.BatchNorm2d(*args)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, plain_batchnorm(child))
    return converted


def unfuse_into(student: ImageClassifier, fused_weights: dict[str, torch.Tensor]) -> None:
    """Write a fused student's weights into an unfused (training-layout) student, exactly.

    Each MobileOne block keeps its fused kernel and bias in its first conv branch, whose BatchNorm is
    made an identity (mean 0, variance 1, scale sqrt(1 + eps), so that fusing it again gives the kernel
    back bit for bit); every other branch gets zero scale and shift. In eval mode the result computes
    the fused function, and `fuse_student` returns the fused weights unchanged. In train mode BatchNorm
    normalises with batch statistics, so training from here starts from these weights, not this function.
    """
    weights = student.state_dict()
    blocks = [name for name, m in student.named_modules() if isinstance(m, MobileOneBlock)]
    for name, value in weights.items():
        block = next((b for b in blocks if name.startswith(f"{b}.")), None)
        part = name[len(block) + 1:] if block else name
        if block is None or not part.startswith(("conv_kxk.", "conv_scale.", "identity.")):
            weights[name] = fused_weights[name]  # head, squeeze-excite: the same in both layouts
            continue
        if part.endswith("num_batches_tracked"):
            continue
        first = part.startswith("conv_kxk.0.")
        if part == "conv_kxk.0.conv.weight":
            weights[name] = fused_weights[f"{block}.reparam_conv.weight"]
        elif part.endswith("conv.weight"):
            weights[name] = torch.zeros_like(value)
        elif part.endswith("running_mean"):
            weights[name] = torch.zeros_like(value)
        elif part.endswith("running_var"):
            weights[name] = torch.ones_like(value)
        elif part.endswith("weight"):  # BatchNorm scale
            eps = student.get_submodule(f"{block}.{part.rsplit('.', 1)[0]}").eps
            weights[name] = (torch.ones_like(value) + eps).sqrt() if first else torch.zeros_like(value)
        elif part.endswith("bias"):  # BatchNorm shift
            weights[name] = fused_weights[f"{block}.reparam_conv.bias"] if first else torch.zeros_like(value)
    student.load_state_dict(weights, strict=True)


def has_reparameterization(model: nn.Module) -> bool:
    """Whether timm's `reparameterize_model` changes anything in `model` (MobileOne, RepVGG, FastViT, ...:
    modules with `reparameterize` or `fuse`); other backbones are deployed as trained."""
    return any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules())


def unfused_modules(model: nn.Module) -> list[str]:
    """Names of modules that should not exist after fusion: BatchNorm layers and MobileOne branches."""
    leftovers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            leftovers.append(name)
        elif getattr(module, "conv_kxk", None) is not None or getattr(module, "conv_scale", None) is not None:
            leftovers.append(name)
    return leftovers


def export_student(student: ImageClassifier, cfg: Config, out_dir: str | Path, *,
                   formats: tuple[str, ...] | None = None) -> Path:
    """Write the fused student to `out_dir` in `formats` (None: the run's train.export_formats); returns the
    path of the deployable `student.safetensors`.

    student.safetensors: the fused weights, with the run's config and export facts in its metadata. It
    holds tensors only, so loading it runs no code: the loader rebuilds the network with timm, fuses it,
    and fills in the weights (mgn.checkpoint.store). student.pt2 (torch.export) and student.onnx carry their
    own graph; load them only from sources you trust (README, "Security").
    """
    formats = formats or tuple(cfg.train.export_formats.split(","))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fused = fuse_student(student).float().cpu()
    reparameterized = has_reparameterization(student)
    leftovers = unfused_modules(fused)
    if reparameterized and leftovers:
        raise RuntimeError(f"reparameterization left unfused modules: {leftovers[:5]}")
    note = ("reparameterized: each block's branches and BatchNorm folded into one convolution"
            if reparameterized else f"exported as trained (BatchNorm in eval mode): timm has no "
                                    f"reparameterization for {cfg.model.image_model}")
    size = cfg.model.image_size
    # what a deployment must do to an image before the model sees it
    mean, std = image_normalisation(cfg.model)
    meta = {"format_version": FORMAT_VERSION, "fused": reparameterized, "note": note,
            "input": [3, size, size],
            "normalisation": {"scale": "RGB / 255", "mean": list(mean), "std": list(std)},
            "num_classes": cfg.model.num_classes, "image_model": cfg.model.image_model,
            "objective": cfg.objective.name}
    if "safetensors" in formats:
        from safetensors.torch import save_file

        tmp = out_dir / f".tmp-{ARTIFACT_NAME}"
        save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(tmp),
                  metadata={"config.json": cfg.to_json(), "export.json": json.dumps(meta)})
        tmp.replace(out_dir / ARTIFACT_NAME)
    example = torch.zeros(2, 3, size, size)
    if "pt2" in formats:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(fused, (example,), dynamic_shapes=({0: batch},))
        tmp = out_dir / f".tmp-{PROGRAM_NAME}"
        torch.export.save(program, tmp, extra_files={"config.json": cfg.to_json(),
                                                     "export.json": json.dumps(meta)})
        tmp.replace(out_dir / PROGRAM_NAME)
    if "onnx" in formats:
        _export_onnx(fused, example, out_dir / "student.onnx")
    return out_dir / ARTIFACT_NAME


def _export_onnx(fused: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401 - optional dependency
    except ImportError:
        log.info("MGN: onnx not installed, skipping %s", path.name)
        return
    torch.onnx.export(fused, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
