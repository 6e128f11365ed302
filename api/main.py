"""The FastAPI application: `uvicorn api.main:app`, or `sidetune api`."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors, metrics
from api.limits import BodySizeLimit
from api.routes import datasets, health, jobs, models, predict
from storage.jobs import JobStore
from storage.settings import Settings
from worker.celery_app import make_app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="sidetune",
        version="0.1.0",
        description="Adapt frozen vision transformers: submit a job (dataset + backbone + method), follow it, "
        "then predict with the adapted model. LoSA side networks and linear probes train from a per-layer "
        "feature cache, so the backbone runs once per image.",
    )
    app.state.settings = settings
    app.state.store = JobStore.from_url(settings.broker_url)
    app.state.celery = make_app(settings)
    app.state.predictor = None
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_mb * 2**20))
    for module in (jobs, datasets, models, predict, health):
        app.include_router(module.router)
    metrics.install(app)  # /metrics; its middleware is added last, so it is outermost and counts every request
    return app


app = create_app()
