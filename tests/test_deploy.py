"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here): the topology of
`sidetune serve`, the store given to every service, the GPU where predictions and workers run, and an API image that
leaves out torch and nothing the control plane imports."""

from __future__ import annotations

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
    assert set(services) == {"redis", "api", "inference", "extract-worker", "train-worker"}
    for name in ("api", "inference", "extract-worker", "train-worker"):
        env = services[name]["environment"]
        assert env["SIDETUNE_STORE_URL"] and env["SIDETUNE_REDIS_URL"].startswith("redis://"), name
    for name in ("inference", "extract-worker", "train-worker"):
        assert services[name]["environment"]["SIDETUNE_DEVICE"] == "cuda", name
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"], name
    assert services["inference"]["command"] == ["sidetune", "inference"]
    assert services["api"]["build"]["target"] == "api" and "deploy" not in services["api"]
    assert services["api"]["environment"]["SIDETUNE_INFERENCE_URL"] == "http://inference:8001"


def test_the_api_image_leaves_out_torch_and_nothing_the_api_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["s3"]
    pattern = re.search(r"grep -v -E '([^']+)'", (ROOT / "Dockerfile").read_text()).group(1)
    dropped = {_name(r) for r in requirements if re.match(pattern, r)}
    assert {"torch", "timm", "peft"} <= dropped

    code = "import sys, json, api.main; api.main.app.openapi(); print(json.dumps(sorted(sys.modules)))"
    modules = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=ROOT).stdout)  # fmt: skip
    dists = packages_distributions()
    imported = {_name(d) for m in modules for d in dists.get(m.split(".")[0], [])}
    assert not imported & dropped, imported & dropped


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement)[0].lower().replace("_", "-")
