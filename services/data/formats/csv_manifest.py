"""CSV manifests: a header with `path,label` (paths relative to the manifest's folder and inside it, or URLs:
`s3://...` under the allowed prefixes, `file://...` under the allowed roots; for multi-label classification the label
column holds `|`-separated tags), of images or of videos (`path,label[,start,end]`, seconds), one row per sample. The
manifest itself may be local or in an object store (formats/manifest_rows.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from services.data.formats.base import Inside
from services.data.formats.manifest_rows import ManifestFormat, ManifestRows, open_text
from services.data.formats.samples import Dataset, DatasetError


def _empty(rel: str, label: str, multi_label: bool) -> str | None:
    """What is missing from a row (its path, its label or tags), or None."""
    if not rel:
        return "an empty path"
    if multi_label and not any(t.strip() for t in label.split("|")):
        return f"an empty tag list {label!r}"
    return None if label else "an empty label"


def read_csv(
    manifest: Path | str,
    multi_label: bool = False,
    skip_bad_rows: bool = False,
    duplicates: str = "drop",
    inside: Inside | None = None,
) -> Dataset:
    """`path,label` rows, paths relative to the manifest's folder and inside it (links followed), or URLs
    (formats/manifest_rows.py), each checked by `inside` if given, before it is looked at. The manifest is a local
    file, or an object-store URL. `multi_label`: the label column holds `|`-separated tags. A row without any tag or
    whose file is missing fails naming its line, or is left out and listed in `skipped_rows` when `skip_bad_rows`
    (the job's on_corrupt=skip)."""
    rows = ManifestRows(manifest, skip_bad_rows, inside)
    with open_text(manifest) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{manifest} needs a header with columns `path,label`, got {reader.fieldnames}")
        timed = {"start", "end"} & set(reader.fieldnames)
        if len(timed) == 1:
            raise DatasetError(f"{manifest}: give both `start` and `end` columns (seconds), or neither")
        for line, row in enumerate(reader, start=2):
            rel = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            empty = _empty(rel, label, multi_label)
            if empty:
                rows.bad(line, empty)
                continue
            rows.add(line, rel, label, _span(row, manifest, line) if timed else None)
    return rows.dataset(duplicates, multi_label, bool(timed))


def _span(row: dict[str, str | None], manifest: Path | str, line: int) -> tuple[float, float]:
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


class CsvManifest(ManifestFormat):
    name = "csv"
    suffix = ".csv"
    reader = staticmethod(read_csv)
