"""Rank-0 logging: a prefixed console/file log and one TensorBoard writer per run.

Two writers in one run folder make TensorBoard skip data, so only global rank 0 writes. After a
resume the writer purges events past the resumed step, so curves never zigzag or repeat a step.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("mgn")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stdout and `<run_dir>/train.log`; other ranks log warnings only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if rank != 0:  # transformers' "Loading weights" bar would print once per rank
        from transformers.utils import logging as transformers_logging  # noqa: PLC0415

        transformers_logging.disable_progress_bar()
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)


class TensorBoard:
    """A SummaryWriter on rank 0, silent elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool, resume_step: int | None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            # purge_step drops events at or after it: the resumed run rewrites them.
            self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def pr_curve(self, tag: str, labels: torch.Tensor, scores: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_pr_curve(tag, labels, scores, step)

    def image(self, tag: str, picture, step: int) -> None:
        """An RGB picture, [H, W, 3] uint8 (mgn.pictures)."""
        if self.writer:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def tensorboard_dir(run_dir: Path) -> Path:
    """`<run>/tb/<run name>`: `tensorboard --logdir <run>/tb` then names the run after itself, not '.'."""
    return run_dir / "tb" / run_dir.name


def point_latest(run_dir: Path) -> None:
    """`<output_dir>/latest` -> the newest run's folder (a relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{run_dir.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    tmp.replace(link)


def append_metrics(run_dir: Path, step: int, epoch: int, results: dict[str, dict]) -> None:
    """One line per evaluation and role in `<run>/metrics.csv`, for a spreadsheet or pandas."""
    columns = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc", "samples")
    path = run_dir / "metrics.csv"
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write("step,epoch,role," + ",".join(columns) + "\n")
        for role, metrics in results.items():
            f.write(f"{step},{epoch},{role}," + ",".join(f"{metrics[c]:.6g}" for c in columns) + "\n")


class Progress:
    """A progress bar over the run's updates in an interactive terminal (rank 0); nothing elsewhere, where the
    periodic log lines (with time per step and ETA) say the same for Slurm's log files."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False)

    def update(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
