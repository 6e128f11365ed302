"""Dataset readers (ImageFolder, CSV, multi-label CSV), fingerprints, the train/validation/test split, class names
that collide, and image decoding (path checks: tests/services/test_paths.py)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.data.datasets import DatasetError, load_image, read_csv, read_dataset, read_imagefolder
from services.data.splits import check_validation, split, stratified_split


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat: 3 images (one in a nested folder), dog: 2 images; plus files and folders that must be ignored."""
    root = tmp_path / "ds"
    png(root / "cat" / "a.png", 10)
    png(root / "cat" / "b.png", 20)
    png(root / "cat" / "sub" / "c.png", 30)
    png(root / "dog" / "a.png", 40)
    png(root / "dog" / "b.PNG", 50)
    (root / "dog" / "notes.txt").write_text("not an image")
    png(root / ".hidden" / "x.png")
    (root / "README.md").write_text("top-level files are not classes")
    return root


def test_read_imagefolder(folder: Path) -> None:
    ds = read_imagefolder(folder)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 5
    rel = [p.relative_to(folder).as_posix() for p in ds.paths]
    assert rel == ["cat/a.png", "cat/b.png", "cat/sub/c.png", "dog/a.png", "dog/b.PNG"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.labels.dtype == np.int64
    assert read_dataset(folder).fingerprint == ds.fingerprint  # auto picks imagefolder for a directory


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        read_imagefolder(tmp_path / "missing")
    png(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(DatasetError, match="at least 2"):
        read_imagefolder(tmp_path / "one")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        read_imagefolder(tmp_path / "empty")


def test_read_csv(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "1.png")
    png(tmp_path / "imgs" / "2.png")
    png(tmp_path / "imgs" / "3.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/1.png,zebra\nimgs/2.png,ant\nimgs/3.png, zebra \n")
    ds = read_dataset(manifest)  # auto picks csv for a .csv file
    assert ds.classes == ["ant", "zebra"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert [p.name for p in ds.paths] == ["1.png", "2.png", "3.png"]
    assert read_csv(manifest).fingerprint == ds.fingerprint


def test_csv_path_outside_the_manifest_folder_is_rejected(tmp_path: Path) -> None:
    png(tmp_path / "outside.png")
    png(tmp_path / "sub" / "in.png")
    manifest = tmp_path / "sub" / "m.csv"
    manifest.write_text("path,label\nin.png,a\n../outside.png,b\n")
    with pytest.raises(DatasetError, match="line 3.*outside"):
        read_csv(manifest)
    manifest.write_text(f"path,label\nin.png,a\n{tmp_path / 'outside.png'},b\n")  # absolute paths too
    with pytest.raises(DatasetError, match="outside"):
        read_csv(manifest)


def test_csv_missing_column_is_named(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,x\n")
    with pytest.raises(DatasetError, match="path,label") as err:
        read_csv(manifest)
    assert "file" in str(err.value)  # what was found is named too


def test_csv_missing_file_and_empty_label(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,x\nnope.png,y\n")
    with pytest.raises(DatasetError, match="'nope.png' does not exist"):
        read_csv(manifest)
    png(tmp_path / "b.png")
    manifest.write_text("path,label\na.png,\n,x\na.png,x\nb.png,y\n")
    with pytest.raises(DatasetError, match="line 2: an empty label"):
        read_csv(manifest)
    ds = read_dataset(manifest, on_corrupt="skip")
    assert len(ds) == 2 and ds.skipped_rows == (
        "m.csv line 2: an empty label, left out",
        "m.csv line 3: an empty path, left out",
    )


def test_fingerprint_changes_when_a_file_changes(folder: Path) -> None:
    before = read_imagefolder(folder).fingerprint
    assert read_imagefolder(folder).fingerprint == before  # stable
    target = folder / "dog" / "a.png"
    png(target, 200)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # never the same mtime
    changed = read_imagefolder(folder).fingerprint
    assert changed != before
    png(folder / "dog" / "new.png")
    assert read_imagefolder(folder).fingerprint != changed  # added file


def test_stratified_split() -> None:
    labels = np.array([0] * 10 + [1] * 20 + [2] * 1 + [3] * 2)
    train, val = stratified_split(labels, 0.2, seed=7)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no duplicates
    per_class_val = {c: int((labels[val] == c).sum()) for c in range(4)}
    assert per_class_val == {0: 2, 1: 4, 2: 0, 3: 1}  # round(n * f); singletons stay in train; pairs give one
    again_train, again_val = stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(again_val, val)
    np.testing.assert_array_equal(again_train, train)
    others = [stratified_split(labels, 0.2, seed=s)[1] for s in range(8, 14)]
    assert any(not np.array_equal(o, val) for o in others)  # the seed matters


def old_stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split before test splits existed, verbatim: jobs without a test split keep their split."""
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


def test_train_val_test_split() -> None:
    labels = np.random.default_rng(0).integers(0, 7, 500)
    labels[:3] = 9  # a class of three: one each
    for seed in (0, 3):
        old = old_stratified_split(labels, 0.2, seed)
        new = split(labels, 0.2, 0.0, seed)
        np.testing.assert_array_equal(new[0], old[0])
        np.testing.assert_array_equal(new[1], old[1])
        assert len(new[2]) == 0
    train, val, test = split(labels, 0.2, 0.3, seed=5)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(train) + len(val) + len(test) == len(labels)
    for c in np.unique(labels):  # stratified: each class's share, rounded; at least one each
        n = int((labels == c).sum())
        want = (1, 1) if n == 3 else (round(n * 0.2), round(n * 0.3))
        assert (int((labels[val] == c).sum()), int((labels[test] == c).sum())) == want, c
    np.testing.assert_array_equal(split(labels, 0.2, 0.3, seed=5)[2], test)  # seeded
    tags = (np.random.default_rng(1).random((50, 4)) > 0.5).astype(np.int64)
    train, val, test = split(tags, 0.2, 0.2, seed=0)  # multi-label: seeded, not stratified
    assert (len(train), len(val), len(test)) == (30, 10, 10)


def test_an_empty_validation_split_is_refused_saying_what_to_change() -> None:
    labels = np.arange(5)  # one image per class
    _, val, _ = split(labels, 0.2, 0.0, 0)
    with pytest.raises(DatasetError, match="a class needs at least 2 for one to be held out"):
        check_validation(labels, val, list("abcde"))
    check_validation(np.array([0, 0, 1, 1]), split(np.array([0, 0, 1, 1]), 0.2, 0.0, 0)[1], ["a", "b"])


def multi_label_csv(tmp_path: Path, rows: list[str]) -> Path:
    for i in range(len(rows)):
        png(tmp_path / "img" / f"{i}.png", i)
    manifest = tmp_path / "tags.csv"
    manifest.write_text("path,label\n" + "".join(f"img/{i}.png,{tags}\n" for i, tags in enumerate(rows)))
    return manifest


def test_multi_label_csv(tmp_path: Path) -> None:
    manifest = multi_label_csv(tmp_path, ["cat|outdoor", " dog ", "cat||dog", "outdoor"])
    ds = read_dataset(manifest, multi_label=True)
    assert ds.multi_label and ds.classes == ["cat", "dog", "outdoor"]
    np.testing.assert_array_equal(ds.labels, [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    single = read_dataset(manifest)
    assert not single.multi_label and "cat|outdoor" in single.classes
    assert single.fingerprint != ds.fingerprint  # other labels: another cache entry
    with pytest.raises(DatasetError, match="multi-label datasets are CSV manifests"):
        read_dataset(tmp_path / "img", multi_label=True)


def test_a_multi_label_row_without_tags_fails_naming_it_or_is_skipped(tmp_path: Path) -> None:
    manifest = multi_label_csv(tmp_path, ["cat|dog", "|", "dog", ""])  # an empty cell is an empty tag list too
    with pytest.raises(DatasetError, match=re.escape("line 3: an empty tag list '|' (set dataset.on_corrupt='skip'")):
        read_dataset(manifest, multi_label=True)
    ds = read_dataset(manifest, multi_label=True, on_corrupt="skip")
    assert len(ds) == 2 and ds.skipped_rows == (
        "tags.csv line 3: an empty tag list '|', left out",
        "tags.csv line 5: an empty tag list '', left out",
    )


NFC, NFD = "caf\u00e9", "cafe\u0301"  # one name, two Unicode forms: they print alike


def test_class_folders_that_collide_are_refused_naming_both(tmp_path: Path) -> None:
    for name, (a, b) in {"forms": (NFC, NFD), "case": ("Cat", "cat"), "both": ("CAF\u00c9", NFD)}.items():
        for i, c in enumerate((a, b)):
            png(tmp_path / name / c / f"{i}.png")
        assert len(os.listdir(tmp_path / name)) == 2  # two folders on this file system
    with pytest.raises(DatasetError) as e:
        read_imagefolder(tmp_path / "forms")
    assert str(e.value).startswith(
        r"class folders 'cafe\u0301' (NFD) and 'caf\xe9' (NFC) are one name in two "
        "Unicode forms; rename one"
    )
    with pytest.raises(DatasetError, match="class folders 'Cat' and 'cat' differ only in case"):
        read_imagefolder(tmp_path / "case")
    with pytest.raises(DatasetError, match=re.escape(r"'CAF\xc9' (NFC) and 'cafe\u0301' (NFD) differ only in Unicode")):
        read_imagefolder(tmp_path / "both")


def test_manifest_labels_and_tags_that_collide_are_refused_naming_both(tmp_path: Path) -> None:
    for i in range(3):
        png(tmp_path / f"{i}.png", i)
    (tmp_path / "forms.csv").write_text(f"path,label\n0.png,{NFC}\n1.png,{NFD}\n2.png,tea\n")
    with pytest.raises(DatasetError, match=re.escape(r"labels 'cafe\u0301' (NFD) and 'caf\xe9' (NFC) are one name")):
        read_csv(tmp_path / "forms.csv")
    (tmp_path / "case.csv").write_text("path,label\n0.png,Tea\n1.png,TEA\n2.png,milk\n")
    with pytest.raises(DatasetError, match="labels 'TEA' and 'Tea' differ only in case"):
        read_csv(tmp_path / "case.csv")
    (tmp_path / "tags.csv").write_text(f"path,label\n0.png,{NFC}|milk\n1.png,Milk\n2.png,{NFC}\n")
    with pytest.raises(DatasetError, match="tags 'Milk' and 'milk' differ only in case"):
        read_csv(tmp_path / "tags.csv", multi_label=True)
    (tmp_path / "fine.csv").write_text(f"path,label\n0.png,{NFC}\n1.png,cafe\n2.png,{NFC}\n")  # distinct names
    assert read_csv(tmp_path / "fine.csv").classes == ["cafe", NFC]


def test_load_image() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 3), 7).save(buf, format="PNG")
    im = load_image(buf.getvalue())
    assert im.mode == "RGB"
    assert im.size == (5, 3)
    with pytest.raises(DatasetError, match="uploaded image: not a readable image"):
        load_image(b"definitely not an image")


def test_load_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        load_image(bad)
