"""`sidetune demo`: the embedded stack end to end on real data (scikit-learn's handwritten digits).

Starts Redis, both workers, the inference service and the API as processes, submits a LoSA job and a linear-probe
job with default settings (LoSA's: its automatic grid of four learning rates, trained together from one cache pass)
on the same small timm ViT (the second reads the last block's class token from the first's feature cache, so it runs
no backbone forward), follows them, predicts the held-out digits over HTTP and prints a table.

`sidetune demo --video` does the same on synthetic videos of a square moving left, right, up or down
(services/video/synthetic.py) with the ViT made a ViViT: only the order of the frames tells a direction from its
reversal, which the frozen ViViT cannot see (a linear probe stays near 0.5) and LoSA's temporal mixer can.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from storage.settings import Settings
from worker.api_spec import BackboneBody, DatasetBody, JobSpecBody, TrainingBody, VideoBody
from worker.api_types import Job
from worker.client import Client
from worker.launcher import Stack
from worker.progress_view import console as wide_console
from worker.progress_view import follow

BACKBONE = "vit_tiny_patch16_224"
IMAGE_SIZE = 112  # the digits are 8x8 scans; 112 px keeps the demo quick on a CPU
VIDEO_SIZE = 64  # the motion videos: 64 px frames, 4 x 4 patches
# 8 frames, tubelets of 2: 4 temporal positions. Filter inflation: each tubelet sees the mean of its two frames, so a
# clip and its reversal give the frozen ViViT the same tokens in another order (it is blind to the direction).
VIDEO: VideoBody = {"num_frames": 8, "tubelet": 2, "init": "filter_inflation"}


def pretrained_reachable(name: str, timeout_s: float = 3.0) -> bool:
    """Weights in the local Hugging Face cache, or the hub reachable (timm downloads from it)."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        if repo and isinstance(try_to_load_from_cache(repo, "model.safetensors"), str):
            return True
    except Exception:
        pass
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class _DemoData:
    """The dataset the demo writes: where, the backbone its jobs use, and the held-out files predicted over HTTP."""

    root: Path
    backbone: BackboneBody
    holdout: list[Path]


def run_demo(epochs: int | None = None, video: bool = False, per_class: int = 40) -> int:
    console = wide_console()
    settings = Settings()
    pretrained = pretrained_reachable(BACKBONE)
    if not pretrained:
        console.print(
            f"[yellow]warning: pretrained weights for {BACKBONE} cannot be downloaded here; using a "
            "randomly initialised backbone (pretrained=False), so accuracy will be lower than with "
            "real weights[/yellow]"
        )
    data = _write_data(console, settings, pretrained, video, per_class)
    rows = _run_jobs(console, settings, _specs(data, epochs, video), data.holdout, video)
    if rows is None:
        return 1
    console.print(_table(rows, pretrained, video))
    reused = [job for job, _ in rows if job["metrics"]["cache_hit"]]
    for job in reused:
        console.print(
            f"the {job['spec']['method']['name']} job reused the feature cache {job['cache_key']}: "
            f"{job['metrics']['backbone_forwards']} backbone forwards"
        )
    return 0


def _write_data(console: Console, settings: Settings, pretrained: bool, video: bool, per_class: int) -> _DemoData:
    """Write the motion videos or the digits under the data dir, saying how many."""
    if video:
        from services.video.synthetic import write_motion

        root = settings.data_path / "datasets" / "motion"
        counts = write_motion(root, per_class, holdout_per_class=max(1, per_class // 4))
        console.print(
            f"motion videos written to {root}: {counts['train']} training videos, {counts['holdout']} held out"
        )
        backbone: BackboneBody = {"name": BACKBONE, "pretrained": pretrained, "image_size": VIDEO_SIZE, "video": VIDEO}
        return _DemoData(root, backbone, sorted((root / "holdout").glob("*/*.mp4")))
    from services.data.digits import write_digits

    root = settings.data_path / "datasets" / "digits"
    counts = write_digits(root)
    console.print(f"digits written to {root}: {counts['train']} training images, {counts['holdout']} held out")
    backbone = {"name": BACKBONE, "pretrained": pretrained, "image_size": IMAGE_SIZE}
    return _DemoData(root, backbone, sorted((root / "holdout").glob("*/*.png")))


def _specs(data: _DemoData, epochs: int | None, video: bool) -> list[JobSpecBody]:
    """The two jobs: LoSA, and a linear probe that reads LoSA's feature cache."""
    dataset: DatasetBody = {"path": str(data.root / "train")}
    # every setting default (epochs: auto, LoSA's learning rates: its automatic grid); the 128 training clips at
    # batches of 16 for 15 epochs keep the video demo to a few minutes on a CPU (the defaults take 100 epochs of 64)
    training: TrainingBody = {"batch_size": 16, "epochs": epochs or 15} if video else {}
    if epochs and not video:
        training["epochs"] = epochs
    return [
        {
            "name": "demo-losa",
            "dataset": dataset,
            "backbone": data.backbone,
            "method": {"name": "losa", "rank": 8},
            "training": training,
        },
        {
            "name": "demo-linear",
            "dataset": dataset,
            "backbone": data.backbone,
            "method": {"name": "linear"},
            "training": training,
        },
    ]


def _run_jobs(
    console: Console, settings: Settings, specs: list[JobSpecBody], holdout: list[Path], video: bool
) -> list[tuple[Job, float]] | None:
    """Start the embedded stack, run the jobs and predict the held-out files with each model: (job, held-out
    accuracy) per job; None when a job did not succeed (said on the console)."""
    stack = Stack(settings)
    console.print(
        f"starting the embedded stack (Redis, extract worker, train worker, inference service, API); logs "
        f"in {stack.logs_where}"
    )
    with stack:
        client = Client(stack.api_url)
        console.print(f"API ready at {stack.api_url}")
        ids = [client.submit(spec)["id"] for spec in specs]
        jobs = follow(client, ids)
        for job in jobs:
            if job["status"] != "succeeded":
                console.print(f"[red]job {job['id']} {job['status']}: {job.get('error')}[/red]")
                return None
        return [(job, _accuracy(client, job["model_id"], holdout, video)) for job in jobs]


def _accuracy(client: Client, model_id: str, holdout: list[Path], video: bool) -> float:
    """The model's accuracy on the held-out files, predicted over HTTP in batches of 32 (the label is the folder)."""
    correct = 0
    for start in range(0, len(holdout), 32):
        batch = holdout[start : start + 32]
        for path, p in zip(batch, client.predict(model_id, batch, video=video), strict=True):
            correct += p["label"] == Path(path).parent.name
    return correct / len(holdout)


def _table(rows: list[tuple[Job, float]], pretrained: bool, video: bool) -> Table:
    """The results: a row per job, its metrics and held-out accuracy."""
    weights = "pretrained" if pretrained else "random init"
    data = f"ViViT of {VIDEO['num_frames']} frames on motion videos" if video else "digits"
    table = Table(title=f"sidetune demo: {BACKBONE} ({weights}) on {data}")
    for col in (
        "method",
        "trainable params",
        "val acc",
        "held-out acc (HTTP)",
        "extraction s",
        "training s",
        "train clips/s" if video else "train img/s",
        "cache",
    ):
        table.add_column(col, justify="right" if col != "method" else "left")
    for job, acc in rows:
        m = job["metrics"]
        method = job["spec"]["method"]["name"]
        if m.get("sweep"):
            method += f" (best of {len(m['sweep'])}: lr {m['selected']['lr']:g})"
        table.add_row(
            method,
            f"{m['trainable_params']:,}",
            f"{m['val_accuracy']:.4f}",
            f"{acc:.4f}",
            f"{m['extract_seconds']:.1f}",
            f"{m['train_seconds']:.1f}",
            f"{m['train_images_per_s']:,.0f}",
            "reused" if m["cache_hit"] else f"extracted ({m['backbone_forwards']} forwards)",
        )
    return table
