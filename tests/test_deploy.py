"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here): the topology of
`sidetune serve`, the store given to every service, the GPU where predictions and workers run, an API image that
leaves out torch and nothing the control plane imports, and a runtime image with the `mlflow` extra."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_the_inference_service_on_the_gpu_and_gives_every_service_the_store() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"redis", "api", "inference", "extract-worker", "train-worker"}  # the `s3` profile's aside
    for name in ("api", "inference", "extract-worker", "train-worker"):
        env = services[name]["environment"]
        assert env["SIDETUNE_STORE_URL"] and env["SIDETUNE_REDIS_URL"].startswith("redis://"), name
    for name in ("inference", "extract-worker", "train-worker"):
        assert services[name]["environment"]["SIDETUNE_DEVICE"] == "cuda", name
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"], name
    assert services["inference"]["command"] == ["sidetune", "inference"]
    assert services["api"]["build"]["target"] == "api" and "deploy" not in services["api"]
    assert services["api"]["environment"]["SIDETUNE_INFERENCE_URL"] == "http://inference:8001"


def test_the_s3_profile_is_an_object_store_every_service_reads_with_the_same_credentials() -> None:
    """`docker compose --profile s3 up`: MinIO, whose root user is the AWS_* credentials that every sidetune service
    passes through from the host (never written in the file), and the allowed prefixes of object-store datasets.
    (The whole file is checked against the Compose Specification below.)"""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {n for n, s in services.items() if s.get("profiles") == ["s3"]} == {"minio", "minio-init"}
    minio = services["minio"]["environment"]
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        "${AWS_ACCESS_KEY_ID:-}",
        "${AWS_SECRET_ACCESS_KEY:-}",
    )
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "minio-data" in compose["volumes"]
    for name in ("api", "inference", "extract-worker", "train-worker"):
        env = services[name]["environment"]
        assert env["SIDETUNE_ALLOWED_PREFIXES"] == "${SIDETUNE_ALLOWED_PREFIXES:-}", name
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
            assert var in env and env[var] is None, (name, var)  # from the host's environment, when set there


def _compose_spec_errors(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose Specification's schema, which it vendors (no network needed)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_docker_compose_yml_follows_the_compose_specification(tmp_path: Path) -> None:
    """No Docker engine runs here, so `docker compose config` cannot check the file; the specification's JSON schema
    can. A file that breaks it is refused, so the check is not vacuous."""
    checked = _compose_spec_errors(ROOT / "docker-compose.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["api"]["deploy"] = "one replica"  # deploy is a mapping
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    refused = _compose_spec_errors(tmp_path / "docker-compose.yml")
    assert refused.returncode == 1 and "$.services.api.deploy" in refused.stdout, refused.stdout + refused.stderr


def _extras(target: str) -> set[str]:
    """The extras whose requirements the Dockerfile installs in `target`: those its stage names, and the base's."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    stages = dict(zip(parts[1::2], parts[2::2], strict=True))
    return {
        e for stage in ("base", target) for e in re.findall(r"\['optional-dependencies'\]\['(\w+)'\]", stages[stage])
    }


@functools.cache
def _api_imports() -> frozenset[str]:
    """The distributions whose modules the API loads (its app built, its OpenAPI document made)."""
    code = "import sys, json, api.main; api.main.app.openapi(); print(json.dumps(sorted(sys.modules)))"
    modules = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    )
    dists = packages_distributions()
    return frozenset(_name(d) for m in modules for d in dists.get(m.split(".")[0], []))


def test_the_api_image_leaves_out_torch_and_nothing_the_api_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [r for extra in sorted(_extras("api")) for r in extras[extra]]
    pattern = re.search(r"grep -v -E '([^']+)'", (ROOT / "Dockerfile").read_text()).group(1)
    dropped = {_name(r) for r in requirements if re.match(pattern, r)}
    assert {"torch", "timm", "peft", "onnx"} <= dropped
    assert not _api_imports() & dropped, _api_imports() & dropped


def test_the_runtime_image_has_the_mlflow_extra_and_the_api_image_has_not() -> None:
    """The inference service writes `format=mlflow` exports and the train workers track to MLflow
    (SIDETUNE_MLFLOW_TRACKING_URI): the runtime image installs the `mlflow` extra. The API imports neither mlflow nor
    onnxruntime, so its image installs neither."""
    assert _extras("runtime") == {"s3", "hf", "mlflow"}
    assert _extras("api") == {"s3", "hf"}
    mlflow = {
        _name(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["mlflow"]
    }
    assert mlflow == {"mlflow", "onnxruntime"} and not _api_imports() & mlflow


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement)[0].lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            pins[_canonical(m[1])] = m[2]
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_at_or_above_its_lower_bound_as_installed() -> None:
    """requirements.lock holds every dependency (the extras too) at a version >= pyproject's lower bound, and it is
    what the tests run with: the installed version of each direct dependency is the pinned one."""
    from importlib.metadata import version

    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([^,;\s]+)$", requirement)
        assert m, f"{requirement}: every dependency has a lower bound (name>=version)"
        name, low = _canonical(m[1]), m[3]
        assert name in pins, f"{name} is not in requirements.lock: regenerate it (README)"
        assert Version(pins[name]) >= Version(low), (name, pins[name], low)
        assert version(name) == pins[name], f"{name} {version(name)} is installed, the lock says {pins[name]}"


def test_readme_ci_and_dockerfile_install_from_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")][:2]
    assert len(commands) == 2 and all("pip install -c requirements.lock -e " in c for c in commands)
    assert "-m pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'grep -m1 -- "-m pytest" README.md' in ci  # CI runs the README's test command verbatim
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("pip install --no-cache-dir -c requirements.lock") == 2
    assert "requirements.lock" in dockerfile.split("COPY pyproject.toml", 1)[1].splitlines()[0]
