"""Which checkpoint a path a user passes stands for: the exported student file, or the tag folder to read.

    resolve(path, notes) -> ("artifact", file) | ("tag", tag folder)

A user may name a run folder, a folder of runs (the run its `latest` link names), a run's checkpoints/ folder
or its `latest` file, a tag folder, a model-states file or an exported student; tags are found through
`mgn.checkpoint.store.newest_intact_tag`, the same verified finder a resume uses. Every path that holds no
checkpoint is one CheckpointError naming the path and what was expected there.

Apart from the reading (mgn/checkpoint/read.py) because it is only about the file system: it looks at names,
links and which files exist, and opens none of the weights.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mgn.checkpoint.store import MODEL_STATES, CheckpointError, latest_tag_name, newest_intact_tag
from mgn.model.export import ARTIFACT_NAME, PROGRAM_NAME
from mgn.run_paths import RunPaths

log = logging.getLogger("mgn")


EXPECTED = ("expected a run folder, its checkpoints/ folder, checkpoints/latest, a checkpoints/<tag>/ "
            "folder, "
            f"or an exported {ARTIFACT_NAME}")


def resolve(path: str | Path, notes: list[str] | None = None, *, take_latest_run: bool = True) -> tuple[str,
                                                                                                        Path]:
    """('artifact', file) or ('tag', tag folder) for any path a user may reasonably pass.

    A folder of runs (train.output_dir, e.g. `runs`) stands for the run its `latest` link names, with a line
    in `notes` saying which; `take_latest_run=False` refuses it instead, naming that run (train.init_from: the
    new run moves `latest` to itself). Every other path that holds no checkpoint is a CheckpointError naming
    the path and what was expected there."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: a link to {os.readlink(path)}, which does not exist ({EXPECTED})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder ({EXPECTED})")
    if path.is_file():
        if path.suffix in (".safetensors", ".pt2"):
            return "artifact", path
        if path.name == "latest":
            return "tag", _tag_from_latest(path)
        if path.name.endswith("model_states.pt"):
            return "tag", path.parent
        raise CheckpointError(f"{path}: not a checkpoint file (expected {ARTIFACT_NAME}, a DeepSpeed "
                              "`latest` file "
                              f"or {MODEL_STATES}, or a folder holding one)")
    if path.is_symlink():  # e.g. runs/latest: name the run it stands for
        target = _link_target(path)
        _note(notes, f"{path} is {target}")
        path = target
    if (path / MODEL_STATES).exists():
        return "tag", path
    for folder in (path, RunPaths(path).checkpoints):
        if (folder / "latest").is_file():
            return "tag", _tag_from_latest(folder / "latest")
        if any(p.is_dir() for p in folder.glob("step_*")):  # tags, but their `latest` pointer is gone
            return "tag", newest_intact_tag(folder)
    student = RunPaths(path).student
    for artifact in (path / ARTIFACT_NAME, student / ARTIFACT_NAME, path / PROGRAM_NAME,
                     student / PROGRAM_NAME):
        if artifact.exists():
            return "artifact", artifact
    if any(path.glob("*optim_states.pt")):
        raise CheckpointError(f"{path}: has optimizer shards but no {MODEL_STATES}; the checkpoint is "
                              "incomplete")
    link = path / "latest"
    if link.is_symlink() and link.is_dir():  # train.output_dir: `latest` -> the newest run
        return _from_runs_folder(path, _link_target(link), notes, take_latest_run)
    runs = _runs_in(path)
    if runs:
        usable = [r for r in runs if _has_checkpoint(r)] or runs
        raise CheckpointError(f"{path}: a folder of runs, not a run ({len(runs)} run folders: "
                              f"{_names(runs)}); pass one of them, e.g. {usable[-1]}")
    if not any(path.iterdir()):
        raise CheckpointError(f"{path}: no checkpoint found here, the folder is empty ({EXPECTED})")
    if RunPaths(path).config.is_file():
        raise CheckpointError(f"{path}: a run folder without a checkpoint or exported student yet (no "
                              "checkpoints/"
                              f"latest, no student/{ARTIFACT_NAME}): it is still starting, or stopped before "
                              "its first "
                              f"checkpoint (its train.log says why)")
    raise CheckpointError(f"{path}: no checkpoint found here (looked for {MODEL_STATES}, latest, "
                          "checkpoints/latest, "
                          f"{ARTIFACT_NAME}, student/{ARTIFACT_NAME}; {EXPECTED})")


def _from_runs_folder(path: Path, newest: Path, notes: list[str] | None, take: bool) -> tuple[str, Path]:
    """The checkpoint of the run a runs folder's `latest` names, or why not (listing the runs that have
    one)."""
    others = [r for r in _runs_in(path) if _has_checkpoint(r) and r.name != newest.name]
    elsewhere = f"; runs here with a checkpoint: {_names(others)}" if others else ""
    if not take:
        raise CheckpointError(f"{path}: a folder of runs, not a run; its newest (the one {path / 'latest'} "
                              "names) "
                              f"is {newest}: pass that run folder, or another{elsewhere}")
    try:
        found = resolve(newest, take_latest_run=False)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: a folder of runs; its newest, {newest} (named by {path / 'latest'}), "
                              "holds no "
                              f"usable checkpoint ({strip_path(str(error), newest)}); pass a run "
                              f"folder{elsewhere}") \
            from None
    _note(notes, f"{path} is a folder of runs: took its newest run, {newest} (named by {path / 'latest'})")
    return found


def _link_target(link: Path) -> Path:
    target = Path(os.readlink(link))
    return target if target.is_absolute() else link.parent / target


def _runs_in(folder: Path) -> list[Path]:
    """The run folders in `folder` (a config.json, checkpoints/ or student/ inside), oldest name first."""
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    return [p for p in children if RunPaths(p).config.is_file() or RunPaths(p).checkpoints.is_dir()
            or RunPaths(p).student.is_dir()]


def _has_checkpoint(run: Path) -> bool:
    return ((RunPaths(run).checkpoints / "latest").is_file()
            or (RunPaths(run).student / ARTIFACT_NAME).is_file())


def _names(runs: list[Path], most: int = 8) -> str:
    names = [r.name for r in runs]
    return ", ".join(names[-most:]) + (f" and {len(names) - most} older" if len(names) > most else "")


def _note(notes: list[str] | None, text: str) -> None:
    log.info("MGN: %s", text)
    if notes is not None:
        notes.append(text)


def strip_path(message: str, path: Path) -> str:
    """A CheckpointError's message without its leading `path: `, to be put after another name for the path."""
    return message.removeprefix(f"{path}: ")


def _tag_from_latest(latest: Path) -> Path:
    """The tag `latest` names if it is intact, else (with a warning) the newest intact one; a `latest` that
    names no tag at all is an error: the folder is not what its pointer says."""
    tag = latest_tag_name(latest.parent)
    if not tag or not (latest.parent / tag / MODEL_STATES).exists():
        raise CheckpointError(f"{latest} points at tag {tag!r}, but {latest.parent / tag / MODEL_STATES} "
                              "does not "
                              "exist (tags present: "
                              f"{sorted(p.name for p in latest.parent.glob('*/') if p.is_dir())})")
    return newest_intact_tag(latest.parent)
