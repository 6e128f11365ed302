"""JSONL manifests on local disk (services/data/formats/jsonl_manifest.py): `path` with `label` or `labels`, and the
keys Vertex AI and Azure AutoML write, single- and multi-label; a bad line named (or left out under skip); and rows
given as URLs read only under the paths rule (a manifest read without it, an upload being validated, may not name
them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.data.datasets import DatasetError, read_dataset, read_for_job, read_imagefolder
from services.paths import UserPaths
from services.spec.dataset import DatasetSpec
from storage.settings import Settings


def write(tmp_path: Path, digits_root: Path, rows: list[dict], name: str = "m.jsonl") -> Path:
    """`rows` with their `path` filled in by copies of digits (the i-th row gets the i-th image)."""
    images = read_imagefolder(digits_root / "train").paths
    lines = []
    for i, row in enumerate(rows):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{i}.png").write_bytes(images[i * 11].read_bytes())
        key = next((k for k in ("imageGcsUri", "image_url") if k in row), "path")
        lines.append(json.dumps({**row, key: row.get(key, f"img/{i}.png")}))
    (tmp_path / name).write_text("\n".join(lines) + "\n\n")
    return tmp_path / name


def test_path_and_label_and_the_keys_of_vertex_and_azure(tmp_path: Path, digits_root: Path) -> None:
    manifest = write(
        tmp_path,
        digits_root,
        [
            {"label": "cat"},
            {"labels": ["dog"]},
            {"imageGcsUri": "img/2.png", "classificationAnnotation": {"displayName": "cat"}},
            {"image_url": "img/3.png", "label": "dog"},
        ],
    )
    ds = read_dataset(manifest)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 0, 1]
    multi = write(
        tmp_path,
        digits_root,
        [
            {"label": ["cat", "outdoor"]},
            {"labels": ["dog"]},
            {"path": "img/2.png", "classificationAnnotations": [{"displayName": "cat"}, {"displayName": "indoor"}]},
        ],
        "multi.jsonl",
    )
    ds = read_dataset(multi, multi_label=True)
    assert ds.classes == ["cat", "dog", "indoor", "outdoor"] and ds.labels.tolist() == [
        [1, 0, 0, 1],
        [0, 1, 0, 0],
        [1, 0, 1, 0],
    ]
    with pytest.raises(DatasetError, match="multi.jsonl line 1: 2 labels; .*multi_label"):
        read_dataset(multi)


def test_a_bad_line_is_named_or_left_out(tmp_path: Path, digits_root: Path) -> None:
    manifest = write(tmp_path, digits_root, [{"label": "a"}, {"label": "b"}, {"label": "a"}])
    manifest.write_text(manifest.read_text() + '{"path": "img/0.png"}\nnot json\n')  # after a blank line 4
    with pytest.raises(DatasetError, match=r"m.jsonl line 5: no label"):
        read_dataset(manifest)
    ds = read_dataset(manifest, on_corrupt="skip")
    assert len(ds) == 3 and [r.split(":")[0] for r in ds.skipped_rows] == ["m.jsonl line 5", "m.jsonl line 6"]


def test_url_rows_only_under_the_rule(tmp_path: Path, digits_root: Path, settings: Settings) -> None:
    manifest = write(tmp_path, digits_root, [{"label": "a"}, {"label": "b"}])
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    rows[0]["path"] = f"file://{tmp_path}/img/0.png"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DatasetError, match="line 1: a URL row is read only under the allowed roots"):
        read_dataset(manifest)
    ds = read_for_job(DatasetSpec(path=str(manifest)), UserPaths(settings))
    assert ds.paths[0] == (tmp_path / "img" / "0.png").resolve() and ds.classes == ["a", "b"]
