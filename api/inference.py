"""The inference service: `sidetune inference` (uvicorn `api.inference:app`), the process that predicts, on the GPU.

It serves predict (v1, api/routes/predict.py, and Open Inference Protocol v2, api/routes/v2.py), exports
(`GET /models/{id}/export`, api/routes/export.py), model metadata read-only (`GET /models`, `GET /models/{id}`),
`/healthz` and `/metrics`, with the same API keys and owner isolation as the API (it reads the same Redis), and loads
models from the store (storage/artifacts.py). The API forwards `/v1/models/...:predict*`, `/v2/...` and exports here
(api/routes/forward.py), so clients may use either URL.

Torch is imported when the app starts (its lifespan builds the serving engine, services/serving/engine.py: the
Predictor, the Batcher and the pools of the predict path), not when this module is imported: the API imports it for
its OpenAPI document only. The lifespan stops the batcher cleanly (what is queued runs first) and the pools:
`decoder` (Pillow decoding, one thread per core), `loader` (cold model loads, off the batching thread) and `exporter`
(one export at a time); the last two run torch, in threads that exit when idle (services/serving/threads.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, metrics
from api.json_depth import DepthLimit
from api.limits import BodySizeLimit
from api.routes import export, health, models, predict, v2
from services.serving.engine import Serving
from services.serving.threads import ExitingPool
from storage.redis import JobStore
from storage.settings import Settings


def create_inference_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.serving = Serving.start(settings, registered=app.state.store.registered_models)  # torch, here only
        app.state.predictor, app.state.batcher = app.state.serving.predictor, app.state.serving.batcher
        app.state.exporter = ExitingPool(1, "model-exporter")  # torch work off the batcher: serving/threads.py
        try:
            yield
        finally:
            app.state.serving.close()
            app.state.exporter.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="sidetune inference",
        version="0.1.0",
        description="Predict with adapted models: v1 (`POST /v1/models/{id}:predict`) and the Open Inference "
        "Protocol v2 (`/v2/...`, KServe v2 / Triton REST). Concurrent requests on one backbone share its forward.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = JobStore.from_url(settings.broker_url, fail_fast=True)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_mb * 2**20))
    app.add_middleware(DepthLimit)  # JSON nested deeper than 64 levels: 422 before a parser recurses
    for router in (predict.router, v2.router, export.router, models.read_only):
        app.include_router(router)
    app.add_api_route("/healthz", health.healthz, response_model=health.Health, tags=["health"])
    metrics.install(app, job_gauges=False)
    return app


app = create_inference_app()
