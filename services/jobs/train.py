"""The train step of a job (queue `train`): train from the pinned cache entry (or images), save the model's artifact
(its completion marker last), register the model and mark the job succeeded. Idempotent: a repeated step finds the
model saved and only registers it. One at a time: a step sent twice (a worker that died between sending it and marking
the hand-off, worker/tasks.py; a step requeued from a worker that only seemed dead) waits on the first one's lease.
"""

from __future__ import annotations

from contextlib import nullcontext

from services.jobs import quotas
from services.jobs.progress import Cancelled, JobReporter
from services.jobs.resolved import recorded
from services.jobs.steps import cancelled, fail, failed, on_this_machine
from services.models.manifest import Manifest
from services.spec import JobSpec
from services.training import reports
from services.training.package import Packaged
from storage.artifacts import ArtifactStore
from storage.cache import CacheError, FeatureCache
from storage.redis import TERMINAL, JobStore, NotFound, model_id_for, now
from storage.redis.locks import acquire_or_wait
from storage.settings import Settings

# the PNGs every model has (services/training/plots.py), at GET /models/{id}/plots/{name}.png
PLOTS = ("confusion", "curves")


def model_files(out: Packaged) -> dict[str, bytes]:
    """The files saved beside a trained model's weights: its evaluation report and its plots."""
    return {
        "evaluation.json": reports.encode(out["evaluation"]),
        **{f"plots/{name}.png": png for name, png in out["plots"].items()},
    }


def train_step(store: JobStore, settings: Settings, job_id: str) -> None:
    """Train the job under its lease. A second step for it waits while the first holds the lease; it returns once the
    job has ended, or takes over (from the checkpoint) when the first's lease lapses because its worker died."""
    told = False

    def ended() -> bool:
        try:
            return store.get_job(job_id)["status"] in TERMINAL
        except NotFound:  # deleted meanwhile
            return True

    def waiting(_waited_s: float) -> None:
        nonlocal told
        if not told:
            store.add_event(job_id, "this job's train step was sent twice: the second waits for the first to end")
            told = True

    lock = store.train_lock(job_id)
    if not acquire_or_wait(lock, ended, on_wait=waiting):
        return
    try:
        _train(store, settings, job_id)
    finally:
        lock.release()


def _train(store: JobStore, settings: Settings, job_id: str) -> None:
    from services.training.job import train_job
    from services.training.mlflow_runs import MlflowJob
    from services.training.wandb_logger import WandbJob

    job = store.get_job(job_id)
    if job["status"] in TERMINAL:
        return
    if job.get("cancel_requested"):
        return cancelled(store, job_id)
    if not job.get("extracted"):
        return fail(store, job_id, RuntimeError("the extraction step did not finish"))
    artifacts = ArtifactStore.from_settings(settings)
    model_id = model_id_for(job_id)
    store.set_fields(job_id, status="training")
    store.add_event(job_id, "training started")
    try:
        spec = JobSpec.model_validate(job["spec"])
        if not artifacts.has_model(model_id):
            quotas.check_models(store, settings, job.get("owner"))  # its models may have reached it since submission
            if not spec.needs_cache:  # trains on images: read from this machine's copy
                spec = on_this_machine(spec, settings)
            # the split and the rest decided at submission; a job recorded before that is resolved now
            resolved = recorded(store, settings, job, lambda: on_this_machine(spec, settings), load_split=True)
            ckpt = artifacts.checkpoints(job_id)
            key = job.get("cache_key")
            # Pinned while training reads it, so eviction never removes it underneath.
            with store.pin(key, holder=job_id) if key else nullcontext() as pin:
                if key and not (pin.held and FeatureCache(settings.cache_location).entry(key).is_complete):
                    raise CacheError(
                        f"the feature cache entry {key} was evicted before training; submit the job "
                        "again (it will extract anew), or raise SIDETUNE_CACHE_QUOTA_GB"
                    )
                runs = artifacts.tensorboard(job_id)
                mlflow = MlflowJob.of(settings, job_id, model_id, spec.name, job.get("owner"))
                wandb = WandbJob.of(settings, job_id, model_id, spec.name, job.get("owner"))
                out = train_job(spec, settings, key, JobReporter(store, job_id), ckpt, resolved, runs, mlflow, wandb)
            files = model_files(out)
            artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"], files)
        artifacts.check_model(model_id)
        manifest = Manifest.from_artifact(artifacts, model_id)
        metrics = artifacts.read_json(model_id, "metrics.json")
        report = artifacts.read_json(model_id, "evaluation.json")
        size = sum(artifacts.model(model_id).files().values())  # counts against the key's models quota
    except Cancelled:
        return cancelled(store, job_id)
    except Exception as e:
        return failed(store, job_id, e)
    store.register_model(
        {
            "id": model_id,
            "object": "model",
            "created_at": now(),
            "job_id": job_id,
            "owner": job.get("owner"),
            "name": spec.name,
            "method": manifest.method.name,
            "mode": manifest.mode,
            "backbone": manifest.backbone.name,
            "video": manifest.video.model_dump() if manifest.video else None,
            "classes": manifest.classes,
            "multi_label": manifest.multi_label,
            "threshold": manifest.threshold,
            "metrics": metrics,
            "evaluation": {"split": report["split"], "images": report["images"], **report["metrics"]},
            "plots": sorted(PLOTS),
            "size_bytes": size,
        }
    )
    store.update_job(
        job_id,
        lambda j: j.update(
            status="succeeded", model_id=model_id, finished_at=now(), metrics={**j["metrics"], **metrics}
        ),
    )
    metric = "val_map" if "val_map" in metrics else "val_accuracy"
    store.add_event(job_id, f"succeeded: model {model_id}, {metric.replace('_', ' ')} {metrics[metric]:.4f}")
    if settings.checkpoint_retention_h == 0:
        artifacts.drop_checkpoints(job_id)  # else kept for the retention (services/jobs/retention.py removes it)
