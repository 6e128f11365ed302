"""What every record in Redis shares: ids that sort by creation time, timestamps, and `NotFound`."""

from __future__ import annotations

import os
import time


class NotFound(KeyError):
    """No record with that id."""


def new_id(prefix: str) -> str:
    """Ids that sort roughly by creation time (`job_<ms hex><random hex>`)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(5).hex()}"


def model_id_for(job_id: str) -> str:
    """One model per job, with an id derived from the job's, so a repeated train step writes the same model."""
    return "model_" + job_id.removeprefix("job_")


def job_id_for(model_id: str) -> str:
    """The job that trains (or trained) the model of this id."""
    return "job_" + model_id.removeprefix("model_")


def now() -> float:
    return round(time.time(), 3)
