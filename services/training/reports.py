"""The evaluation report as it is stored (`evaluation.json`, beside the model's weights) and served in pages
(`GET /models/{id}/evaluation`). Plain Python, without torch or scikit-learn, so that the API reads it.

Up to `LARGE_CLASSES` classes the report holds the dense confusion matrix (`confusion_matrix`, rows: true class,
columns: predicted), as it always did. Above, a dense matrix would be C^2 counts (21,843 classes: 477 million, 3.8 GB
as int64) while a split of N images fills at most N of its cells, so the report holds the cells that are not zero as
(true, predicted, count) triples instead (`confusion`: three lists of class indices and counts, sorted by true class,
then predicted class): O(min(N, C^2)). A multi-label report holds four counts per tag (`confusion_matrix`
[C, 2, 2]) whatever the number of tags. A single-label report also lists `top_confusions`: the most frequent
(true -> predicted) pairs off the diagonal, by name.

A page holds the rows of classes `offset` to `offset + limit` of everything that has one row per class
(`classes`, `per_class`, `confusion_matrix`'s rows, `confusion`'s triples whose true class is on the page; their
indices stay those of the model's class list) and the report's summary whole.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from typing import NotRequired, TypedDict

LARGE_CLASSES = 100  # above this many classes (tags): the sparse confusion, the summary plot, pages in the report
TOP_CONFUSIONS = 20
PAGE = 100  # classes per page when the request names no `limit`
MAX_PAGE = 1000

# one class's (tag's) figures; "class" is a keyword, hence the functional form
ClassFigures = TypedDict(
    "ClassFigures",
    {
        "class": str,
        "average_precision": NotRequired[float | None],  # multi-label only (None: no positive in the split)
        "precision": float,
        "recall": float,
        "f1": float,
        "support": int,
    },
)


class Confusion(TypedDict):
    """An off-diagonal cell of a single-label confusion matrix, by name."""

    true: str
    predicted: str
    count: int


class SparseConfusion(TypedDict):
    """A single-label confusion matrix above LARGE_CLASSES classes: its cells that are not zero, sorted by true class,
    then predicted class."""

    format: str  # "coo"
    shape: list[int]  # [classes, classes]
    true: list[int]
    predicted: list[int]
    count: list[int]


class EvaluationReport(TypedDict):
    """`evaluation.json`: the selected model's figures on one split (services/training/evaluation.py)."""

    split: str  # "test" or "val"
    images: int
    classes: list[str]
    threshold: NotRequired[float | None]  # multi-label: the decision threshold chosen on validation
    metrics: dict[str, float]  # `<split>_<figure>`, e.g. test_accuracy, test_map
    per_class: list[ClassFigures]
    # single-label up to LARGE_CLASSES classes: [true][predicted] counts; multi-label: per tag [[tn, fp], [fn, tp]]
    confusion_matrix: NotRequired[list[list[int]] | list[list[list[int]]]]
    confusion: NotRequired[SparseConfusion]  # single-label above LARGE_CLASSES classes
    top_confusions: NotRequired[list[Confusion]]  # single-label


class EvaluationPage(TypedDict):
    """A page of a report (`page`): its summary whole, the per-class rows of classes [offset, offset + limit)."""

    split: str
    images: int
    threshold: NotRequired[float | None]
    metrics: dict[str, float]
    top_confusions: NotRequired[list[Confusion]]
    offset: int
    limit: int
    total: int
    has_more: bool
    classes: list[str]
    per_class: list[ClassFigures]
    confusion_matrix: NotRequired[list[list[int]] | list[list[list[int]]]]
    confusion: NotRequired[SparseConfusion]


def top_confusions(
    true: list[int], predicted: list[int], count: list[int], classes: list[str], k: int = TOP_CONFUSIONS
) -> list[Confusion]:
    """The `k` most frequent off-diagonal cells of a confusion matrix given as triples (ties: by true class, then
    predicted class), by name."""
    cells = sorted((-n, t, p) for t, p, n in zip(true, predicted, count, strict=True) if t != p)[:k]
    return [{"true": classes[t], "predicted": classes[p], "count": -n} for n, t, p in cells]


def encode(report: EvaluationReport) -> bytes:
    """`evaluation.json`'s bytes: indented up to LARGE_CLASSES classes (as before), compact above (an indented
    21,843-class report would be one line per number)."""
    large = len(report["classes"]) > LARGE_CLASSES
    return json.dumps(report, indent=None if large else 2, separators=(",", ":") if large else None).encode()


def page(report: EvaluationReport, offset: int = 0, limit: int = PAGE) -> EvaluationPage:
    """The report with only the per-class rows of classes [offset, offset + limit), and where it stands: `offset`,
    `limit`, `total` (classes in the report) and `has_more`."""
    classes = report["classes"]
    total = len(classes)
    start, end = min(offset, total), min(offset + limit, total)
    rows = ("classes", "per_class", "confusion_matrix", "confusion")
    out = {k: v for k, v in report.items() if k not in rows}
    out |= {
        "offset": offset,
        "limit": limit,
        "total": total,
        "has_more": end < total,
        "classes": classes[start:end],
        "per_class": report["per_class"][start:end],
    }
    if "confusion_matrix" in report:
        out["confusion_matrix"] = report["confusion_matrix"][start:end]
    if "confusion" in report:
        cells = report["confusion"]
        lo, hi = bisect_left(cells["true"], start), bisect_left(cells["true"], end)
        out["confusion"] = {**cells, **{k: cells[k][lo:hi] for k in ("true", "predicted", "count")}}
    return out
