"""A small HTTP client for the sidetune API, used by the CLI and the demo: one method per route.

The URL and key default to SIDETUNE_URL (or SIDETUNE_API_URL) and SIDETUNE_API_KEY.
"""

from __future__ import annotations

import base64
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import httpx

from worker.api_spec import JobSpecBody
from worker.api_types import (
    CacheList,
    CheckpointList,
    Dataset,
    Evaluation,
    Instance,
    Job,
    Model,
    ModelPredictions,
    Plan,
    PredictBody,
    Prediction,
    Ready,
)

if TYPE_CHECKING:  # a type only: the client imports nothing of the server at run time
    from storage.redis.records import Event

TERMINAL = {"succeeded", "failed", "cancelled"}
# as services/data/datasets.py (the client imports no services)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov"}


class ApiError(RuntimeError):
    """The API answered with an error: `status`, its `code` and message, and the URL asked."""

    def __init__(self, status: int, body: Any, url: str = "") -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status, self.body, self.url = status, body, url
        self.code = err.get("code") if isinstance(err, dict) else None
        message = err.get("message", body) if isinstance(err, dict) else err or body
        super().__init__(f"HTTP {status}{f' from {url}' if url else ''}: {message}")


class EventPage(TypedDict):
    """One page of `GET /jobs/{id}/events`."""

    object: Literal["list"]
    data: list[Event]
    has_more: bool


def default_url() -> str | None:
    return os.environ.get("SIDETUNE_URL") or os.environ.get("SIDETUNE_API_URL")


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        key = api_key or os.environ.get("SIDETUNE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            is_json = r.headers.get("content-type", "").startswith("application/json")
            raise ApiError(r.status_code, r.json() if is_json else r.text, str(r.request.url.copy_with(query=None)))
        return r

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._check(self.http.request(method, path, **kwargs))
        if r.status_code == 204:
            return None
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    # ---- jobs ------------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpecBody) -> Job:
        return self._call("POST", "/jobs", json=spec)

    def plan(self, spec: JobSpecBody) -> Plan:
        """The server's plan of a job spec (`POST /jobs?dry_run=true`): creates no job."""
        return self._call("POST", "/jobs", params={"dry_run": "true"}, json=spec)

    def job(self, job_id: str) -> Job:
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, limit: int = 20, after: str | None = None) -> list[Job]:
        params: dict[str, int | str] = {"limit": limit, **({"after": after} if after else {})}
        return self._call("GET", "/jobs", params=params)["data"]

    def cancel(self, job_id: str) -> Job:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def delete_job(self, job_id: str) -> None:
        self._call("DELETE", f"/jobs/{job_id}")

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        return self._call("GET", f"/jobs/{job_id}/events", params={"after": after, "limit": limit})["data"]

    def event_page(self, job_id: str, after: int = 0, limit: int = 100) -> EventPage:
        """One page of events: {"data", "has_more"}."""
        return self._call("GET", f"/jobs/{job_id}/events", params={"after": after, "limit": limit})

    def follow_events(self, job_id: str, after: int = 0, poll_s: float = 1.0) -> Iterator[Event]:
        """Every event after `after`, as it comes, until the job has ended and its last event was read."""
        while True:
            page = self.event_page(job_id, after)
            for event in page["data"]:
                after = event["seq"]
                yield event
            if not page["has_more"]:
                if self.job(job_id)["status"] in TERMINAL and not self.event_page(job_id, after)["data"]:
                    return
                time.sleep(poll_s)

    def checkpoints(self, job_id: str) -> CheckpointList:
        return self._call("GET", f"/jobs/{job_id}/checkpoints")

    def checkpoint_file(self, job_id: str, name: str, dest: Path) -> Path:
        return self._download(f"/jobs/{job_id}/checkpoints/{name}", {}, dest, name)

    def tensorboard(self, job_id: str, folder: Path) -> Path:
        """Download the job's TensorBoard event files and extract them into `folder` (a run per configuration);
        returns it."""
        archive = self._download(f"/jobs/{job_id}/tensorboard", {}, folder.parent / f".{folder.name}.tar.gz", "")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")  # names inside `folder` only, plain files
        finally:
            archive.unlink(missing_ok=True)
        return folder

    def wait(
        self, job_id: str, on_update: Callable[[Job], None] | None = None, timeout_s: float = 3600, poll_s: float = 0.5
    ) -> Job:
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

    # ---- models ----------------------------------------------------------------------------------------------
    def models(self, limit: int = 100) -> list[Model]:
        return self._call("GET", "/models", params={"limit": limit})["data"]

    def model(self, model_id: str) -> Model:
        return self._call("GET", f"/models/{model_id}")

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/models/{model_id}")

    def export(self, model_id: str, fmt: str, dest: Path | None = None) -> Path:
        """Download the model exported as `fmt` to `dest` (default: the server's file name, here); returns the path."""
        return self._download(f"/models/{model_id}/export", {"format": fmt}, dest, f"{model_id}.{fmt}")

    def _download(self, path: str, params: dict[str, str], dest: Path | None, fallback: str) -> Path:
        """Stream a file to `dest` (default: the name the server gives, here), written whole or not at all."""
        with self.http.stream("GET", path, params=params, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
            self._check(r)
            found = re.search(r'filename="?([^";]+)"?', r.headers.get("content-disposition", ""))
            out = Path(dest or (found.group(1) if found else fallback))
            tmp = out.with_name(f".{out.name}.part")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
            tmp.replace(out)
        return out

    def evaluation(self, model_id: str, offset: int = 0, limit: int | None = None) -> Evaluation:
        """One page of the evaluation report: classes [offset, offset + limit) (the server's default page: 100)."""
        params = {"offset": offset, **({"limit": limit} if limit else {})}
        return self._call("GET", f"/models/{model_id}/evaluation", params=params)

    def whole_evaluation(self, model_id: str, page: int = 1000) -> Evaluation:
        """The whole evaluation report: its pages of `page` classes, joined."""
        out = self.evaluation(model_id, 0, page)
        while out["has_more"]:
            more = self.evaluation(model_id, out["offset"] + len(out["classes"]), page)
            out["classes"] += more["classes"]
            out["per_class"] += more["per_class"]
            if "confusion_matrix" in out and "confusion_matrix" in more:
                out["confusion_matrix"] += more["confusion_matrix"]
            if "confusion" in out and "confusion" in more:
                cells, extra = out["confusion"], more["confusion"]
                cells["true"] += extra["true"]
                cells["predicted"] += extra["predicted"]
                cells["count"] += extra["count"]
            out["has_more"] = more["has_more"]
        out["limit"] = len(out["classes"])
        return out

    def plot(self, model_id: str, name: str) -> bytes:
        return self._check(self.http.get(f"/models/{model_id}/plots/{name}.png")).content

    def predict(
        self, model_id: str, images: list[bytes | Path], video: bool | None = None, threshold: float | None = None
    ) -> list[Prediction]:
        """Classify images, or videos (`video`; None: files named like videos are videos); `threshold` overrides a
        multi-label model's own."""
        body = self._instances(images, video)
        if threshold is not None:
            body["threshold"] = threshold
        return self._call("POST", f"/v1/models/{model_id}:predict", json=body)["predictions"]

    def predict_many(
        self,
        model_ids: list[str],
        images: list[bytes | Path],
        video: bool | None = None,
        threshold: float | None = None,
    ) -> dict[str, list[Prediction]]:
        """Classify images (or videos) with several models in one request (`POST /v1/predict`: decoded once, one
        backbone forward for the models on it); each model's predictions, by id, in the order given."""
        body = self._instances(images, video)
        body["models"] = list(model_ids)
        if threshold is not None:
            body["threshold"] = threshold
        results: list[ModelPredictions] = self._call("POST", "/v1/predict", json=body)["results"]
        return {r["model_id"]: r["predictions"] for r in results}

    @staticmethod
    def _instances(images: list[bytes | Path], video: bool | None) -> PredictBody:
        """`{"instances": [...]}` of files or bytes, base64; `video` None: files named like videos are videos."""
        if video is None:
            video = all(isinstance(i, Path | str) and Path(i).suffix.lower() in VIDEO_SUFFIXES for i in images)
        raw = [Path(i).read_bytes() if isinstance(i, Path | str) else i for i in images]
        encoded = [base64.b64encode(b).decode() for b in raw]
        instances: list[Instance] = [{"video_b64": e} if video else {"image_b64": e} for e in encoded]
        return {"instances": instances}

    # ---- datasets --------------------------------------------------------------------------------------------
    def upload(self, archive: Path, name: str | None = None) -> Dataset:
        """Upload a dataset archive (zip or tar), streamed from the file."""
        with open(archive, "rb") as f:
            return self._call(
                "POST",
                "/datasets",
                files={"file": (Path(archive).name, f)},
                data={"name": name} if name else None,
                timeout=None,
            )

    def datasets(self, limit: int = 100) -> list[Dataset]:
        return self._call("GET", "/datasets", params={"limit": limit})["data"]

    def dataset(self, dataset_id: str) -> Dataset:
        return self._call("GET", f"/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DELETE", f"/datasets/{dataset_id}")

    # ---- the feature cache (operators: an admin key) ----------------------------------------------------------------
    def cache(self) -> CacheList:
        return self._call("GET", "/cache")

    def delete_cache_entry(self, key: str) -> None:
        self._call("DELETE", f"/cache/{key}")

    def ready(self) -> Ready:
        return self._call("GET", "/readyz")
