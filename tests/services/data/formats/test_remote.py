"""Datasets in an object store, on a real S3-compatible server (moto): WebDataset shards and manifests uploaded to it
read as their local copies read (the same samples, labels and bytes), every URL checked against the allowed
prefixes (refused in the reading, as a worker reads, not only at the API), URLs carrying credentials refused without
being repeated, a missing object named by its manifest line, and an unreachable store a clear StoreUnavailable
naming the shard, after the retries, with no secret of the environment in it."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest
from pydantic import ValidationError

from services.data.datasets import RemoteFile, ShardMember, read_for_job, read_imagefolder
from services.paths import ForbiddenPath, UserPaths
from services.spec.dataset import DatasetSpec
from storage.faults import StoreUnavailable
from storage.settings import Settings
from tests.shards import imagefolder_samples, write_shards
from tests.tcp_proxy import TcpProxy

SECRET = "sEcReT-never-shown-0123456789"


def upload(local: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(str(local), path, recursive=local.is_dir())


@pytest.fixture
def digit_shards(digits_root: Path, tmp_path: Path, s3_url: str) -> tuple[str, str]:
    """The digits as 5 shards, local and on the store: (local pattern, s3 pattern)."""
    folder = read_imagefolder(digits_root / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    pattern = write_shards(tmp_path / "shards", samples, per_shard=40)
    upload(tmp_path / "shards", f"{s3_url}/shards")
    return pattern, f"{s3_url}/shards/{{000000..000004}}.tar"


def allowing(settings: Settings, *prefixes: str) -> UserPaths:
    return UserPaths(settings.model_copy(update={"allowed_prefixes": list(prefixes)}))


def test_shards_on_s3_read_as_their_local_copies(settings: Settings, digit_shards, s3_url: str) -> None:
    local, remote = digit_shards
    paths = allowing(settings, f"{s3_url}/")
    got = read_for_job(DatasetSpec(path=remote), paths)
    want = read_for_job(DatasetSpec(path=local), paths)
    assert got.classes == want.classes and got.labels.tolist() == want.labels.tolist() and len(got) == len(want)
    assert all(isinstance(m, ShardMember) and isinstance(m.shard, str) for m in got.paths)
    assert str(got.root) == f"{s3_url}/shards" and got.fingerprint != want.fingerprint
    for a, b in zip(got.paths[::37], want.paths[::37], strict=True):
        assert a.read_bytes() == b.read_bytes() and a.member == b.member and a.offset == b.offset
    # the fingerprint is stable (ETags and sizes), and another prefix spelling of the same scheme reads the same
    assert read_for_job(DatasetSpec(path=remote), allowing(settings, s3_url)).fingerprint == got.fingerprint


def test_a_url_outside_the_prefixes_is_refused_where_it_is_read(settings: Settings, digit_shards, s3_url) -> None:
    _, remote = digit_shards
    for prefixes in ((), (f"{s3_url}/other/",), (s3_url + "x",)):
        with pytest.raises(ForbiddenPath, match="outside the allowed object-store prefixes") as e:
            read_for_job(DatasetSpec(path=remote), allowing(settings, *prefixes))
        assert e.value.field == "dataset.path"
    assert allowing(settings, f"{s3_url}/shards").check_url("dataset.path", f"{s3_url}/shards/000000.tar")


@pytest.mark.parametrize(
    "url",
    [
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/shards/000000.tar",
        f"s3://bucket/shards/000000.tar?X-Amz-Signature={SECRET}",
        f"s3://bucket/shards/../{SECRET}/000000.tar",
    ],
)
def test_a_url_with_credentials_is_refused_without_repeating_it(settings: Settings, url: str) -> None:
    with pytest.raises(ValidationError) as e:
        DatasetSpec(path=url)
    assert SECRET not in "".join(err["msg"] for err in e.value.errors())
    with pytest.raises(ForbiddenPath) as refused:
        allowing(settings, "s3://").check_url("dataset.path", url)
    assert SECRET not in str(refused.value)


def manifests(tmp_path: Path, s3_url: str, digits_root: Path) -> list[tuple[str, str]]:
    """(path, label) rows of 30 digits: on the store (relative to the store's manifest) and as URLs."""
    folder = read_imagefolder(digits_root / "train")
    rows = [(p, folder.classes[label]) for p, label in zip(folder.paths, folder.labels, strict=True)][::7][:30]
    images = tmp_path / "images"
    for p, label in rows:
        (images / label).mkdir(parents=True, exist_ok=True)
        (images / label / p.name).write_bytes(p.read_bytes())
    upload(images, f"{s3_url}/images")
    return [(f"{label}/{p.name}", label) for p, label in rows]


def test_manifests_on_s3_and_manifests_of_urls(settings: Settings, tmp_path: Path, s3_url: str, digits_root) -> None:
    rows = manifests(tmp_path, s3_url, digits_root)
    csv_text = "path,label\n" + "".join(f"{rel},{label}\n" for rel, label in rows)
    (tmp_path / "on-store.csv").write_text(csv_text)
    upload(tmp_path / "on-store.csv", f"{s3_url}/images/train.csv")
    jsonl = tmp_path / "urls.jsonl"
    lines = [f'{{"path": "{s3_url}/images/{rel}", "label": "{label}"}}' for rel, label in rows[:-1]]
    rel, label = rows[-1]  # Vertex's keys, and a file:// row under the allowed roots
    lines.append(
        f'{{"imageGcsUri": "file://{tmp_path}/images/{rel}", "classificationAnnotation": {{"displayName": "{label}"}}}}'
    )
    jsonl.write_text("\n".join(lines) + "\n")
    paths = allowing(settings, f"{s3_url}/images/")

    on_store = read_for_job(DatasetSpec(path=f"{s3_url}/images/train.csv"), paths)
    of_urls = read_for_job(DatasetSpec(path=str(jsonl)), paths)
    assert on_store.classes == of_urls.classes and on_store.labels.tolist() == of_urls.labels.tolist()
    assert all(isinstance(p, RemoteFile) for p in on_store.paths) and isinstance(of_urls.paths[-1], Path)
    assert on_store.paths[0].read_bytes() == (tmp_path / "images" / rows[0][0]).read_bytes()

    # a row outside the prefixes, a missing object (named by its line, or left out under skip)
    (tmp_path / "outside.jsonl").write_text(f'{{"path": "{s3_url}/elsewhere/a.png", "label": "0"}}\n')
    with pytest.raises(ForbiddenPath, match="urls|outside.jsonl line 1"):
        read_for_job(DatasetSpec(path=str(tmp_path / "outside.jsonl")), paths)
    jsonl.write_text(jsonl.read_text() + f'{{"path": "{s3_url}/images/0/missing.png", "label": "0"}}\n')
    with pytest.raises(ValueError, match=f"urls.jsonl line {len(rows) + 1}: .*missing.png' does not exist"):
        read_for_job(DatasetSpec(path=str(jsonl)), paths)
    skipped = read_for_job(DatasetSpec(path=str(jsonl), on_corrupt="skip"), paths)
    assert len(skipped) == len(rows) and "missing.png does not exist, left out" in skipped.skipped_rows[0]


def test_an_unreachable_store_names_the_shard_after_retries(settings, digit_shards, s3_url, monkeypatch) -> None:
    from s3fs import S3FileSystem

    _, remote = digit_shards
    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("SIDETUNE_TEST_SECRET_TOKEN", SECRET)  # a secret of the environment, never in a message
    S3FileSystem.clear_instance_cache()
    try:
        paths = allowing(settings, s3_url)
        dataset = read_for_job(DatasetSpec(path=remote), paths)
        proxy.stop()
        with pytest.raises(StoreUnavailable, match=r"shard s3://.*/shards/00000\d\.tar: the object store did not") as e:
            read_for_job(DatasetSpec(path=remote), paths)
        with pytest.raises(StoreUnavailable, match=r"shard s3://.*/shards/000000\.tar") as read:
            dataset.paths[0].read_bytes()
        assert SECRET not in str(e.value) + str(read.value) and "testing" not in str(e.value)
        proxy.start()
        assert dataset.paths[0].read_bytes()  # nothing lost: the store answers again, and the same items read
    finally:
        proxy.stop()
        S3FileSystem.clear_instance_cache()
