"""mgn.eval.metrics on a hand-made prediction set: the values worked out by hand, and scikit-learn's own."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mgn.eval.metrics import classification_metrics, precision_recall_curve, recall_at_precision

# Ten samples, positive = 1. At the argmax (score > 0.5): TP 4 (idx 4,5,7,8), FP 1 (idx 3), FN 1 (idx 6), TN
# 4.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
SCORES = np.array([0.10, 0.40, 0.35, 0.80, 0.90, 0.65, 0.45, 0.70, 0.55, 0.20])
PROBS = np.stack([1 - SCORES, SCORES], axis=1)


def test_binary_metrics_match_hand_computation():
    m = classification_metrics(LABELS, PROBS)
    assert m["samples"] == 10
    assert m["confusion_matrix"] == [[4, 1], [1, 4]]  # rows: true 0/1, columns: predicted 0/1
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(4 / 5) and m["recall"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(4 / 5)
    # AUROC = share of (positive, negative) pairs ranked correctly: 5 + 4 + 4 + 4 + 4 of 25
    assert m["auroc"] == pytest.approx(21 / 25)
    # average precision: mean precision at each positive, in score order .90 .70 .65 .55 .45 -> 1, 2/3, 3/4,
    # 4/5, 5/6
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5)


def test_binary_metrics_match_scikit_learn():
    m = classification_metrics(LABELS, PROBS)
    preds = PROBS.argmax(1)
    assert m["accuracy"] == skm.accuracy_score(LABELS, preds)
    assert m["precision"] == skm.precision_score(LABELS, preds)
    assert m["recall"] == skm.recall_score(LABELS, preds)
    assert m["f1"] == skm.f1_score(LABELS, preds)
    assert m["auroc"] == skm.roc_auc_score(LABELS, SCORES)
    assert m["pr_auc"] == skm.average_precision_score(LABELS, SCORES)
    assert m["confusion_matrix"] == skm.confusion_matrix(LABELS, preds).tolist()


@pytest.mark.parametrize("target,recall,threshold", [
    (0.8, 1.0, 0.45),   # lowest threshold: 5 TP, 1 FP -> precision 5/6 >= 0.8, every positive found
    (0.85, 0.2, 0.90),  # 5/6 < 0.85; only the top score (precision 1) qualifies
    (1.0, 0.2, 0.90),
])
def test_recall_at_target_precision_and_its_threshold(target, recall, threshold):
    m = classification_metrics(LABELS, PROBS, target_precision=target)
    assert m["target_precision"] == target
    assert m["recall_at_precision"] == pytest.approx(recall)
    assert m["threshold_at_precision"] == pytest.approx(threshold)
    # the threshold really reaches the target: precision and recall of `score >= threshold`
    chosen = SCORES >= m["threshold_at_precision"]
    assert skm.precision_score(LABELS, chosen) >= target
    assert skm.recall_score(LABELS, chosen) == pytest.approx(recall)


def test_unreachable_precision_has_no_threshold():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6])  # the most confident sample is wrong: precision never reaches 1
    out = recall_at_precision(labels, scores, 1.0)
    assert out == {"target_precision": 1.0, "recall_at_precision": 0.0, "threshold_at_precision": None}


def test_multiclass_is_macro_averaged_like_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = probs.argmax(1)
    m = classification_metrics(labels, probs, target_precision=0.9)
    assert m["precision"] == pytest.approx(skm.precision_score(labels, preds, average="macro"))
    assert m["recall"] == pytest.approx(skm.recall_score(labels, preds, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(np.eye(3)[labels], probs,
                                                                    average="macro"))
    assert np.array(m["confusion_matrix"]).shape == (3, 3) and "recall_at_precision" not in m  # binary only


def test_one_class_present_gives_nan_ranking_metrics_not_an_error():
    m = classification_metrics(np.zeros(4, dtype=int), PROBS[:4], target_precision=0.9)
    assert math.isnan(m["auroc"]) and math.isnan(m["pr_auc"]) and m["accuracy"] == pytest.approx(3 / 4)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="expected labels"):
        classification_metrics(LABELS[:5], PROBS)


def test_labels_outside_the_classes_are_rejected_not_counted_elsewhere():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        classification_metrics(np.array([0, 1, -1]), PROBS[:3])


@pytest.mark.filterwarnings("ignore:.*(class is present|positive class found).*")  # sklearn, on purpose
def test_random_sets_with_ties_and_more_classes_give_scikit_learns_values_exactly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, n = int(rng.choice([2, 3])), int(rng.integers(2, 120))
        labels = rng.integers(0, k, n)
        logits = np.round(rng.normal(size=(n, k)) + rng.random() * 2 * np.eye(k)[labels], 1)  # rounded: ties
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        preds, binary = probs.argmax(1), k == 2
        m = classification_metrics(labels, probs, target_precision=0.8)
        average = "binary" if binary else "macro"
        assert m["precision"] == skm.precision_score(labels, preds, average=average, zero_division=0)
        assert m["recall"] == skm.recall_score(labels, preds, average=average, zero_division=0)
        assert m["f1"] == skm.f1_score(labels, preds, average=average, zero_division=0)
        assert m["accuracy"] == skm.accuracy_score(labels, preds)
        if len(np.unique(labels)) < 2:
            assert math.isnan(m["auroc"])
        elif binary:
            assert m["auroc"] == skm.roc_auc_score(labels, probs[:, 1])
            assert m["pr_auc"] == skm.average_precision_score(labels, probs[:, 1])
            precision, recall, thresholds = skm.precision_recall_curve(labels, probs[:, 1])
            ours = precision_recall_curve(labels == 1, probs[:, 1])
            assert all(np.array_equal(a, b) for a, b in zip(ours, (precision, recall, thresholds)))
        else:
            # a class absent from the labels: NaN from both (scikit-learn warns)
            expected = skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(k)))
            assert m["auroc"] == expected or (math.isnan(m["auroc"]) and math.isnan(expected))
            assert m["pr_auc"] == skm.average_precision_score(np.eye(k)[labels], probs, average="macro")


def test_non_finite_probabilities_are_refused_not_scored():
    probs = PROBS.copy()
    probs[2] = np.nan
    with pytest.raises(ValueError, match="1 of 10 samples have NaN or infinite probabilities"):
        classification_metrics(LABELS, probs)


def test_labels_as_whole_floats_are_read_as_classes_and_fractions_refused():
    assert classification_metrics(LABELS.astype(float), PROBS) == classification_metrics(LABELS, PROBS)
    with pytest.raises(ValueError, match="labels must be whole class numbers"):
        classification_metrics(LABELS + 0.5, PROBS)
