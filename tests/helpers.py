"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from services.spec import JobSpec
from worker.launcher import free_port

# Served models (the `trained` fixture): three side models on one backbone (different layers, so a batch taps their
# union) and an adapted (merged) one
MODELS = {
    "model_losa3": ({"name": "losa", "rank": 4, "layers": 3}, "cache"),
    "model_losa_all": ({"name": "losa", "rank": 8}, "cache"),
    # mini-batch like the others (1 epoch at lr 1e-2); the L-BFGS probe is served in
    # tests/services/training/test_held_out.py
    "model_linear": ({"name": "linear", "solver": "sgd"}, "cache"),
    "model_lora": ({"name": "lora", "rank": 4}, "tail"),
}


def job_spec(path: Path, method: dict, mode: str, **backbone) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path)},
            "backbone": {"name": "test_vit", "pretrained": False, **backbone},
            "method": method,
            "execution": {"mode": mode, **({"tail_blocks": 2} if mode == "tail" else {})},
            "extraction": {"batch_size": 64},
            "training": {"epochs": 1, "batch_size": 32, "lr": 1e-2},
        }
    )


@contextmanager
def serve(app) -> Iterator[str]:
    """The app under uvicorn on a loopback port, in a thread (lifespan included): real HTTP, streamed bodies."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        assert thread.is_alive(), "uvicorn exited"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def keys(view: type) -> set[str]:
    """Every key a TypedDict names."""
    return set(view.__required_keys__ | view.__optional_keys__)


def shaped(answer: dict, view: type) -> None:
    """`answer` holds every key the TypedDict `view` requires, and no key it does not name (worker/api_types.py)."""
    assert view.__required_keys__ <= set(answer), f"{view.__name__} lacks {view.__required_keys__ - set(answer)}"
    assert set(answer) <= keys(view), f"{view.__name__} does not name {set(answer) - keys(view)}"


def plan_now(app, job_id: str) -> dict:
    """Run a job's plan step here (services/jobs/planning.py), as an extract worker would, on the settings of the API
    `app` that recorded it; the job's record after it."""
    from services.jobs.planning import plan_step
    from storage.redis import JobStore

    settings = app.state.settings
    store = JobStore.from_url(settings.broker_url)
    plan_step(store, settings, job_id)
    return store.get_job(job_id)


def plan_failure(api_url: str, body: dict, headers: dict | None = None, timeout_s: float = 120) -> dict:
    """POST a job that its plan step refuses, on a stack with workers: answered at once (201, `planning`), then failed
    by the plan step in a worker. Returns the job's error (code and message, as a dry run's 422 carries them)."""
    r = httpx.post(f"{api_url}/jobs", json=body, headers=headers, timeout=60)
    assert r.status_code == 201 and r.json()["status"] == "planning", r.text
    return failed_job(api_url, r.json()["id"], headers, timeout_s)["error"]


def failed_job(api_url: str, job_id: str, headers: dict | None = None, timeout_s: float = 120) -> dict:
    """The job once its plan step has failed it (asserted: failed, not planned)."""
    deadline = time.monotonic() + timeout_s
    while (job := httpx.get(f"{api_url}/jobs/{job_id}", headers=headers, timeout=30).json())["status"] == "planning":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "failed", job
    return job
