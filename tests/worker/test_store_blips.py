"""A store that blinks, with real processes: the feature cache on a real S3-compatible server (moto) reached through a
TCP proxy (tests/tcp_proxy.py) that is stopped for 8 s while a job extracts. The writes in flight are retried in the
call, then the step is retried by its task with backoff, and the extraction resumes from the batches already written:
the job succeeds (it failed before: botocore's EndpointConnectionError was no store outage on the cache path)."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from services.data.digits import write_digits
from storage.cache import CacheError, FeatureCache
from storage.redis import JobStore
from storage.redis_server import RedisServer
from storage.settings import Settings
from tests.tcp_proxy import TcpProxy
from worker.client import Client
from worker.launcher import Stack, free_port

BLIP_S = 8.0  # longer than the in-call tries, so the task retries (5 s, then 10 s); 20 s blips were tried by hand


@pytest.fixture(scope="module")
def blip_stack(tmp_path_factory: pytest.TempPathFactory, s3_server: str):
    root = tmp_path_factory.mktemp("blips")
    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()  # to moto
    redis = RedisServer(root / "redis", free_port()).start()
    settings = Settings(
        data_dir=root / "data",
        redis_url=redis.url,
        api_port=free_port(),
        device="cpu",
        cache_url=f"{s3_server}/{uuid.uuid4().hex[:12]}/cache",
    )
    write_digits(root / "data" / "datasets" / "digits", limit=120)  # 108 images: 14 batches of 8
    stack = Stack(settings)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", proxy.url)  # every process reaches the store through the proxy
            for queue in ("extract", "train"):
                stack.spawn(f"{queue}-worker", "worker", "--queues", queue)
            stack.spawn("api", "api")
        stack.wait_ready(180, [f"{stack.api_url}/readyz"])
        yield stack, Client(stack.api_url), JobStore.from_url(redis.url), proxy
    finally:
        stack.stop()
        redis.stop()
        proxy.stop()


def test_a_store_blip_mid_extraction_ends_in_a_succeeded_job(blip_stack) -> None:
    stack, client, store, proxy = blip_stack
    body = {
        "dataset": {"path": str(stack.settings.data_path / "datasets" / "digits" / "train")},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 96},
        "method": {"name": "losa", "rank": 4, "layers": 2},
        "extraction": {"batch_size": 8, "shards": 1},
        "training": {"epochs": 1},
    }
    job_id = client.submit(body)["id"]
    cache = FeatureCache(stack.settings.cache_location)  # this process reaches moto directly

    def written() -> int:
        try:
            (entry,) = cache.entries()
            return -(-entry.meta["shape"][0] // 8) - len(entry.pending_batches())
        except (ValueError, CacheError, FileNotFoundError):  # not created yet
            return 0

    deadline = time.monotonic() + 120
    while written() < 2:  # two batches on the store: the rest is written after the blip
        job = store.get_job(job_id)
        assert time.monotonic() < deadline and job["status"] in ("planning", "queued", "extracting"), job
        time.sleep(0.05)
    proxy.stop()
    time.sleep(BLIP_S)
    assert store.get_job(job_id)["status"] == "extracting"  # still: waiting for its retry
    proxy.start()

    job = client.wait(job_id, timeout_s=240)
    assert job["status"] == "succeeded", job["error"]
    messages = [e["message"] for e in client.events(job_id)]
    retries = [m for m in messages if "retrying in" in m]
    assert retries and "the store is unavailable" in retries[0], messages
    assert any(m.startswith("resuming extraction") for m in messages), messages  # from the batches written
    n_batches = -(-job["metrics"]["images"] // 8)
    assert 0 < job["metrics"]["backbone_forwards"] < n_batches
