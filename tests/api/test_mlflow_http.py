"""MLflow tracking on the real topology: a job submitted over HTTP to a stack whose train worker has
SIDETUNE_MLFLOW_TRACKING_URI (a Redis, both workers and the API as processes; the server reached through a proxy in
this process, tests/tcp_proxy.py) has its run on the `mlflow server`, read through its REST API: tagged with the job
and its model, its params, its per-epoch metrics and its artifacts. With the server unreachable the job succeeds and
its events say once that tracking stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from services.data.digits import write_digits
from storage.redis_server import RedisServer
from storage.settings import Settings
from tests.mlflow_server import MlflowServer, Rest
from tests.tcp_proxy import TcpProxy
from worker.client import Client
from worker.launcher import Stack, free_port

EXPERIMENT = "sidetune-http"


class Tracked(NamedTuple):
    client: Client
    proxy: TcpProxy  # between the train worker and the MLflow server
    data: Path


@pytest.fixture(scope="module")
def tracked(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracked]:
    """The stack without the inference service (no test here predicts), its MLflow server behind `proxy`."""
    data = tmp_path_factory.mktemp("mlflow-stack")
    write_digits(data / "datasets" / "digits", limit=150)
    redis = RedisServer(data / "redis", free_port()).start()
    proxy = TcpProxy(mlflow_server.port).start()
    settings = Settings(
        data_dir=data,
        redis_url=redis.url,
        api_port=free_port(),
        device="cpu",
        mlflow_tracking_uri=proxy.url,
        mlflow_experiment=EXPERIMENT,
    )
    stack = Stack(settings, log_dir=data / "logs")
    try:
        for name, queue in (("extract-worker", "extract"), ("train-worker", "train")):
            stack.spawn(name, "worker", "--queues", queue)
        stack.spawn("api", "api")
        stack.wait_ready(180, urls=[f"{stack.api_url}/readyz"])
        yield Tracked(Client(stack.api_url), proxy, data)
    finally:
        stack.stop()
        proxy.stop()
        redis.stop()


def tiny_job(tracked: Tracked) -> dict:
    return {
        "name": "tracked digits",
        "dataset": {"path": str(tracked.data / "datasets" / "digits" / "train")},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
        "method": {"name": "linear", "solver": "sgd"},
        "training": {"epochs": 2},
    }


def test_a_jobs_run_is_on_the_server(tracked: Tracked, mlflow_server: MlflowServer) -> None:
    client = tracked.client
    job = client.wait(client.submit(tiny_job(tracked))["id"], timeout_s=600, poll_s=0.2)
    assert job["status"] == "succeeded", job["error"]
    assert not [e for e in client.events(job["id"]) if "tracking stopped" in e["message"]]
    rest = Rest(mlflow_server.url)
    [run] = rest.runs(EXPERIMENT, job["id"])
    run_id = run["info"]["run_id"]
    assert run["info"]["run_name"] == "tracked digits" and run["info"]["status"] == "FINISHED"
    assert run["tags"]["sidetune.model_id"] == job["model_id"]
    assert run["params"]["method"] == "linear" and run["params"]["epochs"] == "2"
    model = client.model(job["model_id"])
    history = model["metrics"]["history"]
    assert rest.history(run_id, "train/loss") == [(r["epoch"], pytest.approx(r["train_loss"])) for r in history]
    assert [s for s, _ in rest.history(run_id, "val/accuracy")] == [1, 2]
    evaluation = {k: v for k, v in model["evaluation"].items() if k not in ("split", "images")}
    assert evaluation["val_accuracy"] and model["evaluation"]["split"] == "val"  # no test split: named so
    assert {k: run["metrics"][k] for k in evaluation} == pytest.approx(evaluation)
    assert len(rest.history(run_id, "val_accuracy")) == 1  # the report on validation, not beside the best epoch's
    assert {"evaluation.json", "plots/confusion.png", "plots/curves.png"} <= set(rest.artifacts(run_id))


def test_a_server_out_of_reach_stops_tracking_not_the_job(tracked: Tracked, mlflow_server: MlflowServer) -> None:
    client = tracked.client
    tracked.proxy.stop()  # the port refuses connections, as a server that went away
    try:
        job = client.wait(client.submit(tiny_job(tracked))["id"], timeout_s=600, poll_s=0.2)
    finally:
        tracked.proxy.start()
    assert job["status"] == "succeeded", job["error"]
    stopped = [e for e in client.events(job["id"]) if "tracking stopped" in e["message"]]
    assert len(stopped) == 1 and stopped[0]["level"] == "warning", stopped
    assert stopped[0]["message"].startswith("MLflow tracking stopped (")
    assert not Rest(mlflow_server.url).runs(EXPERIMENT, job["id"])
