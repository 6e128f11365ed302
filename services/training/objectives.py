"""The training objective, per configuration of a sweep: cross-entropy for single-label classification (optionally
label-smoothed and class-weighted), binary cross-entropy per tag for multi-label classification.

Logits come as [K, B, C] (K configurations that saw the same batch) and the loss as [K], the mean over the batch
of each configuration, exactly as torch's `reduction="mean"` computes it for one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Objective:
    """`targets`: the training split's labels ([n] class indices, or [n, tags] 0/1 for multi-label), from which
    `class_weights="balanced"` takes its weights."""

    def __init__(
        self,
        targets: np.ndarray,
        num_classes: int,
        label_smoothing: float = 0.0,
        class_weights: str = "none",
        device: str = "cpu",
    ) -> None:
        self.multi_label = targets.ndim == 2
        self.num_classes, self.label_smoothing, self.device = num_classes, label_smoothing, device
        self.weight: torch.Tensor | None = None
        if class_weights == "balanced":
            if self.multi_label:
                # BCE pos_weight: a tag's positives weigh as much as its negatives (torch's documented use)
                pos = targets.sum(0).astype(np.float64)
                weight = (len(targets) - pos) / np.maximum(pos, 1.0)
            else:
                # scikit-learn's class_weight="balanced": n / (classes x n_c); a class absent from training gets 1
                counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
                weight = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1.0)), 1.0)
            self.weight = torch.tensor(weight, dtype=torch.float32, device=device)

    @property
    def metric(self) -> str:
        """The validation figure that selects epochs and configurations (higher is better)."""
        return "val_map" if self.multi_label else "val_accuracy"

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over classes, or a sigmoid per tag (multi-label), of logits [..., C] on the host."""
        t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        return (torch.sigmoid(t) if self.multi_label else t.softmax(-1)).numpy()

    def cast(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as a source yields them (int64) -> what the loss takes: class indices, or float 0/1 per tag."""
        return y.float() if self.multi_label else y

    def targets(self, y: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(y))
        return (t.float() if self.multi_label else t.long()).to(self.device, non_blocking=True)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss [K] of logits [K, B, C]."""
        return self._loss(logits, y, self.label_smoothing, self.weight)

    def normalizer(self, y: torch.Tensor) -> torch.Tensor | int:
        """What the loss of a batch with targets `y` is divided by (its rows, or for class weights the weights of its
        targets): a batch's loss is the sum over parts of it of each part's loss times its normalizer's share."""
        return self._divisor(y, self.weight)

    def _divisor(self, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | int:
        # torch's weighted mean divides by the weights of the targets, not by the batch size; a multi-label loss is
        # the mean over rows and tags, so a part's share of it is its share of the rows
        return weight[y].sum() if weight is not None and not self.multi_label else len(y)

    def single(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one configuration's logits [B, C], a scalar: `self(logits[None], y)[0]` in fewer
        operations (the L-BFGS probe evaluates it hundreds of times)."""
        if self.multi_label:
            target = y * (1 - self.label_smoothing) + self.label_smoothing / 2 if self.label_smoothing else y
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.weight)
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.label_smoothing)

    def plain(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The unweighted, unsmoothed loss [K]: what validation reports."""
        return self._loss(logits, y, 0.0, None)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, smoothing: float, weight: torch.Tensor | None):
        k, b, c = logits.shape
        logits = logits.float()
        if self.multi_label:
            target = y.expand(k, b, c)
            if smoothing:
                target = target * (1 - smoothing) + smoothing / 2
            per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
            return per.mean(dim=(1, 2))
        # classes on dim 1 ([K, C, B], as for a per-pixel loss): log-softmax over a strided dim runs vectorised over
        # the batch, 3x faster than over the rows of [K * B, C] for K = 32 heads of 10 classes
        per = F.cross_entropy(
            logits.transpose(1, 2), y.expand(k, b), weight=weight, label_smoothing=smoothing, reduction="none"
        )
        return per.sum(1) / self._divisor(y, weight)
