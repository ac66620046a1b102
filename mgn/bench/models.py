"""The models `python benchmark.py` times, and the check that they compute the same thing before any is timed.

    prepare(...)         -> the deployed student (fused), its unfused form, and timm's own model of the same
                            backbone (fused where it can be) with the same weights; checkpoint or random init
    check_equivalence()  -> fused vs unfused and student vs plain outputs, fp32 on CPU

Kept apart from the timing (mgn/bench/latency.py) because what is timed must be settled, and shown equal,
before any clock starts: a model is built, warmed and checked here, and only handed over once it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from mgn.config import ModelConfig
from mgn.model.export import fuse_student
from mgn.model.networks import ImageClassifier


@dataclass
class Models:
    variant: str
    image_size: int
    num_classes: int
    weights: str  # where the weights came from, in words
    fused: nn.Module  # the deployed student
    plain: nn.Module  # timm.create_model(variant, num_classes=K), fused, same weights
    unfused: nn.Module | None = None
    notes: list[str] = field(default_factory=list)


def prepare(*, ckpt: str | None = None, variant: str = "mobileone_s4", image_size: int | None = None,
            num_classes: int = 2, bn_warmup_batches: int = 4, seed: int = 0, trust: bool = False) -> Models:
    """Student from a checkpoint (any kind mgn.eval.evaluate reads), or random init of `variant`."""
    if ckpt:
        from mgn.checkpoint.read import load_checkpoint

        loaded = load_checkpoint(ckpt, trust=trust)
        cfg = loaded.cfg.model
        weights = f"{loaded.kind} checkpoint {loaded.path}"
        if loaded.kind == "student":  # an exported program: rebuild an nn.Module with its weights to time it
            fused = fuse_student(ImageClassifier(cfg))
            fused.load_state_dict(loaded.student.state_dict(), strict=True)
            unfused = None
            x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
            with torch.inference_mode():
                diff = (fused(x) - loaded.student(x)).abs().max().item()
            notes = [(f"artifact holds fused weights only: no unfused comparison; rebuilt module vs exported "
                      f"program max |diff| {diff:.2e}")]
        else:
            fused, unfused, notes = loaded.student, loaded.unfused_student, []
        if image_size and image_size != cfg.image_size:
            notes.append(f"timed at {image_size} px; the checkpoint was trained at {cfg.image_size} px")
        size = image_size or cfg.image_size
        variant, num_classes = cfg.image_model, cfg.num_classes
    else:
        size = image_size or 224
        cfg = ModelConfig(image_model=variant, image_size=size, num_classes=num_classes)
        torch.manual_seed(seed)
        unfused = ImageClassifier(cfg)
        warm_batchnorm(unfused, size, bn_warmup_batches, seed)
        fused = fuse_student(unfused)
        passes = f"{bn_warmup_batches} train-mode pass{'es' if bn_warmup_batches != 1 else ''}"
        weights = (f"random init (no checkpoint); BatchNorm statistics from {passes} on ImageNet-normalised "
                   f"smooth-noise images")
        notes = []
    if unfused is not None:
        unfused = unfused.eval()
    plain = plain_timm_model(variant, num_classes, fused)
    return Models(variant=variant, image_size=size, num_classes=num_classes, weights=weights,
                  fused=fused.eval(),
                  plain=plain, unfused=unfused, notes=notes)


def realistic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Photo-like inputs, ImageNet-normalised: a smooth 8x8 colour field upsampled, plus a little pixel
    noise."""
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    image = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.rand(image.shape, generator=generator)).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def warm_batchnorm(model: nn.Module, image_size: int, batches: int, seed: int = 0) -> None:
    """Random-init BatchNorm statistics make MobileOne logits reach 1e7-1e8; use those of real-looking
    inputs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(realistic_images(8, image_size, generator))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def plain_timm_model(variant: str, num_classes: int, fused_student: nn.Module) -> nn.Module:
    """timm's own classifier of the same backbone, fused where it has a reparameterization, with the
    student's weights (encoder.* as they are, the head's into timm's classifier, e.g. `classifier` or
    `head.fc`)."""
    plain = fuse_student(timm.create_model(variant, pretrained=False, num_classes=num_classes))
    classifier = plain.pretrained_cfg.get("classifier", "head.fc")
    weights = {}
    for key, value in fused_student.state_dict().items():
        if key.startswith("head.fc."):
            key = classifier + key[len("head.fc"):]
        weights[key.removeprefix("encoder.")] = value
    plain.load_state_dict(weights, strict=True)
    return plain.eval()


# --- equivalence -------------------------------------------------------------------------------------------

@torch.inference_mode()
def check_equivalence(models: Models, rtol: float, batch: int = 4, seed: int = 1) -> dict:
    """fp32 outputs on CPU: fused vs unfused (relative to the logit scale) and student vs plain timm.

    Inputs look like the BatchNorm warm-up images: on far-off inputs (e.g. N(0,1) pixels) a random-init
    network's activations explode, and fp32 rounding differences grow with them.
    """
    x = realistic_images(batch, models.image_size, torch.Generator().manual_seed(seed))
    fused = models.fused.float().cpu()(x)
    out = {"input": f"{batch} smooth-noise images of {models.image_size} px (ImageNet-normalised), fp32, CPU"}
    if models.unfused is not None:
        reference = models.unfused.float().cpu()(x)
        diff = (fused - reference).abs().max().item()
        scale = reference.abs().max().item()
        out["fused_vs_unfused"] = {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / max(scale,
                                                                                                        1e-12),
                                   "rtol": rtol,
                                   "same_argmax": bool((fused.argmax(1) == reference.argmax(1)).all()),
                                   "ok": diff <= rtol * max(scale, 1e-12)}
    plain = models.plain.float().cpu()(x)
    diff = (fused - plain).abs().max().item()
    out["student_vs_plain"] = {"max_abs_diff": diff, "ok": diff <= rtol * max(plain.abs().max().item(),
                                                                              1e-12)}
    return out
