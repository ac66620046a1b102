"""Training state on disk: writing, verifying, finding and resuming checkpoints. The one place that knows
their layout; `mgn/checkpoint/read.py` reads them for evaluation through the functions here.

Layout under `<run_dir>/checkpoints/`:
    step_00000050/                      one DeepSpeed tag (model, optimizer, scheduler, client state)
    step_00000050/rank_00001.pt         this rank's RNG states and data-stream position
    step_00000050/manifest.json         written last: size and SHA-256 of every file of the tag
    latest                              the pointer to the newest tag

`save` / `load` are collective: every rank calls them (DeepSpeed's save hangs if only rank 0 does). The
per-rank file holds tensors and plain numbers only, so it loads with `weights_only=True`. A tag is used
only when its manifest verifies (`newest_intact_tag`): resumes and readers alike pass over a damaged or
partial one for the newest intact one, with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mgn import devices, distributed
from mgn.config import Config

log = logging.getLogger("mgn")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the config saved with it."""


class UntrustedCheckpointError(CheckpointError):
    """Reading this file would unpickle it, which can run code: it needs --trust-checkpoint."""


TRUST_HINT = ("unpickling can run code hidden in the file; pass --trust-checkpoint (train.trust_checkpoint "
              "true) "
              "only if you trust where it came from")

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class TrainState:
    """Where the run is. `batch_in_epoch` counts micro-batches consumed in the current epoch."""
    # updates done, skipped non-finite ones included (under ZeRO-0 the LR schedule moves on for them;
    step: int = 0
    #                under ZeRO-1/2 DeepSpeed's own overflow skip holds the schedule back by one step each)
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = float("-inf")
    best_step: int = 0  # the step of student_best
    attention_grids: int = 0  # attention images written so far: the cap holds across requeues
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    train_seconds: float = 0.0  # wall time of the run up to this checkpoint, across resumes
    lr_scale: float = 1.0  # product of the rollbacks' learning-rate scales: the config's rates times this
    rollbacks: list = field(default_factory=list)  # one record per rollback (mgn/train/recovery.py)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, ckpt_dir: Path, state: TrainState, config: dict, keep_last: int, rank: int,
         world_size: int) -> str:
    """All ranks: check the free space, write a tag, write its manifest last, then move `latest` to it and
    drop tags beyond the newest `keep_last`. A tag without a manifest is never resumed from.

    Frozen parameters (a frozen text encoder) are not stored: they never change, and the model rebuilds them
    from the config's `model.text_model`.
    """
    tag = tag_for(state.step)
    folder = ckpt_dir / tag
    needed = _previous_size(ckpt_dir, engine)
    free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free
    if distributed.any_rank(needed * 1.1 > free, _device_of(engine)):
        raise CheckpointError(f"not enough disk space to save a checkpoint in {ckpt_dir}: it needs about "
                              f"{needed / 2**20:.0f} MB (the size of the last one, or of the weights and "
                              "optimizer "
                              f"state) and {free / 2**20:.0f} MB are free (on this rank or another); free "
                              "space "
                              f"there, or lower train.keep_last. Nothing was written")
    # a failed write must not skip DeepSpeed's own barriers on this rank only
    writes = _RecordedWrites(engine)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": asdict(state),
                                                                     "config": config},
                               save_latest=False, exclude_frozen_parameters=True)
    finally:
        writes.detach()
    failed = writes.failure
    if failed is None:
        try:
            torch.save(_rank_state(state), folder / f"rank_{rank:05d}.pt")
        except (OSError, RuntimeError) as error:  # a full disk shows as 'basic_ios::clear: iostream error'
            failed = error
    if distributed.any_rank(failed is not None, _device_of(engine)):
        distributed.barrier()
        latest = ckpt_dir / "latest"
        if rank == 0 and not (latest.exists() and latest.read_text().strip() == tag):
            shutil.rmtree(folder, ignore_errors=True)
        last = latest_tag_name(ckpt_dir)
        kept = f"{ckpt_dir / 'latest'} still names the last complete one, {last}" if last else \
            "no earlier checkpoint exists"
        raise CheckpointError(f"writing checkpoint {folder} failed ({failed or 'on another rank'}); the "
                              "partial tag "
                              f"was removed and {kept}. Free disk space: "
                              f"{shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MB")
    distributed.barrier()
    if rank == 0:
        _write_manifest(folder, step=state.step, world_size=world_size,
                        zero_stage=engine.zero_optimization_stage())
        _write_atomically(ckpt_dir / "latest", tag)
        if keep_last:
            for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return tag


class _RecordedWrites:
    """DeepSpeed's file writes during one save, their first failure recorded instead of raised.

    DeepSpeed's save is collective: barriers and an all-reduce sit between its writes. A write that raised on
    one rank only (a full disk, a quota, a broken mount) would take that rank out of the save while the others
    wait in its barrier, and the run would hang until the collective timeout. Recorded, the save runs its
    course on every rank; then the ranks agree that it failed (mgn.checkpoint.store.save) and all stop with
    one message."""

    def __init__(self, engine):
        self.engine, self.inner, self.failure = engine, engine.checkpoint_engine, None
        engine.checkpoint_engine = self
        self.copy_script = getattr(engine, "_copy_recovery_script", None)  # ZeRO-1/2: zero_to_fp32.py, rank 0
        if self.copy_script is not None:
            engine._copy_recovery_script = self._recorded(self.copy_script)

    def _recorded(self, write):
        def run(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as error:
                self.failure = self.failure or error
        return run

    def save(self, *args, **kwargs):
        return self._recorded(self.inner.save)(*args, **kwargs)

    def makedirs(self, *args, **kwargs):
        return self._recorded(self.inner.makedirs)(*args, **kwargs)

    def __getattr__(self, name):  # everything else (create, commit, ...) as DeepSpeed's own engine does it
        return getattr(self.inner, name)

    def detach(self) -> None:
        self.engine.checkpoint_engine = self.inner
        if self.copy_script is not None:
            del self.engine._copy_recovery_script  # the class's method again


MANIFEST = "manifest.json"


def _write_manifest(folder: Path, **facts) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    _write_atomically(folder / MANIFEST, json.dumps({**facts, "files": files}, indent=1) + "\n")


def verify(folder: Path) -> str | None:
    """None if the tag is complete and intact, else what is wrong with it, in words."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {str(name): (int(facts["bytes"]), str(facts["sha256"])) for name,
                 facts in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST} (the save did not finish, or the file is damaged)"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{name} is corrupt (checksum differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _previous_size(ckpt_dir: Path, engine) -> int:
    """Bytes the last tag took; before the first one, the trainable weights plus AdamW's two moments."""
    tags = sorted(ckpt_dir.glob("step_*"))
    if tags:
        return sum(p.stat().st_size for p in tags[-1].iterdir() if p.is_file())
    return sum(3 * p.numel() * 4 for p in engine.module.parameters() if p.requires_grad)


def _device_of(engine) -> torch.device:
    return next(engine.module.parameters()).device


def _rank_state(state: TrainState) -> dict:
    return {"rng": devices.random_states(), "position": {"epoch": state.epoch,
                                                         "batch_in_epoch": state.batch_in_epoch}}


def has_tag(ckpt_dir: Path, step: int) -> bool:
    """Whether the checkpoint of `step` was written already."""
    return (ckpt_dir / tag_for(step)).exists()


def has_checkpoints(ckpt_dir: Path) -> bool:
    return (ckpt_dir / "latest").exists() or any(ckpt_dir.glob("step_*"))


def latest_tag_name(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None without a `latest` file."""
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.exists() else None


def newest_intact_tag(ckpt_dir: Path) -> Path:
    """The tag `latest` names if it verifies, else the newest tag that does. A damaged or partial tag is named
    in a warning and passed over; a folder with tags of which none verifies is an error, never a silent fresh
    start."""
    latest = latest_tag_name(ckpt_dir)
    candidates = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
    candidates.sort(key=lambda p: p.name != latest)  # `latest` first, then newest to oldest
    for tag in candidates:
        problem = verify(tag)
        if problem is None:
            return tag
        log.warning("MGN: checkpoint %s is damaged or incomplete (%s); trying an older one", tag, problem)
    raise CheckpointError(f"{ckpt_dir} holds checkpoints, but none is complete and intact ({len(candidates)} "
                          "tags "
                          f"checked, see the warnings); move the folder away to start afresh")


def resume_hint(ckpt_dir: Path, run_name: str) -> str:
    """For a run that cannot go on: its last good checkpoint, and how to continue from it."""
    good = latest_tag_name(ckpt_dir)
    if not good:
        return "Last good checkpoint: none yet. Lower the learning rate and start afresh"
    return (f"Last good checkpoint: {ckpt_dir / good}. Lower the learning rate and resume from it: "
            "--train.run_name "
            f"{run_name} --train.resume auto --train.lr_... (the config's rates replace the checkpoint's)")


def check_resume_allowed(cfg: Config) -> None:
    """Refuse, before anything starts, a resume that would unpickle a file from outside this run's folder
    without --train.trust_checkpoint, and a fresh start over a folder that already holds this run's
    checkpoints."""
    run_dir, resume = cfg.run_dir, cfg.train.resume
    outside = resume not in ("", "auto") and not Path(resume).resolve().is_relative_to(run_dir.resolve())
    if outside and not cfg.train.trust_checkpoint:
        raise UntrustedCheckpointError(
            f"train.resume={resume!r} is outside this run's folder {run_dir}; DeepSpeed loads a checkpoint "
            f"by unpickling it: {TRUST_HINT} (or start from its weights alone, read without unpickling: "
            f"--train.init_from)")
    if not resume and has_checkpoints(cfg.paths.checkpoints):
        raise FileExistsError(f"{run_dir} already holds a run with checkpoints: pass --train.resume auto to "
                              "continue it, or another --train.run_name")


def find_resume_tag(ckpt_dir: Path, resume: str) -> tuple[Path, str] | None:
    """`auto` -> the newest intact tag of this run, if any; a path -> that checkpoint dir (or its tag dir)."""
    if not resume:
        return None
    if resume == "auto":
        folder = ckpt_dir
        if not has_checkpoints(folder):
            return None
    else:
        path = Path(resume)
        if has_checkpoints(path):
            folder = path
        elif path.is_dir() and any(path.glob("*model_states.pt")):
            problem = verify(path)
            if problem:
                raise CheckpointError(f"train.resume={resume!r}: {problem}")
            return path.parent, path.name
        else:
            raise FileNotFoundError(f"train.resume={resume!r}: no DeepSpeed checkpoint (no 'latest' file or "
                                    "tag "
                                    f"folder)")
    tag = newest_intact_tag(folder)
    return folder, tag.name


def config_differences(saved: Config, other: Config, names: tuple[str, str],
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """'section.field: <names[0]> a vs <names[1]> b' for every model and objective field in which two configs
    differ (weights of another model or objective must not be loaded into this one); `ignore` names fields
    that may."""
    return [f"{section}.{name}: {names[0]} {value!r} vs {names[1]} {getattr(getattr(other, section), name)!r}"
            for section in ("model", "objective")
            for name, value in dataclasses.asdict(getattr(saved, section)).items()
            if getattr(getattr(other, section), name) != value and name not in ignore]


# Fields a resumed run may change: the caption cache size and where the image weights first came from.
RESUME_MAY_CHANGE = ("text_cache", "image_pretrained")


def resume(engine, cfg: Config, rank: int, world_size: int) -> TrainState | None:
    """All ranks: continue from a checkpoint when `train.resume` asks for one. Rank 0 verifies the tags, every
    rank loads the one it chose. None when there is nothing to resume."""
    ckpt_dir = cfg.paths.checkpoints
    found = distributed.gather_objects(find_resume_tag(ckpt_dir, cfg.train.resume) if rank == 0 else None)[0]
    if found:
        return load(engine, *found, rank=rank, world_size=world_size, cfg=cfg)
    if cfg.train.resume == "auto":
        log.info("MGN: train.resume=auto found no checkpoint in %s: starting this run from the beginning",
                 ckpt_dir)
    return None


def load(engine, ckpt_dir: Path, tag: str, rank: int, world_size: int,
         cfg: Config | None = None) -> TrainState:
    """All ranks: restore model, optimizer, scheduler, RNG; return the saved position. With `cfg`, a
    checkpoint of another model or objective is refused (its weights would be loaded into a different
    experiment)."""
    manifest = json.loads((ckpt_dir / tag / MANIFEST).read_text())
    if manifest["world_size"] != world_size and manifest["zero_stage"] > 0:
        raise CheckpointError(
            f"{ckpt_dir / tag} is a ZeRO-{manifest['zero_stage']} checkpoint of {manifest['world_size']} "
            "ranks: its "
            f"optimizer state is split across them, so it resumes only at {manifest['world_size']} ranks. To "
            "go on "
            f"at {world_size}, start a new run from its weights: --train.init_from {ckpt_dir / tag} (the "
            "optimizer "
            f"state restarts)")
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    if cfg is not None and client.get("config"):
        differ = config_differences(Config.from_dict(client["config"]), cfg, ("checkpoint", "now"),
                                    ignore=RESUME_MAY_CHANGE)
        if differ:
            raise CheckpointError(f"{ckpt_dir / tag} was trained with another model or objective "
                                  f"({'; '.join(differ)}); resume it with its own settings, or start a new "
                                  "run "
                                  f"(--train.init_from for its weights)")
    frozen = [n for n, p in engine.module.named_parameters() if not p.requires_grad]
    if frozen and rank == 0:
        log.info("MGN: %d frozen parameter tensors are not stored in checkpoints; they come from the "
                 "config's "
                 "text model, as at the start of the run", len(frozen))
    state = TrainState(**client["train_state"])
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    if rank_file.exists():
        devices.restore_random_states(torch.load(rank_file, weights_only=True)["rng"])
    else:
        log.warning("MGN: %s is missing: rank %d's random-number state is lost (the run was saved by %d "
                    "ranks); it "
                    "continues with a fresh one, so dropout and caption dropout will differ from an "
                    "uninterrupted "
                    "run", rank_file, rank, manifest["world_size"])
    log.info("MGN: resumed from %s (step %d, epoch %d, batch %d)", ckpt_dir / tag, state.step, state.epoch,
             state.batch_in_epoch)
    return state


