"""The rule every server path of a job spec goes through (services/paths.py): under an allowed root, never one of the
service's own folders (as the path, inside it, or held by it), the caller's upload only through its id; links are
followed first, and a refused path says nothing of what lies there (not even whether it exists)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.data.datasets import read_dataset
from services.paths import ForbiddenPath, UserPaths
from storage.settings import Settings


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data dir as the service leaves it, with an operator's dataset in it and in the uploads folder."""
    data = tmp_path / "data"
    for folder in (
        "cache/f1/v1",
        "artifacts/models/model_1",
        "redis",
        "logs",
        "datasets/ds_b0b/files/x",
        "datasets/.staging/upload-ds_c0c",
        "mydata/a",
        "datasets/digits/a",
    ):
        (data / folder).mkdir(parents=True)
    (data / "artifacts/models/model_1/weights.safetensors").write_bytes(b"")
    return data


SERVICE = [
    "",
    "cache",
    "cache/f1/v1",
    "artifacts",
    "artifacts/models",
    "artifacts/models/model_1/weights.safetensors",
    "redis",
    "logs",
    "datasets",
    "datasets/ds_b0b",
    "datasets/ds_b0b/files/x",
    "datasets/.staging",
    "datasets/.staging/upload-ds_c0c",
    "cache/missing",
    "datasets/ds_b0b/files/missing",
]


@pytest.mark.parametrize("rel", SERVICE)
def test_the_service_folders_are_refused_as_in_or_above_a_path(data: Path, rel: str) -> None:
    paths = UserPaths(Settings(data_dir=data))
    with pytest.raises(ForbiddenPath) as e:  # a missing file there is refused too: its existence is not told
        paths.check("dataset.path", data / rel)
    message = str(e.value)
    assert message.startswith(f"dataset.path: '{data / rel}' is, holds or lies in one of the service's own folders")
    assert "name it by `dataset.id`" in message
    assert not [name for name in ("ds_b0b", "model_1", "f1", "ds_c0c", "digits") if name in message and name not in rel]
    assert e.value.status == 403 and e.value.code == "forbidden_path" and isinstance(e.value, PermissionError)
    with pytest.raises(ForbiddenPath):
        paths.check("dataset.path", data.parent)  # a folder above the data dir holds them all


def test_datasets_of_their_own_are_read_under_the_data_dir(data: Path) -> None:
    paths = UserPaths(Settings(data_dir=data))
    assert paths.check("dataset.path", data / "mydata") == (data / "mydata").resolve()
    assert paths.check("dataset.path", str(data / "datasets" / "digits")) == (data / "datasets" / "digits").resolve()
    with pytest.raises(FileNotFoundError, match="dataset.path: .* does not exist"):
        paths.check("dataset.path", data / "mydata" / "missing")


def test_an_upload_is_read_through_its_own_id_only(data: Path) -> None:
    paths = UserPaths(Settings(data_dir=data, allowed_roots=[data.parent / "elsewhere"]))
    folder = data / "datasets" / "ds_b0b" / "files" / "x"
    assert paths.check("dataset.path", folder, upload="ds_b0b") == folder.resolve()  # no root needed
    for upload in (None, "ds_0ther", "../ds_b0b", "."):
        with pytest.raises(ForbiddenPath, match="one of the service's own folders"):
            paths.check("dataset.path", folder, upload=upload)
    with pytest.raises(ForbiddenPath):  # an id opens its upload's folder, not the uploads folder around it
        paths.check("dataset.path", data / "datasets", upload="ds_b0b")


def test_the_roots_and_links_are_resolved_first(data: Path, tmp_path: Path) -> None:
    root = data / "mydata"
    (tmp_path / "elsewhere").mkdir()
    paths = UserPaths(Settings(data_dir=data, allowed_roots=[root]))
    with pytest.raises(ForbiddenPath, match=r"outside the allowed roots \(.*mydata\); put the dataset"):
        paths.check("dataset.test", tmp_path / "elsewhere")
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        paths.check("dataset.path", root / ".." / ".." / "elsewhere")  # .. is resolved first
    (root / "to_cache").symlink_to(data / "cache")
    with pytest.raises(ForbiddenPath, match="service's own folders") as e:
        paths.check("dataset.test", root / "to_cache")
    assert "`dataset.test_id`" in str(e.value)
    (root / "to_weights").symlink_to(data / "artifacts/models/model_1/weights.safetensors")
    with pytest.raises(ForbiddenPath, match="backbone.checkpoint: .* own folders .*put the checkpoint file"):
        paths.check("backbone.checkpoint", root / "to_weights")


def test_a_local_store_and_cache_elsewhere_are_the_services_too(data: Path, tmp_path: Path) -> None:
    store, cache = tmp_path / "store", tmp_path / "fast" / "cache"
    settings = Settings(data_dir=data, store_url=f"file://{store}", cache_url=str(cache), allowed_roots=[tmp_path])
    paths = UserPaths(settings)
    for path in (
        store,
        store / "artifacts" / "models",
        store / "datasets",
        store / "datasets" / "ds_1",
        cache,
        cache.parent,
        cache / "f1",
        tmp_path,
    ):
        with pytest.raises(ForbiddenPath, match="service's own folders"):
            paths.check("dataset.path", path)
    (store / "datasets" / "ds_1" / "files").mkdir(parents=True)
    assert paths.check("dataset.path", store / "datasets" / "ds_1" / "files", upload="ds_1")
    remote = UserPaths(Settings(data_dir=data, store_url="s3://bucket/x"))  # its local copies of uploads are in data
    with pytest.raises(ForbiddenPath):
        remote.check("dataset.path", data / "datasets" / "ds_b0b")


def test_a_manifest_row_in_a_service_folder_is_refused_before_it_is_looked_at(data: Path) -> None:
    from functools import partial

    manifest = data / "m.csv"  # in the data dir: its folder holds the service's folders
    manifest.write_text("path,label\ndatasets/ds_b0b/files/x/secret.png,a\nmydata/a/1.png,b\n")
    inside = partial(UserPaths(Settings(data_dir=data)).check_member, "dataset.path")
    with pytest.raises(ForbiddenPath) as e:
        read_dataset(manifest, inside=inside)
    assert str(e.value).startswith(
        "dataset.path: m.csv line 2 lies in (or links into) one of the service's own folders"
    )
    assert "secret" not in str(e.value) and "does not exist" not in str(e.value)  # missing there: not told either
