"""Every method on video: the linear probe and LoSA online (the backbone on jittered clips every step, with crops and
flips), APLA, ARC, LoRA and full fine-tuning through the ViViT in `images` mode and on its last blocks in `tail`
mode; each trained by `train_job` and served by the Predictor on video files, decoded as the training data was.
Adapted models are served merged and must predict what the trained, unmerged module predicts on the same clips."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from services import methods
from services.backbones import load_backbone
from services.data.datasets import DatasetError, read_dataset
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.serving.inference import Predictor
from services.spec import BackboneSpec, JobSpec
from services.training.job import to_torch, train_job
from services.video.decoding import read_clip
from services.video.loading import clip_transform
from services.video.spec import VideoSpec
from services.video.synthetic import write_motion
from storage.artifacts import ArtifactStore
from storage.settings import Settings

BACKBONE = {"name": "test_vit", "pretrained": False, "image_size": 32, "video": {"num_frames": 4, "tubelet": 2}}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_motion(root, per_class=3, frames=8, size=32)
    return root / "train"


def spec(path: Path, method: dict, mode: str, **execution) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), "val_fraction": 0.34},
            "backbone": BACKBONE,
            "method": method,
            "execution": {"mode": mode, **execution},
            "training": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "optimizer": "adamw", "warmup_epochs": 0},
        }
    )


def unmerged_probs(out: dict, clips: torch.Tensor) -> np.ndarray:
    manifest = out["manifest"]
    backbone = load_backbone(manifest.backbone)
    method = manifest.method
    model = methods.build(method, copy.deepcopy(backbone.model), len(manifest.classes), manifest.tail_blocks).eval()
    model.load_trainable(to_torch(out["weights"]))
    with torch.inference_mode():
        x = clips if manifest.tail_blocks is None else backbone.intermediates(clips, model.input_layers)
        return model(x).softmax(-1).numpy()


@pytest.mark.parametrize(
    ("method", "mode", "execution"),
    [
        ({"name": "linear"}, "online", {}),
        ({"name": "losa", "rank": 4}, "online", {"augment": True}),
        ({"name": "apla", "rank": 4}, "images", {"augment": True}),
        ({"name": "arc", "rank": 4}, "images", {}),
        ({"name": "lora", "rank": 2}, "images", {}),
        ({"name": "full"}, "images", {}),
        ({"name": "apla", "rank": 4}, "tail", {"tail_blocks": 2}),
        ({"name": "lora", "rank": 2}, "tail", {"tail_blocks": 2}),
    ],
)
def test_methods_train_on_clips_and_predict_on_video_files(
    settings: Settings, videos: Path, tmp_path: Path, method: dict, mode: str, execution: dict
) -> None:
    job = spec(videos, method, mode, **execution)
    key = run_extraction(job, settings, NullReporter())["cache_key"] if job.needs_cache else None
    reporter = NullReporter()
    out = train_job(job, settings, key, reporter, tmp_path / "ckpt")
    assert out["manifest"].mode == mode and out["manifest"].backbone.video.num_frames == 4
    if not job.needs_cache:
        assert any("clips (jittered in time)" in e["message"] for e in reporter.events)
    ArtifactStore.from_settings(settings).save_model("model_v", out["weights"], out["manifest"], out["metrics"])
    paths = read_dataset(videos).paths[:3]
    predictor = Predictor(settings)
    preds = predictor.predict("model_v", [p.read_bytes() for p in paths], sent="video")
    classes = out["manifest"].classes
    got = np.array([[p["scores"][c] for c in classes] for p in preds])
    assert got.shape == (3, 4) and np.allclose(got.sum(1), 1, atol=1e-4)
    if out["manifest"].kind == "adapted":  # served merged: the same as the trained module on the same clips
        backbone = load_backbone(BackboneSpec.model_validate(BACKBONE))
        frames = clip_transform(backbone.data_config, backbone.split.pil).for_clip(None)
        clips = np.stack([read_clip(p, VideoSpec(**BACKBONE["video"]), frames).frames for p in paths])
        np.testing.assert_allclose(got, unmerged_probs(out, backbone.input(clips)), atol=1e-4)
    with pytest.raises(DatasetError, match="trained on videos: send videos"):
        predictor.predict("model_v", [paths[0].read_bytes()], sent="image")
    with pytest.raises(DatasetError, match="instance 0: not a readable video"):
        predictor.predict("model_v", [b"not a video"])
