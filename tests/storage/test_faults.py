"""Faults named and survived at the storage layer, on real filesystems and a real S3 server: a full tmpfs under the
cache writer (tensorstore), the store and the `last_used` marker; log lines a full disk refuses; store outages
recognised (botocore's own errors) and retried within one operation (moto behind a proxy that goes away)."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage.faults import DiskFull, StoreUnavailable, as_disk_full, is_store_outage
from storage.logs import JsonFormatter, KeepingHandler, Redactor
from storage.store import Store
from tests.disk import fill
from tests.tcp_proxy import TcpProxy


def test_a_full_disk_under_the_cache_writer_is_disk_full_naming_the_cache_dir(tmpfs, digits_root: Path) -> None:
    """tensorstore's RESOURCE_EXHAUSTED (ENOSPC) mid-extraction was an internal error; it names the directory and
    the bytes still needed."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from storage.settings import Settings
    from tests.helpers import job_spec

    disk = tmpfs(2)
    settings = Settings(
        data_dir=disk.parent / "data", cache_url=str(disk / "cache"), device="cpu", allowed_roots=[digits_root.parent]
    )
    spec = job_spec(digits_root / "train", {"name": "losa", "rank": 4}, "cache")  # ~15 MB of activations
    spec.extraction.batch_size = 8  # shards of 0.6 MB: the disk fills after a few
    with pytest.raises(DiskFull) as raised:
        run_extraction(spec, settings, NullReporter())
    full = raised.value
    assert full.where == str(disk / "cache") and "feature cache entry" in str(full), full
    assert full.need is not None and full.need > 10_000_000 and full.free is not None, full
    assert "more needed" in str(full) and "free" in str(full)
    assert "RESOURCE_EXHAUSTED" in str(full.__cause__) or isinstance(full.__cause__, OSError)


def test_a_full_disk_under_the_store_is_disk_full_not_unavailable(tmpfs) -> None:
    """A model or checkpoint write that fills the disk was StoreUnavailable (retried, then `storage_unavailable`)."""
    disk = tmpfs(1)
    folder = Store(disk).folder("artifacts", "checkpoints", "job_x")
    data = b"x" * 2_000_000
    with pytest.raises(DiskFull) as raised:
        folder.write_bytes("checkpoint.safetensors", data)
    assert raised.value.need == len(data) and str(disk) in raised.value.where
    assert "about 2.00 MB more needed" in str(raised.value)
    assert not [p for p in disk.rglob("*") if p.is_file()]  # the temporary key is removed


def test_the_last_used_marker_is_best_effort(tmpfs, caplog: pytest.LogCaptureFixture) -> None:
    from storage.cache import FeatureCache

    disk = tmpfs(1)
    entry = FeatureCache(disk / "cache").entry("f/v")
    entry.create(
        labels=np.arange(4), layers=[0], tokens="all", token_count=2, dim=4, batch_size=4, meta={"num_prefix_tokens": 1}
    )
    fill(disk)
    with caplog.at_level(logging.WARNING, logger="sidetune.cache"):
        assert entry.touch() is False  # raised OSError(ENOSPC) before
    assert "could not mark cache entry f/v as used" in caplog.text
    (disk / "ballast").unlink()
    assert entry.touch() is True and entry.last_used > 0


def test_log_lines_a_full_disk_refuses_are_written_once_there_is_room(tmpfs) -> None:
    """The traceback behind a reference id, logged while the log's disk is full, is not lost."""
    disk = tmpfs(1)
    path = disk / "worker.log"
    with open(path, "a") as stream:
        handler = KeepingHandler(stream)
        handler.setFormatter(JsonFormatter(Redactor()))
        logger = logging.getLogger("sidetune.test_faults")
        logger.propagate, logger.handlers = False, [handler]
        logger.setLevel(logging.INFO)
        try:
            logger.info("before")
            ballast = fill(disk)
            try:
                raise ValueError("boom " + "x" * 8000)  # past the page the file has already: the disk refuses it
            except ValueError:
                logger.exception("internal error ref0123")
            assert handler.kept_lines == 1 and path.read_text().count("\n") == 1  # the line is cut off at the page
            ballast.unlink()
            logger.info("after")
        finally:
            logger.handlers = []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["message"] for line in lines] == ["before", "internal error ref0123", "after"]
    assert lines[1]["exc"].endswith("x" * 8000) and handler.kept_lines == 0


def test_as_disk_full_reads_errnos_and_tensorstore_messages(tmp_path: Path) -> None:
    quota = as_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, "an upload", 10)
    assert quota is not None and quota.where == str(tmp_path) and quota.free == shutil.disk_usage(tmp_path).free
    ts = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/x/cache/f/v/features.zarr/acts/c/1/0/0/0": '
        "Failed to write 57380 bytes to file 6: No space left on device [os_error_code='28']"
    )
    assert as_disk_full(ts).where == "/x/cache/f/v/features.zarr/acts/c/1/0/0/0"
    assert as_disk_full(OSError(errno.EACCES, "denied")) is None
    assert as_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory")) is None


def test_store_outages_are_told_from_other_errors() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    assert is_store_outage(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_store_outage(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_store_outage(client_error("SlowDown", 503)) and is_store_outage(client_error("InternalError", 500))
    wrapped = OSError(errno.EIO, "translated by s3fs")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    assert is_store_outage(wrapped)
    assert not is_store_outage(client_error("AccessDenied", 403)) and not is_store_outage(FileNotFoundError("x"))
    assert not is_store_outage(OSError(errno.ENOSPC, "No space left on device"))


def test_an_outage_shorter_than_the_in_call_retries_is_ridden_out(s3_url: str, monkeypatch) -> None:
    """moto behind a proxy that goes away for 0.8 s: one store read is retried until it answers; a longer outage
    is StoreUnavailable naming the store."""
    import os

    from s3fs import S3FileSystem

    moto_port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    S3FileSystem.clear_instance_cache()  # an instance made earlier would talk to moto directly
    try:
        folder = Store(s3_url).folder("models", "m")
        folder.write_bytes("config.json", b"{}")
        proxy.stop()
        threading.Timer(0.8, proxy.start).start()
        t0 = time.monotonic()
        assert folder.read_bytes("config.json") == b"{}"
        assert 0.8 <= time.monotonic() - t0 < 10
        proxy.stop()
        with pytest.raises(StoreUnavailable, match=r"the store s3://.* is unavailable: EndpointConnectionError"):
            folder.read_bytes("config.json")
    finally:
        proxy.stop()
        S3FileSystem.clear_instance_cache()
