"""Validation of a configuration: every field's type, choices and range, then what spans several fields.

    validate(cfg)  -> None, or a ValueError naming the flag (`section.field=VALUE ...`) and what is allowed
    RANGES         -> the range of every numeric field

Apart from mgn/config.py, which holds the fields, presets and flags and calls `validate` on every config it
builds (`mgn.config.validate` stays the name callers use): this is the rule book, read against any
config-shaped object (sections of dataclass fields, choice fields carrying their allowed values as `option`
metadata), so it imports nothing from mgn and nothing heavy (`python train.py --help` must answer before torch
loads).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

# The image encoders of the presets (MobileOne, the paper's), known without importing timm; any other timm
# model name is checked against timm's registry (check_image_model).
PRESET_IMAGE_MODELS = tuple(f"mobileone_s{i}" for i in range(5))
# MobileOne downsamples by 32: a smaller input still gives a one-cell embedding, of mostly padding.
MIN_IMAGE_SIZE = 32
# numpy seeds its generator with 32 bits, and every rank adds its rank to train.seed.
MAX_SEED = 2**31 - 1

# The range of every numeric field: (low, high, low_inclusive, high_inclusive); None = unbounded. A field that
# is not here is a choice (its `option` lists the values), a bool, a free string, or checked by name in
# `validate`; tests/test_bad_input.py fails when a new field is none of these.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.image_size": (MIN_IMAGE_SIZE, None, True, True),
    "model.seq_len": (1, None, True, True),
    "model.text_cache": (0, None, True, True),
    "model.fusion_dim": (1, None, True, True),
    "model.attention_heads": (1, None, True, True),
    "model.num_classes": (2, None, True, True),
    "model.drop_rate": (0, 1, True, False),
    "objective.student_weight": (0, None, True, True),
    "objective.distill_weight": (0, 1, True, True),
    "objective.temperature": (0, None, False, True),
    "objective.attention_weight": (0, None, True, True),
    "objective.caption_dropout": (0, 1, True, True),
    "data.num_workers": (0, None, True, True),
    "data.shuffle_buffer": (0, None, True, True),
    "data.max_skip_fraction": (0, 1, True, True),
    "data.synthetic_samples": (0, None, True, True),
    "data.max_image_pixels": (1, None, True, True),
    "data.max_caption_bytes": (1, None, True, True),
    "data.max_member_bytes": (1, None, True, True),
    "data.max_sample_bytes": (1, None, True, True),
    "train.seed": (0, MAX_SEED, True, True),
    "train.epochs": (1, None, True, True),
    "train.micro_batch": (1, None, True, True),
    "train.grad_accum": (1, None, True, True),
    "train.lr_image": (0, None, True, True),
    "train.lr_text": (0, None, True, True),
    "train.lr_head": (0, None, True, True),
    "train.weight_decay": (0, None, True, True),
    "train.warmup_steps": (0, None, True, True),
    "train.grad_clip": (0, None, True, True),
    "train.max_skipped_steps": (1, None, True, True),
    "train.max_rollbacks": (0, None, True, True),
    "train.rollback_skip_updates": (0, None, True, True),
    "train.rollback_lr_scale": (0, 1, False, True),
    "train.label_smoothing": (0, 1, True, False),
    "train.dist_timeout_s": (1, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.eval_every": (-1, None, True, True),
    "train.ckpt_every": (0, None, True, True),
    "train.keep_last": (0, None, True, True),
    "train.attention_images": (0, None, True, True),
}

# What a range means for a field, where the bare bound says too little.
RANGE_NOTES = {
    "model.image_size": " (MobileOne downsamples by 32: a smaller input is a one-cell embedding of padding)",
    "model.num_classes": " (binary uses 2 logits)",
    "train.eval_every": " (-1: never during training; 0: after each epoch)",
    "train.seed": " (numpy takes 32-bit seeds, and each rank adds its rank)",
}


def _describe_range(low, high, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _type_error(value: Any, default: Any) -> str | None:
    """Why `value` cannot stand where the dataclass default is `default` (a config file may hold anything)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected a whole number"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        return None if math.isfinite(value) else "expected a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "expected a string"
    return None


def _field_errors(cfg: Any):
    """(key, message) for every field whose type, choice or range is wrong, in field order."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            wrong = _type_error(value, f.default)
            if wrong:
                yield key, f"{key}={value!r}: {wrong}"
                continue
            allowed = f.metadata.get("choices")
            if allowed is not None and value not in allowed:
                yield key, f"{key}={value!r}: expected one of {list(allowed)}"
            if key in RANGES:
                low, high, low_in, high_in = RANGES[key]
                below = value < low if low_in else value <= low
                above = high is not None and (value > high if high_in else value >= high)
                if below or above:
                    yield key, (f"{key}={value!r} must be {_describe_range(low, high, low_in, high_in)}"
                                f"{RANGE_NOTES.get(key, '')}")


def check_image_model(flag: str, name: str) -> None:
    """`name` is a timm model (any backbone timm builds: its last feature map feeds the guidance path)."""
    if name in PRESET_IMAGE_MODELS:
        return
    import difflib

    import timm  # only for a name the presets do not use

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"{flag}={name!r}: not a timm model name{hint}")


def _check_channels(flag: str, text: str, positive: bool) -> None:
    """'' or three comma-separated finite numbers, one per RGB channel (all > 0 when `positive`)."""
    if not text:
        return
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise ValueError(f"{flag}={text!r}: expected three comma-separated numbers, one per RGB channel "
                         f"(e.g. 0.5,0.5,0.5){', each > 0' if positive else ''}")


def validate(cfg: Any) -> None:
    """Reject impossible settings once, at start, with the flag that caused them: every field's type, choices
    (`option`) and range (`RANGES`), then what depends on more than one field or on a field's form.

    `cfg` is a mgn.config.Config, read field by field (this module does not import it: mgn/config.py imports
    this one)."""
    for _, message in _field_errors(cfg):
        raise ValueError(message)
    m, o, t = cfg.model, cfg.objective, cfg.train
    check_image_model("model.image_model", m.image_model)
    for name in ("image_mean", "image_std"):
        _check_channels(f"model.{name}", getattr(m, name), positive=name == "image_std")
    if bool(m.image_mean) != bool(m.image_std):
        raise ValueError(f"model.image_mean={m.image_mean!r} and model.image_std={m.image_std!r}: set both "
                         "(a "
                         f"backbone's own normalisation) or neither (its timm pretrained config's)")
    side = math.isqrt(m.seq_len)
    if side * side != m.seq_len:
        raise ValueError(
            f"model.seq_len={m.seq_len} is not a perfect square: the token embeddings [B, L, H] are "
            f"reshaped to a [H, sqrt(L), sqrt(L)] block (e.g. 121 -> 11x11, 64 -> 8x8)")
    if m.fusion_dim % m.attention_heads:
        raise ValueError(f"model.fusion_dim={m.fusion_dim} must be divisible by "
                         f"model.attention_heads={m.attention_heads}")
    if m.image_size <= MIN_IMAGE_SIZE and t.micro_batch == 1:
        raise ValueError(f"model.image_size={m.image_size} with train.micro_batch=1: at <= {MIN_IMAGE_SIZE} "
                         "px the "
                         "image embedding is one cell, and BatchNorm in training needs more than one value "
                         "per "
                         f"channel; raise either")
    if o.name == "guided" and m.attend_to == "fusion" and o.student_weight <= 0:
        raise ValueError("model.attend_to=fusion trains the classifier on fusion features only; "
                         "set objective.student_weight > 0 so the image-only student head is trained")
    if cfg.data.text_blocks and not m.freeze_text:
        raise ValueError(f"data.text_blocks={cfg.data.text_blocks!r} needs model.freeze_text=true: a text "
                         "encoder "
                         f"that trains changes its captions' blocks at every step")
    formats = t.export_formats.split(",")
    if "safetensors" not in formats or not set(formats) <= {"safetensors", "pt2", "onnx"}:
        raise ValueError(f"train.export_formats={t.export_formats!r}: a comma-separated subset of "
                         "safetensors,pt2,onnx that holds safetensors (the file evaluate.py and benchmark.py "
                         "read)")
    name = Path(t.run_name)
    if t.run_name and (name.is_absolute() or ".." in name.parts or not name.parts):
        raise ValueError(f"train.run_name={t.run_name!r}: must be a folder name under train.output_dir "
                         f"(no absolute path, no '..')")
    if t.resume == "auto" and not t.run_name:
        raise ValueError("train.resume=auto continues a named run: also pass --train.run_name NAME "
                         f"(a folder under train.output_dir={t.output_dir!r})")
