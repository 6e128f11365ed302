"""JSONL manifests: one JSON object per line, as Vertex AI and Azure AutoML take them, each naming an image (or
video) and its label:

- the path: `path`, or Vertex's `imageGcsUri`, or Azure's `image_url`: relative to the manifest's folder and inside
  it, or a URL (`s3://`, `gs://` under the allowed prefixes, `file://` under the allowed roots;
  formats/manifest_rows.py);
- the label: `label` (a class name; for multi-label, a list of tags as Azure writes them, or `|`-separated tags),
  `labels` (a list of tags), or Vertex's `classificationAnnotation.displayName` (one label) and
  `classificationAnnotations[].displayName` (several).

Blank lines are ignored; a line that is no JSON object, or lacks a path or a label, fails naming it (or is left out
under on_corrupt=skip). Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from services.data.formats.base import Inside
from services.data.formats.manifest_rows import ManifestFormat, ManifestRows, open_text
from services.data.formats.samples import Dataset

PATH_KEYS = ("path", "imageGcsUri", "image_url")


def _tags(row: Mapping[str, object]) -> list[object] | None:
    """The label or labels a row gives, as a list, or None without any."""
    for key in ("label", "labels"):
        if key in row:
            value = row[key]
            return value if isinstance(value, list) else [value]
    one = row.get("classificationAnnotation")
    if isinstance(one, Mapping) and "displayName" in one:
        return [one["displayName"]]
    many = row.get("classificationAnnotations")
    if isinstance(many, list):
        return [a.get("displayName") if isinstance(a, Mapping) else a for a in many]
    return None


def _row(text: str, multi_label: bool) -> tuple[str, str]:
    """(path, label: its tags `|`-joined for multi-label) of a line; ValueError saying what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    path = next((row[k] for k in PATH_KEYS if k in row), None)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"no path (a string under one of {', '.join(PATH_KEYS)})")
    tags = _tags(row)
    if tags is None:
        raise ValueError("no label (`label`, `labels` or classificationAnnotation.displayName)")
    if not all(isinstance(t, str) for t in tags):
        raise ValueError("a label is not a string")
    names = [t.strip() for tag in tags for t in tag.split("|")] if multi_label else [t.strip() for t in tags]
    names = [n for n in names if n]
    if not names:
        raise ValueError("an empty tag list" if multi_label else "an empty label")
    if not multi_label and len(names) > 1:
        raise ValueError(f"{len(names)} labels; several labels a sample need dataset.multi_label: true")
    return path.strip(), "|".join(names)


def read_jsonl(
    manifest: Path | str,
    multi_label: bool = False,
    skip_bad_rows: bool = False,
    duplicates: str = "drop",
    inside: Inside | None = None,
) -> Dataset:
    """The rows of a JSONL manifest (a local file or an object), each path checked by `inside` if given."""
    rows = ManifestRows(manifest, skip_bad_rows, inside)
    with open_text(manifest) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rel, label = _row(text, multi_label)
            except ValueError as e:
                rows.bad(line, str(e))
                continue
            rows.add(line, rel, label)
    return rows.dataset(duplicates, multi_label, timed=False)


class JsonlManifest(ManifestFormat):
    name = "jsonl"
    suffix = ".jsonl"
    reader = staticmethod(read_jsonl)
