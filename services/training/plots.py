"""A job's pictures, as PNG bytes for the artifact store (served at `GET /models/{id}/plots/{name}.png`):

- `curves`: training loss, the validation figure and the learning rate per epoch, one line per sweep configuration
  (the selected one drawn bold); for the L-BFGS linear probe, the validation figure against the L2 strength;
- `confusion`: the evaluation's confusion matrix (rows: true class, columns: predicted), or for multi-label models
  each tag's true/false positives and negatives.

matplotlib's object API (`Figure`, drawn by its Agg canvas): no pyplot, so no global state and no display needed.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def curves(series: list[tuple[str, list[dict[str, Any]]]], metric: str, selected: int = 0) -> bytes:
    """`series`: (label, per-epoch history) per configuration; history rows hold train_loss, `metric`, lr."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for i, (label, history) in enumerate(series):
        epochs = [h["epoch"] for h in history]
        style = {"linewidth": 2.4 if i == selected else 1.0, "alpha": 1.0 if i == selected else 0.6,
                 "label": label if len(series) <= 12 else None}  # fmt: skip
        for ax, key in zip(axes, ("train_loss", metric, "lr"), strict=True):
            ax.plot(epochs, [h[key] for h in history], **style)
    for ax, title in zip(axes, ("training loss", metric.replace("_", " "), "learning rate"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if 1 < len(series) <= 12:
        axes[1].legend(fontsize=7)
    return _png(fig)


def l2_path(points: list[dict[str, Any]], metric: str) -> bytes:
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


def confusion(report: dict[str, Any]) -> bytes:
    matrix = np.asarray(report["confusion_matrix"])
    classes = report["classes"]
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
            ax.text(c, r, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")  # fmt: skip
        ax.set_yticks(range(rows), classes)
        ax.set_xticks(range(cols), ["TP", "FP", "FN", "TN"] if multi else classes, rotation=90 if cols > 10 else 0)
    ax.set_ylabel("tag" if multi else "true class")
    ax.set_xlabel("" if multi else "predicted class")
    ax.set_title(f"{'per-tag outcomes' if multi else 'confusion matrix'} on the {report['split']} split "
                 f"({report['images']} images)")  # fmt: skip
    return _png(fig)


def for_job(metrics: dict[str, Any], report: dict[str, Any], metric: str) -> dict[str, bytes]:
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
