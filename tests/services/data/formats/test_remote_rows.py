"""A manifest in an object store and its URL rows on a real S3-compatible server (moto), read as planning and the
loaders read them (services/data/formats/remote.py): the manifest streamed a range at a time (never read whole: its
text the same as the local copy's, a byte-order mark dropped), a loader's batch of URL rows fetched together (several
requests in flight at once, through a TCP proxy that counts them; each object's own bytes), and the outage semantics
kept: an object gone since planning, or a store that stops answering, leaves the row to its own read, which names it
(DatasetError, or StoreUnavailable after the retries); a manifest whose store stops answering mid-read is named too,
and nothing is lost once the store answers again."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from services.data.datasets import DatasetError, RemoteFile, read_for_job, read_imagefolder
from services.data.formats import remote, samples
from services.paths import UserPaths
from services.spec.dataset import DatasetSpec
from storage.faults import StoreUnavailable
from storage.settings import Settings
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxied(monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The store reached through a TCP proxy (stopped: the store is away)."""
    from s3fs import S3FileSystem

    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    S3FileSystem.clear_instance_cache()
    try:
        yield proxy
    finally:
        proxy.stop()
        S3FileSystem.clear_instance_cache()


@pytest.fixture
def url_rows(digits_root: Path, tmp_path: Path, s3_url: str) -> tuple[str, str, list[Path]]:
    """48 digits on the store and a CSV manifest of their URLs there (with a byte-order mark, as Excel writes it):
    (the manifest's URL, its text, the local files in its order)."""
    folder = read_imagefolder(digits_root / "train")
    picked = list(zip(folder.paths, folder.labels.tolist(), strict=True))[::4][:48]
    fs, base = fsspec.core.url_to_fs(f"{s3_url}/img")
    lines = ["path,label"]
    for p, y in picked:
        fs.put_file(str(p), f"{base}/{y}/{p.name}")
        lines.append(f"{s3_url}/img/{y}/{p.name},{folder.classes[y]}")
    text = "\n".join(lines) + "\n"
    fs.pipe_file(fsspec.core.url_to_fs(f"{s3_url}/rows.csv")[1], ("\ufeff" + text).encode())
    return f"{s3_url}/rows.csv", text, [p for p, _ in picked]


def _rule(settings: Settings, prefix: str) -> UserPaths:
    return UserPaths(settings.model_copy(update={"allowed_prefixes": [prefix]}))


def test_a_manifest_on_the_store_is_read_a_range_at_a_time(
    settings: Settings, url_rows, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, text, files = url_rows
    ranges: list[tuple[int, int]] = []
    read_range = remote.read_range

    def counted(url: str, start: int, size: int, what: str = "object") -> bytes:
        ranges.append((start, size))
        return read_range(url, start, size, what)

    def whole(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the manifest was read whole")

    monkeypatch.setattr(remote, "read_range", counted)
    monkeypatch.setattr(remote, "read_all", whole)
    size = len(("\ufeff" + text).encode())
    with remote.open_text(manifest, "manifest", chunk=1024) as f:
        assert f.read() == text  # the byte-order mark dropped, the rest as written
    assert ranges == [(start, min(1024, size - start)) for start in range(0, size, 1024)]
    assert len(ranges) == math.ceil(size / 1024)

    dataset = read_for_job(DatasetSpec(path=manifest), _rule(settings, s3_url))
    assert [p.url for p in dataset.paths] == [line.split(",")[0] for line in text.splitlines()[1:]]
    assert all(isinstance(p, RemoteFile) for p in dataset.paths)


def test_a_loaders_batch_of_url_rows_is_fetched_at_once(settings: Settings, url_rows, s3_url: str, proxied) -> None:
    manifest, _, files = url_rows
    dataset = read_for_job(DatasetSpec(path=manifest), _rule(settings, s3_url))
    batch = list(range(8, 40))
    proxied.peak = 0
    got = samples.read_together(dataset.paths, batch)
    assert sorted(got) == batch
    assert all(got[i] == files[i].read_bytes() for i in batch)  # each object's own bytes
    assert proxied.peak > 1  # requests in flight together, not one after the other
    assert samples.read_together(dataset.paths, [3]) == {}  # one object: its own read_bytes() reads it


def test_a_row_gone_or_a_store_away_is_left_to_its_own_read(settings: Settings, url_rows, s3_url: str, proxied) -> None:
    manifest, _, files = url_rows
    dataset = read_for_job(DatasetSpec(path=manifest), _rule(settings, s3_url))
    gone = dataset.paths[5]
    fs, path = fsspec.core.url_to_fs(gone.url)
    fs.rm_file(path)
    got = samples.read_together(dataset.paths, list(range(8)))
    assert sorted(got) == [0, 1, 2, 3, 4, 6, 7]
    with pytest.raises(DatasetError, match=rf"{gone.url}: the object no longer exists"):
        gone.read_bytes()

    proxied.stop()
    assert samples.read_together(dataset.paths, list(range(8))) == {}  # nothing raised for the batch: each item's
    with pytest.raises(StoreUnavailable, match=rf"file {dataset.paths[0].url}: the object store did not answer"):
        dataset.paths[0].read_bytes()  # own read retries, then names it
    proxied.start()
    assert samples.read_together(dataset.paths, [0, 1])[1] == files[1].read_bytes()  # nothing lost


def test_a_manifest_whose_store_goes_away_mid_read_is_named(settings: Settings, url_rows, proxied) -> None:
    manifest, text, _ = url_rows
    with remote.open_text(manifest, "manifest", chunk=512) as f:
        first = f.read(100)
        proxied.stop()
        with pytest.raises(StoreUnavailable, match=rf"manifest {manifest}: the object store did not answer"):
            f.read()
    assert text.startswith(first)
    proxied.start()
    with remote.open_text(manifest, "manifest", chunk=512) as f:
        assert f.read() == text
