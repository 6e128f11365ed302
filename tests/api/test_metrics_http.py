"""`GET /metrics` against the real processes: jobs by status, queue depth, live workers, the extraction rate, the
request counter and the predict latency histogram, parsed with prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from storage.redis import JobStore
from storage.settings import Settings

# Another image size than the other stack tests: a cache family of its own, so their cache hits stay theirs.
BACKBONE = {"name": "test_vit", "pretrained": False, "image_size": 64}


def scrape(running) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    r = httpx.get(f"{running.api_url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_after_a_job_and_a_predict(stack):
    running, client = stack
    data = running.settings.data_path / "datasets" / "digits"
    body = {
        "dataset": {"path": str(data / "train")},
        "backbone": BACKBONE,
        "method": {"name": "linear"},
        "training": {"epochs": 1},
    }
    job = client.wait(client.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    images = sorted((data / "holdout").glob("*/*.png"))[:2]
    assert len(client.predict(job["model_id"], images)) == 2

    m = scrape(running)
    assert m["sidetune_redis_up"][()] == 1
    assert m["sidetune_jobs"][(("status", "succeeded"),)] >= 1
    assert set(m["sidetune_jobs"]) == {
        (("status", s),) for s in ("planning", "queued", "extracting", "training", "succeeded", "failed", "cancelled")
    }
    assert m["sidetune_live_workers"][(("queue", "extract"),)] >= 1
    assert m["sidetune_live_workers"][(("queue", "train"),)] >= 1
    assert set(m["sidetune_queue_depth"]) == {(("queue", "extract"),), (("queue", "train"),)}

    route = "/v1/models/{model_id}:predict"
    assert m["sidetune_predict_latency_seconds_count"][(("route", route),)] >= 1
    assert m["sidetune_predict_latency_seconds_sum"][(("route", route),)] > 0
    requests = m["sidetune_http_requests_total"]
    assert requests[(("method", "POST"), ("route", "/jobs"), ("status", "201"))] >= 1
    assert requests[(("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "200"))] >= 1  # a template, no id
    assert not any(job["id"] in dict(labels)["route"] for labels in requests)


def test_extraction_rate_of_an_extracting_job(stack):
    running, _ = stack
    store = JobStore.from_url(running.redis.url)
    # A record only (nothing enqueued), as an extract worker leaves it mid-extraction.
    spec = {"dataset": {"path": "digits"}, "backbone": {"name": "test_vit"}, "method": {"name": "linear"}}
    job = store.create_job(spec)  # a well-formed record: other tests on this stack list every job
    store.set_fields(
        job["id"],
        status="extracting",
        progress={"stage": "extracting", "done": 3, "total": 9, "images": 48, "images_per_s": 12.5},
    )
    m = scrape(running)  # a stack without API keys: every caller is an operator, who sees each job's rate
    assert m["sidetune_job_extract_images_per_second"][(("job_id", job["id"]),)] == 12.5
    assert m["sidetune_extract_images_per_second"][()] >= 12.5  # the sum, for everyone
    assert m["sidetune_jobs"][(("status", "extracting"),)] >= 1

    store.set_fields(job["id"], status="cancelled")
    assert (("job_id", job["id"]),) not in scrape(running).get("sidetune_job_extract_images_per_second", {})


def test_queue_depth_counts_waiting_tasks_of_every_priority_through_the_broker(tmp_path, redis_url) -> None:
    """Through a passive queue declare (the broker's own count), not the transport's key names: tasks sent with
    priorities (kept in lists of their own on Redis) count too, and a queue never declared is 0."""
    from api.metrics import queue_depths
    from worker.celery_app import EXTRACT, TASK_EXTRACT, TRAIN, make_app

    settings = Settings(data_dir=tmp_path, redis_url=redis_url.rsplit("/", 1)[0] + "/9")  # no worker reads it
    celery = make_app(settings)
    assert queue_depths(celery) == {EXTRACT: 0, TRAIN: 0}
    for priority in (None, 3, 9):
        celery.signature(TASK_EXTRACT, args=["job_x"], queue=EXTRACT, priority=priority).apply_async()
    assert queue_depths(celery) == {EXTRACT: 3, TRAIN: 0}
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(EXTRACT)
