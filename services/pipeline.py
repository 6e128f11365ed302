"""The two steps of a job, as the Celery tasks run them: extract, then train. Each is idempotent (check,
do, mark done last): a redelivered or repeated step finds its work done and returns, a crashed one resumes
from what was finished (cache batches, training checkpoints).
"""

from __future__ import annotations

import logging
import traceback

from services.backbones import BackboneError
from services.datasets import DatasetError
from services.progress import Cancelled, JobReporter
from services.spec import JobSpec
from storage.artifacts import ArtifactStore, read_json
from storage.cache import CacheError
from storage.jobs import TERMINAL, JobStore, now
from storage.settings import Settings

log = logging.getLogger("sidetune.pipeline")

# Errors whose message is the user's answer; anything else is reported as an internal error.
USER_ERRORS: dict[type[Exception], str] = {
    DatasetError: "invalid_dataset",
    FileNotFoundError: "not_found",
    PermissionError: "forbidden_path",
    BackboneError: "invalid_backbone",
    CacheError: "cache_error",
    ValueError: "invalid_value",
}


def model_id_for(job_id: str) -> str:
    """One model per job, with an id derived from the job's, so a repeated train step writes the same model."""
    return "model_" + job_id.removeprefix("job_")


def _fail(store: JobStore, job_id: str, exc: Exception) -> None:
    code = next((c for t, c in USER_ERRORS.items() if isinstance(exc, t)), "internal_error")
    message = str(exc) if code != "internal_error" else f"{type(exc).__name__}: {exc}"
    if code == "internal_error":
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
    store.set_fields(job_id, status="failed", error={"code": code, "message": message}, finished_at=now())
    store.add_event(job_id, f"failed: {message}", level="error")


def _cancelled(store: JobStore, job_id: str) -> None:
    store.set_fields(job_id, status="cancelled", finished_at=now())
    store.add_event(job_id, "cancelled", level="warning")


def extract_step(store: JobStore, settings: Settings, job_id: str) -> None:
    from services.extraction import run_extraction

    job = store.get_job(job_id)
    if job["status"] in TERMINAL or job.get("extracted"):
        return  # finished, failed, cancelled, or extracted already (a redelivered task)
    if job.get("cancel_requested"):
        return _cancelled(store, job_id)
    spec = JobSpec.model_validate(job["spec"])
    if not spec.needs_cache:
        store.add_event(job_id, f"mode {spec.mode}: trains on images, no feature cache needed")
        store.set_fields(job_id, extracted=True, started_at=job.get("started_at") or now())
        return
    store.set_fields(job_id, status="extracting", started_at=job.get("started_at") or now())
    store.add_event(job_id, "extraction started")
    try:
        result = run_extraction(spec, settings, JobReporter(store, job_id))
    except Cancelled:
        return _cancelled(store, job_id)
    except Exception as e:
        return _fail(store, job_id, e)
    store.update_job(job_id, lambda j: j.update(cache_key=result["cache_key"], extracted=True,
                                                metrics={**j["metrics"], **result}))  # fmt: skip


def train_step(store: JobStore, settings: Settings, job_id: str) -> None:
    from services.training import train_job

    job = store.get_job(job_id)
    if job["status"] in TERMINAL:
        return
    if job.get("cancel_requested"):
        return _cancelled(store, job_id)
    if not job.get("extracted"):
        return _fail(store, job_id, RuntimeError("the extraction step did not finish"))
    artifacts = ArtifactStore(settings.artifacts_dir)
    model_id = model_id_for(job_id)
    store.set_fields(job_id, status="training")
    store.add_event(job_id, "training started")
    try:
        spec = JobSpec.model_validate(job["spec"])
        if not artifacts.has_model(model_id):
            ckpt = artifacts.checkpoint_dir(job_id)
            out = train_job(spec, settings, job.get("cache_key"), JobReporter(store, job_id), ckpt)
            artifacts.save_model(model_id, out["weights"], out["config"], out["metrics"])
        config = artifacts.load_model(model_id)[1]
        metrics = read_json(artifacts.model_dir(model_id) / "metrics.json")
    except Cancelled:
        return _cancelled(store, job_id)
    except Exception as e:
        return _fail(store, job_id, e)
    store.register_model({
        "id": model_id, "object": "model", "created_at": now(), "job_id": job_id, "owner": job.get("owner"),
        "name": spec.name, "method": spec.method.name, "mode": spec.mode, "backbone": spec.backbone.name,
        "classes": config["classes"],
        "metrics": metrics,
    })  # fmt: skip
    store.update_job(job_id, lambda j: j.update(status="succeeded", model_id=model_id, finished_at=now(),
                                                metrics={**j["metrics"], **metrics}))  # fmt: skip
    store.add_event(job_id, f"succeeded: model {model_id}, val accuracy {metrics['val_accuracy']:.4f}")
    artifacts.drop_checkpoints(job_id)
