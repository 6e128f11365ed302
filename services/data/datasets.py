"""Dataset readers: an ImageFolder directory (one subfolder per class) or a CSV manifest (`path,label`; for
multi-label classification the label column holds `|`-separated tags), of images or of videos
(`path,label[,start,end]`, seconds), never both. The train/validation/test split is services/data/splits.py.

A dataset is read into a `Dataset` (sorted sample list and class names) with a fingerprint over its file
list, sizes and modification times, so a changed dataset gets a new cache entry. A job's dataset is read through
services/paths.py's rule (`read_for_job`): its path, every class folder and linked file, every manifest row. Class names
that differ only in Unicode form (NFC/NFD) or case are refused: they would print as one class. Torch-free.
"""

from __future__ import annotations

import csv
import hashlib
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from services.data import images
from services.errors import UserError
from services.paths import UserPaths

# Checks a file or folder of the dataset, links followed (UserPaths.check_member bound to a field): (path, what).
Inside = Callable[[Path, str], None]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the cause (the file, the line). `field`: the job spec's
    field it is about (what the API names in a 422)."""

    code = "invalid_dataset"

    def __init__(self, message: str, field: str = "dataset.path") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Dataset:
    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64 class index per sample; multi-label: int64 0/1 [samples, classes] (multi-hot)
    classes: list[str]
    fingerprint: str
    skipped_rows: tuple[str, ...] = ()  # rows left out: repeated files; under on_corrupt=skip, missing files and
    # multi-label rows without a tag
    kind: str = "image"  # or "video": the name of its modality (services/modality/)
    spans: np.ndarray | None = None  # videos of a manifest with start,end: float [N, 2] seconds, NaN where not given

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.paths)


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if path.is_file() and path.suffix.lower() == ".csv" else "imagefolder"


def _fingerprint(
    root: Path, paths: list[Path], labels: list[str], stats: list[os.stat_result], spans: np.ndarray | None = None
) -> str:
    h = hashlib.sha256()
    for i, (p, label, st) in enumerate(zip(paths, labels, stats, strict=True)):
        rel = p.relative_to(root) if p.is_relative_to(root) else p
        span = "" if spans is None else f"\0{spans[i, 0]!r}\0{spans[i, 1]!r}"  # images' fingerprints are unchanged
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}{span}\n".encode())
    return h.hexdigest()[:32]


def media_kind(paths: list[Path], where: Path) -> str:
    """`image` or `video` by the files' suffixes; a dataset mixing both is refused."""
    videos = sum(p.suffix.lower() in VIDEO_SUFFIXES for p in paths)
    if videos and videos < len(paths):
        raise DatasetError(
            f"dataset {where} mixes images ({len(paths) - videos}) and videos ({videos}); a dataset "
            "holds one or the other"
        )
    return "video" if videos else "image"


def _form(name: str) -> str:
    return (
        "NFC"
        if unicodedata.is_normalized("NFC", name)
        else "NFD"
        if unicodedata.is_normalized("NFD", name)
        else "neither NFC nor NFD"
    )


def name_clash(a: str, b: str) -> str:
    """How two names that fold to one differ, each as its repr with code points escaped (what prints alike does not
    read alike): "'caf\\xe9' (NFC) and 'cafe\\u0301' (NFD) are one name in two Unicode forms"."""
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        return f"{ascii(a)} ({_form(a)}) and {ascii(b)} ({_form(b)}) are one name in two Unicode forms"
    if _form(a) != _form(b):
        return f"{ascii(a)} ({_form(a)}) and {ascii(b)} ({_form(b)}) differ only in Unicode form and case"
    return f"{ascii(a)} and {ascii(b)} differ only in case"


def check_distinct(names: list[str], what: str) -> None:
    """Refuse two of `names` (classes, tags) that are one name after Unicode NFC normalisation and case folding: two
    classes that print the same (and one folder on a case-insensitive or normalising file system)."""
    seen: dict[str, str] = {}
    for name in names:
        first = seen.setdefault(unicodedata.normalize("NFC", name).casefold(), name)
        if first != name:
            raise DatasetError(
                f"{what} {name_clash(first, name)}; rename one (or merge them) so that every class reads differently"
            )


def _finish(
    root: Path,
    paths: list[Path],
    names: list[str],
    where: list[str],
    duplicates: str = "drop",
    skipped: tuple[str, ...] = (),
    spans: np.ndarray | None = None,
    multi_label: bool = False,
    what: str = "class folders",
) -> Dataset:
    """The dataset of (path, label) rows, each file once: a file listed again (the same file by device and inode:
    a repeated row, `./a.png` next to `a.png`, a link to it) is left out with the same label (`duplicates="drop"`,
    noted in `skipped_rows`) or refused (`"fail"`), and refused with another label. So no file can land in two
    splits. `where` names each row for the messages (a manifest's line, or the file)."""
    keep: list[int] = []
    stats: list[os.stat_result] = []
    seen: dict[tuple, int] = {}
    notes = list(skipped)
    for i, (p, name, at) in enumerate(zip(paths, names, where, strict=True)):
        st = p.stat()
        span = () if spans is None else (repr(spans[i, 0]), repr(spans[i, 1]))  # clips of one video are distinct
        first = seen.setdefault((st.st_dev, st.st_ino, *span), i)
        if first != i:
            if names[first] != name:
                raise DatasetError(
                    f"{at}: {p.name} is also {where[first]} with another label ({names[first]!r} vs "
                    f"{name!r}); one file cannot be in two classes"
                )
            if duplicates == "fail":
                raise DatasetError(
                    f"{at}: {p.name} is listed again (first: {where[first]}); remove the repeated rows "
                    "or set dataset.duplicates='drop'"
                )
            notes.append(f"{at}: {p.name} repeats {where[first]}, left out")
            continue
        keep.append(i)
        stats.append(st)
    paths, names = [paths[i] for i in keep], [names[i] for i in keep]
    spans = spans[keep] if spans is not None else None
    tags = [[t.strip() for t in n.split("|") if t.strip()] for n in names] if multi_label else [[n] for n in names]
    classes = sorted({t for row in tags for t in row})
    check_distinct(classes, "tags" if multi_label else what)
    if len(paths) == 0:
        raise DatasetError(
            f"dataset {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
            f"({', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if len(classes) < 2:
        raise DatasetError(
            f"dataset {root} has {len(classes)} {'tag' if multi_label else 'class'}; at least 2 are needed"
        )
    kind = media_kind(paths, root)
    if spans is not None and kind != "video":
        raise DatasetError(f"{root}: `start`/`end` columns apply to videos only")
    index = {c: i for i, c in enumerate(classes)}
    if multi_label:
        labels = np.zeros((len(paths), len(classes)), dtype=np.int64)
        for row, row_tags in enumerate(tags):
            labels[row, [index[t] for t in row_tags]] = 1
        # the same manifest read as single-label holds other labels: it must not share a cache entry
        fingerprint = _fingerprint(root, paths, [f"multi-label:{n}" for n in names], stats, spans)
    else:
        labels = np.array([index[row[0]] for row in tags], dtype=np.int64)
        fingerprint = _fingerprint(root, paths, names, stats, spans)
    return Dataset(root, paths, labels, classes, fingerprint, kind=kind, spans=spans, skipped_rows=tuple(notes))


def read_imagefolder(root: Path, inside: Inside | None = None, duplicates: str = "drop") -> Dataset:
    """One subfolder per class. With `inside`, every class folder and every linked file is checked by it."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; an ImageFolder dataset has one subfolder per class")
    paths: list[Path] = []
    names: list[str] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if inside is not None:
            inside(class_dir, f"class folder {class_dir}")
        # os.walk does not descend into linked folders below the class folder; linked files are checked one by one
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for f in sorted(filenames):
                if Path(f).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    path = Path(dirpath) / f
                    if inside is not None and path.is_symlink():
                        inside(path, f"file {path}")
                    paths.append(path)
                    names.append(class_dir.name)
    return _finish(root, paths, names, [str(p) for p in paths], duplicates)


def read_csv(
    manifest: Path,
    multi_label: bool = False,
    skip_bad_rows: bool = False,
    duplicates: str = "drop",
    inside: Inside | None = None,
) -> Dataset:
    """`path,label` rows, paths relative to the manifest's folder and inside it (links followed), each checked by
    `inside` if given, before it is looked at. `multi_label`: the label column holds `|`-separated tags. A row without
    any tag or whose file is missing fails naming its line, or is left out and listed in `skipped_rows` when
    `skip_bad_rows` (the job's on_corrupt=skip)."""
    root = manifest.parent
    paths: list[Path] = []
    names: list[str] = []
    where: list[str] = []
    skipped: list[str] = []
    spans: list[tuple[float, float]] = []
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
            empty = (
                "an empty path"
                if not rel
                else (
                    f"an empty tag list {label!r}"
                    if multi_label and not any(t.strip() for t in label.split("|"))
                    else "an empty label"
                    if not label
                    else None
                )
            )
            if empty:
                if not skip_bad_rows:
                    raise DatasetError(
                        f"{manifest} line {line}: {empty} (set dataset.on_corrupt='skip' to leave such rows out)"
                    )
                skipped.append(f"{manifest.name} line {line}: {empty}, left out")
                continue
            p = (root / rel).resolve()
            if not p.is_relative_to(root.resolve()):
                raise DatasetError(f"{manifest} line {line}: {rel!r} points outside the manifest's folder")
            if inside is not None:  # before is_file: whether a refused file exists is not told either
                inside(root / rel, f"{manifest.name} line {line}")
            if not p.is_file():
                if not skip_bad_rows:
                    raise DatasetError(
                        f"{manifest} line {line}: {rel!r} does not exist (set dataset.on_corrupt="
                        "'skip' to leave missing files out)"
                    )
                skipped.append(f"{manifest.name} line {line}: {rel} does not exist, left out")
                continue
            paths.append(p)
            names.append(label)
            where.append(f"{manifest.name} line {line}")
            if timed:
                spans.append(_span(row, manifest, line))
    if not paths and not skipped:
        raise DatasetError(f"manifest {manifest} has no rows")
    timing = np.array(spans, dtype=np.float64).reshape(-1, 2) if timed else None
    return _finish(root, paths, names, where, duplicates, tuple(skipped), timing, multi_label, "labels")


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


def read_dataset(
    path: Path,
    fmt: str = "auto",
    multi_label: bool = False,
    on_corrupt: str = "fail",
    inside: Inside | None = None,
    duplicates: str = "drop",
) -> Dataset:
    """With `inside`, every class folder, linked file and manifest row is checked by it before it is read."""
    fmt = resolve_format(path, fmt)
    if multi_label and fmt != "csv":
        raise DatasetError(
            f"{path}: multi-label datasets are CSV manifests whose label column holds `|`-separated "
            "tags; an ImageFolder has one class per image"
        )
    if fmt == "csv":
        return read_csv(path, multi_label, on_corrupt == "skip", duplicates, inside)
    return read_imagefolder(path, inside, duplicates)


def read_for_job(dataset: Any, paths: UserPaths, test: bool = False) -> Dataset:
    """The dataset a job spec names (`test`: its `dataset.test`) under services/paths.py's rule: its path, and every
    file it resolves to. Errors name the field."""
    field = "dataset.test" if test else "dataset.path"
    upload = dataset.test_id if test else dataset.id
    path = paths.check(field, dataset.test if test else dataset.path, upload)
    inside = partial(paths.check_member, field, upload=upload)
    try:
        return read_dataset(
            path,
            "auto" if test else dataset.format,
            dataset.multi_label,
            dataset.on_corrupt,
            inside,
            dataset.duplicates,
        )
    except DatasetError as e:
        e.field = field
        raise


def read_test_set(dataset: Any, paths: UserPaths, classes: list[str]) -> tuple[Dataset, np.ndarray]:
    """A job's `dataset.test` (under services/paths.py's rule) and its targets in the order of the training set's
    `classes`: class indices, or [n, tags] for multi-label. DatasetError naming classes (tags) the training set does
    not have."""
    test = read_for_job(dataset, paths, test=True)
    unknown = sorted(set(test.classes) - set(classes))
    if unknown:
        folded = {unicodedata.normalize("NFC", c).casefold(): c for c in classes}
        near = [
            name_clash(folded[k], u) for u in unknown[:5] if (k := unicodedata.normalize("NFC", u).casefold()) in folded
        ]
        hint = f" ({'; '.join(near)}: spell them as the training set does)" if near else ""
        listed = ", ".join(ascii(u) for u in unknown[:5])
        raise DatasetError(
            f"dataset.test has {'tags' if dataset.multi_label else 'classes'} the training set does "
            f"not have: {listed}{hint}",
            field="dataset.test",
        )
    order = [classes.index(c) for c in test.classes]
    if test.multi_label:
        targets = np.zeros((len(test), len(classes)), dtype=np.int64)
        targets[:, order] = test.labels
        return test, targets
    return test, np.asarray(order, dtype=np.int64)[test.labels]


def load_image(source: Path | bytes, draft: int | None = None):
    """An RGB PIL image, decoded by the rules of services/data/images.py; DatasetError naming the file otherwise."""
    try:
        return images.load_image(source, draft)
    except images.ImageError as e:
        raise DatasetError(str(e)) from None
