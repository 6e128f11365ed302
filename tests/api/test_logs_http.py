"""Structured logs from the real processes, with API keys configured: every line is a JSON object, the workers'
lines during a step carry the job id, and no key (a valid one, a wrong one, the Authorization header) is ever
written, whatever the requests did. A stack of its own, since it needs keys."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from services.data.digits import write_digits
from storage.logs import Redactor, configure_logging, log_context
from storage.settings import Settings
from worker.client import Client
from worker.launcher import Stack, free_port

KEYS = ["alpha-KEY-7f3a9c", "beta-KEY-2b8e41"]
WRONG = "wrong-KEY-d00d55"


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("logs")
    settings = Settings(
        data_dir=data,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        api_keys=KEYS,
    )
    write_digits(data / "datasets" / "digits", limit=60)
    with Stack(settings) as running:
        yield running


def lines(running: Stack, name: str) -> list[dict]:
    text = (running.log_dir / f"{name}.log").read_text()
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line is one JSON object
    return out


def test_keys_never_logged_and_lines_carry_the_job_id(keyed_stack):
    running = keyed_stack
    url = running.api_url
    data = running.settings.data_path / "datasets" / "digits"
    body = {
        "dataset": {"path": str(data / "train")},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
        "training": {"epochs": 1},
    }
    # Refused: no key, a wrong key, a malformed header, and /metrics without a key.
    assert httpx.post(f"{url}/jobs", json=body).status_code == 401
    assert httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
    assert httpx.get(f"{url}/jobs", headers={"Authorization": KEYS[0]}).status_code == 401  # no scheme
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200

    client = Client(url, api_key=KEYS[0])
    job = client.wait(client.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert len(client.predict(job["model_id"], sorted((data / "holdout").glob("*/*.png"))[:1])) == 1
    client.events(job["id"])
    running.stop()  # every process flushed and exited: the log files are complete

    texts = {p.name: p.read_text() for p in running.log_dir.glob("*.log")}
    assert {"api.log", "extract-worker.log", "train-worker.log"} <= set(texts)
    for name, text in texts.items():
        for secret in (*KEYS, WRONG):
            assert secret not in text, f"{secret} in {name}"
        assert "authorization" not in text.lower(), name

    for worker, steps in (("extract-worker", ("plan", "extract")), ("train-worker", ("train",))):  # plan: its queue's
        records = lines(running, worker)
        mine = [r for r in records if r.get("job_id") == job["id"]]
        messages = [r["message"] for r in mine]
        for step in steps:
            assert f"step {step} started" in messages, messages
            assert any(m.startswith(f"step {step} finished") for m in messages), messages
        assert all(r["task"] in steps and r["worker"] and {"ts", "level", "logger"} <= set(r) for r in mine)

    api = lines(running, "api")
    access = [r for r in api if r["logger"] == "uvicorn.access"]
    assert any(r.get("job_id") == job["id"] and r["path"] == f"/jobs/{job['id']}" for r in access)
    assert any(r.get("model_id") == job["model_id"] and r["status"] == 200 for r in access)
    assert any(r["status"] == 401 for r in access)
    assert any(r.get("job_id") == job["id"] and r["message"].startswith("job queued") for r in api)


def test_redactor_scrubs_keys_and_credentials(capsys):
    redact = Redactor(KEYS)
    assert redact(f"token {KEYS[0]} and {KEYS[1]}x") == "token [redacted] and [redacted]x"
    assert redact(f"Authorization: Bearer {WRONG}") == "Authorization: Bearer [redacted]"
    assert redact(f'{{"authorization": "Bearer {WRONG}"}}') == '{"authorization": "Bearer [redacted]"}'
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(True, secrets=KEYS)
        with log_context(job_id="job_1", task="train"):
            try:
                raise RuntimeError(f"failed with headers {{'authorization': 'Bearer {KEYS[1]}'}}")
            except RuntimeError:
                logging.getLogger("sidetune.test").exception("request to %s failed", KEYS[0])
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert line["job_id"] == "job_1" and line["task"] == "train" and line["level"] == "error"
    assert line["message"] == "request to [redacted] failed"
    assert KEYS[1] not in line["exc"] and "RuntimeError" in line["exc"]
