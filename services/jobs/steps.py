"""What every step of a job shares (services/jobs/planning.py, extract.py, train.py): how a step ends (failed,
cancelled, or what it asks the task layer to enqueue next) and the spec as this machine reads its uploaded datasets.
"""

from __future__ import annotations

import logging

from services.errors import classify, internal_message, named, reference, transient
from services.spec import JobSpec
from storage.datasets import DatasetFiles
from storage.redis import JobStore, now
from storage.settings import Settings

log = logging.getLogger("sidetune.pipeline")


def fail(store: JobStore, job_id: str, exc: Exception) -> None:
    """Record the job as failed: a known error with its code and message (services/errors.py), anything else as
    `internal_error` with a reference id under which the traceback is logged (no internals in the record)."""
    exc = named(exc)
    known = classify(exc)
    if known is None:
        ref = reference()
        log.error("job %s failed: internal error %s", job_id, ref, exc_info=exc)
        code, message = "internal_error", internal_message(ref)
    else:
        code, message = known[1], str(exc)
        log.warning("job %s failed: %s: %s", job_id, code, message)
    store.set_fields(job_id, status="failed", error={"code": code, "message": message}, finished_at=now())
    store.add_event(job_id, f"failed: {message}", level="error")


def failed(store: JobStore, job_id: str, exc: Exception) -> None:
    """A step's error: one a retry may cure (the store or Redis unreachable, Redis refusing writes) is raised for the
    task to retry the step with backoff (worker/tasks.py), failing the job after the last try; any other fails the
    job now."""
    exc = named(exc)
    if transient(exc):
        raise exc
    fail(store, job_id, exc)


class JobEnded(Exception):
    """Another shard task of the job failed it: this one stops writing."""


def cancelled(store: JobStore, job_id: str) -> None:
    store.set_fields(job_id, status="cancelled", finished_at=now())
    store.add_event(job_id, "cancelled", level="warning")


def on_this_machine(spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec reading its uploaded datasets (`dataset.id`, `dataset.test_id`) from this machine's copies, fetched
    from the store the first time (the paths the API stored are where the API's machine reads them)."""
    ds, files, update = spec.dataset, DatasetFiles.from_settings(settings), {}
    if ds.id is not None:
        path, fmt = files.dataset_path(ds.id)
        update.update(path=str(path), format=fmt)
    if ds.test_id is not None:
        update["test"] = str(files.dataset_path(ds.test_id)[0])
    return spec.model_copy(update={"dataset": ds.model_copy(update=update)}) if update else spec


# What a step asks the task layer to enqueue next: the extract step (after the plan step), the train step, n extraction
# shards, or nothing.
EXTRACT_NEXT, TRAIN_NEXT = "extract", "train"
Next = str | tuple[str, int] | None
