"""The plan step of a job (queue `extract`), and the planner's verdict as errors. `POST /jobs` validates the spec,
checks its paths and the key's quotas, records the job `planning` and enqueues this step, so that the request answers
at once whatever the dataset's size; the step reads the dataset (services/jobs/resolved.py: `resolve`, through
planner.py: `plan_job`), records the resolved job exactly as the request once did (a large split in the store), moves
the job to `queued` and asks for the extract step. A plan that refuses the job fails it with the code and message
`POST /jobs?dry_run=true` answers with (the one path that still plans inside the request, to show the plan).

Idempotent (check, do, mark done last): the resolved job and the status `queued` are written together, in one
transaction that also checks the job is still `planning`, so a redelivered step or a job cancelled meanwhile never
enqueues the extract step twice, or at all. Torch-free: the API imports the verdict from here.
"""

from __future__ import annotations

from services.architectures import architecture
from services.backprop import backprop_memory
from services.data.datasets import DatasetError, format_for
from services.errors import UserError
from services.jobs import planner, quotas
from services.jobs.plan import Plan
from services.jobs.resolved import ResolvedJob, save_split
from services.jobs.steps import EXTRACT_NEXT, Next, cancelled, failed, on_this_machine
from services.modality import modality_for
from services.spec import JobSpec
from services.spec.sweep import check_size
from storage.redis import TERMINAL, JobRecord, JobStore
from storage.settings import Settings


class PlanRefused(UserError):
    """The planner refuses the job: its dataset cannot be used, its cache or its backpropagation cannot fit, or its
    layers or tokens do not suit the backbone. `code` and the message are what the job's failure (or a dry run's 422)
    carries."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Refuse in the request what the planner would refuse without reading the dataset (PlanRefused, as a dry run
    answers): a sweep over the settings' cap, cached layers or tokens the backbone or the method rule out, and
    backpropagation that cannot fit the device's memory. The plan step checks them again with the rest."""
    arch = architecture(spec.backbone.name, spec.backbone.image_size, spec.backbone.video)
    try:
        check_size(spec.grid(), settings.max_sweep_configs)
        if spec.needs_cache and arch is not None:
            spec.cached_layers_and_tokens(arch.num_layers, arch.global_pool)
    except ValueError as e:
        raise PlanRefused("invalid_request", str(e)) from None
    memory = backprop_memory(spec, arch, settings.device_memory_gb)
    if memory is not None and memory.fits is False:
        raise PlanRefused("does_not_fit_memory", planner.memory_message(memory))


def plan_checked(spec: JobSpec, settings: Settings) -> tuple[Plan, ResolvedJob]:
    """`planner.plan_job` with a dataset or spec it cannot plan as PlanRefused (`invalid_dataset` naming the field,
    `invalid_request`); a forbidden or missing path stays what it is (403 `forbidden_path`, 422 `not_found`)."""
    try:
        return planner.plan_job(spec, settings)
    except DatasetError as e:
        raise PlanRefused("invalid_dataset", f"{e.field}: {e}") from None
    except ValueError as e:  # cached layers or tokens that the backbone or the method rule out
        raise PlanRefused("invalid_request", str(e)) from None


def check_fit(plan: Plan) -> None:
    """Refuse a job whose backpropagation or feature cache cannot fit (`does_not_fit_memory`, `cache_over_quota`)."""
    if plan.memory_fits is False:
        raise PlanRefused("does_not_fit_memory", plan.message)
    if plan.fits is False:
        # 422 where it answers, not 413 (the request body is small) nor 507 (a 5xx blames the server and invites a
        # retry): this spec asks for more than the server allows, and only changing the spec (or the quota) helps.
        raise PlanRefused("cache_over_quota", plan.message)


def _mark_planned(store: JobStore, job_id: str, resolved: ResolvedJob, dataset_format: str) -> bool:
    """Record the resolved job (and the format its dataset was read in, for the page) and move the job to `queued`,
    if it is still `planning` (not cancelled, not planned by another delivery of this step); True for the one caller
    that did."""
    flipped = False

    def change(job: JobRecord) -> None:
        nonlocal flipped
        flipped = job["status"] == "planning" and not job.get("cancel_requested")
        if flipped:
            job.update(status="queued", resolved=resolved.record(), dataset_format=dataset_format)

    store.update_job(job_id, change)
    return flipped


def plan_step(store: JobStore, settings: Settings, job_id: str) -> Next:
    """Plan the job in the worker: resolve it (reading the whole dataset), refuse what does not fit or passes the
    key's cache quota, store its split, record it `queued` and ask for the extract step."""
    job = store.get_job(job_id)
    if job["status"] != "planning":
        return None  # planned already (a redelivered task), or ended: cancelled, failed
    if job.get("cancel_requested"):
        return cancelled(store, job_id)
    try:
        spec = JobSpec.model_validate(job["spec"])
        here = on_this_machine(spec, settings)
        plan, resolved = plan_checked(here, settings)
        check_fit(plan)
        quotas.check_submission(plan, settings, store, job.get("owner"))  # the key's models and feature cache
        resolved = resolved.model_copy(update={"spec": spec})  # the spec as recorded (the API's paths of uploads)
        if store.get_job(job_id)["status"] in TERMINAL:  # cancelled while reading: nothing written for it
            return None
        save_split(settings, job_id, resolved)  # the codes first: a record never names a file that is not there
        dataset_format = format_for(here.dataset.path or "", here.dataset.format).name  # `auto` as it was read
        if not _mark_planned(store, job_id, resolved, dataset_format):
            return None
        store.add_event(
            job_id,
            f"planned: {resolved.images} {modality_for(spec.backbone).items}, {resolved.split.train} "
            f"training, {resolved.split.val} validation, {resolved.test_images} test; {plan.message}",
        )
        return EXTRACT_NEXT
    except Exception as e:
        return failed(store, job_id, e)
