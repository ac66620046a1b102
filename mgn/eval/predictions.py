"""The evaluation core: a model's predictions on every test sample, the same code during training and in
`python evaluate.py`.

    collect(batches, forward)  -> Predictions   keys, labels and the student's (and teacher's) probabilities
    merge(per_rank)            -> Predictions   one set from every rank; a sample read twice counts once

`forward(batch)` returns the student's and the teacher's (or None) logits for one batch: the trainer passes
its objective's `predict` (the model being trained), `mgn.eval.evaluate` the fused student as deployed, beside
the guided teacher when asked. Metrics come from these probabilities alone (mgn.eval.metrics).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

NO_SAMPLES = "no samples were read: the shards are empty, or every sample was skipped as bad"

Forward = Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Predictions:
    keys: list[str]
    labels: np.ndarray  # [N] int
    student: np.ndarray  # [N, K] probabilities of the image-only student
    teacher: np.ndarray | None = None  # [N, K] guided probabilities
    fusion_max_abs_diff: float | None = None  # max |fused - unfused| student logit over the checked samples
    fusion_max_logit: float | None = None
    fusion_pred_agree: float | None = None  # fraction of checked samples with the same argmax
    fusion_checked: int = 0
    seconds: float = 0.0


def collect(batches: Iterable[dict], forward: Forward, num_classes: int, *,
            allow_empty: bool = False) -> Predictions:
    """Probabilities of the student (and teacher) on every batch, with the samples' keys and labels.

    `allow_empty`: a rank of a distributed evaluation may get no shards; the merged set must not be empty.
    """
    keys, labels, student_probs, teacher_probs = [], [], [], []
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        batch_labels = labels_of(batch, num_classes)
        student, teacher = forward(batch)
        student_probs.append(student.float().softmax(-1).cpu())
        if teacher is not None:
            teacher_probs.append(teacher.float().softmax(-1).cpu())
        labels.append(batch_labels)
        keys.extend(batch.get("key") or [f"#{index}:{i}" for i in range(len(batch_labels))])
    if not labels:
        if not allow_empty:
            raise ValueError(NO_SAMPLES)
        return Predictions(keys=[], labels=np.zeros(0, dtype=np.int64),
                           student=np.zeros((0, num_classes), dtype=np.float32), teacher=None)
    return Predictions(keys=keys, labels=np.concatenate(labels), student=torch.cat(student_probs).numpy(),
                       teacher=torch.cat(teacher_probs).numpy() if teacher_probs else None,
                       seconds=time.perf_counter() - start)


def labels_of(batch: dict, num_classes: int) -> np.ndarray:
    labels = batch.get("label")
    if labels is None:
        raise ValueError("these shards have no labels (no 'cls' entry per sample); evaluation needs labelled "
                         "shards")
    labels = torch.as_tensor(labels).cpu().numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][:5].tolist()
        raise ValueError(f"labels {bad} are outside [0, {num_classes}): the shards are unlabelled (-1) or "
                         "were made "
                         f"for another number of classes than model.num_classes={num_classes}")
    return labels


def merge(parts: list[Predictions]) -> Predictions:
    """Predictions from several ranks as one set; a sample read by two ranks (padding) counts once."""
    if len(parts) == 1:
        return parts[0]
    seen, keep = set(), []
    keys = [k for p in parts for k in p.keys]
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    checked = sum(p.fusion_checked for p in parts)
    diffs = [p.fusion_max_abs_diff for p in parts if p.fusion_max_abs_diff is not None]

    read = [p for p in parts if p.keys] or parts[:1]  # a rank that read nothing adds nothing

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in read])[keep]

    return Predictions(keys=[keys[i] for i in keep], labels=cat("labels"), student=cat("student"),
                       teacher=cat("teacher") if all(p.teacher is not None for p in read) else None,
                       fusion_max_abs_diff=max(diffs) if diffs else None,
                       fusion_max_logit=max((p.fusion_max_logit or 0.0) for p in parts) if diffs else None,
                       fusion_pred_agree=(sum(p.fusion_pred_agree * p.fusion_checked for p in parts
                                              if p.fusion_checked) / checked) if checked else None,
                       fusion_checked=checked, seconds=max(p.seconds for p in parts))
