"""Evaluation with scikit-learn's metrics: the validation figures that select the epoch and the configuration, the
multi-label threshold chosen on validation, and the report of the selected model on the test split.

Figures are named by their split: `val_*` on validation (which chose the model, so they are optimistic), `test_*`
on the test split (seen once, by the selected model). Single-label: accuracy, balanced accuracy, top-5 accuracy
(more than 5 classes), macro-F1, per-class precision/recall/F1/support and the confusion matrix. Multi-label: mean
average precision over the tags (mAP, the tags with a positive in the split), micro- and macro-F1 at the model's
threshold, and the same per tag.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


@contextlib.contextmanager
def _quiet():
    # e.g. "y_pred contains classes not in y_true" on a small split: the figures are still the defined ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scikit-learn's UndefinedMetricWarning is one
        yield


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the tags that have a positive in `targets` (AP is undefined without one)."""
    present = targets.sum(0) > 0
    if not present.any():
        return float("nan")
    return float(average_precision_score(targets[:, present], scores[:, present], average="macro"))


def validation_score(targets: np.ndarray, scores: np.ndarray) -> float:
    """The figure that selects (higher is better): accuracy, or mAP for multi-label targets. `scores` [n, C]: logits
    or probabilities alike (both figures depend only on the order of the scores). Accuracy is counted directly:
    scikit-learn's accuracy_score gives the same number (tested) at ~1 ms of input checks per call, which a sweep of
    64 configurations would pay every epoch. Non-finite scores (a diverged configuration) score NaN: never selected."""
    if not np.isfinite(scores).all():
        return float("nan")
    if targets.ndim == 2:
        return mean_average_precision(targets, scores)
    return float(np.mean(scores.argmax(1) == targets)) if len(targets) else float("nan")


def validation_scores(targets: np.ndarray, scores: list[np.ndarray]) -> list[float]:
    """`validation_score` of several configurations' scores, each [n, C]; accuracies counted for all at once."""
    if targets.ndim == 2 or not len(targets) or not scores:
        return [validation_score(targets, s) for s in scores]
    stacked = np.stack(scores)
    accuracy = (stacked.argmax(2) == targets).mean(1)
    return np.where(np.isfinite(stacked).all((1, 2)), accuracy, np.nan).tolist()


def choose_threshold(targets: np.ndarray, probs: np.ndarray) -> float:
    """The multi-label decision threshold with the best micro-F1 on validation (ties: the one nearest 0.5)."""
    with _quiet():
        f1 = [f1_score(targets, probs >= t, average="micro", zero_division=0) for t in THRESHOLDS]
    best = max(f1)
    return float(min((t for t, f in zip(THRESHOLDS, f1, strict=True) if f == best), key=lambda t: abs(t - 0.5)))


def _seen(targets: np.ndarray, pred: np.ndarray) -> list[int] | None:
    """The tags that occur in multi-label `targets` or `pred` (all of them when none does)."""
    seen = np.flatnonzero(targets.any(0) | pred.any(0)).tolist()
    return seen or None


def _round(x: Any) -> Any:
    return round(float(x), 5)


def report(targets: np.ndarray, probs: np.ndarray, classes: list[str], split: str,
           threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The evaluation of probabilities `probs` [n, C] (softmax, or sigmoid per tag) against `targets`: summary
    figures named `<split>_<metric>`, per-class figures (every class), and the confusion matrix. Macro figures
    average over the classes (tags) that occur in the split or are predicted, scikit-learn's default: a class that
    is absent and never predicted has no F1, and counting it as 0 would contradict a perfect accuracy."""
    labels = list(range(len(classes)))
    n = len(targets)
    out: dict[str, Any] = {"split": split, "images": int(n), "classes": classes}
    with _quiet():
        if targets.ndim == 2:
            pred = probs >= threshold
            p, r, f, s = precision_recall_fscore_support(targets, pred, average=None, labels=labels, zero_division=0)
            ap = [average_precision_score(targets[:, c], probs[:, c]) if targets[:, c].any() else None for c in labels]
            out["threshold"] = threshold
            out["metrics"] = {
                f"{split}_map": _round(mean_average_precision(targets, probs)),
                f"{split}_micro_f1": _round(f1_score(targets, pred, average="micro", zero_division=0)),
                f"{split}_macro_f1": _round(
                    f1_score(targets, pred, average="macro", zero_division=0, labels=_seen(targets, pred))
                ),  # fmt: skip
            }
            out["per_class"] = [
                {"class": c, "average_precision": None if a is None else _round(a), "precision": _round(pi),
                 "recall": _round(ri), "f1": _round(fi), "support": int(si)}
                for c, a, pi, ri, fi, si in zip(classes, ap, p, r, f, s, strict=True)
            ]  # fmt: skip
            # per tag [[tn, fp], [fn, tp]]
            out["confusion_matrix"] = multilabel_confusion_matrix(targets, pred, labels=labels).tolist()
            return out
        pred = probs.argmax(1)
        metrics = {
            f"{split}_accuracy": _round(accuracy_score(targets, pred)),
            f"{split}_balanced_accuracy": _round(balanced_accuracy_score(targets, pred)),
            f"{split}_macro_f1": _round(f1_score(targets, pred, average="macro", zero_division=0)),
        }
        if len(classes) > 5:
            metrics[f"{split}_top5_accuracy"] = _round(top_k_accuracy_score(targets, probs, k=5, labels=labels))
        p, r, f, s = precision_recall_fscore_support(targets, pred, labels=labels, zero_division=0)
    out["metrics"] = metrics
    out["per_class"] = [
        {"class": c, "precision": _round(pi), "recall": _round(ri), "f1": _round(fi), "support": int(si)}
        for c, pi, ri, fi, si in zip(classes, p, r, f, s, strict=True)
    ]
    out["confusion_matrix"] = confusion_matrix(targets, pred, labels=labels).tolist()  # rows: true, columns: predicted
    return out
