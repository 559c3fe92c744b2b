"""Accuracy, macro-F1 and the confusion matrix, from predicted and true class indices."""

from __future__ import annotations

import numpy as np


def classification_metrics(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> dict:
    """`confusion[t][p]` counts samples of true class t predicted as p. Macro-F1 averages the per-class F1
    over the classes present in `targets` (a class never predicted and never true is not counted)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets, predictions), 1)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros(num_classes), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    present = actual > 0
    return {
        "accuracy": float(true_positives.sum() / max(1, len(targets))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_f1": [round(float(v), 6) for v in f1],
        "confusion": confusion.tolist(),
        "num_samples": len(targets),
    }
