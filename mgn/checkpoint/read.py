"""Reading what training wrote, for evaluation, benchmarks and `train.init_from`.

`load_checkpoint(path)` accepts a run folder (or a folder of runs: the run its `latest` link names), its
checkpoints/ folder or `latest`, a tag folder (ZeRO-0 module states, or ZeRO-1/2 shards consolidated to fp32)
or an exported student (.safetensors, .pt2), and rebuilds the student (and on request the whole objective)
from the config saved with the weights, never from command-line options. Which file or tag a path stands for
is mgn/checkpoint/paths.py's `resolve` (tags through `mgn.checkpoint.store.newest_intact_tag`, the same
verified finder a resume uses). `init_student` loads those weights into a new run's student (`check_init_from`
first reads and checks them, before a run starts). Nothing is unpickled unless trusted.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mgn.checkpoint.store import (
    MODEL_STATES,
    TRUST_HINT,
    CheckpointError,
    UntrustedCheckpointError,
    config_differences,
)
from mgn.checkpoint.paths import resolve, strip_path
from mgn.config import Config
from mgn.model.export import ARTIFACT_NAME, fuse_student, has_reparameterization, unfuse_into
from mgn.model.networks import ImageClassifier
from mgn.model.objectives import build_objective
from mgn.run_paths import RunPaths

STUDENT_PREFIX = "student."  # every objective holds the deployed model as `self.student`


@dataclass
class Checkpoint:
    """A loaded checkpoint of any kind, with the deployed student ready to run (fused, eval, fp32, CPU)."""
    kind: str  # "deepspeed" (module states) | "zero" (ZeRO-1/2, consolidated to fp32) | "student" (artifact)
    path: Path  # the tag folder or the artifact file actually read
    cfg: Config
    student: nn.Module  # as deployed: fused MobileOne + head (or the exported program itself)
    stored_fused: bool  # whether the image encoder was already reparameterized in the file
    unfused_student: nn.Module | None = None  # the training-time student (None for an artifact or fused file)
    # the whole training objective (student + guidance), only when asked for
    objective: nn.Module | None = None
    step: int | None = None
    tag: str | None = None
    zero_stage: int | None = None
    dtype: str = "float32"  # dtype of the weights as stored
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"deepspeed": f"DeepSpeed checkpoint (ZeRO-{self.zero_stage or 0}, module states)",
                "zero": f"ZeRO-{self.zero_stage} checkpoint (fp32 weights consolidated by zero_to_fp32)",
                "student": "exported student artifact"}[self.kind]
        encoder = ("as trained (no reparameterization)" if not has_reparameterization(self.student) else
                   "stored fused" if self.stored_fused else "stored unfused, fused here for evaluation")
        step = f", step {self.step}" if self.step is not None else ""
        return (f"{what}{step}; objective {self.cfg.objective.name}, {self.cfg.model.image_model}, "
                f"encoder {encoder}")


def load_checkpoint(path: str | Path, *, teacher: bool = False, trust: bool = False,
                    take_latest_run: bool = True) -> Checkpoint:
    """Load any checkpoint kind; build the student (and with `teacher`, the whole objective) from its own
    config.

    Without `trust` nothing is unpickled: student.safetensors and the DeepSpeed model-states file are read as
    tensors only; a student.pt2 that marks any weight as pickled is refused; ZeRO-1/2 tags are read from
    their module states (fp32 masters would need DeepSpeed's unpickling consolidation of the optimizer shards,
    which `trust` allows).
    """
    notes: list[str] = []
    kind, where = resolve(path, notes, take_latest_run=take_latest_run)
    if kind == "artifact":
        if teacher:
            raise CheckpointError(f"{where}: an exported student holds no text encoder or fusion; pass the "
                                  "training "
                                  "checkpoint (run folder or checkpoints/<tag>) to evaluate the guided "
                                  "teacher")
        loaded = _load_artifact(where, trust)
    else:
        loaded = _load_tag(where, teacher=teacher, consolidate_zero=trust)
    loaded.notes[:0] = notes
    return loaded


def read_student(path: Path, trust: bool = False) -> tuple[nn.Module, Config, dict]:
    """(module, config, export facts) of an exported student: .safetensors (safe) or .pt2 (trusted only)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta, weights = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        if "config.json" not in meta or "export.json" not in meta:
            raise CheckpointError(f"{path}: a safetensors file, but not an MGN student: no "
                                  "config.json/export.json in "
                                  f"its metadata (expected the {ARTIFACT_NAME} that training exports; "
                                  "weights saved "
                                  f"by another tool cannot be read)")
        cfg = Config.from_dict(json.loads(meta["config.json"]))
        # timm's MobileOne, reparameterized: the deployed shape
        student = fuse_student(ImageClassifier(cfg.model))
        _load_strict(student, weights, cfg, path, what="student")
        return student.eval(), cfg, json.loads(meta["export.json"])
    pickled = pt2_pickled_members(path)
    if pickled and not trust:
        raise UntrustedCheckpointError(f"{path}: this torch.export archive stores {len(pickled)} item(s) as "
                                       "pickles "
                                       f"({pickled[:3]}), and loading it would unpickle them: {TRUST_HINT}")
    extra = {"config.json": "", "export.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    if not extra["config.json"] or not extra["export.json"]:
        raise CheckpointError(f"{path}: not an MGN student artifact (no embedded config.json/export.json)")
    return (program.module(), Config.from_dict(json.loads(extra["config.json"])),
            json.loads(extra["export.json"]))


def pt2_pickled_members(path: Path) -> list[str]:
    """What torch.export.load would unpickle in a .pt2 archive: weights or constants marked `use_pickle`, and
    any pickle file inside."""
    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith((".pkl", ".pickle")) or name.endswith("/data.pkl"):
                found.append(name)
            elif name.endswith(("model_weights_config.json", "model_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                found += [f"{name}:{key}" for key, item in config.items() if item.get("use_pickle")]
    return found


def _load_artifact(path: Path, trust: bool) -> Checkpoint:
    try:
        module, cfg, meta = read_student(path, trust)
    except CheckpointError:
        raise
    except Exception as error:  # torch.export and safetensors raise several types for a damaged file
        raise CheckpointError(f"{path}: cannot read the exported student ({type(error).__name__}: {error}); "
                              f"the file is truncated, corrupt or not a student artifact") from error
    size = cfg.model.image_size  # the input the student was exported for: what it is evaluated and timed at
    for key, value in (("image_model", cfg.model.image_model), ("num_classes", cfg.model.num_classes),
                       ("input", [3, size, size])):
        if key in meta and meta[key] != value:
            raise CheckpointError(f"{path}: export.json says {key}={meta[key]!r} but the embedded config "
                                  "says "
                                  f"{value!r}; the artifact was assembled from another model's config")
    return Checkpoint(kind="student", path=path, cfg=cfg, student=module, stored_fused=bool(meta.get("fused",
                                                                                                     True)),
                      notes=[f"export format {meta.get('format_version')}, trained with objective "
                             f"{meta.get('objective')}"])


def _read_model_states(tag_dir: Path) -> dict:
    file = tag_dir / MODEL_STATES
    try:
        # DeepSpeed's model-states file holds tensors, plain containers and numbers: safe to load
        # weights-only.
        states = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{file}: cannot read checkpoint ({type(error).__name__}: {str(error)[:200]}); "
                              "the file "
                              f"is truncated or corrupt; re-copy it or evaluate another tag") from error
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{file}: no 'module' state dict inside; not a DeepSpeed model-states file")
    return states


def _config_for(tag_dir: Path, states: dict) -> Config:
    """The config saved inside the checkpoint; the run's config.json must agree with it where both exist."""
    run_config = RunPaths(tag_dir.parent.parent).config
    embedded = states.get("config")
    if embedded is None and not run_config.exists():
        raise CheckpointError(f"{tag_dir}: no config saved with this checkpoint (no client_state 'config' "
                              "and no "
                              f"{run_config}); cannot tell which model to build")
    try:
        cfg = Config.from_dict(embedded) if embedded is not None else Config.load(run_config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{tag_dir}: the saved config does not parse ({error}); written by an "
                              "incompatible "
                              f"version of mgn?") from error
    if embedded is not None and run_config.exists():
        try:
            other = Config.load(run_config)
        except (ValueError, TypeError, json.JSONDecodeError):
            other = None
        if other is not None:
            differ = config_differences(cfg, other, ("checkpoint", "config.json"))
            if differ:
                raise CheckpointError(f"{tag_dir}: this checkpoint comes from another model config than "
                                      f"{run_config} "
                                      f"({', '.join(differ)}); was it copied from another run?")
    return cfg


def _load_tag(tag_dir: Path, *, teacher: bool, consolidate_zero: bool) -> Checkpoint:
    states = _read_model_states(tag_dir)
    cfg = _config_for(tag_dir, states)
    zero_stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    weights = dict(states["module"])
    stored_dtype = _dominant_dtype(weights)
    has_shards = any(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))
    notes = []
    kind = "deepspeed"
    if has_shards and zero_stage in (1, 2) and consolidate_zero:
        # fp32 masters; frozen params and buffers stay from the module
        weights.update(_consolidate_zero(tag_dir))
        kind = "zero"
    elif has_shards and zero_stage in (1, 2):
        notes.append(f"ZeRO-{zero_stage}: read from the module states, not from the optimizer shards "
                     "(consolidating "
                     f"those unpickles them; --trust-checkpoint allows it)"
                     + ("" if stored_dtype == "float32"
                        else f"; the module states are {stored_dtype} copies"))
    elif stored_dtype != "float32":
        notes.append(f"weights stored as {stored_dtype} (ZeRO-{zero_stage} keeps its fp32 masters in "
                     "optimizer state, "
                     f"not read); evaluated in fp32 after conversion")
    if teacher and not cfg.uses_captions:
        raise CheckpointError(f"{tag_dir}: a {cfg.objective.name} checkpoint has no guided (teacher) path; "
                              f"drop --teacher")
    train_state = states.get("train_state") or {}
    step = states.get("step", train_state.get("step"))
    stored_fused = any(k.endswith("reparam_conv.weight") for k in weights)

    student_weights = {k[len(STUDENT_PREFIX):]: v for k, v in weights.items() if k.startswith(STUDENT_PREFIX)}
    student = ImageClassifier(cfg.model)
    if stored_fused:
        student = fuse_student(student)
    _load_strict(student, student_weights, cfg, tag_dir, what="student")
    student = student.float().eval()
    fused = student if stored_fused else fuse_student(student)

    objective = None
    if teacher:
        objective = build_objective(cfg)
        if stored_fused:
            objective.student = fuse_student(objective.student)
        _load_strict(objective, weights, cfg, tag_dir, what=f"{cfg.objective.name} objective")
        objective = objective.float().eval()
    return Checkpoint(kind=kind, path=tag_dir, cfg=cfg, student=fused, stored_fused=stored_fused,
                      unfused_student=None if stored_fused else student, objective=objective, step=step,
                      tag=tag_dir.name, zero_stage=zero_stage, dtype=stored_dtype, notes=notes)


def _consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as error:
        raise CheckpointError(f"{tag_dir}: the ZeRO optimizer shards cannot be consolidated "
                              f"({type(error).__name__}: "
                              f"{str(error)[:200]}); a shard is missing, truncated or from another "
                              "world size") from error


def _dominant_dtype(weights: dict) -> str:
    floats = [v.dtype for v in weights.values() if torch.is_tensor(v) and v.is_floating_point()]
    return str(max(set(floats), key=floats.count)).replace("torch.", "") if floats else "float32"


def _load_strict(model: nn.Module, weights: dict, cfg: Config, source: Path, what: str) -> None:
    """load_state_dict, but a mismatch names the config the model was built from and the first differences.

    Frozen parameters may be absent: checkpoints do not store them, the model built them from its config.
    """
    expected = model.state_dict()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in expected if k not in weights and k not in frozen]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k}: checkpoint {list(weights[k].shape)} vs model {list(v.shape)}" for k,
              v in expected.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        m = cfg.model
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise CheckpointError(
            f"{source}: the weights do not fit the {what} built from the config saved with the checkpoint "
            f"(objective.name={cfg.objective.name!r}, model.image_model={m.image_model!r}, "
            f"model.num_classes={m.num_classes}): {'; '.join(p for p in parts if p)}. "
            f"The checkpoint comes from another model config.")
    model.load_state_dict(weights, strict=not frozen)


# train.init_from as checked by `check_init_from` (train.py, before the run starts), for `init_student` to use
# instead of reading it again: {(path, trust): Checkpoint}.
_CHECKED: dict[tuple[str, bool], Checkpoint] = {}


def check_init_from(cfg: Config) -> None:
    """Before a run starts (train.py, every rank, before any collective): `train.init_from` is readable and
    fits this run's student, or one CheckpointError naming the flag, the path and what was expected. The
    loaded checkpoint is kept for `init_student`."""
    if cfg.train.init_from:
        source = _init_source(cfg)
        _CHECKED[(cfg.train.init_from, cfg.train.trust_checkpoint)] = source


def _init_source(cfg: Config) -> Checkpoint:
    flag, path = "train.init_from", cfg.train.init_from
    key = (path, cfg.train.trust_checkpoint)
    if key in _CHECKED:
        return _CHECKED.pop(key)
    try:
        source = load_checkpoint(path, trust=cfg.train.trust_checkpoint, take_latest_run=False)
    except CheckpointError as error:
        raise type(error)(f"{flag}={path!r}: {strip_path(str(error), Path(path))}") from error
    if source.cfg.model.image_model != cfg.model.image_model:
        raise CheckpointError(f"{flag}={path!r} holds a {source.cfg.model.image_model}, "
                              f"this run trains a {cfg.model.image_model} (model.image_model)")
    if cfg.train.init_parts != "image_encoder" and source.cfg.model.num_classes != cfg.model.num_classes:
        raise CheckpointError(f"{flag}={path!r} has {source.cfg.model.num_classes} classes, "
                              f"this run {cfg.model.num_classes}: pass --train.init_parts image_encoder for "
                              "a "
                              f"fresh head")
    return source


def init_student(student: ImageClassifier, cfg: Config) -> str:
    """`train.init_from`: load another run's student (or only its image encoder) into `student`.

    From a training checkpoint the unfused weights are copied as they are. An exported student holds
    fused weights only; they are written into the unfused layout so that it computes the same function in
    eval mode (mgn.model.export.unfuse_into). Returns a line for the log.
    """
    source = _init_source(cfg)
    donor = ImageClassifier(source.cfg.model)
    if source.unfused_student is not None:
        donor.load_state_dict(source.unfused_student.state_dict())
    else:
        unfuse_into(donor, source.student.state_dict())
    weights = donor.state_dict()
    if cfg.train.init_parts == "image_encoder":
        weights = {k: v for k, v in weights.items() if k.startswith("encoder.")}
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (cfg.train.init_parts == "image_encoder" and k.startswith("head."))]
    if missing or unexpected:
        raise CheckpointError(f"train.init_from={cfg.train.init_from!r}: weights do not fit this run's "
                              "student "
                              f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected)")
    notes = "".join(f"; {note}" for note in source.notes)
    return f"{cfg.train.init_parts} from {source.describe()} at {source.path}{notes}"
