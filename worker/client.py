"""A small HTTP client for the sidetune API, used by the CLI and the demo."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}  # as services/datasets.py (the client imports no services)


class ApiError(RuntimeError):
    """The API answered with an error: `status`, its `code` and message, and the URL asked."""

    def __init__(self, status: int, body: Any, url: str = "") -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status, self.body, self.url = status, body, url
        self.code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message", body) if isinstance(err, dict) else err or body
        super().__init__(f"HTTP {status}{f' from {url}' if url else ''}: {message}")


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        key = api_key or os.environ.get("SIDETUNE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code >= 400:
            raise ApiError(r.status_code, body, str(r.request.url.copy_with(query=None)))
        return body

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/jobs", json=spec)

    def plan(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The server's plan of a job spec (`POST /jobs?dry_run=true`): creates no job."""
        return self._call("POST", "/jobs", params={"dry_run": "true"}, json=spec)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._call("GET", "/jobs", params={"limit": limit})["data"]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", f"/jobs/{job_id}/events", params={"after": after})["data"]

    def wait(
        self, job_id: str, on_update: Callable[[dict], None] | None = None, timeout_s: float = 3600, poll_s: float = 0.5
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")
            time.sleep(poll_s)

    def predict(
        self, model_id: str, images: list[bytes | Path], video: bool | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """Classify images, or videos (`video`; None: files named like videos are videos); `threshold` overrides a
        multi-label model's own."""
        if video is None:
            video = all(isinstance(i, Path | str) and Path(i).suffix.lower() in VIDEO_SUFFIXES for i in images)
        raw = [Path(i).read_bytes() if isinstance(i, Path | str) else i for i in images]
        field = "video_b64" if video else "image_b64"
        body: dict[str, Any] = {"instances": [{field: base64.b64encode(b).decode()} for b in raw]}
        if threshold is not None:
            body["threshold"] = threshold
        return self._call("POST", f"/v1/models/{model_id}:predict", json=body)["predictions"]

    def model(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{model_id}")

    def evaluation(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{model_id}/evaluation")

    def plot(self, model_id: str, name: str) -> bytes:
        r = self.http.get(f"/models/{model_id}/plots/{name}.png")
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json())
        return r.content

    def ready(self) -> dict[str, Any]:
        return self._call("GET", "/readyz")
