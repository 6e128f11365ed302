"""The same digits as a local ImageFolder and as WebDataset shards on a real S3-compatible server (moto): run_extraction
in process, through the loader thread and through loader processes (which read each member by a ranged request,
nothing staged on disk), writes bit-equal activations, labels and valid rows. A store that goes away in the middle of
an extraction fails it with StoreUnavailable naming the shard (after the in-call retries; the task layer then retries
the step), no secret of the environment in the error or the job's events; once the store is back the extraction
resumes from the batches it finished, and the entry is still bit-equal to the folder's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pytest

from services.data.datasets import read_imagefolder
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from storage.cache import FeatureCache
from storage.faults import StoreUnavailable
from storage.settings import Settings
from tests.services.test_extraction_webdataset import spec_for
from tests.shards import imagefolder_samples, write_shards
from tests.tcp_proxy import TcpProxy

SECRET = "sEcReT-never-shown-9876543210"


def s3_shards(digits_root: Path, tmp_path: Path, s3_url: str) -> str:
    folder = read_imagefolder(digits_root / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    write_shards(tmp_path / "shards", samples, per_shard=50)
    fs, path = fsspec.core.url_to_fs(f"{s3_url}/shards")
    fs.put(str(tmp_path / "shards"), path, recursive=True)
    return f"{s3_url}/shards/{{000000..000003}}.tar"


def assert_same_entries(settings: Settings, a: str, b: str) -> None:
    cache = FeatureCache(settings.cache_location)
    want, got = cache.entry(a), cache.entry(b)
    assert want.is_complete and got.is_complete
    np.testing.assert_array_equal(got.read(), want.read())
    np.testing.assert_array_equal(got.labels(), want.labels())
    np.testing.assert_array_equal(got.valid(), want.valid())


@pytest.mark.parametrize("workers", [0, 2], ids=["loader-thread", "loader-processes"])
def test_imagefolder_and_s3_shards_give_bit_equal_activations(
    settings: Settings, digits_root: Path, tmp_path: Path, s3_url: str, workers: int
) -> None:
    pattern = s3_shards(digits_root, tmp_path, s3_url)
    settings = settings.model_copy(update={"loader_workers": workers, "allowed_prefixes": [s3_url]})
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    b = run_extraction(spec_for(pattern), settings, NullReporter())
    assert a["loader_workers"] == b["loader_workers"] == workers and a["cache_key"] != b["cache_key"]
    assert_same_entries(settings, a["cache_key"], b["cache_key"])


class StopsTheStore(NullReporter):
    """Takes the store away once the first batch is written."""

    def __init__(self, proxy: TcpProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def progress(self, stage: str, done: int, total: int, **extra) -> None:
        if done == 1:
            self.proxy.stop()


@contextmanager
def through_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The store reached through a TcpProxy (which can take it away, and counts the bytes it sends), with a secret
    in the environment that must never be shown (moto takes any key); s3fs's cached filesystems dropped before and
    after, so that each reaches the store the way set here."""
    from s3fs import S3FileSystem

    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
    with monkeypatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", proxy.url)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        S3FileSystem.clear_instance_cache()
        try:
            yield proxy
        finally:
            proxy.stop()
            S3FileSystem.clear_instance_cache()


def test_a_store_outage_fails_naming_the_shard_and_the_extraction_resumes(
    settings: Settings, digits_root: Path, tmp_path: Path, s3_url: str, monkeypatch
) -> None:
    pattern = s3_shards(digits_root, tmp_path, s3_url)
    settings = settings.model_copy(update={"loader_workers": 0, "allowed_prefixes": [s3_url]})
    with through_proxy(monkeypatch) as proxy:
        reporter = StopsTheStore(proxy)
        with pytest.raises(StoreUnavailable, match=r"shard s3://.*/shards/00000\d\.tar: the object store did not") as e:
            run_extraction(spec_for(pattern), settings, reporter)
        assert SECRET not in str(e.value) and SECRET not in str(reporter.events)
        proxy.start()
        resumed = NullReporter()
        b = run_extraction(spec_for(pattern), settings, resumed)
        assert any("resuming extraction" in ev["message"] for ev in resumed.events)
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    assert_same_entries(settings, a["cache_key"], b["cache_key"])


def s3_parquet(digits_root: Path, tmp_path: Path, s3_url: str) -> str:
    """The digits as a Hugging Face dataset's Parquet shards (row groups of 20 rows) on the store: its folder URL."""
    from tests.services.data.formats.test_huggingface import digits_dataset

    ds = digits_dataset(digits_root / "train")
    for i in range(3):
        ds.shard(3, i, contiguous=True).to_parquet(tmp_path / "pq" / f"train-{i:05d}-of-00003.parquet", batch_size=20)
    fs, path = fsspec.core.url_to_fs(f"{s3_url}/pq")
    fs.put(str(tmp_path / "pq"), path, recursive=True)
    return f"{s3_url}/pq/"


def test_a_store_outage_fails_naming_the_parquet_file_and_the_extraction_resumes(
    settings: Settings, digits_root: Path, tmp_path: Path, s3_url: str, monkeypatch
) -> None:
    pytest.importorskip("datasets")
    from services.data.formats import store_tables

    folder = s3_parquet(digits_root, tmp_path, s3_url)
    settings = settings.model_copy(update={"loader_workers": 0, "allowed_prefixes": [s3_url]})
    with through_proxy(monkeypatch) as proxy:
        reporter = StopsTheStore(proxy)
        with pytest.raises(StoreUnavailable, match=r"Parquet file s3://.*/pq/train-0000\d-of-00003\.parquet: the obj"):
            run_extraction(spec_for(folder), settings, reporter)
        assert SECRET not in str(reporter.events)
        proxy.start()
        store_tables.clear()  # as a fresh loader process: nothing kept from before the outage
        resumed = NullReporter()
        b = run_extraction(spec_for(folder), settings, resumed)
        assert any("resuming extraction" in ev["message"] for ev in resumed.events)
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    assert_same_entries(settings, a["cache_key"], b["cache_key"])
