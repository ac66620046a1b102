"""What a run shows while it trains: a prefixed console/file log on rank 0, one TensorBoard writer per run,
the step timer and the periodic training line, metrics.csv and the progress bar.

Two writers in one run folder make TensorBoard skip data, so only global rank 0 writes. After a
resume the writer purges events past the resumed step, so curves never zigzag or repeat a step.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mgn import devices, distributed
from mgn.data.epoch_plan import BALANCE_WARNING
from mgn.run_paths import RunPaths
from mgn.io.line_files import append_lines
from mgn.eval.metrics import classification_metrics

log = logging.getLogger("mgn")


def setup_logging(log_file: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stdout and `log_file` (a run's train.log); other ranks log warnings only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if rank != 0:  # transformers' "Loading weights" bar would print once per rank
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)


class TensorBoard:
    """A SummaryWriter on rank 0, silent elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool, resume_step: int | None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at or after it: the resumed run rewrites them.
            self.writer = SummaryWriter(str(log_dir),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def pr_curve(self, tag: str, labels: torch.Tensor, scores: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_pr_curve(tag, labels, scores, step)

    def image(self, tag: str, picture, step: int) -> None:
        """An RGB picture, [H, W, 3] uint8 (mgn.eval.pictures)."""
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


def append_metrics(run_dir: Path, step: int, epoch: int, results: dict[str, dict]) -> None:
    """One line per evaluation and role in `<run>/metrics.csv`, for a spreadsheet or pandas."""
    columns = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc", "samples")
    path = RunPaths(run_dir).metrics
    header = [] if path.exists() else ["step,epoch,role," + ",".join(columns)]
    append_lines(path, header + [f"{step},{epoch},{role}," + ",".join(f"{metrics[c]:.6g}" for c in columns)
                                 for role, metrics in results.items()])  # a line a crash cut is moved aside


class Progress:
    """A progress bar over the run's updates in an interactive terminal (rank 0); nothing elsewhere, where the
    periodic log lines (with time per step and ETA) say the same for Slurm's log files."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False)

    def update(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class StepTimer:
    """Splits wall time into waiting for data and computing, between log lines; counts what was trained."""
    data: float = 0.0
    total: float = 0.0
    samples: int = 0
    updates: int = 0
    # name -> per-micro-batch values (tensors: no device sync per step)
    terms: dict = field(default_factory=dict)

    def add(self, output, labels: torch.Tensor) -> None:
        """One micro-batch's loss, its named terms and its training accuracy (an objective's StepOutput)."""
        self.samples += len(labels)
        correct = (output.logits.detach().argmax(-1) == labels).float().mean()
        for name, value in {"loss": output.loss, **output.terms, "accuracy": correct}.items():
            self.terms.setdefault(name, []).append(value.detach().float())

    def reset(self) -> None:
        self.__init__()

    def scalars(self, device: torch.device) -> dict[str, float]:
        """Means over every rank since the last reset: `train/<term>` values, throughput, data wait, step
        time. One all-reduce of a tensor on the rank's device (NCCL takes no CPU tensor) and one host sync."""
        names = sorted(self.terms)
        local = [torch.stack(self.terms[n]).mean() for n in names]
        local.append(torch.tensor(self.samples / max(self.total, 1e-9), device=device))
        means = distributed.all_reduce_mean(torch.stack([v.to(device) for v in local])).tolist()
        values = {f"train/{name}": value for name, value in zip(names, means)}
        return values | {"train/samples_per_s": means[-1] * distributed.world_size(),
                         "train/data_wait_fraction": self.data / max(self.total, 1e-9),
                         "train/peak_memory_mb": devices.peak_memory_mb(device),
                         "train/seconds_per_step": self.total / max(self.updates, 1)}


def log_training(timer: StepTimer, optimizer, tensorboard: TensorBoard, device: torch.device, step: int,
                 total_steps: int, epoch: int, seconds_per_update: float) -> None:
    """The periodic training line and its TensorBoard points: the timer's means over all ranks, learning
    rates."""
    values = timer.scalars(device)
    for group in optimizer.param_groups:
        values[f"lr/{group.get('name', 'group')}"] = group["lr"]
    tensorboard.scalars(values, step)
    log.info("%s", train_line(values, step, total_steps, epoch, (total_steps - step) * seconds_per_update))
    timer.reset()


def train_line(values: dict[str, float], step: int, total_steps: int, epoch: int, remaining_s: float) -> str:
    """The periodic training log line, from `StepTimer.scalars`."""
    terms = {k.removeprefix("train/"): v for k, v in values.items() if k.startswith("train/")}
    extra = ("samples_per_s", "data_wait_fraction", "peak_memory_mb", "seconds_per_step", "loss", "accuracy")
    parts = " ".join(f"{name} {value:.4f}" for name, value in terms.items() if name not in extra)
    return (f"MGN: step {step}/{total_steps} epoch {epoch} loss {terms['loss']:.4f} ({parts}) acc "
            f"{terms['accuracy']:.3f} | {terms['seconds_per_step']:.2f} s/step, ETA "
            f"{format_duration(remaining_s)} | "
            f"{terms['samples_per_s']:.1f} samples/s | data wait {100 * terms['data_wait_fraction']:.0f}% | "
            "peak mem "
            f"{terms['peak_memory_mb']:.0f} MB")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def size_line(objective, world_size: int, updates_per_epoch: int, total_steps: int, cfg,
              precision: str) -> str:
    """What a run trains, and how much of it: the start-up line."""
    n_params = sum(p.numel() for p in objective.parameters())
    n_student = sum(p.numel() for p in objective.student.parameters())
    per_update = world_size * cfg.train.micro_batch * cfg.train.grad_accum
    return (f"MGN: objective {cfg.objective.name}, {n_params / 1e6:.2f}M parameters ({n_student / 1e6:.2f}M "
            "in the "
            f"deployed student); {world_size} ranks x {cfg.train.micro_batch} x {cfg.train.grad_accum} = "
            f"{per_update} "
            f"samples per update; {updates_per_epoch} updates per epoch, {total_steps} total; precision "
            f"{precision}")


def log_balance(balance: dict, epoch: int) -> None:
    """How evenly an epoch covers the training samples (mgn.data.epoch_plan), with a warning past
    BALANCE_WARNING."""
    log.info("MGN: epoch %d reads every training sample once, except %.1f%% repeated and %.1f%% not seen "
             "(ranks and workers balanced by sample count)", epoch + 1, 100 * balance["repeated_fraction"],
             100 * balance["unseen_fraction"])
    if max(balance.values()) > BALANCE_WARNING:
        log.warning("MGN: more than %.0f%% of epoch %d is repeated or never seen: more samples per rank, or "
                    "a "
                    "smaller micro_batch x ranks, fixes it", 100 * BALANCE_WARNING, epoch + 1)


def report_evaluation(preds, tensorboard: TensorBoard, run_dir: Path, step: int, epoch: int) -> dict[str,
                                                                                                     dict]:
    """Metrics per role (student, and teacher when there is one) of an evaluation's predictions
    (mgn.eval.predictions), to the log, TensorBoard and metrics.csv. Returns them."""
    results = {}
    for role, probs in (("student", preds.student), ("teacher", preds.teacher)):
        if probs is None:
            continue
        results[role] = metrics = classification_metrics(preds.labels, probs)
        tensorboard.scalars({f"eval/{role}_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
        if probs.shape[1] == 2:
            tensorboard.pr_curve(f"eval/{role}_pr", torch.as_tensor(preds.labels), torch.as_tensor(probs[:,
                                                                                                         1]),
                                                                                                         step)
        log.info("MGN: eval step %d %-7s acc %.4f  P %.4f  R %.4f  F1 %.4f  AUROC %.4f  (%d samples)", step,
                 role,
                 metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"],
                 metrics["auroc"],
                 metrics["samples"])
    append_metrics(run_dir, step, epoch, results)
    return results


def done_line(summary: dict) -> str:
    """The last line of a run: where everything is, and the two students."""
    final = (f"acc {summary['student_accuracy']:.4f}" if summary["student_accuracy"] is not None
             else "not evaluated")
    best = (f" | best student (step {summary['best_student_step']}, acc "
            f"{summary['best_student_accuracy']:.4f}; "
            f"chosen on the test set) {summary['student_best']}") if summary["student_best"] else ""
    return (f"MGN: done step={summary['step']}. run dir {summary['run_dir']} | TensorBoard: tensorboard "
            "--logdir "
            f"{summary['tensorboard']} | final student ({final}) {summary['student']}{best}")
