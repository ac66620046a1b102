"""Rank-0 logging: a prefixed console/file log and one TensorBoard writer per run.

Two writers in one run folder make TensorBoard skip data, so only global rank 0 writes. After a
resume the writer purges events past the resumed step, so curves never zigzag or repeat a step.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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

    def attention_grid(self, tag: str, images: torch.Tensor, attention: torch.Tensor, mean, std, step: int) -> None:
        """Input images with the cross-modality attention map blended over them (red = attended)."""
        if self.writer:
            self.writer.add_images(tag, attention_overlay(images, attention, mean, std), step)

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def attention_overlay(images: torch.Tensor, attention: torch.Tensor, mean, std) -> torch.Tensor:
    """[B,3,S,S] normalized images + [B,h,w] maps -> [B,3,S,S] in [0,1]."""
    images = images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    heat = F.interpolate(attention.float().cpu().unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)
    low = heat.amin(dim=(2, 3), keepdim=True)
    high = heat.amax(dim=(2, 3), keepdim=True)
    heat = (heat - low) / (high - low).clamp_min(1e-8)
    colour = torch.cat([heat, torch.zeros_like(heat), 1 - heat], dim=1)
    return (0.5 * images.clamp(0, 1) + 0.5 * colour).clamp(0, 1)
