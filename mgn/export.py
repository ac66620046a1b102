"""Turn a trained model into the deployable student: fused MobileOne + head, one file.

The artifact is a `torch.export` program (`student.pt2`) with `config.json` and `export.json`
embedded as extra files, so it carries its own weights, graph and configuration. An ONNX copy
is written beside it when the `onnx` package is installed.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from timm.utils import reparameterize_model
from torch import nn

from mgn.config import Config
from mgn.model import ImageClassifier

log = logging.getLogger("mgn")

ARTIFACT_NAME = "student.pt2"
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


def unfused_modules(model: nn.Module) -> list[str]:
    """Names of modules that should not exist after fusion: BatchNorm layers and MobileOne branches."""
    leftovers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            leftovers.append(name)
        elif getattr(module, "conv_kxk", None) is not None or getattr(module, "conv_scale", None) is not None:
            leftovers.append(name)
    return leftovers


def export_student(student: ImageClassifier, cfg: Config, out_dir: str | Path, *, onnx: bool = True) -> Path:
    """Write the fused student to `out_dir/student.pt2` (and `.onnx`); returns the .pt2 path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fused = fuse_student(student).float().cpu()
    leftovers = unfused_modules(fused)
    if leftovers:
        raise RuntimeError(f"reparameterization left unfused modules: {leftovers[:5]}")
    size = cfg.model.image_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(fused, (example,), dynamic_shapes=({0: batch},))
    meta = {"format_version": FORMAT_VERSION, "fused": True, "input": [3, size, size],
            "num_classes": cfg.model.num_classes, "image_model": cfg.model.image_model,
            "trained_mode": cfg.model.mode}
    path = out_dir / ARTIFACT_NAME
    tmp = out_dir / f".tmp-{ARTIFACT_NAME}"
    torch.export.save(program, tmp, extra_files={"config.json": cfg.to_json(), "export.json": json.dumps(meta)})
    tmp.replace(path)
    if onnx:
        _export_onnx(fused, example, out_dir / "student.onnx")
    return path


def _export_onnx(fused: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        log.info("MGN: onnx not installed, skipping %s", path.name)
        return
    torch.onnx.export(fused, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def load_student(path: str | Path) -> tuple[nn.Module, Config, dict]:
    """Load an exported student: (callable module, its training config, export metadata)."""
    extra = {"config.json": "", "export.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    if not extra["config.json"] or not extra["export.json"]:
        raise ValueError(f"{path}: not an MGN student artifact (no embedded config.json/export.json)")
    return program.module(), Config.from_dict(json.loads(extra["config.json"])), json.loads(extra["export.json"])
