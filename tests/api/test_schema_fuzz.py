"""Hostile input: schemathesis generates requests for every operation of the OpenAPI schema (valid and invalid
bodies, odd paths and headers); none may get a 5xx. Runs in process against the real app and a real Redis; the
predict operations the API forwards reach a real inference service (uvicorn, in a thread).

Operations are driven through `as_strategy()` and hypothesis directly: schemathesis's pytest fixture loader
(`from_fixture`) does not work with pytest 9.2.
"""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.inference import create_inference_app
from api.main import create_app
from storage.settings import Settings
from tests.helpers import serve


def test_no_input_gets_a_server_error(tmp_path, redis_url, digits_root):
    # A Redis database of its own: the jobs this creates are queued for no worker and must not reach other tests'.
    app_settings = Settings(
        data_dir=tmp_path,
        redis_url=redis_url.rsplit("/", 1)[0] + "/7",
        allowed_roots=[digits_root.parent],
        max_request_mb=1,
    )
    with serve(create_inference_app(app_settings)) as inference:
        _fuzz(create_app(app_settings.model_copy(update={"inference_url": inference})))


def _fuzz(app) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # /readyz answers 503 by design here (no workers run): its status reports the deployment, not the input.
    operations = [op for op in (result.ok() for result in schema.get_all_operations()) if op.path != "/readyz"]
    assert len(operations) >= 8

    for operation, mode in itertools.product(operations, GenerationMode):  # schema-valid and schema-violating

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:  # nothing violates the schema of e.g. a lone string path parameter
            continue
        except Exception as e:
            raise AssertionError(f"{operation.label} ({mode.value}): {e}") from e


def test_stateful_sequences_get_no_server_error(tmp_path, redis_url, digits_root):
    """Schemathesis's stateful mode: sequences of calls that follow the links between operations (inferred from the
    schema: a job's, dataset's or model's id from one answer into the next request's path), a bounded number of
    scenarios and steps; no call of any sequence may get a 5xx."""
    import hypothesis

    app_settings = Settings(
        data_dir=tmp_path,
        redis_url=redis_url.rsplit("/", 1)[0] + "/7",
        allowed_roots=[digits_root.parent],
        max_request_mb=1,
    )
    with serve(create_inference_app(app_settings)) as inference:
        app = create_app(app_settings.model_copy(update={"inference_url": inference}))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        Machine = schema.as_state_machine()  # infers the links from the schema's dependencies, and adds them
        links = sum(len(v) for v in _transitions(schema).values())
        assert links >= 4, "no links between operations: the state machine would test single calls only"

        class NoServerErrors(Machine):
            def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
                case.validate_response(response, checks=[not_a_server_error], transport_kwargs=kwargs or None)

        bounded = hypothesis.settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        NoServerErrors.run(settings=bounded)


def _transitions(schema) -> dict:
    """The links between operations that the state machine follows, by target operation."""
    from schemathesis.specs.openapi.stateful import collect_transitions

    operations = [result.ok() for result in schema.get_all_operations()]
    return {label: entry.incoming for label, entry in collect_transitions(operations).operations.items()}
