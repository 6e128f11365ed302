"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) written as an ImageFolder.

The embedded default dataset of the demo and the tests: real data that needs no download. A seeded,
stratified share is written to a separate folder as held-out images for prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from services.data.splits import stratified_split


def write_digits(root: Path, holdout_fraction: float = 0.1, size: int = 32, limit: int | None = None) -> dict:
    """Write `root/train/<digit>/*.png` and `root/holdout/<digit>/*.png`; returns counts. Idempotent."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None and limit < len(labels):
        keep, _ = stratified_split(labels, 1 - limit / len(labels), 0)
        keep = keep[:limit]
        images, labels = images[keep], labels[keep]
    train, holdout = stratified_split(labels, holdout_fraction, seed=1234)
    for split, idx in (("train", train), ("holdout", holdout)):
        for i in idx:
            path = Path(root) / split / str(labels[i]) / f"{i:04d}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (255 - images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
            Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).save(path)
    return {"train": len(train), "holdout": len(holdout)}
