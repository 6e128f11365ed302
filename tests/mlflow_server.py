"""A real MLflow tracking server for the tests (`MlflowServer`): `mlflow server` on a free loopback port, its runs in
a SQLite file and its artifacts in a folder under the given one, its job runners and telemetry off (a process group
of its own, stopped whole); and its REST API as the tests read it (`Rest`: runs by tag, metric histories, artifacts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from worker.launcher import free_port

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        """Start it and wait for /health (the first start creates the SQLite schema: seconds)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                command, env={**os.environ, **QUIET}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.folder / "server.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop the server and the uvicorn worker it started (its process group)."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


class Rest:
    """The server's REST API (MLflow's /api/2.0/mlflow/...), as the tests read a job's runs."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, endpoint: str, **params: Any) -> dict:
        r = httpx.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def experiment_id(self, name: str) -> str:
        return self._get("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def runs(self, experiment: str, job_id: str, deleted: bool = False) -> list[dict]:
        """The job's runs (active ones, or the deleted), each as {info, params, tags} with params and tags as dicts."""
        body = {
            "experiment_ids": [self.experiment_id(experiment)],
            "filter": f"tags.`sidetune.job_id` = '{job_id}'",
            "run_view_type": "DELETED_ONLY" if deleted else "ACTIVE_ONLY",
            "max_results": 1000,
        }
        r = httpx.post(f"{self.url}/api/2.0/mlflow/runs/search", json=body, timeout=30)
        r.raise_for_status()
        return [
            {
                "info": run["info"],
                "params": {p["key"]: p["value"] for p in run["data"].get("params", [])},
                "tags": {t["key"]: t["value"] for t in run["data"].get("tags", [])},
                "metrics": {m["key"]: m["value"] for m in run["data"].get("metrics", [])},
            }
            for run in r.json().get("runs", [])
        ]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """A metric's points, (step, value), by step."""
        metrics = self._get("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000).get("metrics", [])
        return sorted((int(m.get("step", 0)), m["value"]) for m in metrics)

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        """The run's artifact files under `path`, recursively."""
        files = self._get("artifacts/list", run_id=run_id, **({"path": path} if path else {})).get("files", [])
        out = []
        for f in files:
            out += self.artifacts(run_id, f["path"]) if f.get("is_dir") else [f["path"]]
        return sorted(out)

    def artifact(self, run_id: str, path: str) -> bytes:
        r = httpx.get(f"{self.url}/get-artifact", params={"run_uuid": run_id, "path": path}, timeout=30)
        r.raise_for_status()
        return r.content
