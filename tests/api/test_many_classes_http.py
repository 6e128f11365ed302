"""A 1,000-class linear job through the real processes (`stack`) under a memory guard on the train worker: before
issue 19 its confusion plot asked for a 50,200 x 45,150 px canvas (23 GB resident, the OOM killer, `worker_lost`).

The guard: while the job runs the worker's address space is capped (a soft RLIMIT_AS 4 GiB above what it has mapped,
so a runaway allocation fails the job instead of the host) and its peak RSS is the kernel's VmHWM, reset when the job
is submitted (psutil sampling where /proc/PID/clear_refs cannot be written). The old code fails the job (the canvas
cannot be allocated); the fixed one stays under PEAK_RSS_MB."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from worker.cli import main as cli

CLASSES = 1000
PEAK_RSS_MB = 2048  # the train worker's peak during the job, its imports included (measured: 0.94 GB)


def write_classes(root: Path, classes: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(2):
            pixels = np.clip(colour + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"n{c:08d}" / f"{i}.png", compress_level=1)


@contextlib.contextmanager
def memory_guard(pid: int, extra_bytes: int) -> Iterator[dict[str, int]]:
    """Caps the process's address space at what it maps now + `extra_bytes` (soft limit, restored after) and yields
    a dict whose "peak" is its peak RSS over the block, in bytes."""
    proc = psutil.Process(pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_AS)
    cap = proc.memory_info().vms + extra_bytes
    proc.rlimit(psutil.RLIMIT_AS, (cap if hard == psutil.RLIM_INFINITY else min(cap, hard), hard))
    out = {"peak": proc.memory_info().rss}
    stop = threading.Event()
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := RSS now
        exact = True
    except OSError:
        exact = False

        def sample() -> None:
            while not stop.wait(0.02):
                with contextlib.suppress(psutil.Error):
                    out["peak"] = max(out["peak"], proc.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()
    try:
        yield out
    finally:
        stop.set()
        if exact:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            hwm = next(line for line in status if line.startswith("VmHWM"))
            out["peak"] = int(hwm.split()[1]) * 1024
        proc.rlimit(psutil.RLIMIT_AS, (soft, hard))


def test_a_1000_class_linear_job_trains_under_a_memory_guard(stack, tmp_path, capsys) -> None:
    running, client = stack
    root = running.settings.data_path / "datasets" / "classes_1000"
    write_classes(root, CLASSES)
    # one L2 strength and at most 20 L-BFGS iterations, images of one patch: seconds of compute for 2,000 images
    body = {
        "dataset": {"path": str(root)},
        "method": {"name": "linear", "max_iter": 20},
        "training": {"weight_decay": 1e-3},
        "backbone": {"name": "vit_tiny_patch16_224", "pretrained": False, "image_size": 16},
    }
    with memory_guard(running.procs["train-worker"].pid, 4 * 2**30) as guard:
        job = client.wait(client.submit(body)["id"], timeout_s=300)
    assert job["status"] == "succeeded", job.get("error")
    assert guard["peak"] < PEAK_RSS_MB * 2**20, f"train worker peak RSS {guard['peak'] / 2**20:.0f} MB"

    model_id = job["model_id"]
    api = running.api_url
    record = httpx.get(f"{api}/models/{model_id}", timeout=30)
    assert len(record.content) < 200_000  # classes and figures, nothing per pair of classes
    report = httpx.get(f"{api}/models/{model_id}/evaluation", timeout=30).json()
    assert report["total"] == CLASSES and report["has_more"] and len(report["per_class"]) == 100
    assert "confusion_matrix" not in report and report["confusion"]["shape"] == [CLASSES, CLASSES]
    assert len(report["top_confusions"]) == 20
    png = httpx.get(f"{api}/models/{model_id}/plots/confusion.png", timeout=30).content
    assert Image.open(io.BytesIO(png)).size == (1400, 700)

    assert cli(["report", model_id, "--url", api, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "the first 20 of 1,000 classes" in out and "most frequent confusions" in out
    per_class = out.split("most frequent confusions")[0]
    assert "n00000019" in per_class and "n00000020" not in per_class  # 20 rows, not 1,000

    # predict: every class's score by default (as before), the k highest with top_k
    image = root / "n00000003" / "0.png"
    everything = client.predict(model_id, [image])[0]["scores"]
    assert len(everything) == CLASSES
    files = [("files", ("a.png", image.read_bytes(), "image/png"))]
    top = httpx.post(f"{api}/v1/models/{model_id}:predict-files", params={"top_k": 5}, files=files, timeout=60)
    scores = top.json()["predictions"][0]["scores"]
    assert len(scores) == 5 and list(scores.values()) == sorted(scores.values(), reverse=True)
    assert all(everything[c] == v for c, v in scores.items())
    assert min(scores.values()) >= sorted(everything.values(), reverse=True)[5]  # the 5 highest (scores may tie)
    instance = {"image_b64": base64.b64encode(image.read_bytes()).decode()}
    r = httpx.post(f"{api}/v1/models/{model_id}:predict", json={"instances": [instance], "top_k": 3}, timeout=60)
    assert list(r.json()["predictions"][0]["scores"]) == list(scores)[:3]
    r = httpx.post(f"{api}/v1/models/{model_id}:predict", json={"instances": [instance], "top_k": 0}, timeout=60)
    assert r.status_code == 422 and "top_k" in r.json()["error"]["message"]
