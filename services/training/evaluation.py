"""Evaluation with scikit-learn's metrics: the validation figures that select the epoch and the configuration, the
multi-label threshold chosen on validation, and the report of the selected model on the test split.

Figures are named by their split: `val_*` on validation (which chose the model, so they are optimistic), `test_*`
on the test split (seen once, by the selected model). Single-label: accuracy, balanced accuracy, top-5 accuracy
(more than 5 classes), macro-F1, per-class precision/recall/F1/support and the confusion matrix. Multi-label: mean
average precision over the tags (mAP, the tags with a positive in the split), micro- and macro-F1 at the model's
threshold, and the same per tag.

Nothing here grows with the square of the classes: a single-label report is computed from each image's predicted
class and top-5 hit (`label_report`; the trainer computes them batch by batch, so the probabilities [n, C] are never
held whole), above `reports.LARGE_CLASSES` classes the confusion matrix is kept sparse (services/training/reports.py)
and balanced accuracy comes from the per-class recalls (scikit-learn's own function builds the dense C x C matrix).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from services.training.reports import LARGE_CLASSES, ClassFigures, EvaluationReport, top_confusions

# rows x classes of one chunk of an [n, C] array that is computed chunk by chunk (16 MiB of float32)
CHUNK_ELEMENTS = 2**22
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def row_chunks(rows: int, num_classes: int) -> list[slice]:
    """Slices of `rows` rows, each of at most CHUNK_ELEMENTS scores over `num_classes` classes (at least one row)."""
    size = max(1, CHUNK_ELEMENTS // max(1, num_classes))
    return [slice(s, s + size) for s in range(0, rows, size)]


def top_k_hits(targets: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true class is among its `k` highest scores, ranked as scikit-learn's top_k_accuracy_score
    ranks them (a stable sort, descending: of equal scores the higher class index ranks first), chunk by chunk
    instead of sorting [n, C]."""
    hits = np.empty(len(targets), dtype=bool)
    index = np.arange(scores.shape[1])
    for rows in row_chunks(len(targets), scores.shape[1]):
        s, t = scores[rows], targets[rows]
        own = s[np.arange(len(t)), t][:, None]
        hits[rows] = (s > own).sum(1) + ((s == own) & (index > t[:, None])).sum(1) < k
    return hits


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


def _round(x: float) -> float:
    return round(float(x), 5)


def report(
    targets: np.ndarray, probs: np.ndarray, classes: list[str], split: str, threshold: float | None = None
) -> EvaluationReport:
    """The evaluation of probabilities `probs` [n, C] (softmax, or sigmoid per tag) against `targets`: summary
    figures named `<split>_<metric>`, per-class figures (every class), and the confusion matrix. Macro figures
    average over the classes (tags) that occur in the split or are predicted, scikit-learn's default: a class that
    is absent and never predicted has no F1, and counting it as 0 would contradict a perfect accuracy."""
    if targets.ndim == 1:
        top5 = top_k_hits(targets, probs, 5) if len(classes) > 5 else None
        return label_report(targets, probs.argmax(1), top5, classes, split)
    labels = list(range(len(classes)))
    with _quiet():
        pred = probs >= threshold
        p, r, f, s = precision_recall_fscore_support(targets, pred, average=None, labels=labels, zero_division=0)
        ap = [average_precision_score(targets[:, c], probs[:, c]) if targets[:, c].any() else None for c in labels]
        metrics = {
            f"{split}_map": _round(mean_average_precision(targets, probs)),
            f"{split}_micro_f1": _round(f1_score(targets, pred, average="micro", zero_division=0)),
            f"{split}_macro_f1": _round(
                f1_score(targets, pred, average="macro", zero_division=0, labels=_seen(targets, pred))
            ),
        }
    per_class: list[ClassFigures] = [
        {
            "class": c,
            "average_precision": None if a is None else _round(a),
            "precision": _round(pi),
            "recall": _round(ri),
            "f1": _round(fi),
            "support": int(si),
        }
        for c, a, pi, ri, fi, si in zip(classes, ap, p, r, f, s, strict=True)
    ]
    return {
        "split": split,
        "images": int(len(targets)),
        "classes": classes,
        "threshold": threshold,
        "metrics": metrics,
        "per_class": per_class,
        # per tag [[tn, fp], [fn, tp]]: four counts a tag, however many tags
        "confusion_matrix": multilabel_confusion_matrix(targets, pred, labels=labels).tolist(),
    }


def label_report(
    targets: np.ndarray, pred: np.ndarray, top5: np.ndarray | None, classes: list[str], split: str
) -> EvaluationReport:
    """The single-label report from each image's true class `targets`, predicted class `pred` and whether the true
    class was among the 5 most probable `top5` (None: 5 classes or fewer)."""
    labels = list(range(len(classes)))
    with _quiet():
        p, r, f, s = precision_recall_fscore_support(targets, pred, labels=labels, zero_division=0)
        metrics = {
            f"{split}_accuracy": _round(accuracy_score(targets, pred)),
            # scikit-learn's balanced_accuracy_score: the mean recall over the classes in the split (tested equal)
            f"{split}_balanced_accuracy": _round(np.mean(r[s > 0])),
            f"{split}_macro_f1": _round(f1_score(targets, pred, average="macro", zero_division=0)),
        }
        if top5 is not None:
            metrics[f"{split}_top5_accuracy"] = _round(np.mean(top5))
    out: EvaluationReport = {
        "split": split,
        "images": int(len(targets)),
        "classes": classes,
        "metrics": metrics,
        "per_class": [
            {"class": c, "precision": _round(pi), "recall": _round(ri), "f1": _round(fi), "support": int(si)}
            for c, pi, ri, fi, si in zip(classes, p, r, f, s, strict=True)
        ],
    }
    # the cells that are not zero, as (true, predicted, count): at most one per image
    cells, count = np.unique(targets.astype(np.int64) * len(classes) + pred, return_counts=True)
    true, predicted, count = (cells // len(classes)).tolist(), (cells % len(classes)).tolist(), count.tolist()
    if len(classes) <= LARGE_CLASSES:  # rows: true, columns: predicted
        out["confusion_matrix"] = confusion_matrix(targets, pred, labels=labels).tolist()
    else:
        out["confusion"] = {
            "format": "coo",
            "shape": [len(classes)] * 2,
            "true": true,
            "predicted": predicted,
            "count": count,
        }
    out["top_confusions"] = top_confusions(true, predicted, count, classes)
    return out
