"""The extract step of a job (queue `extract`), and its shard tasks: reuse a covering cache entry, or write it
under the entry's lease, in this task or split into shards any extract worker runs. Idempotent: a redelivered step
finds the job extracted, a crashed one resumes from the batches written.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from services.errors import named
from services.jobs import quotas
from services.jobs.progress import Cancelled, JobReporter
from services.jobs.resolved import record_weights_hash, recorded
from services.jobs.steps import TRAIN_NEXT, JobEnded, Next, cancelled, failed, on_this_machine
from services.spec import JobSpec
from storage.cache import CacheError, FeatureCache
from storage.faults import DiskFull
from storage.redis import TERMINAL, JobRecord, JobStore, now
from storage.redis.locks import LeaseLock, acquire_or_wait
from storage.settings import Settings


def _mark_extracted(store: JobStore, job_id: str, **fields: Any) -> bool:
    """Set `extracted` once; True for the one caller that flipped it (so the train step is enqueued once)."""
    flipped = False
    metrics = fields.pop("metrics", {})

    def change(job: JobRecord) -> None:
        nonlocal flipped
        flipped = not job.get("extracted") and job["status"] not in TERMINAL
        if flipped:
            job.update(extracted=True, **fields, metrics={**job["metrics"], **metrics})

    store.update_job(job_id, change)
    return flipped


def _shard_count(store: JobStore, spec: JobSpec) -> int:
    if spec.extraction.shards != "auto":
        return spec.extraction.shards
    return max(1, store.live_workers().get("extract", 1))  # one shard per live extract worker


class _LockedReporter(JobReporter):
    """Stops the extraction if its cache lock was lost (Redis unreachable for a whole lease: another job may have
    taken the entry over, and two writers must never write the same batches), or if another shard task failed the
    job."""

    def __init__(self, store: JobStore, job_id: str, lock: LeaseLock) -> None:
        super().__init__(store, job_id)
        self.lock = lock

    def check_cancel(self) -> None:
        job = self.store.get_job(self.job_id)
        if job.get("cancel_requested"):
            raise Cancelled(self.job_id)
        if job["status"] == "failed":  # by another shard task of the job (a full disk, say)
            raise JobEnded(self.job_id)
        if self.lock.lost:
            raise CacheError("lost the lock of the cache entry being written; retry the job")


def _wait_notice(reporter: JobReporter, key: str):
    said = False

    def on_wait(waited_s: float) -> None:
        nonlocal said
        if not said:
            reporter.event(f"another job is extracting the same cache entry {key}; waiting for it")
            said = True
        reporter.check_cancel()

    return on_wait


def _make_room(store: JobStore, settings: Settings, spec: JobSpec, prep: Any, reporter: JobReporter) -> None:
    """Evict least recently used entries (never one in use) so the new entry fits the cache quota and the free disk,
    as the plan promised (storage/cache/eviction.py decides for both). A disk that cannot hold it even then fails the
    job `disk_full` before anything is written."""
    from services.extraction import planned_bytes
    from services.jobs.planner import GB, lossy_fraction

    expected = int(planned_bytes(prep) * (lossy_fraction(spec.extraction.codec, spec.extraction.keepbits) or 1.0))
    need = max(0, expected - (prep.entry.nbytes() if prep.entry.exists else 0))
    cache = FeatureCache(settings.cache_location)
    quota = None if settings.cache_quota_gb is None else int(settings.cache_quota_gb * GB)
    evicted = cache.evict(quota, keep={prep.key}, reserve=need, guard=store.pins())
    if evicted:
        why = "the cache quota and the free disk" if quota is not None else "the free disk"
        reporter.event(
            f"evicted {len(evicted)} least recently used cache entries to make room for {prep.key} within {why}",
            data={"evicted": evicted},
        )
    free = cache.free_bytes()
    if free is not None and need > free:
        raise DiskFull(cache.local_root or cache.root, f"the feature cache entry {prep.key}", need, free)


def _give_back(settings: Settings, prep: Any, reporter: JobReporter, exc: Exception) -> None:
    """After a full disk while this job (holding the entry's lock: no other job writes or reads it) wrote the entry:
    remove what it wrote, so the space comes back."""
    if not isinstance(named(exc), DiskFull):
        return
    size = prep.entry.nbytes()
    if FeatureCache(settings.cache_location).discard(prep.key):
        reporter.event(
            f"removed the partial cache entry {prep.key} ({size / 1e6:.1f} MB) to give its space back",
            level="warning",
            data={"cache": prep.key, "bytes": size},
        )


def _hit(store: JobStore, job_id: str, prep: Any, reporter: JobReporter, t0: float, owner: str | None) -> Next:
    prep.entry.touch()
    quotas.use_cache(prep, owner)
    reporter.event(f"reusing the feature cache {prep.key}: no backbone forward needed", data={"cache": prep.key})
    hit = {
        "cache_key": prep.key,
        "cache_hit": True,
        "backbone_forwards": 0,
        "images": len(prep.dataset),
        "extract_seconds": round(time.perf_counter() - t0, 3),
        **prep.entry.summary,
    }
    return TRAIN_NEXT if _mark_extracted(store, job_id, cache_key=prep.key, metrics=hit) else None


def extract_step(store: JobStore, settings: Settings, job_id: str) -> Next:
    """Reuse a covering cache entry, or extract it: in this task (one shard), or split into shard tasks that
    every extract worker can run (`extraction.shards`). Jobs that need the same entry at the same time extract
    it once: the first takes its lock, the others wait and reuse it."""
    from services.extraction import begin_extraction, prepare, run_extraction

    job = store.get_job(job_id)
    if job["status"] in TERMINAL or job.get("extracted"):
        return None  # finished, failed, cancelled, or extracted already (a redelivered task)
    if job.get("cancel_requested"):
        return cancelled(store, job_id)
    try:
        spec = JobSpec.model_validate(job["spec"])
        if not spec.needs_cache:
            store.add_event(job_id, f"mode {spec.mode}: trains on images, no feature cache needed")
            return TRAIN_NEXT if _mark_extracted(store, job_id, started_at=job.get("started_at") or now()) else None
        store.set_fields(job_id, status="extracting", started_at=job.get("started_at") or now())
        if job.get("extract_key"):  # redelivered after splitting: send the shards again (finished ones no-op)
            return ("shards", job["extract_shards"])
        store.add_event(job_id, "extraction started")
        reporter = JobReporter(store, job_id)
        t0 = time.perf_counter()
        spec = on_this_machine(spec, settings)
        resolved = recorded(store, settings, job, lambda: spec)
        prep = prepare(spec, settings, resolved=resolved)
        record_weights_hash(store, job_id, prep.backbone.weights_hash)  # the cache key's part only a worker knows
        lock = store.extraction_lock(prep.key, job_id)
        # A lock held under this job's token is this step's own, left by a worker that died (its step is requeued
        # only then): taken over at once rather than after its lease expires.
        if prep.entry.is_complete or not (
            lock.adopt()
            or acquire_or_wait(lock, lambda: prep.entry.is_complete, on_wait=_wait_notice(reporter, prep.key))
        ):
            return _hit(store, job_id, prep, reporter, t0, job.get("owner"))
        try:
            quotas.fit_cache(store, settings, prep, job.get("owner"), reporter)  # the key's own cache quota
            _make_room(store, settings, spec, prep, reporter)
            locked = _LockedReporter(store, job_id, lock)
            # never more shard tasks than batches to write (1024 shards of 120 images would be 1024 tasks)
            shards = min(_shard_count(store, spec), -(-len(prep.dataset) // prep.batch_size))
            if shards > 1:
                begin_extraction(spec, settings, locked, prep=prep)
                store.set_fields(job_id, extract_key=prep.key, extract_shards=shards, extract_started_at=now())
                reporter.event(
                    f"extracting {len(prep.dataset)} images into cache {prep.key} as {shards} shard "
                    f"tasks ({len(prep.entry.pending_batches())} batches to write)"
                )
                lock.detach()  # held on for the shard tasks, which adopt and renew it
                return ("shards", shards)
            result = run_extraction(spec, settings, locked, prep=prep)
        except Exception as e:
            _give_back(settings, prep, reporter, e)
            raise
        finally:
            lock.release()  # a no-op once detached
        return TRAIN_NEXT if _mark_extracted(store, job_id, cache_key=result["cache_key"], metrics=result) else None
    except Cancelled:
        return cancelled(store, job_id)
    except Exception as e:
        return failed(store, job_id, e)


def extract_shard_step(store: JobStore, settings: Settings, job_id: str, index: int, count: int) -> Next:
    """Write shard `index` of `count` of the job's cache entry; whichever shard finds every batch written
    completes the entry and hands the job to the train step."""
    from services.extraction import begin_extraction, extract_batches, finish_extraction, shard_batches

    job = store.get_job(job_id)
    if job["status"] in TERMINAL or job.get("extracted"):
        return None
    if job.get("cancel_requested"):
        return cancelled(store, job_id)
    lock = store.extraction_lock(job["extract_key"], job_id)
    try:
        spec = on_this_machine(JobSpec.model_validate(job["spec"]), settings)
        reporter = JobReporter(store, job_id)
        t0 = time.perf_counter()
        resolved = recorded(store, settings, job, lambda: spec)
        prep = begin_extraction(spec, settings, reporter, key=job["extract_key"], resolved=resolved)
        # Join this job's lock; if its lease lapsed (every shard worker died or stalled), take it again, or wait
        # for the job that took the entry over in the meantime.
        complete = lambda: prep.entry.is_complete  # noqa: E731
        if (
            not complete()
            and not lock.adopt()
            and not acquire_or_wait(lock, complete, on_wait=_wait_notice(reporter, prep.key))
        ):
            return _hit(store, job_id, prep, reporter, t0, job.get("owner"))
        batches = shard_batches(prep.entry.pending_batches(), index, count)
        if batches:
            try:
                run = extract_batches(prep, spec, _LockedReporter(store, job_id, lock), batches, settings)
            except Exception as e:
                _give_back(settings, prep, reporter, e)
                raise
            store.update_job(
                job_id,
                lambda j: j.update(
                    metrics={
                        **j["metrics"],
                        "backbone_forwards": j["metrics"].get("backbone_forwards", 0) + run["backbone_forwards"],
                    }
                ),
            )
            reporter.event(
                f"shard {index + 1}/{count}: wrote {len(batches)} batches ({run['images_extracted']} "
                f"images) in {run['seconds']:.1f}s on {socket.gethostname()}-{os.getpid()}"
            )
        if prep.entry.pending_batches():
            lock.detach()  # the shards still writing renew it
            return None
        summary = finish_extraction(prep)
        lock.release()
        seconds = now() - store.get_job(job_id).get("extract_started_at", now())
        result = {
            "cache_key": prep.key,
            "cache_hit": False,
            "images": len(prep.dataset),
            "extract_seconds": round(seconds, 3),
            "extract_images_per_s": round(len(prep.dataset) / max(seconds, 1e-9), 2),
            **summary,
        }
        if _mark_extracted(store, job_id, cache_key=prep.key, metrics=result):
            reporter.event(f"extraction complete: {len(prep.dataset)} images in {seconds:.1f}s over {count} shards")
            return TRAIN_NEXT
        return None
    except Cancelled:
        lock.release()
        return cancelled(store, job_id)
    except JobEnded:
        lock.release()
        return None
    except Exception as e:
        lock.release()
        return failed(store, job_id, e)
