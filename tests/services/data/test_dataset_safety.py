"""Datasets read only what they may and count each file once: links that resolve outside the allowed roots are
refused naming the file (a linked class folder, a linked image, a dataset at a root itself), repeated files are left
out with a note (or refused), one file never lands in two splits or two classes, and `on_corrupt: skip` covers missing
manifest files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.data.datasets import DatasetError, read_dataset, read_for_job
from services.data.splits import stratified_split
from services.paths import UserPaths
from services.spec import DatasetSpec
from storage.settings import Settings


def _images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        out.append(folder / f"{i}.png")
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(out[-1])
    return out


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root holding an ImageFolder, and a folder outside it with images of its own."""
    root, outside = tmp_path / "allowed", tmp_path / "secret"
    for c in ("a", "b"):
        _images(root / "ds" / c, 3)
    _images(outside / "loot", 4)
    return root, outside


def _read(path: Path, root: Path, **spec) -> object:
    rule = UserPaths(Settings(data_dir=root.parent / "data", allowed_roots=[root]))
    return read_for_job(DatasetSpec(path=str(path), **spec), rule)


def test_a_linked_class_folder_outside_the_roots_is_refused(layout) -> None:
    root, outside = layout
    (root / "ds" / "c").symlink_to(outside / "loot")
    with pytest.raises(PermissionError, match=r"class folder .*ds/c resolves to .*secret/loot, outside the allowed"):
        _read(root / "ds", root)


def test_a_linked_image_outside_the_roots_is_refused_naming_it(layout) -> None:
    root, outside = layout
    (root / "ds" / "a" / "evil.png").symlink_to(outside / "loot" / "0.png")
    with pytest.raises(PermissionError, match=r"file .*a/evil.png resolves to .*loot/0.png"):
        _read(root / "ds", root)
    (root / "ds" / "a" / "evil.png").unlink()
    (root / "ds" / "a" / "passwd.png").symlink_to("/etc/passwd")
    with pytest.raises(PermissionError, match="passwd.png resolves to /etc/passwd"):
        _read(root / "ds", root)


def test_a_dataset_at_the_root_itself_cannot_link_a_class_in(layout) -> None:
    root, outside = layout
    (root / "ds" / "a").rename(root / "a")
    (root / "ds" / "b").rename(root / "b")
    (root / "linked").symlink_to(outside / "loot")
    with pytest.raises(PermissionError, match="linked resolves to"):
        _read(root, root)
    (root / "linked").unlink()
    assert _read(root, root).classes == ["a", "b"]
    (root / "inside").symlink_to(root / "a")  # a link that stays inside: its files are a's, in a second class
    with pytest.raises(DatasetError, match="inside/0.png: 0.png is also .*a/0.png with another label"):
        _read(root, root)


def test_links_inside_the_roots_are_read(layout) -> None:
    root, _ = layout
    _images(root / "elsewhere", 2, start=50)
    (root / "ds" / "c").symlink_to(root / "elsewhere")
    assert _read(root / "ds", root).classes == ["a", "b", "c"]


def test_repeated_manifest_rows_are_left_out_and_never_split_apart(tmp_path: Path) -> None:
    files = _images(tmp_path / "img", 8)
    rows = [f"img/{p.name},{'x' if i % 2 else 'y'}" for i, p in enumerate(files)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "\n".join(rows + rows[:4] + ["./img/1.png,x"]) + "\n")
    ds = read_dataset(manifest)
    assert len(ds) == 8 and len(ds.skipped_rows) == 5
    assert "m.csv line 10: 0.png repeats m.csv line 2, left out" in ds.skipped_rows
    for seed in range(20):
        train, val = stratified_split(ds.labels, 0.5, seed)
        assert not set(map(str, np.asarray(ds.paths)[train])) & set(map(str, np.asarray(ds.paths)[val]))
    with pytest.raises(DatasetError, match="line 10: 0.png is listed again"):
        read_dataset(manifest, duplicates="fail")


def test_one_file_with_two_labels_is_refused(tmp_path: Path) -> None:
    _images(tmp_path / "img", 4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimg/0.png,x\nimg/1.png,y\nimg/2.png,x\nimg/0.png,y\n")
    with pytest.raises(DatasetError, match="m.csv line 5: 0.png is also m.csv line 2 with another label"):
        read_dataset(manifest)


def test_missing_manifest_files_are_skipped_under_on_corrupt_skip(tmp_path: Path) -> None:
    _images(tmp_path / "img", 4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimg/0.png,x\nimg/1.png,y\nimg/gone.png,x\nimg/2.png,x\nimg/3.png,y\n")
    with pytest.raises(DatasetError, match="line 4: 'img/gone.png' does not exist"):
        read_dataset(manifest)
    ds = read_dataset(manifest, on_corrupt="skip")
    assert len(ds) == 4 and ds.skipped_rows == ("m.csv line 4: img/gone.png does not exist, left out",)


def test_an_empty_manifest_names_itself(tmp_path: Path) -> None:
    manifest = tmp_path / "sub" / "empty.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n")
    with pytest.raises(DatasetError, match=r"manifest .*sub/empty.csv has no rows"):
        read_dataset(manifest)
