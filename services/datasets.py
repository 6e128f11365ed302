"""Dataset readers: an ImageFolder directory (one subfolder per class) or a CSV manifest (`path,label`).

A dataset is read into a `Dataset` (sorted sample list and class names) with a fingerprint over its file
list, sizes and modification times, so a changed dataset gets a new cache entry. Torch-free: the API uses
`check_path` to validate a submission.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services import images
from services.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the cause (the file, the line)."""

    code = "invalid_dataset"


@dataclass(frozen=True)
class Dataset:
    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64 class index per sample
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.paths)


def check_path(path: str | Path, roots: list[Path]) -> Path:
    """Resolve `path` and require it to exist inside one of `roots` (symlinks resolved first)."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PermissionError(f"dataset path {str(path)!r} is outside the allowed roots ({allowed})")
    if not resolved.exists():
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
    return resolved


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if path.is_file() and path.suffix.lower() == ".csv" else "imagefolder"


def _fingerprint(root: Path, paths: list[Path], labels: list[str]) -> str:
    h = hashlib.sha256()
    for p, label in zip(paths, labels, strict=True):
        st = p.stat()
        rel = p.relative_to(root) if p.is_relative_to(root) else p
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _finish(root: Path, paths: list[Path], names: list[str]) -> Dataset:
    classes = sorted(set(names))
    if len(paths) == 0:
        raise DatasetError(f"dataset {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(classes) < 2:
        raise DatasetError(f"dataset {root} has {len(classes)} class; at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    return Dataset(root, paths, labels, classes, _fingerprint(root, paths, names))


def read_imagefolder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; an ImageFolder dataset has one subfolder per class")
    paths: list[Path] = []
    names: list[str] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for f in sorted(filenames):
                if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(Path(dirpath) / f)
                    names.append(class_dir.name)
    return _finish(root, paths, names)


def read_csv(manifest: Path) -> Dataset:
    root = manifest.parent
    paths: list[Path] = []
    names: list[str] = []
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{manifest} needs a header with columns `path,label`, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            rel = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            if not rel or not label:
                raise DatasetError(f"{manifest} line {line}: empty path or label")
            p = (root / rel).resolve()
            if not p.is_relative_to(root.resolve()):
                raise DatasetError(f"{manifest} line {line}: {rel!r} points outside the manifest's folder")
            if not p.is_file():
                raise DatasetError(f"{manifest} line {line}: {rel!r} does not exist")
            paths.append(p)
            names.append(label)
    return _finish(root, paths, names)


def read_dataset(path: Path, fmt: str = "auto") -> Dataset:
    fmt = resolve_format(path, fmt)
    return read_csv(path) if fmt == "csv" else read_imagefolder(path)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): per class, a seeded shuffle, round(n * val_fraction) held out (at least one of
    any class with two or more samples)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def load_image(source: Path | bytes, draft: int | None = None):
    """An RGB PIL image, decoded by the rules of services/images.py; DatasetError naming the file otherwise."""
    try:
        return images.load_image(source, draft)
    except images.ImageError as e:
        raise DatasetError(str(e)) from None
