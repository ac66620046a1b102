"""Classification metrics from scikit-learn, shared by training-time evaluation and evaluate.py.

The positive class is 1 (e.g. "violent"). With more than two classes, precision/recall/F1 are
macro-averaged and AUROC is one-vs-rest; the precision-target threshold is binary-only.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           target_precision: float | None = None) -> dict:
    """labels [N] ints, probs [N, K] class probabilities -> a flat dict of floats (and the confusion
    matrix)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"expected labels [N] and probs [N, K], got {labels.shape} and {probs.shape}")
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    binary = num_classes == 2
    average = "binary" if binary else "macro"
    out = {
        "samples": int(len(labels)),
        "accuracy": skm.accuracy_score(labels, preds),
        "precision": skm.precision_score(labels, preds, average=average, zero_division=0),
        "recall": skm.recall_score(labels, preds, average=average, zero_division=0),
        "f1": skm.f1_score(labels, preds, average=average, zero_division=0),
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=list(range(num_classes))).tolist(),
    }
    present = np.unique(labels)
    if len(present) < 2:  # AUROC and PR-AUC are undefined with one class present
        out["auroc"] = out["pr_auc"] = float("nan")
    elif binary:
        out["auroc"] = skm.roc_auc_score(labels, probs[:, 1])
        out["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
    else:
        out["auroc"] = skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(num_classes)))
        out["pr_auc"] = skm.average_precision_score(np.eye(num_classes)[labels], probs, average="macro")
    if target_precision is not None and binary and len(present) == 2:
        out.update(recall_at_precision(labels, probs[:, 1], target_precision))
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def recall_at_precision(labels: np.ndarray, scores: np.ndarray, target: float) -> dict:
    """Highest recall whose precision reaches `target`, and the score threshold that gives it."""
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    reachable = np.flatnonzero(precision[:-1] >= target)
    if len(reachable) == 0:
        return {"target_precision": target, "recall_at_precision": 0.0, "threshold_at_precision": None}
    best = reachable[np.argmax(recall[reachable])]
    return {"target_precision": target, "recall_at_precision": float(recall[best]),
            "threshold_at_precision": float(thresholds[best])}
