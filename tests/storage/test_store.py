"""The store (storage/store.py): the same folder operations on a local directory, a `file://` URL and a real
S3-compatible server; an unreachable store is StoreUnavailable naming it, a missing file stays FileNotFoundError."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.settings import Settings
from storage.store import Incomplete, Store, StoreUnavailable
from worker.launcher import free_port


@pytest.fixture(params=["local", "file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return {"local": str(tmp_path / "store"), "file": f"file://{tmp_path}/store"}.get(request.param) or (
        request.getfixturevalue("s3_url")
    )


def test_folders_write_list_seal_and_remove(url: str, tmp_path: Path) -> None:
    folder = Store(url).folder("datasets", "ds_1")
    assert not folder.exists() and folder.files() == {} and folder.sealed() is None
    local = tmp_path / "upload"
    (local / "cats").mkdir(parents=True)
    (local / "cats" / "a.png").write_bytes(b"a" * 10)
    (local / "b.csv").write_bytes(b"path,label\n")
    folder.put_tree(local)
    with pytest.raises(Incomplete, match="no completion marker"):
        folder.check()
    marker = folder.seal({"format": "csv"})
    assert marker == {"files": {"cats/a.png": 10, "b.csv": 11}, "format": "csv"}
    assert folder.check() == marker
    copy = tmp_path / "copy"
    folder.get_tree(copy, sorted(marker["files"]))
    assert (copy / "cats" / "a.png").read_bytes() == b"a" * 10
    with pytest.raises(FileNotFoundError):
        folder.read_bytes("nope.txt")
    with pytest.raises(ValueError, match="bad file name"):
        folder.write_bytes("../escape", b"")
    folder.remove()
    assert not folder.exists() and folder.sealed() is None


def test_settings_place_everything_on_the_store(tmp_path: Path) -> None:
    local = Settings(data_dir=tmp_path)
    assert local.store_location == str(tmp_path) and local.cache_location == str(tmp_path / "cache")
    assert local.artifacts_location == f"{tmp_path}/artifacts" and local.datasets_dir == tmp_path / "datasets"
    shared = Settings(data_dir=tmp_path / "a", store_url=f"file://{tmp_path}/shared")
    assert shared.datasets_dir == tmp_path / "shared" / "datasets"  # read in place: every machine mounts it
    assert shared.roots == [tmp_path / "a"] and shared.cache_location == f"file://{tmp_path}/shared/cache"
    assert {tmp_path / "shared" / "artifacts", tmp_path / "shared" / "cache"} <= set(shared.service_dirs)
    remote = Settings(data_dir=tmp_path / "b", store_url="s3://bucket/sidetune", allowed_roots=[tmp_path / "x"])
    assert remote.store_dir is None and remote.datasets_dir == tmp_path / "b" / "datasets"  # this machine's copies
    assert remote.roots == [tmp_path / "x"]  # uploads are read through their ids (services/paths.py)
    assert remote.service_dirs == [tmp_path / "b" / n for n in ("cache", "artifacts", "redis", "logs")]
    assert remote.artifacts_location == "s3://bucket/sidetune/artifacts"
    assert remote.cache_location == "s3://bucket/sidetune/cache"


def test_an_unreachable_store_is_unavailable_not_missing(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    try:
        folder = Store("s3://sidetune-test/down").folder("models", "m")
        with pytest.raises(StoreUnavailable, match="the store s3://sidetune-test/down/models/m is unavailable"):
            folder.read_bytes("config.json")
        with pytest.raises(StoreUnavailable):
            folder.write_bytes("config.json", b"{}")
    finally:
        S3FileSystem.clear_instance_cache()
