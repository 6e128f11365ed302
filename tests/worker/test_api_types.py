"""The client's view of the API's JSON (worker/api_types.py) against the server's own models: every key the client
names is one the server answers or takes, and the keys it requires are those every answer holds. (The real answers
are checked against it in tests/worker/test_cli.py.)"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from pydantic import BaseModel

from api import schemas
from services.jobs.plan import Plan
from services.methods import CONFIGS
from services.spec import JobSpec
from services.spec.backbone import BackboneSpec
from services.spec.dataset import DatasetSpec
from services.spec.sweep import SweepSpec
from services.spec.training import ExecutionSpec, TrainingSpec
from services.video.spec import VideoSpec
from tests.helpers import keys, shaped
from worker import api_spec as spec_bodies
from worker import api_types as client


def fields(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


# Answered through the route's response model, which fills in every field: every key is in every answer.
WHOLE = [
    (client.Job, schemas.Job),
    (client.JobError, schemas.JobError),
    (client.Checkpoint, schemas.Checkpoint),
    (client.CheckpointList, schemas.CheckpointList),
    (client.Model, schemas.Model),
    (client.Prediction, schemas.Prediction),
    (client.ModelPredictions, schemas.PredictResponse),
    (client.Dataset, schemas.Dataset),
    (client.CacheEntry, schemas.CacheEntryInfo),
    (client.CacheList, schemas.CacheList),
    (client.Ready, schemas.Ready),
]
# The evaluation page is the report as written (no response model): keys only some reports have are NotRequired.
PAGE = [
    (client.Evaluation, schemas.Evaluation),
    (client.PerClass, schemas.PerClass),
    (client.SparseConfusion, schemas.SparseConfusion),
    (client.Confusion, schemas.Confusion),
]


@pytest.mark.parametrize(("view", "model"), WHOLE, ids=[v.__name__ for v, _ in WHOLE])
def test_an_answer_through_a_response_model_holds_every_key(view: type, model: type[BaseModel]) -> None:
    assert keys(view) == fields(model)
    assert view.__required_keys__ == keys(view)


@pytest.mark.parametrize(("view", "model"), PAGE, ids=[v.__name__ for v, _ in PAGE])
def test_the_evaluation_page_requires_what_every_report_has(view: type, model: type[BaseModel]) -> None:
    assert keys(view) == fields(model)
    optional = {f.alias or name for name, f in model.model_fields.items() if not f.is_required()}
    assert view.__optional_keys__ <= optional


def test_the_summaries_name_the_fields_the_server_declares() -> None:
    assert {"stage", "done", "total"} == client.Progress.__required_keys__ == fields(schemas.Progress)
    assert {"split", "images"} == client.EvaluationSummary.__required_keys__ == fields(schemas.EvaluationSummary)
    assert keys(client.CacheMeta) == keys(schemas.CacheMeta)
    assert keys(client.Plan) <= fields(Plan) and "message" in keys(client.Plan)


@pytest.mark.parametrize(
    ("view", "model"),
    [
        (spec_bodies.JobSpecBody, JobSpec),
        (spec_bodies.DatasetBody, DatasetSpec),
        (spec_bodies.BackboneBody, BackboneSpec),
        (spec_bodies.VideoBody, VideoSpec),
        (spec_bodies.TrainingBody, TrainingSpec),
        (spec_bodies.ExecutionBody, ExecutionSpec),
        (client.SweepConfig, SweepSpec),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_spec_the_client_builds_is_one_the_server_takes(view: type, model: type[BaseModel]) -> None:
    assert keys(view) <= fields(model)
    assert view.__required_keys__ == {name for name, f in model.model_fields.items() if f.is_required()}


def test_the_method_s_settings_are_a_method_s() -> None:
    assert spec_bodies.MethodBody.__required_keys__ == {"name"}
    assert keys(spec_bodies.MethodBody) - {"name"} <= fields(CONFIGS["losa"])


def test_shaped_names_a_missing_or_unknown_key() -> None:
    answer = {"code": "not_found", "message": "no job"}
    shaped(answer, client.JobError)
    with pytest.raises(AssertionError, match="lacks"):
        shaped({"code": "x"}, client.JobError)
    with pytest.raises(AssertionError, match="does not name"):
        shaped({**answer, "extra": 1}, client.JobError)


def test_the_client_imports_nothing_of_the_server() -> None:
    """The client and its types load no module of api/, services/ or storage/ (nor torch): a machine with the client
    alone talks to the API."""
    code = "import sys, worker.client; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not set(ast.literal_eval(out)) & {"api", "services", "storage", "torch"}
