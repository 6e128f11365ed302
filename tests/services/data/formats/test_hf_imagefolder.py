"""A Hugging Face `imagefolder` with metadata (services/data/formats/hf_load.py, read by formats/huggingface.py),
written by the test from the digits ImageFolder as the datasets documentation lays it out: images in split folders
with a `metadata.csv` each, or one `metadata.jsonl` at the top naming images below it. `auto` reads it as a Hugging
Face dataset; its `file_name` rows are the images (read from their files: the same Paths as the ImageFolder's), its
other columns the labels (`label_column`), its split folders the job's splits; an edited metadata file is read
again; a `file_name` leaving the folder, a linked image or metadata file outside the allowed roots are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

from services.data.datasets import DatasetError, format_for, read_dataset, read_for_job, read_imagefolder  # noqa: E402
from services.data.formats.base import HuggingFaceOptions  # noqa: E402
from services.jobs.resolved import resolve  # noqa: E402
from services.paths import ForbiddenPath, UserPaths  # noqa: E402
from services.spec import DatasetSpec, JobSpec  # noqa: E402
from storage.settings import Settings  # noqa: E402

SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}  # `val/` is the library's name for validation


def write_metadata_folder(digits: Path, out: Path, splits: bool = True) -> dict[str, list[tuple[Path, str]]]:
    """The digits ImageFolder copied flat into split folders (`train/`, `val/`, `test/`: every 5th image to
    validation, every 7th of the rest to test), each with a `metadata.csv` of `file_name,label,parity`; without
    `splits`, all in `train/`. Returns each split's (copied image, label)."""
    folder = read_imagefolder(digits)
    written: dict[str, list[tuple[Path, str]]] = {s: [] for s in SPLIT_DIRS}
    for i, (path, y) in enumerate(zip(folder.paths, folder.labels.tolist(), strict=True)):
        split = "train" if not splits else "validation" if i % 5 == 0 else "test" if i % 7 == 0 else "train"
        target = out / SPLIT_DIRS[split] / f"{i:04d}{path.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        written[split].append((target, folder.classes[y]))
    for split, rows in written.items():
        if rows:
            with open(out / SPLIT_DIRS[split] / "metadata.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "label", "parity"])
                w.writerows([p.name, label, "odd" if int(label) % 2 else "even"] for p, label in rows)
    return written


def test_split_folders_with_metadata_csv_are_the_datasets_splits(digits_root: Path, tmp_path: Path) -> None:
    written = write_metadata_folder(digits_root / "train", tmp_path / "hf")
    assert format_for(tmp_path / "hf").name == "huggingface"  # auto: the metadata says what the folder is
    assert format_for(digits_root / "train").name == "imagefolder"  # a plain ImageFolder is still one
    hf = read_dataset(tmp_path / "hf")
    assert hf.classes == [str(d) for d in range(10)] and hf.kind == "image"
    want = [p for s in ("train", "validation", "test") for p, _ in written[s]]
    assert sorted(hf.paths) == sorted(want)  # the image files themselves, nothing copied out
    by_path = {p: label for rows in written.values() for p, label in rows}
    assert [hf.classes[y] for y in hf.labels] == [by_path[p] for p in hf.paths]
    np.testing.assert_array_equal(np.bincount(hf.parts), [len(written[s]) for s in ("train", "validation", "test")])

    parity = read_dataset(tmp_path / "hf", huggingface=HuggingFaceOptions(label_column="parity"))
    assert parity.classes == ["even", "odd"]
    assert [parity.classes[y] for y in parity.labels] == ["odd" if int(by_path[p]) % 2 else "even" for p in hf.paths]
    with pytest.raises(DatasetError, match=r"no column 'breed' \(dataset.huggingface.label_column\)"):
        read_dataset(tmp_path / "hf", huggingface=HuggingFaceOptions(label_column="breed"))

    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path])
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": str(tmp_path / "hf")},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
            "method": {"name": "linear"},
        }
    )
    resolved, _ = resolve(spec, settings)
    counts = (resolved.split.train, resolved.split.val, resolved.split.test)
    assert counts == tuple(len(written[s]) for s in ("train", "validation", "test"))


def test_a_metadata_jsonl_at_the_top_and_multi_label_lists(digits_root: Path, tmp_path: Path) -> None:
    folder = read_imagefolder(digits_root / "train")
    root = tmp_path / "tags"
    lines = []
    for i, (path, y) in enumerate(zip(folder.paths, folder.labels.tolist(), strict=True)):
        target = root / "images" / f"{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        tags = [folder.classes[y], "odd" if y % 2 else "even"]
        lines.append(json.dumps({"file_name": f"images/{target.name}", "tags": tags}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    hf = read_dataset(root, multi_label=True, huggingface=HuggingFaceOptions(label_column="tags"))
    assert hf.multi_label and hf.parts is None and len(hf) == len(folder)
    assert set(hf.classes) == {*folder.classes, "even", "odd"} and hf.labels.sum() == 2 * len(folder)
    with pytest.raises(DatasetError, match="lists of labels; set dataset.multi_label"):
        read_dataset(root, huggingface=HuggingFaceOptions(label_column="tags"))


def test_an_edited_metadata_file_is_read_again(digits_root: Path, tmp_path: Path) -> None:
    write_metadata_folder(digits_root / "train", tmp_path / "hf", splits=False)
    first = read_dataset(tmp_path / "hf")
    meta = tmp_path / "hf" / "train" / "metadata.csv"
    rows = list(csv.reader(meta.open()))
    with open(meta, "w", newline="") as f:  # digits relabelled as letters: the library must not answer from cache
        csv.writer(f).writerows([rows[0], *([n, "abcdefghij"[int(y)], p] for n, y, p in rows[1:])])
    second = read_dataset(tmp_path / "hf")
    assert first.classes == [str(d) for d in range(10)] and second.classes == list("abcdefghij")
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.fingerprint != second.fingerprint


def test_file_names_leaving_the_folder_and_links_outside_the_roots_are_refused(
    digits_root: Path, tmp_path: Path
) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_metadata_folder(digits_root / "train", allowed / "hf", splits=False)
    meta = allowed / "hf" / "train" / "metadata.csv"
    original = meta.read_text()
    rule = UserPaths(Settings(data_dir=tmp_path / "data", allowed_roots=[allowed]))
    spec = DatasetSpec(path=str(allowed / "hf"))
    assert len(read_for_job(spec, rule)) == len(original.splitlines()) - 1

    meta.write_text(original + "../../secret.png,3,odd\n")  # the library's own traversal guard
    with pytest.raises(DatasetError, match=r"cannot be read by the `datasets` library.*file_name"):
        read_for_job(spec, rule)

    outside.mkdir()
    shutil.copyfile(next((allowed / "hf" / "train").glob("*.png")), outside / "x.png")
    (allowed / "hf" / "train" / "link.png").symlink_to(outside / "x.png")
    meta.write_text(original + "link.png,3,odd\n")
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        read_for_job(spec, rule)

    (outside / "metadata.csv").write_text(original)
    meta.unlink()
    meta.symlink_to(outside / "metadata.csv")
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        read_for_job(spec, rule)
