"""The watchdog: steps whose worker died (its heartbeat expired: SIGKILL, a lost machine) go back to the queue,
and jobs that no worker picks up again within `worker_lost_timeout_s` fail with the reason.

Celery alone would redeliver a killed worker's late-acked task only after the visibility timeout (as long as
the longest job, 48 h by default). Every step is idempotent and resumable (cache batches, training
checkpoints), so handing it back early is safe: the next worker resumes from what was finished. Every worker
runs this check a few times a minute; a Redis lease lets one of them act at a time. The same pass removes expired
checkpoints (services/jobs/retention.py), every few minutes.

A worker may die after its step did its work but before it enqueued the next step: the plan step's job recorded
`queued`, or the extract step's job `extracted`, with nothing in the queue. Sent again, that step would find its work
done and stop, so the job would wait forever; the watchdog sends the next step instead. It tells the two deaths
apart by `handed_off`, which the task layer sets once it has enqueued the next step (worker/tasks.py): check, send,
mark last. A death between the send and the mark sends the next step twice: a second extract step waits on the
entry's lease and hands on once, a second train step after the first has ended does nothing (two train workers could
run them at once; the window is one Redis write).
"""

from __future__ import annotations

from collections.abc import Callable

from services.jobs.retention import sweep_checkpoints
from storage.redis import TERMINAL, JobRecord, JobStore, NotFound, RunningStep, now
from storage.settings import Settings

Requeue = Callable[[str, RunningStep], None]


def _describe(step: RunningStep) -> str:
    if step["task"] == "extract_shard":
        return f"extraction shard {step['index'] + 1}/{step['count']}"
    return {"plan": "planning", "extract": "extraction", "train": "training"}.get(step["task"], step["task"])


def _next_step(job: JobRecord, step: RunningStep) -> RunningStep | None:
    """The step to send instead of the dead worker's `step` when that one had done its work but not handed the job
    on (see above); None when `step` itself is to be sent again. Had the next step been sent and run, it would have
    left its mark: the extract step `extracted` (or status `extracting`), the train step status `training`."""
    handed = job.get("handed_off")
    planned = job["status"] == "queued" and job.get("resolved") is not None and not job.get("extracted")
    if step["task"] == "plan" and planned and handed is None:
        return {"task": "extract"}
    extracted = job.get("extracted") and job["status"] != "training"
    if step["task"] in ("extract", "extract_shard") and extracted and handed != "train":
        return {"task": "train"}
    return None


def _fail(store: JobStore, job_id: str, message: str) -> None:
    store.set_fields(job_id, status="failed", error={"code": "worker_lost", "message": message}, finished_at=now())
    store.add_event(job_id, f"failed: {message}", level="error")


def check(store: JobStore, settings: Settings, requeue: Requeue) -> list[str]:
    """One pass; returns what it did, one line each."""
    done: list[str] = []
    for job_id, steps in store.running_steps().items():
        for worker, step in steps.items():
            if store.worker_alive(worker) or not store.drop_step(job_id, worker):
                continue  # alive, or another watchdog handled it
            try:
                job = store.get_job(job_id)
            except NotFound:
                continue
            if job["status"] in TERMINAL:
                continue
            what = _describe(step)
            lost = job.get("workers_lost", 0) + 1
            if lost > settings.max_worker_losses:
                _fail(
                    store,
                    job_id,
                    f"the workers running this job died {lost} times (last: {worker}, during {what}); see their logs",
                )
                done.append(f"{job_id}: failed after {lost} lost workers")
                continue
            following = _next_step(job, step)
            sent = following or step
            store.set_fields(job_id, workers_lost=lost, requeued_at=now(), requeued_step=_describe(sent))
            store.workers.mark_requeued(job_id)
            if following is None:
                message = f"during {what}; the step is requeued and resumes from what was finished"
            else:
                message = f"after {what}, before handing the job on; the {_describe(following)} step is enqueued"
            store.add_event(job_id, f"worker {worker} stopped (no heartbeat) {message}", level="warning")
            requeue(job_id, sent)
            if following is not None:
                store.set_fields(job_id, handed_off=following["task"])  # sent: marked last, as the task layer does
            done.append(f"{job_id}: {_describe(sent)} requeued from {worker}")
    running = store.running_steps()
    for job_id in store.workers.requeued():
        try:
            job = store.get_job(job_id)
        except NotFound:
            store.workers.settle_requeued(job_id)
            continue
        picked_up = job_id in running or job["status"] in TERMINAL or not job.get("requeued_at")
        if picked_up:
            store.workers.settle_requeued(job_id)
        elif now() - job["requeued_at"] > (limit := settings.worker_lost_timeout_s):
            store.workers.settle_requeued(job_id)
            _fail(
                store,
                job_id,
                f"its {job['requeued_step']} step lost its worker and no worker took it up again "
                f"within {limit:.0f} s; start a worker and resubmit",
            )
            done.append(f"{job_id}: failed, no worker within {limit:.0f} s")
    done += [f"{job_id}: checkpoint removed (retention over)" for job_id in sweep_checkpoints(store, settings)]
    return done
