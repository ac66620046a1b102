"""DeepSpeed checkpoints with the run's position, RNG states and config; keep the last K.

Layout under `<run_dir>/checkpoints/`:
    step_00000050/                      one DeepSpeed tag (model, optimizer, scheduler, client state)
    step_00000050/rank_00001.pt         this rank's RNG states and data-stream position
    latest                              DeepSpeed's pointer to the newest tag

`save` is collective: every rank must call it (DeepSpeed's save hangs if only rank 0 does).
The per-rank file holds tensors and plain numbers only, so it loads with `weights_only=True`.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mgn import distributed

log = logging.getLogger("mgn")


@dataclass
class TrainState:
    """Where the run is. `batch_in_epoch` counts micro-batches consumed in the current epoch."""
    step: int = 0  # optimizer updates done
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = float("-inf")
    attention_grids: int = 0  # attention images written so far: the cap holds across requeues


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, ckpt_dir: Path, state: TrainState, config: dict, keep_last: int, rank: int) -> str:
    """All ranks: write a tag, then drop tags beyond the newest `keep_last`."""
    tag = tag_for(state.step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": asdict(state), "config": config})
    torch.save(_rank_state(state), ckpt_dir / tag / f"rank_{rank:05d}.pt")
    distributed.barrier()
    if rank == 0:
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return tag


def _rank_state(state: TrainState) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"rng": rng, "position": {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}}


def find_resume_tag(ckpt_dir: Path, resume: str) -> tuple[Path, str] | None:
    """`auto` -> the newest tag in this run, if any; a path -> that checkpoint dir (or its tag dir)."""
    if not resume:
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        return (ckpt_dir, latest.read_text().strip()) if latest.exists() else None
    path = Path(resume)
    if (path / "latest").exists():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"train.resume={resume!r}: no DeepSpeed checkpoint (no 'latest' file or tag folder)")


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> TrainState:
    """All ranks: restore model, optimizer, scheduler, RNG; return the saved position."""
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    state = TrainState(**client["train_state"])
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    if rank_file.exists():  # absent when resuming at a different world size: keep fresh RNG
        rank_state = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(rank_state["rng"]["torch"])
        if "cuda" in rank_state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rank_state["rng"]["cuda"])
    log.info("MGN: resumed from %s (step %d, epoch %d, batch %d)", ckpt_dir / tag, state.step, state.epoch,
             state.batch_in_epoch)
    return state
