"""A job's pictures, as PNG bytes for the artifact store (served at `GET /models/{id}/plots/{name}.png`):

- `curves`: training loss, the validation figure and the learning rate per epoch, one line per sweep configuration
  (the selected one drawn bold); for the L-BFGS linear probe, the validation figure against the L2 strength;
- `confusion`: the evaluation's confusion matrix (rows: true class, columns: predicted), or for multi-label models
  each tag's true/false positives and negatives. Up to `reports.LARGE_CLASSES` classes (tags) every cell is drawn,
  on a canvas that grows with the classes (at 100: about 5,200 x 4,650 px); above, a summary on a fixed canvas
  (`SUMMARY_INCHES` at `DPI`: 1,400 x 700 px whatever the class count): the matrix downsampled to at most `MAX_BINS`
  x `MAX_BINS` bins of consecutive classes, beside a table of the most frequent confusions (multi-label: the tags'
  outcomes per bin, beside the tags with the most errors). Drawn in full, a 1,000-class matrix asked for a
  50,200 x 45,150 px canvas (tens of GB).

matplotlib's object API (`Figure`, drawn by its Agg canvas): no pyplot, so no global state and no display needed.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from services.spec.sweep import Overrides
from services.training.metrics import HistoryRow, JobMetrics, L2Point
from services.training.reports import LARGE_CLASSES, TOP_CONFUSIONS, EvaluationReport

DPI = 100
SUMMARY_INCHES = (14.0, 7.0)
MAX_BINS = 100
NAME_CHARS = 36  # class names in the summary's table are cut to this many characters


def _png(fig: Figure, tight: bool = True) -> bytes:
    """The figure as PNG bytes; `tight` crops to what is drawn (the canvas then follows the content), otherwise the
    canvas is the figure's size exactly."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


def _name(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "\u2026"


def _label(config: Overrides) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def curves(series: list[tuple[str, list[HistoryRow]]], metric: str, selected: int = 0) -> bytes:
    """`series`: (label, per-epoch history) per configuration; history rows hold train_loss, `metric`, lr."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for i, (label, history) in enumerate(series):
        epochs = [h["epoch"] for h in history]
        style = {
            "linewidth": 2.4 if i == selected else 1.0,
            "alpha": 1.0 if i == selected else 0.6,
            "label": label if len(series) <= 12 else None,
        }
        for ax, key in zip(axes, ("train_loss", metric, "lr"), strict=True):
            ax.plot(epochs, [h[key] for h in history], **style)
    for ax, title in zip(axes, ("training loss", metric.replace("_", " "), "learning rate"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if 1 < len(series) <= 12:
        axes[1].legend(fontsize=7)
    return _png(fig)


def l2_path(points: list[L2Point], metric: str) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for pool in sorted({p["pool"] for p in points}):
        mine = sorted((p for p in points if p["pool"] == pool), key=lambda p: p["weight_decay"])
        ax.semilogx([p["weight_decay"] for p in mine], [p[metric] for p in mine], marker="o", label=f"pool {pool}")
    ax.set_xlabel("L2 strength (weight_decay)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("linear probe (L-BFGS): validation figure per L2 strength")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def confusion(report: EvaluationReport) -> bytes:
    classes = report["classes"]
    if len(classes) > LARGE_CLASSES:
        return _tag_summary(report) if "confusion_matrix" in report else _confusion_summary(report)
    matrix = np.asarray(report["confusion_matrix"])
    multi = matrix.ndim == 3  # per tag [[tn, fp], [fn, tp]]
    if multi:
        matrix = matrix.reshape(len(classes), 4)[:, [3, 1, 2, 0]]  # tp, fp, fn, tn
    rows, cols = matrix.shape
    fig = Figure(figsize=(max(4.0, 0.5 * cols + 2), max(3.5, 0.45 * rows + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    if rows <= 40 and cols <= 40:
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(
                c,
                r,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > matrix.max() / 2 else "black",
            )
        ax.set_yticks(range(rows), classes)
        ax.set_xticks(range(cols), ["TP", "FP", "FN", "TN"] if multi else classes, rotation=90 if cols > 10 else 0)
    ax.set_ylabel("tag" if multi else "true class")
    ax.set_xlabel("" if multi else "predicted class")
    ax.set_title(
        f"{'per-tag outcomes' if multi else 'confusion matrix'} on the {report['split']} split "
        f"({report['images']} images)"
    )
    return _png(fig)


def _bin_ticks(ax: Axes, axis: str, classes: int, bins: int) -> None:
    """About six ticks along a binned axis, labelled with the index of the first class of their bin."""
    at = np.unique(np.linspace(0, bins - 1, min(bins, 6)).round().astype(int))
    labels = [f"{b * classes // bins:,}" for b in at]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(at, labels)


def _table(ax: Axes, title: str, columns: list[str], rows: list[list[str]]) -> None:
    ax.axis("off")
    ax.set_title(title)
    if rows:
        table = ax.table(cellText=rows, colLabels=columns, loc="upper center", cellLoc="left", colLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.auto_set_column_width(list(range(len(columns))))
    else:
        ax.text(0.5, 0.9, "none", ha="center", transform=ax.transAxes)


def _confusion_summary(report: EvaluationReport) -> bytes:
    """A single-label report of many classes: its sparse matrix summed into bins of consecutive classes (counts on a
    log scale), beside its most frequent confusions."""
    n, cells = len(report["classes"]), report["confusion"]
    bins = min(n, MAX_BINS)
    true, predicted, count = (np.asarray(cells[k], dtype=np.int64) for k in ("true", "predicted", "count"))
    binned = np.zeros((bins, bins))
    np.add.at(binned, (true * bins // n, predicted * bins // n), count)
    right = int(count[true == predicted].sum())
    fig = Figure(figsize=SUMMARY_INCHES, layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[1.15, 1])
    image = ax.imshow(
        np.ma.masked_equal(binned, 0),
        cmap="Blues",
        interpolation="nearest",
        norm=LogNorm(vmin=1, vmax=max(2.0, binned.max())),
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    _bin_ticks(ax, "x", n, bins)
    _bin_ticks(ax, "y", n, bins)
    ax.set_xlabel(f"predicted class (index; bins of about {n / bins:.3g} classes)")
    ax.set_ylabel(f"true class (index; bins of about {n / bins:.3g} classes)")
    ax.set_title(
        f"confusion matrix on the {report['split']} split: {report['images']:,} images, {n:,} classes\n"
        f"({right:,} on the diagonal; the whole matrix is in evaluation.json)",
        fontsize=10,
    )
    top = report.get("top_confusions", [])[:TOP_CONFUSIONS]
    rows = [[_name(c["true"]), _name(c["predicted"]), f"{c['count']:,}"] for c in top]
    _table(side, f"the {len(rows)} most frequent confusions", ["true class", "predicted as", "images"], rows)
    return _png(fig, tight=False)


def _tag_summary(report: EvaluationReport) -> bytes:
    """A multi-label report of many tags: each bin of consecutive tags' share of true/false positives/negatives,
    beside the tags with the most errors."""
    names = report["classes"]
    n = len(names)
    bins = min(n, MAX_BINS)
    outcomes = np.asarray(report["confusion_matrix"], dtype=np.int64).reshape(n, 4)[:, [3, 1, 2, 0]]  # tp fp fn tn
    binned = np.zeros((bins, 4))
    np.add.at(binned, np.arange(n) * bins // n, outcomes)
    shares = binned / np.maximum(binned.sum(1, keepdims=True), 1)
    fig = Figure(figsize=SUMMARY_INCHES, layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[1.15, 1])
    image = ax.imshow(shares.T, cmap="Blues", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the bin's (image, tag) decisions")
    ax.set_yticks(range(4), ["TP", "FP", "FN", "TN"])
    _bin_ticks(ax, "x", n, bins)
    ax.set_xlabel(f"tag (index; bins of about {n / bins:.3g} tags)")
    ax.set_title(
        f"per-tag outcomes on the {report['split']} split: {report['images']:,} images, {n:,} tags", fontsize=10
    )
    errors = outcomes[:, 1] + outcomes[:, 2]
    worst = [i for i in np.argsort(-errors, kind="stable")[:TOP_CONFUSIONS] if errors[i] > 0]
    rows = [[_name(names[i]), *(f"{v:,}" for v in outcomes[i, :3])] for i in worst]
    _table(side, f"the {len(rows)} tags with the most errors (FP + FN)", ["tag", "TP", "FP", "FN"], rows)
    return _png(fig, tight=False)


def for_job(metrics: JobMetrics, report: EvaluationReport, metric: str) -> dict[str, bytes]:
    """The PNGs of a finished job, by name."""
    out = {"confusion": confusion(report)}
    if "l2_path" in metrics:
        out["curves"] = l2_path(metrics["l2_path"], metric)
    elif "sweep" in metrics:
        series = [(_label(e["config"]), e["history"]) for e in metrics["sweep"]]
        out["curves"] = curves(series, metric, [e["config"] for e in metrics["sweep"]].index(metrics["selected"]))
    else:
        out["curves"] = curves([("", metrics["history"])], metric)
    return out
