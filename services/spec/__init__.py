"""The job spec: what a user submits to `POST /jobs`, one module per part (dataset, backbone, extraction, training,
the job as a whole). Torch-free, so the API validates it without loading ML code. Method-specific fields live in each
method's config (services/methods/<name>/config.py), the sweep's in services/spec/sweep.py.
"""

from services.errors import SpecError
from services.spec.backbone import BackboneSpec
from services.spec.dataset import DatasetSpec
from services.spec.extraction import EveryKth, ExtractionSpec, LastK, LayerChoice, select_cached_layers
from services.spec.fields import NO_NUL, SEED_MAX
from services.spec.job import JobSpec, Mode
from services.spec.training import ExecutionSpec, Hyperparameters, TrainingSpec

__all__ = [
    "NO_NUL",
    "SEED_MAX",
    "BackboneSpec",
    "DatasetSpec",
    "EveryKth",
    "ExecutionSpec",
    "ExtractionSpec",
    "Hyperparameters",
    "JobSpec",
    "LastK",
    "LayerChoice",
    "Mode",
    "SpecError",
    "TrainingSpec",
    "select_cached_layers",
]
