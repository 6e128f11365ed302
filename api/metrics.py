"""Prometheus metrics at `GET /metrics`, and the middleware that measures requests and tags their log lines.

Scraped from Redis at scrape time (so every API replica reports the same numbers): jobs by status, queue depth
per Celery queue, live workers per queue, and the extraction rate summed over the extracting jobs; an admin key's
scrape (SIDETUNE_ADMIN_KEYS; any caller when the API has no keys) also gets each job's rate by `job_id`. Other keys
see no job id nor any other per-tenant id: their jobs are no business of each other's. Measured in this
process (the API, and the inference service, which serves the same `/metrics` without the Redis gauges): requests
by method, route template and status, and predict latency by route (v1 predict and v2 infer). Route templates, not
paths, label the series, so ids never multiply them.

With API keys configured, a scrape needs a valid key unless `SIDETUNE_METRICS_PUBLIC=true`; without keys it is
open, like the rest of the API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from kombu.exceptions import ChannelError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import SettingsDep, get_owner, is_admin
from api.schemas import ErrorBody
from storage.logs import bind_scope, reset_scope
from storage.redis import JobStore
from worker.celery_app import EXTRACT, TRAIN

log = logging.getLogger("sidetune.api")

QUEUES = (EXTRACT, TRAIN)
# From a small CPU batch to a large GPU-less one.
PREDICT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StoreCollector(Collector):
    """Gauges read from Redis on each scrape: a few SCARD calls, a passive declare per queue and one MGET of the
    extracting jobs."""

    def __init__(self, store: JobStore, celery: Celery) -> None:
        self.store, self.celery = store, celery

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("sidetune_redis_up", "Whether Redis answered this scrape (the gauges below need it).")
        try:
            families = self._families()
        except Exception as e:  # a scrape while Redis restarts says so instead of failing with a 500
            log.warning("metrics: Redis unavailable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("sidetune_jobs", "Jobs by status.", labels=["status"])
        for status, n in self.store.count_by_status().items():
            jobs.add_metric([status], n)

        depth = GaugeMetricFamily("sidetune_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"])
        for queue, n in queue_depths(self.celery).items():
            depth.add_metric([queue], n)

        live = {queue: 0 for queue in QUEUES} | self.store.live_workers()
        workers = GaugeMetricFamily(
            "sidetune_live_workers", "Workers with a fresh heartbeat, by queue.", labels=["queue"]
        )
        for queue, n in sorted(live.items()):
            workers.add_metric([queue], n)

        rate = GaugeMetricFamily(
            "sidetune_extract_images_per_second",
            "Backbone extraction rate summed over the extracting jobs, as their latest progress reports give it (with "
            "shards, the reporting shard's).",
        )
        rate.add_metric([], sum(extraction_rates(self.store).values()))
        return [jobs, depth, workers, rate]


class JobCollector(Collector):
    """Per-job gauges, for admin keys only: each extracting job's rate by job id."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rate = GaugeMetricFamily(
            "sidetune_job_extract_images_per_second",
            "Backbone extraction rate of each extracting job (admin keys only).",
            labels=["job_id"],
        )
        try:
            rates = extraction_rates(self.store)
        except Exception as e:  # as StoreCollector: sidetune_redis_up says so
            log.warning("metrics: Redis unavailable: %s", e)
            return
        for job_id, value in rates.items():
            rate.add_metric([job_id], value)
        yield rate


def extraction_rates(store: JobStore) -> dict[str, float]:
    """{job id: images per second} of each extracting job, from its latest progress report (one MGET)."""
    ids = store.job_ids_with_status("extracting")
    out = {}
    for job_id, job in zip(ids, store.jobs_many(ids), strict=True):
        progress = (job or {}).get("progress") or {}
        if progress.get("stage") == "extracting" and isinstance(progress.get("images_per_s"), int | float):
            out[job_id] = progress["images_per_s"]
    return out


def queue_depths(celery: Celery) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them: a passive declare (it creates nothing) answers
    with the count; a queue that was never declared, or is empty on Redis, answers "not found": zero."""
    depths = {}
    with celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        for queue in QUEUES:
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:
                depths[queue] = 0
    return depths


class RequestMetrics:
    """Counts every request by method, route template and status, times predict routes, and binds the request
    to the log context (its `job_id` or `model_id` path parameter tags the lines written while it runs, the
    access line included). A plain ASGI middleware: it never buffers a body."""

    def __init__(self, app: ASGIApp, requests: Counter, predict_latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.predict_latency = predict_latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = bind_scope(scope)
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # set by the router once it matched
            self.requests.labels(scope["method"], route, str(status)).inc()
            if ":predict" in route or route.endswith("/infer") or route == "/v1/predict":
                self.predict_latency.labels(route).observe(seconds)
            reset_scope(token)


router = APIRouter(tags=["health"])


async def _scrape_auth(request: Request, settings: SettingsDep) -> None:
    if not settings.metrics_public:
        await get_owner(request, settings)  # 401 without a valid key, when keys are configured


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
        401: {"model": ErrorBody},
    },
)
def metrics(request: Request, settings: SettingsDep, _: Annotated[None, Depends(_scrape_auth)]) -> Response:
    """Prometheus metrics: jobs by status, queue depth, live workers, extraction rate, requests and predict
    latency, none with a job id; an admin key's scrape adds each extracting job's rate by `job_id`. Needs an API key
    when keys are configured, unless `SIDETUNE_METRICS_PUBLIC=true`."""
    body = generate_latest(request.app.state.metrics_registry)
    admin = getattr(request.app.state, "admin_metrics_registry", None)
    if admin is not None and is_admin(request, settings):
        body += generate_latest(admin)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, job_gauges: bool = True) -> None:
    """A registry per app (tests build several apps in one process); call after the other middleware, so that
    requests they refuse (413) are counted too. `job_gauges`: the gauges read from Redis (the API's; the inference
    service measures its requests only)."""
    registry = CollectorRegistry()
    if job_gauges:
        registry.register(StoreCollector(app.state.store, app.state.celery))
        app.state.admin_metrics_registry = CollectorRegistry()
        app.state.admin_metrics_registry.register(JobCollector(app.state.store))
    requests = Counter(
        "sidetune_http_requests",
        "HTTP requests by method, route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "sidetune_predict_latency_seconds",
        "Predict request latency by route, in seconds.",
        ["route"],
        buckets=PREDICT_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, requests=requests, predict_latency=latency)
    app.include_router(router)
