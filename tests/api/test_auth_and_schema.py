"""API keys (Bearer), per-key isolation of jobs, a torch-free control plane, and a described OpenAPI schema."""

from __future__ import annotations

import subprocess
import sys

import httpx
from fastapi.testclient import TestClient

from api.main import create_app
from storage.settings import Settings
from tests.helpers import serve


def client_for(tmp_path, redis_url, digits_root) -> tuple[TestClient, dict]:
    settings = Settings(
        data_dir=tmp_path, redis_url=redis_url, api_keys=["key-a", "key-b"], allowed_roots=[digits_root]
    )
    body = {
        "dataset": {"path": str(digits_root / "train")},
        "backbone": {"name": "test_vit"},
        "method": {"name": "linear"},
    }
    return TestClient(create_app(settings)), body


def test_keys_required_and_jobs_isolated_per_key(tmp_path, redis_url, digits_root):
    client, body = client_for(tmp_path, redis_url, digits_root)
    assert client.get("/healthz").status_code == 200  # liveness needs no key
    r = client.post("/jobs", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401

    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    job = client.post("/jobs", json=body, headers=a).json()
    assert client.get(f"/jobs/{job['id']}", headers=a).status_code == 200
    assert client.get(f"/jobs/{job['id']}", headers=b).status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/jobs", headers=b).json()["data"]]
    assert client.post(f"/jobs/{job['id']}/cancel", headers=b).status_code == 404
    assert client.post(f"/jobs/{job['id']}/cancel", headers=a).json()["status"] == "cancelled"  # still queued


def test_a_key_of_non_ascii_bytes_is_a_401_and_a_non_ascii_key_works(tmp_path, redis_url):
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=["key-a", "clé"])
    with serve(create_app(settings)) as url:  # real HTTP: the test client re-encodes header bytes
        for token in (b"Bearer \xff\xfe", b"Bearer cl\xe9", b"\xff"):  # compare_digest refused non-ASCII text: 500
            r = httpx.get(f"{url}/jobs", headers={"Authorization": token}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert httpx.get(f"{url}/jobs", headers={"Authorization": "Bearer clé".encode()}, timeout=30).status_code == 200


def test_control_plane_imports_no_torch():
    code = (
        "import sys, api.main\n"
        "api.main.app.openapi()  # the forwarded operations' docs come from the inference app's routes\n"
        "heavy = ('torch', 'timm', 'torchvision', 'peft', 'onnx', 'onnxscript', 'tensorboardX', 'tensorboard',\n"
        "         'mlflow', 'wandb')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_path_with_a_nul_byte_is_refused_by_the_schema(tmp_path, redis_url, digits_root):
    client, body = client_for(tmp_path, redis_url, digits_root)
    nul = {**body, "dataset": {"path": "/data/\x00x"}}
    r = client.post("/jobs", json=nul, headers={"Authorization": "Bearer key-a"})
    assert r.status_code == 422 and "dataset.path" in r.json()["error"]["message"]


def test_every_schema_field_is_described(tmp_path, redis_url, digits_root):
    client, _ = client_for(tmp_path, redis_url, digits_root)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    undocumented = [
        f"{name}.{field}"
        for name, schema in schemas.items()
        if not name.startswith(("HTTPValidationError", "ValidationError", "Body_"))
        for field, prop in schema.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert undocumented == []


def test_every_operation_parameter_and_response_is_described(tmp_path, redis_url, digits_root):
    client, _ = client_for(tmp_path, redis_url, digits_root)
    paths = client.get("/openapi.json").json()["paths"]
    missing = []
    for path, operations in paths.items():
        for method, op in operations.items():
            if not op.get("description"):
                missing.append(f"{method} {path}")
            missing += [
                f"{method} {path} {p['name']}"
                for p in op.get("parameters", [])
                if not (p.get("description") or p.get("schema", {}).get("description"))
            ]
            missing += [f"{method} {path} -> {code}" for code, r in op["responses"].items() if not r.get("description")]
    assert missing == []
    # the lifecycle and export operations are there, as the API forwards or serves them
    for path, method in (
        ("/models/{model_id}/export", "get"),
        ("/models/{model_id}", "delete"),
        ("/jobs/{job_id}", "delete"),
        ("/jobs/{job_id}/checkpoints", "get"),
        ("/jobs/{job_id}/checkpoints/{name}", "get"),
    ):
        assert method in paths[path], (method, path)
