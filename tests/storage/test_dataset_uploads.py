"""Safe extraction of uploaded dataset archives (storage/archives.py, storage/datasets.py) on real files, their
publication to the store (a local directory, and a real S3-compatible server from which another machine fetches its
own copy). Their records in Redis: tests/storage/redis/test_datasets.py."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from storage.archives import MAX_TAR_META, _Writer
from storage.datasets import (
    STAGING,
    ArchiveError,
    DatasetFiles,
    Limits,
    member_parts,
    sweep_staging,
    unpack,
)
from storage.store import MARKER, Incomplete, Store

LIMITS = Limits(max_bytes=1 << 20, max_files=100)


def png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def folder(prefix: str = "flowers/") -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": png(i * 40) for cls in ("daisy", "rose") for i in range(3)}


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_with(path: Path, info: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("a/1.png"), io.BytesIO(b""))
        tf.addfile(info)
    return path


def assert_nothing_left(datasets: Path) -> None:
    """No dataset folder and an empty staging area: a refused upload leaves no trace."""
    assert sorted(p.name for p in datasets.iterdir() if p.name != STAGING) == []
    assert list((datasets / STAGING).iterdir()) == []


def refused(archive: Path, datasets: Path, code: str, limits: Limits = LIMITS) -> str:
    with pytest.raises(ArchiveError) as info:
        unpack(archive, DatasetFiles(datasets), "ds_1", limits)
    assert info.value.code == code, info.value.message
    assert_nothing_left(datasets)
    return info.value.message


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
def test_imagefolder_under_one_top_folder_is_extracted_and_renamed_into_place(tmp_path, kind):
    archive = tmp_path / f"upload.{kind}"
    if kind == "zip":
        make_zip(archive, {"flowers/": b"", **folder(), "__MACOSX/flowers/._x": b"junk"})
    else:
        make_tar(archive, folder(), mode="w:gz" if kind == "tar.gz" else "w")
    datasets = tmp_path / "datasets"
    rel, fmt, _ = unpack(archive, DatasetFiles(datasets), "ds_1", LIMITS)
    assert (rel, fmt) == (Path("flowers"), "imagefolder")
    files = datasets / "ds_1" / "files"
    assert sorted(p.name for p in (files / "flowers").iterdir()) == ["daisy", "rose"]
    assert (files / "flowers" / "rose" / "2.png").read_bytes() == png(80)
    assert not (files / "__MACOSX").exists()  # macOS resource forks are skipped
    assert list((datasets / STAGING).iterdir()) == []
    marker = Store(datasets / "ds_1").folder().check()  # the completion marker came with it
    assert marker["rel"] == "flowers" and marker["format"] == "imagefolder" and len(marker["files"]) == 6


def test_csv_manifest_at_the_top_is_located(tmp_path):
    members = {**folder("img/"), "labels.csv": b"path,label\nimg/daisy/0.png,daisy\nimg/rose/0.png,rose\n"}
    datasets = tmp_path / "datasets"
    assert unpack(make_zip(tmp_path / "a.zip", members), DatasetFiles(datasets), "ds_1", LIMITS)[:2] == (
        Path("labels.csv"),
        "csv",
    )
    assert DatasetFiles(datasets).dataset_path("ds_1") == (datasets / "ds_1" / "files" / "labels.csv", "csv")
    two = {**members, "more.csv": b"path,label\n"}
    assert "several CSV manifests" in refused(make_zip(tmp_path / "b.zip", two), tmp_path / "d2", "invalid_dataset")


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/evil.png", "a/../../evil.png", "..\\evil.png", "C:/evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_names_that_escape_are_refused_naming_the_member(tmp_path, name, kind):
    members = {**folder(), name: png()}
    archive = make_zip(tmp_path / "a.zip", members) if kind == "zip" else make_tar(tmp_path / "a.tgz", members)
    datasets = tmp_path / "sub" / "datasets"
    assert repr(name) in refused(archive, datasets, "unsafe_archive")
    assert not (tmp_path / "sub" / "evil.png").exists() and not (tmp_path / "evil.png").exists()


def test_member_parts():
    assert member_parts("./a//b/./c.png") == ["a", "b", "c.png"]
    assert member_parts("a\\b.png") == ["a", "b.png"]
    for bad in ("/etc/passwd", "a/../../b", "..", "x\x00y"):
        with pytest.raises(ArchiveError):
            member_parts(bad)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.FIFOTYPE, "device"),
    ],
)
def test_tar_links_and_devices_are_refused(tmp_path, kind, expected):
    info = tarfile.TarInfo("a/link.png")
    info.type, info.linkname = kind, "/etc/passwd"
    message = refused(tar_with(tmp_path / "a.tar", info), tmp_path / "datasets", "unsafe_archive")
    assert expected in message and "'a/link.png'" in message


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert "symbolic link" in refused(archive, tmp_path / "datasets", "unsafe_archive")


def test_zip_bomb_stops_at_the_limit(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {**folder(), "flowers/rose/big.png": bytes(8 << 20)})
    assert archive.stat().st_size < 64 << 10  # 8 MB of zeros compress to a few KB
    assert "exceeds 1 MB" in refused(archive, tmp_path / "datasets", "dataset_too_large")
    # many members each under the limit, together over it
    parts = {f"flowers/rose/{i}.png": bytes(300 << 10) for i in range(5)}
    refused(make_tar(tmp_path / "many.tgz", parts), tmp_path / "datasets", "dataset_too_large")


def test_bytes_written_are_counted_whatever_the_header_claims(tmp_path):
    writer = _Writer(tmp_path, Limits(max_bytes=1000, max_files=10))
    writer.claim("x", 10)  # the header claims 10 bytes; the stream holds far more
    with pytest.raises(ArchiveError, match="exceeds"):
        writer.copy(io.BytesIO(bytes(10**6)), tmp_path / "x", "x")
    assert (tmp_path / "x").stat().st_size <= 1000  # stopped at the limit, not at the end of the stream


def test_member_count_limit(tmp_path):
    archive = make_zip(tmp_path / "a.zip", folder())
    message = refused(archive, tmp_path / "datasets", "dataset_too_large", Limits(max_bytes=1 << 20, max_files=3))
    assert "members" in message
    tar = make_tar(tmp_path / "a.tgz", folder())
    refused(tar, tmp_path / "datasets", "dataset_too_large", Limits(max_bytes=1 << 20, max_files=3))


def test_huge_tar_extended_header_is_refused_before_it_is_read(tmp_path):
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/1.png")
        info.pax_headers = {"comment": "x" * (MAX_TAR_META + 10)}
        tf.addfile(info, io.BytesIO(b""))
    assert "extended header" in refused(archive, tmp_path / "datasets", "invalid_archive")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not an archive" * 100, os.urandom(5000), b"PK\x03\x04" + os.urandom(200)],
    ids=["empty", "text", "random", "truncated-zip"],
)
def test_garbage_is_invalid_archive(tmp_path, content):
    archive = tmp_path / "x.zip"
    archive.write_bytes(content)
    refused(archive, tmp_path / "datasets", "invalid_archive")


def test_corrupt_member_and_duplicates_are_invalid_archive(tmp_path):
    archive = make_zip(tmp_path / "a.zip", folder(), zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    data[100:110] = b"\xff" * 10  # inside the first member's data: its CRC no longer matches
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path / "datasets", "invalid_archive")
    with tarfile.open(tmp_path / "dup.tar", "w") as tf:
        for _ in range(2):
            info = tarfile.TarInfo("a/1.png")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    assert "'a/1.png'" in refused(tmp_path / "dup.tar", tmp_path / "datasets", "invalid_archive")


def test_failed_validation_leaves_nothing(tmp_path):
    def validate(path: Path, fmt: str) -> None:
        raise ArchiveError("invalid_dataset", "only one class")

    datasets = tmp_path / "datasets"
    with pytest.raises(ArchiveError, match="only one class"):
        unpack(make_zip(tmp_path / "a.zip", folder()), DatasetFiles(datasets), "ds_1", LIMITS, validate)
    assert_nothing_left(datasets)


def test_remove_and_sweep(tmp_path):
    datasets = tmp_path / "datasets"
    unpack(make_zip(tmp_path / "a.zip", folder()), DatasetFiles(datasets), "ds_1", LIMITS)
    DatasetFiles(datasets).remove("ds_1")
    DatasetFiles(datasets).remove("ds_1")  # already gone: nothing to do
    assert_nothing_left(datasets)
    stale, fresh = datasets / STAGING / "stale", datasets / STAGING / "fresh"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 86400
    os.utime(stale, (old, old))
    sweep_staging(datasets)
    assert not stale.exists() and fresh.exists()


def test_a_dataset_on_s3_is_fetched_once_by_another_machine_with_the_same_fingerprint(tmp_path, s3_url):
    from services.data.datasets import read_dataset

    store = Store(s3_url).folder("datasets")
    uploader = DatasetFiles(tmp_path / "a" / "datasets", store)
    worker = DatasetFiles(tmp_path / "b" / "datasets", store)
    unpack(make_zip(tmp_path / "a.zip", folder()), uploader, "ds_1", LIMITS)
    assert store.child("ds_1").check()["files"]["files/flowers/rose/2.png"] == len(png(80))
    time.sleep(0.01)  # a fetched copy gets its own files; their times must be restored from the marker
    path, fmt = worker.dataset_path("ds_1")
    assert path == tmp_path / "b" / "datasets" / "ds_1" / "files" / "flowers" and fmt == "imagefolder"
    here, there = read_dataset(uploader.dataset_path("ds_1")[0]), read_dataset(path)
    assert here.fingerprint == there.fingerprint and here.classes == there.classes == ["daisy", "rose"]
    assert worker.dataset_path("ds_1")[0] == path  # fetched once: the copy is complete (its marker inside)
    assert list((tmp_path / "b" / "datasets" / STAGING).iterdir()) == []

    store.child("ds_2").write_bytes("files/x/1.png", png())  # an upload cut off before its marker
    with pytest.raises(Incomplete, match="ds_2 is incomplete"):
        worker.dataset_path("ds_2")
    with pytest.raises(FileNotFoundError, match="ds_3 is not in the store"):
        worker.dataset_path("ds_3")
    uploader.remove("ds_1")
    assert not store.child("ds_1").exists(MARKER) and not (tmp_path / "a" / "datasets" / "ds_1").exists()
    with pytest.raises(FileNotFoundError):
        DatasetFiles(tmp_path / "c" / "datasets", store).dataset_path("ds_1")
