"""Dataset readers: an ImageFolder directory (one subfolder per class) or a CSV manifest (`path,label`; for
multi-label classification the label column holds `|`-separated tags), of images or of videos
(`path,label[,start,end]`, seconds), never both; and the train/validation/test split.

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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: larger images are rejected, not decoded


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the cause."""


@dataclass(frozen=True)
class Dataset:
    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64 class index per sample; multi-label: int64 0/1 [samples, classes] (multi-hot)
    classes: list[str]
    fingerprint: str
    kind: str = "image"  # or "video"
    spans: np.ndarray | None = None  # videos of a manifest with start,end: float [N, 2] seconds, NaN where not given
    skipped_rows: tuple[str, ...] = ()  # manifest rows left out (multi-label rows without a tag, on_corrupt=skip)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

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


def _fingerprint(root: Path, paths: list[Path], labels: list[str], spans: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    for i, (p, label) in enumerate(zip(paths, labels, strict=True)):
        st = p.stat()
        rel = p.relative_to(root) if p.is_relative_to(root) else p
        span = "" if spans is None else f"\0{spans[i, 0]!r}\0{spans[i, 1]!r}"  # images' fingerprints are unchanged
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}{span}\n".encode())
    return h.hexdigest()[:32]


def media_kind(paths: list[Path], where: Path) -> str:
    """`image` or `video` by the files' suffixes; a dataset mixing both is refused."""
    videos = sum(p.suffix.lower() in VIDEO_SUFFIXES for p in paths)
    if videos and videos < len(paths):
        raise DatasetError(f"dataset {where} mixes images ({len(paths) - videos}) and videos ({videos}); a dataset "
                           "holds one or the other")  # fmt: skip
    return "video" if videos else "image"


def _finish(
    root: Path,
    paths: list[Path],
    names: list[str],
    spans: np.ndarray | None = None,
    multi_label: bool = False,
    skipped: tuple[str, ...] = (),
) -> Dataset:
    tags = [[t.strip() for t in n.split("|") if t.strip()] for n in names] if multi_label else [[n] for n in names]
    classes = sorted({t for row in tags for t in row})
    if len(paths) == 0:
        raise DatasetError(f"dataset {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
                           f"({', '.join(sorted(VIDEO_SUFFIXES))})")  # fmt: skip
    if len(classes) < 2:
        raise DatasetError(f"dataset {root} has {len(classes)} {'tag' if multi_label else 'class'}; at least 2 are "
                           "needed")  # fmt: skip
    kind = media_kind(paths, root)
    if spans is not None and kind != "video":
        raise DatasetError(f"{root}: `start`/`end` columns apply to videos only")
    index = {c: i for i, c in enumerate(classes)}
    if multi_label:
        labels = np.zeros((len(paths), len(classes)), dtype=np.int64)
        for row, row_tags in enumerate(tags):
            labels[row, [index[t] for t in row_tags]] = 1
        # the same manifest read as single-label holds other labels: it must not share a cache entry
        fingerprint = _fingerprint(root, paths, [f"multi-label:{n}" for n in names], spans)
    else:
        labels = np.array([index[row[0]] for row in tags], dtype=np.int64)
        fingerprint = _fingerprint(root, paths, names, spans)
    return Dataset(root, paths, labels, classes, fingerprint, kind=kind, spans=spans, skipped_rows=skipped)


def read_imagefolder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; an ImageFolder dataset has one subfolder per class")
    paths: list[Path] = []
    names: list[str] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for f in sorted(filenames):
                if Path(f).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    paths.append(Path(dirpath) / f)
                    names.append(class_dir.name)
    return _finish(root, paths, names)


def read_csv(manifest: Path, multi_label: bool = False, skip_bad_rows: bool = False) -> Dataset:
    """`multi_label`: the label column holds `|`-separated tags; a row without any fails naming its line, or is
    left out and listed in `skipped_rows` when `skip_bad_rows`."""
    root = manifest.parent
    paths: list[Path] = []
    names: list[str] = []
    spans: list[tuple[float, float]] = []
    skipped: list[str] = []
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{manifest} needs a header with columns `path,label`, got {reader.fieldnames}")
        timed = {"start", "end"} & set(reader.fieldnames)
        if len(timed) == 1:
            raise DatasetError(f"{manifest}: give both `start` and `end` columns (seconds), or neither")
        for line, row in enumerate(reader, start=2):
            rel = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            if not rel or not label:
                raise DatasetError(f"{manifest} line {line}: empty path or label")
            if multi_label and not any(t.strip() for t in label.split("|")):
                if not skip_bad_rows:
                    raise DatasetError(f"{manifest} line {line}: empty tag list {label!r} (set dataset.on_corrupt="
                                       "'skip' to leave such rows out)")  # fmt: skip
                skipped.append(f"{manifest.name} line {line}: empty tag list")
                continue
            p = (root / rel).resolve()
            if not p.is_relative_to(root.resolve()):
                raise DatasetError(f"{manifest} line {line}: {rel!r} points outside the manifest's folder")
            if not p.is_file():
                raise DatasetError(f"{manifest} line {line}: {rel!r} does not exist")
            paths.append(p)
            names.append(label)
            if timed:
                spans.append(_span(row, manifest, line))
    spans_array = np.array(spans, dtype=np.float64).reshape(-1, 2) if timed else None
    return _finish(root, paths, names, spans_array, multi_label, tuple(skipped))


def _span(row: dict, manifest: Path, line: int) -> tuple[float, float]:
    """(start, end) seconds of a manifest row; both empty: the whole video (NaN)."""
    start, end = (row.get("start") or "").strip(), (row.get("end") or "").strip()
    if not start and not end:
        return float("nan"), float("nan")
    try:
        a, b = float(start), float(end)
    except ValueError:
        raise DatasetError(f"{manifest} line {line}: start {start!r} and end {end!r} must both be seconds") from None
    if not (0 <= a < b) or not np.isfinite(b):
        raise DatasetError(f"{manifest} line {line}: need 0 <= start < end, got start {a:g}, end {b:g}")
    return a, b


def read_dataset(path: Path, fmt: str = "auto", multi_label: bool = False, on_corrupt: str = "fail") -> Dataset:
    fmt = resolve_format(path, fmt)
    if multi_label and fmt != "csv":
        raise DatasetError(f"{path}: multi-label datasets are CSV manifests whose label column holds `|`-separated "
                           "tags; an ImageFolder has one class per image")  # fmt: skip
    return read_csv(path, multi_label, on_corrupt == "skip") if fmt == "csv" else read_imagefolder(path)


def split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test), sorted and disjoint. Per class, a seeded shuffle; round(n * val_fraction) go
    to validation (at least one of any class with two or more samples), then round(n * test_fraction) to test (at
    least one when test_fraction > 0 and two are left), the rest to training. Without a test split this is the
    validation split of earlier versions, image for image. Multi-label targets [n, tags]: the same over all
    samples at once (seeded, not stratified)."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    groups = [np.arange(len(labels))] if labels.ndim == 2 else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for idx in groups:
        rng.shuffle(idx)
        n = len(idx)
        n_val = min(max(int(round(n * val_fraction)), 1), n - 1) if n >= 2 else 0
        n_test = 0
        if test_fraction > 0 and n - n_val >= 2:
            n_test = min(max(int(round(n * test_fraction)), 1), n - n_val - 1)
        val.extend(idx[:n_val])
        test.extend(idx[n_val : n_val + n_test])
        train.extend(idx[n_val + n_test :])
    return tuple(np.sort(np.array(part, dtype=np.int64)) for part in (train, val, test))  # type: ignore[return-value]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of `split` without a test split."""
    train, val, _ = split(labels, val_fraction, 0.0, seed)
    return train, val


def check_validation(labels: np.ndarray, val: np.ndarray, classes: list[str]) -> None:
    """Refuse an empty validation split (nothing to select the epoch, the configuration or the L2 strength on),
    saying what to change."""
    if len(val):
        return
    n = len(labels)
    if labels.ndim == 2:
        raise DatasetError(f"the validation split is empty: the dataset has {n} usable image(s); at least 2 are needed "
                           "(one to train on, one to validate on)")  # fmt: skip
    raise DatasetError(f"the validation split is empty: each of the {len(classes)} classes has a single usable image "
                       f"({n} in all), and a class needs at least 2 for one to be held out for validation; add "
                       "images (2 or more per class), or submit a dataset with more images per class")  # fmt: skip


def load_image(source: Path | bytes):
    """Decode an image to RGB with Pillow, refusing decompression bombs; raises DatasetError naming the cause."""
    import io

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    name = str(source) if isinstance(source, Path) else "uploaded image"
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{name}: image too large ({e})") from e
    except Exception as e:  # Pillow raises many types for bad bytes
        raise DatasetError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
