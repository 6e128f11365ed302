"""The steps of a job, as the Celery tasks run them: plan, extract, then train. Each is idempotent (check,
do, mark done last): a redelivered or repeated step finds its work done and returns, a crashed one resumes
from what was finished (cache batches, training checkpoints).

One module per step (planning.py, extract.py, train.py) and what they share (steps.py); this one names what the task
layer (worker/tasks.py) calls.
"""

from services.jobs.extract import extract_shard_step, extract_step
from services.jobs.planning import plan_step
from services.jobs.steps import EXTRACT_NEXT, TRAIN_NEXT, Next, fail
from services.jobs.train import PLOTS, model_files, train_step
from storage.redis import model_id_for

__all__ = [
    "EXTRACT_NEXT",
    "PLOTS",
    "TRAIN_NEXT",
    "Next",
    "extract_shard_step",
    "extract_step",
    "fail",
    "model_files",
    "model_id_for",
    "plan_step",
    "train_step",
]
