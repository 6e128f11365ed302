"""Video over HTTP. End to end against the real processes (`stack`): a zip of videos uploaded, a LoSA job on it as a
ViViT, and predictions on video files (`video_b64` and multipart), with the limits on a video's size (413) and
duration (400) and the mismatches named. The planner in-process: clip sizes, the dataset/backbone mismatch (422),
and a method whose backpropagation through the ViViT cannot fit the device (422 `does_not_fit_memory`)."""

from __future__ import annotations

import base64
import io
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
from fastapi.testclient import TestClient

from api.main import create_app
from services.video.synthetic import write_motion, write_video
from storage.settings import Settings


def zip_tree(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(root.rglob("*.mp4")):
            zf.write(path, f"motion/{path.relative_to(root)}")
    return buf.getvalue()


def test_upload_videos_train_and_predict_on_video(stack, tmp_path: Path) -> None:
    running, client = stack
    api = running.api_url
    write_motion(tmp_path, per_class=3, holdout_per_class=1, frames=8, size=32)
    r = httpx.post(f"{api}/datasets", files={"file": ("motion.zip", zip_tree(tmp_path / "train"))}, timeout=60)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == ["down", "left", "right", "up"] and ds["num_images"] == 12

    body = {
        "dataset": {"id": ds["id"], "val_fraction": 0.34},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32, "video": {"num_frames": 4}},
        "method": {"name": "losa", "rank": 4},
        "training": {"epochs": 2, "batch_size": 4},
    }
    job = client.wait(client.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job.get("error")
    assert job["metrics"]["images"] == 12 and job["metrics"]["backbone_forwards"] > 0
    model_id = job["model_id"]
    assert client._call("GET", f"/models/{model_id}")["video"]["num_frames"] == 4

    def post(instances: list[dict]) -> httpx.Response:
        return httpx.post(f"{api}/v1/models/{model_id}:predict", json={"instances": instances}, timeout=60)

    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    held_out = sorted((tmp_path / "holdout").glob("*/*.mp4"))
    r = post([{"video_b64": b64(p.read_bytes())} for p in held_out])
    assert r.status_code == 200, r.text
    by_json = r.json()["predictions"]
    assert len(by_json) == 4 and all(set(p["scores"]) == set(ds["classes"]) for p in by_json)
    files = [("files", (p.name, p.read_bytes(), "video/mp4")) for p in held_out]
    by_files = httpx.post(f"{api}/v1/models/{model_id}:predict-files", files=files, timeout=60)
    assert by_files.status_code == 200, by_files.text
    assert by_files.json()["predictions"] == by_json  # the same decoding and sampling either way
    r = post([{"video_b64": b64(b"\0" * (17 * 2**20))}])  # over SIDETUNE_MAX_PREDICT_VIDEO_MB (16)
    assert r.status_code == 413 and r.json()["error"]["code"] == "video_too_large"
    long = write_video(tmp_path / "long.mp4", np.zeros((61, 32, 32, 3), np.uint8), fps=1)  # 61 s
    r = post([{"video_b64": b64(long.read_bytes())}])
    assert r.status_code == 400 and "at most 60 s" in r.json()["error"]["message"]
    r = post([{"video_b64": b64(b"garbage")}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_video"
    assert "instance 0: not a readable video" in r.json()["error"]["message"]
    r = post([{"image_b64": b64(held_out[0].read_bytes())}])
    assert r.status_code == 400 and "trained on videos: send videos" in r.json()["error"]["message"]
    r = post([{"video_b64": b64(held_out[0].read_bytes()), "image_b64": "AAAA"}])
    assert r.status_code == 422
    r = post([{"video_b64": b64(held_out[0].read_bytes())}, {"image_b64": "AAAA"}])
    assert r.status_code == 400 and "images or videos, not both" in r.json()["error"]["message"]

    # Open Inference Protocol v2: the model takes one input, `video` (BYTES: encoded video files)
    meta = httpx.get(f"{api}/v2/models/{model_id}").json()
    assert [i["name"] for i in meta["inputs"]] == ["video"] and meta["parameters"]["classes"] == ds["classes"]

    def infer(name: str, data: list[bytes]) -> httpx.Response:
        tensor = {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": [b64(d) for d in data]}
        return httpx.post(f"{api}/v2/models/{model_id}/infer", json={"inputs": [tensor]}, timeout=60)

    r = infer("video", [p.read_bytes() for p in held_out])
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"]["data"] == [p["label"] for p in by_json]  # as v1 answered
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    want = np.array([[p["scores"][c] for c in ds["classes"]] for p in by_json])
    assert np.allclose(probs, want, atol=1e-5)
    r = infer("image", [held_out[0].read_bytes()])
    assert r.status_code == 400 and "trained on videos; send the input `video`" in r.json()["error"]
    r = infer("video", [b"garbage"])
    assert r.status_code == 400 and "input 'video': instance 0: not a readable video" in r.json()["error"]
    r = infer("video", [long.read_bytes()])
    assert r.status_code == 400 and "at most 60 s" in r.json()["error"]


def planner_client(tmp_path: Path, redis_url: str, **settings) -> TestClient:
    key = f"key-{uuid.uuid4().hex}"
    app = create_app(
        Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=[key], allowed_roots=[tmp_path], **settings)
    )
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def test_plans_of_video_jobs(tmp_path: Path, redis_url: str) -> None:
    write_motion(tmp_path / "m", per_class=2, frames=4, size=32)
    client = planner_client(tmp_path, redis_url, device_memory_gb=16)
    vivit = {"name": "vit_base_patch16_224", "pretrained": False, "video": {"num_frames": 16}}
    body = {"dataset": {"path": str(tmp_path / "m" / "train")}, "backbone": vivit, "method": {"name": "losa"}}
    plan = client.post("/jobs", params={"dry_run": "true"}, json=body).json()
    assert plan["architecture"]["tokens"] == 8 * 196 + 1 and plan["architecture"]["global_pool"] == "avg"
    assert plan["bytes_per_image"] == 12 * 1569 * 768 * 2  # 28.9 MB a clip
    assert any("28.92 MB per clip here (Kinetics-400's 240k clips would take 6.94 TB)" in n for n in plan["notes"])

    image = {**vivit, "video": None}
    r = client.post("/jobs", params={"dry_run": "true"}, json={**body, "backbone": image})
    assert r.status_code == 422 and "holds videos: set `backbone.video`" in r.json()["error"]["message"]

    full = {**body, "method": {"name": "full"}}  # images mode through ViViT-B at batch size 64: about 2 TB
    r = client.post("/jobs", json=full)
    assert r.status_code == 422 and r.json()["error"]["code"] == "does_not_fit_memory"
    message = r.json()["error"]["message"]
    assert "full in mode images backpropagates through 12 blocks on 16-frame clips of 1569 tokens" in message
    assert "training.batch_size" in message and "fewer frames" in message and "losa" in message
    lora = client.post(
        "/jobs", params={"dry_run": "true"}, json={**body, "method": {"name": "lora"}, "training": {"batch_size": 2}}
    ).json()
    assert lora["memory_fits"] is True and 0 < lora["backprop_memory_bytes"] < 16e9
    assert client.get("/jobs").json()["data"] == []
