"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import StoreDep
from api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict:
    """The process is up (answered on the event loop: no thread pool in the way under load)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
def readyz(store: StoreDep):
    """Redis answers and both queues (extract, train) have a live worker."""
    try:
        redis_ok = store.ping()
        workers = store.live_workers()
    except Exception:
        redis_ok, workers = False, {}
    ready = redis_ok and workers.get("extract", 0) > 0 and workers.get("train", 0) > 0
    body = {"status": "ready" if ready else "not_ready", "redis": redis_ok, "workers": workers}
    return body if ready else JSONResponse(body, status_code=503)
