"""The FastAPI application (the control plane): `uvicorn api.main:app`, or `sidetune api`. Imports no torch: predict
runs in the inference service (api/inference.py), to which the API forwards the predict paths (api/routes/forward.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api import errors, metrics
from api.json_depth import DepthLimit
from api.limits import BodySizeLimit
from api.routes import cache, catalog, datasets, forward, health, jobs, models, tensorboard, ui
from storage.redis import JobStore
from storage.settings import Settings
from worker.celery_app import make_app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await forward.close_clients()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="sidetune",
        version="0.1.0",
        description="Adapt frozen vision transformers: submit a job (dataset + backbone + method), follow it, "
        "then predict with the adapted model. LoSA side networks and linear probes train from a per-layer "
        "feature cache, so the backbone runs once per image.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.store = JobStore.from_url(settings.broker_url, fail_fast=True)
    app.state.celery = make_app(settings)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_mb * 2**20))
    app.add_middleware(DepthLimit)  # JSON nested deeper than 64 levels: 422 before a parser recurses
    for module in (jobs, tensorboard, datasets, models, cache, catalog, forward, health):
        app.include_router(module.router)
    ui.install(app)  # the web page at /ui
    metrics.install(app)  # /metrics; its middleware is added last, so it is outermost and counts every request
    app.openapi = lambda: _openapi(app, settings)
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The API's own operations, plus the forwarded ones as the inference service documents them."""
    if app.openapi_schema is None:
        from api.inference import create_inference_app  # its routes only: torch is imported when it starts

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        served = create_inference_app(settings).openapi()
        for path, operations in served["paths"].items():
            if path.startswith(("/v1/", "/v2")) or path.endswith("/export"):
                schema["paths"][path] = operations
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, component in served.get("components", {}).get("schemas", {}).items():
            components.setdefault(name, component)
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
