"""A job's TensorBoard event files over HTTP, on the real topology with API keys (`keyed_api`): the owner downloads
them (`GET /jobs/{id}/tensorboard`, the client's `tensorboard`, `sidetune jobs tensorboard`) and TensorBoard's own
reader finds the job's epochs in them; another key gets 404, as for the job itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.training.tensorboard import EVENTS
from tests.api.test_tenants_http import tiny_job
from tests.conftest import TENANT_KEYS
from worker.client import ApiError, Client


def test_the_owner_downloads_a_jobs_event_files_and_another_key_gets_404(keyed_api, tmp_path: Path) -> None:
    a, b = Client(keyed_api.api_url, TENANT_KEYS["a"]), Client(keyed_api.api_url, TENANT_KEYS["b"])
    body = tiny_job(keyed_api)
    body["training"]["epochs"] = 2
    job = a.wait(a.submit(body)["id"], timeout_s=600, poll_s=0.2)
    assert job["status"] == "succeeded", job["error"]

    folder = a.tensorboard(job["id"], tmp_path / "runs")
    assert sorted(p.name for p in folder.iterdir()) == [EVENTS]  # one configuration: the root run
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "plots/confusion" in acc.Tags()["images"]
    assert not list(tmp_path.glob(".*"))  # the archive is removed once extracted

    url = f"{keyed_api.api_url}/jobs/{job['id']}/tensorboard"
    for key in (TENANT_KEYS["b"], None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(url, headers=headers, timeout=60).status_code == (404 if key else 401)
    with pytest.raises(ApiError) as refused:
        b.tensorboard(job["id"], tmp_path / "theirs")
    assert refused.value.status == 404

    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "jobs", "tensorboard", job["id"], str(tmp_path / "cli")],
        env={**os.environ, "SIDETUNE_URL": keyed_api.api_url, "SIDETUNE_API_KEY": TENANT_KEYS["a"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli" / EVENTS).read_bytes() == (folder / EVENTS).read_bytes()
