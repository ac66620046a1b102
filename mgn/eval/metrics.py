"""Classification metrics, shared by training-time evaluation and evaluate.py.

The positive class is 1 (e.g. "violent"). With more than two classes, precision/recall/F1 are
macro-averaged over the classes present in the labels or the predictions, AUROC is one-vs-rest (macro), and
the precision-target threshold is binary-only.

Written with numpy alone, in scikit-learn's definitions and order of operations (tests/test_metrics.py checks
them against scikit-learn, value for value): importing scikit-learn took 1-1.7 s of every training and
evaluation process's start.
"""
from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           target_precision: float | None = None) -> dict:
    """labels [N] ints, probs [N, K] class probabilities -> a flat dict of floats (and the confusion
    matrix)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"expected labels [N] and probs [N, K], got {labels.shape} and {probs.shape}")
    if not np.isfinite(probs).all():  # a NaN would sort as a score and argmax pick it: no made-up metric
        raise ValueError(f"{int((~np.isfinite(probs)).any(1).sum())} of {len(probs)} samples have NaN or "
                         "infinite probabilities: the model's outputs are not finite")
    if labels.dtype.kind not in "iu":
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"labels must be whole class numbers, got {labels.dtype} values like "
                             f"{labels[:3].tolist()}")
        labels = labels.astype(np.int64)
    num_classes = probs.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    preds = probs.argmax(axis=1)
    binary = num_classes == 2
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (labels, preds), 1)
    # per class: true positives, predicted, true; binary reads class 1, more classes the mean over those seen
    scored = [1] if binary else sorted(set(labels.tolist()) | set(preds.tolist()))
    tp, predicted, true = (np.array([counts[c] for c in scored], dtype=np.float64)
                           for counts in (np.diag(confusion), confusion.sum(0), confusion.sum(1)))
    out = {
        "samples": int(len(labels)),
        "accuracy": float(np.mean(labels == preds)) if len(labels) else float("nan"),
        "precision": float(np.mean(_divide(tp, predicted))),
        "recall": float(np.mean(_divide(tp, true))),
        "f1": float(np.mean(_divide(2.0 * tp, 1.0 * true + predicted))),
        "confusion_matrix": confusion.tolist(),
    }
    present = np.unique(labels)
    if len(present) < 2:  # AUROC and PR-AUC are undefined with one class present
        out["auroc"] = out["pr_auc"] = float("nan")
    elif binary:
        out["auroc"] = roc_auc(labels == 1, probs[:, 1])
        out["pr_auc"] = average_precision(labels == 1, probs[:, 1])
    else:
        columns = [labels == c for c in range(num_classes)]
        out["auroc"] = float(np.mean([roc_auc(truth, probs[:, c]) for c, truth in enumerate(columns)]))
        out["pr_auc"] = float(np.mean([average_precision(truth, probs[:, c])
                                       for c, truth in enumerate(columns)]))
    if target_precision is not None and binary and len(present) == 2:
        out.update(recall_at_precision(labels, probs[:, 1], target_precision))
    return out


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a class never predicted has precision 0)."""
    return np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1.0, denominator))


def _positives_above_each_score(truth: np.ndarray, scores: np.ndarray):
    """False and true positives when everything scoring at least each distinct score (highest first) is
    called positive, and those scores."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    scores, truth = np.asarray(scores)[order], np.asarray(truth, dtype=np.float64)[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(truth)[last_of_each_score]
    false_positives = 1 + last_of_each_score.astype(np.float64) - true_positives
    return false_positives, true_positives, scores[last_of_each_score]


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids), the curve's collinear points dropped first as scikit-learn
    does; NaN without both classes."""
    fps, tps, _ = _positives_above_each_score(truth, scores)
    if fps[-1] <= 0 or tps[-1] <= 0:
        return float("nan")
    if len(fps) > 2:
        corners = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[corners], tps[corners]
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(truth: np.ndarray, scores: np.ndarray):
    """Precision, recall (recall falling, ending at precision 1, recall 0) and the thresholds: scikit-learn's
    curve for the positive class `truth`."""
    fps, tps, thresholds = _positives_above_each_score(truth, scores)
    called = tps + fps
    precision = _divide(tps, called)
    recall = tps / tps[-1] if tps[-1] != 0 else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: precision at each threshold weighted by the recall it adds (no interpolation)."""
    precision, recall, _ = precision_recall_curve(truth, scores)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def recall_at_precision(labels: np.ndarray, scores: np.ndarray, target: float) -> dict:
    """Highest recall whose precision reaches `target`, and the score threshold that gives it."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels) == 1, scores)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    reachable = np.flatnonzero(precision[:-1] >= target)
    if len(reachable) == 0:
        return {"target_precision": target, "recall_at_precision": 0.0, "threshold_at_precision": None}
    best = reachable[np.argmax(recall[reachable])]
    return {"target_precision": target, "recall_at_precision": float(recall[best]),
            "threshold_at_precision": float(thresholds[best])}
