"""Tenants on the real topology (`keyed_api`: an API process with keys and a jobs quota, on the session stack's Redis
and workers): key B's first job is not stuck behind key A's backlog, concurrent submissions never pass a key's jobs
quota (429 with Retry-After naming it), and `/metrics` shows job ids to an admin key only."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from api.deps import owner_of
from storage.redis import JobStore
from tests.conftest import ADMIN_KEY, JOBS_QUOTA, TENANT_KEYS
from worker.client import Client

BACKLOG = 5  # A's jobs queued ahead of B's; under strict FIFO each of them starts before B's


def tiny_job(keyed_api) -> dict:
    data = keyed_api.settings.data_path / "datasets" / "digits" / "train"
    return {
        "dataset": {"path": str(data)},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
        "method": {"name": "linear", "solver": "sgd"},
        "training": {"epochs": 1},
    }


def training_started(client: Client, job_id: str) -> float | None:
    return next((e["created_at"] for e in client.events(job_id) if e["message"] == "training started"), None)


def test_b_first_job_starts_among_the_first_after_a_backlog(keyed_api) -> None:
    a, b = Client(keyed_api.api_url, TENANT_KEYS["a"]), Client(keyed_api.api_url, TENANT_KEYS["b"])
    body = tiny_job(keyed_api)  # A's first job extracts the feature cache (if no test did): the others reuse it
    with ThreadPoolExecutor(BACKLOG) as pool:
        backlog = list(pool.map(lambda _: a.submit(body)["id"], range(BACKLOG)))
    mine = b.wait(b.submit(body)["id"], timeout_s=600, poll_s=0.2)
    try:
        assert mine["status"] == "succeeded", mine["error"]
        trained = training_started(b, mine["id"])
        others = [(a.job(j), training_started(a, j)) for j in backlog]
        # A's jobs that started (extraction, then training) after B submitted and before B's job did, where FIFO
        # takes all of A's backlog first: at most the step a worker had just taken (its start is recorded a moment
        # later) and A's first job, which shares the first priority level with B's and was queued before it
        started_ahead = [j["id"] for j, _ in others if mine["created_at"] < (j["started_at"] or 0) < mine["started_at"]]
        trained_ahead = [j["id"] for j, t in others if t and mine["created_at"] < t < trained]
        assert len(started_ahead) <= 2 and len(trained_ahead) <= 2, (started_ahead, trained_ahead)
    finally:
        for job_id in backlog:  # not waited for: the workers drop them as they come
            a.cancel(job_id)


def test_concurrent_submissions_never_pass_the_jobs_quota(keyed_api) -> None:
    c = Client(keyed_api.api_url, TENANT_KEYS["c"])
    store = JobStore.from_url(keyed_api.settings.broker_url)
    owner = owner_of(TENANT_KEYS["c"])
    most, stop = [0], threading.Event()

    def watch() -> None:  # the key's jobs queued or running, sampled all along the burst
        while not stop.is_set():
            most[0] = max(most[0], store.active_jobs(owner))
            time.sleep(0.005)

    def submit(_: int) -> httpx.Response:
        return httpx.post(
            f"{keyed_api.api_url}/jobs",
            json=tiny_job(keyed_api),
            timeout=120,
            headers={"Authorization": f"Bearer {TENANT_KEYS['c']}"},
        )

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(submit, range(3 * JOBS_QUOTA)))
    finally:
        stop.set()
        watcher.join()
    admitted = [r.json()["id"] for r in answers if r.status_code == 201]
    refused = [r for r in answers if r.status_code != 201]
    try:
        assert most[0] <= JOBS_QUOTA and len(admitted) >= JOBS_QUOTA, (most, len(admitted))
        assert refused and {r.status_code for r in refused} == {429}
        error = refused[0].json()["error"]
        assert error["code"] == "too_many_jobs" and int(refused[0].headers["retry-after"]) > 0
        assert f"{JOBS_QUOTA} jobs queued or running" in error["message"]
        assert "SIDETUNE_KEY_QUOTA_JOBS" in error["message"] and f"of at most {JOBS_QUOTA} " in error["message"]
    finally:
        for job_id in admitted + [j["id"] for j in c.jobs(limit=100) if j["status"] in ("planning", "queued")]:
            c.cancel(job_id)


def test_metrics_show_job_ids_to_an_admin_key_only(keyed_api) -> None:
    store = JobStore.from_url(keyed_api.settings.broker_url)
    spec = {"dataset": {"path": "digits"}, "backbone": {"name": "test_vit"}, "method": {"name": "linear"}}
    job = store.create_job(spec, owner="b-owner-id")  # B's job mid-extraction, as a worker leaves its record
    store.set_fields(
        job["id"], status="extracting", progress={"stage": "extracting", "done": 1, "total": 4, "images_per_s": 7.5}
    )
    try:

        def scrape(key: str) -> str:
            r = httpx.get(f"{keyed_api.api_url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200
            return r.text

        plain = scrape(TENANT_KEYS["a"])
        assert job["id"] not in plain and 'job_id="' not in plain and "b-owner-id" not in plain
        assert not re.search(r"\b(job|model|ds)_[0-9a-f]{12,}", plain)
        rate = re.search(r"^sidetune_extract_images_per_second (\S+)$", plain, re.M)
        assert rate and float(rate.group(1)) >= 7.5  # the sum over extracting jobs
        admin = scrape(ADMIN_KEY)
        assert f'sidetune_job_extract_images_per_second{{job_id="{job["id"]}"}} 7.5' in admin
    finally:
        store.set_fields(job["id"], status="cancelled")
