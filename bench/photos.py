"""Synthetic photos for the benchmarks: 500x375 JPEGs (the size of a typical web photo, e.g. Pascal VOC's) with the
statistics that make decoding and resizing cost what they cost on real photos: smooth colour gradients, hard edges
of overlapping shapes, and sensor-like noise (so the JPEG is not trivially compressible), quality 90.

    write_photos(root, n=256, classes=4)  ->  root/<class>/<i>.jpg, an ImageFolder
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 500, 375


def photo(rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.empty((HEIGHT, WIDTH, 3), np.float32)
    for c in range(3):  # a smooth field: a random gradient plus two low-frequency waves per channel
        gx, gy = rng.uniform(-0.3, 0.3, 2)
        f1, f2 = rng.uniform(0.005, 0.03, 2)
        base[..., c] = 128 + gx * x + gy * y + 40 * np.sin(f1 * x + rng.uniform(0, 6)) * np.cos(f2 * y)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(6, 14)):  # hard edges: overlapping ellipses and rectangles
        x0, y0 = rng.integers(0, WIDTH - 40), rng.integers(0, HEIGHT - 40)
        box = [int(x0), int(y0), int(x0 + rng.integers(30, 220)), int(y0 + rng.integers(30, 180))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_photos(root: Path, n: int = 256, classes: int = 4, seed: int = 0) -> Path:
    """`n` photos in `classes` class folders under `root` (written once: an existing set of the same size is kept)."""
    root = Path(root)
    if len(list(root.glob("*/*.jpg"))) == n:
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng).save(folder / f"{i:05d}.jpg", quality=90)
    return root
