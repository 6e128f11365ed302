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
    """Redis answers and takes writes, and both queues (extract, train) have a live worker; `reason` says what is
    missing."""
    redis_ok, refusal, workers = False, None, {}
    try:
        refusal = store.write_refusal()  # a write, not a PING: Redis refuses even PING while its disk fails it
        redis_ok = True
        workers = store.live_workers()
    except Exception as e:
        reason = f"Redis is unavailable ({type(e).__name__}: {e})"
    else:
        missing = [q for q in ("extract", "train") if workers.get(q, 0) == 0]
        reason = (
            f"Redis refuses writes ({refusal})"
            if refusal
            else f"no live {' or '.join(missing)} worker"
            if missing
            else None
        )
    body = {
        "status": "ready" if reason is None else "not_ready",
        "redis": redis_ok,
        "redis_writable": redis_ok and refusal is None,
        "workers": workers,
        "reason": reason,
    }
    return body if reason is None else JSONResponse(body, status_code=503)
