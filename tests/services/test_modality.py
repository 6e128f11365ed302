"""The image and video modalities (services/modality/): which one a spec names, what each refuses, its token layout,
and a predict payload decoded and batched by each on a real backbone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.backbones import load_backbone
from services.data.datasets import DatasetError
from services.errors import SpecError
from services.modality import modality_for
from services.spec import BackboneSpec
from services.video.decoding import VideoTooLarge
from services.video.spec import VideoSpec
from services.video.synthetic import motion_clip, write_video
from storage.settings import Settings

VIDEO = VideoSpec(num_frames=4, tubelet=2)


def test_a_spec_names_its_modality() -> None:
    images, videos = modality_for(None), modality_for(VIDEO)
    assert (images.name, images.items, images.video) == ("image", "images", None)
    assert (videos.name, videos.items, videos.video) == ("video", "clips", VIDEO)
    spec = BackboneSpec(name="test_vit", pretrained=False, video=VIDEO)
    assert modality_for(spec).video == VIDEO and modality_for(spec.model_copy(update={"video": None})) is images


def test_each_refuses_the_other_kind() -> None:
    images, videos = modality_for(None), modality_for(VIDEO)
    images.check_dataset("image", "d")
    with pytest.raises(DatasetError, match="holds videos: set `backbone.video`"):
        images.check_dataset("video", "d")
    with pytest.raises(DatasetError, match="holds images, but `backbone.video` is set"):
        videos.check_dataset("image", "d")
    with pytest.raises(SpecError, match="decoded by PyAV"):
        videos.check_decode("device")
    images.check_decode("device")
    videos.check_sent("m", None)
    with pytest.raises(DatasetError, match="trained on videos: send videos"):
        videos.check_sent("m", "image")
    with pytest.raises(DatasetError, match="trained on images: send images"):
        images.check_sent("m", "video")


def test_token_layouts() -> None:
    image = modality_for(None).layout(196)
    assert (image.patches, image.global_pool, image.num_frames) == (196, "token", None)
    clip = modality_for(VideoSpec(num_frames=16, tubelet=2)).layout(196)
    assert (clip.patches, clip.global_pool, clip.num_frames, clip.temporal_positions) == (8 * 196, "avg", 16, 8)


def test_a_payload_decoded_and_batched_by_each(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_predict_video_mb=0.001)
    image_backbone = load_backbone(BackboneSpec(name="test_vit", pretrained=False, image_size=32))
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(png, "PNG")
    images = modality_for(None)
    assert images.check_payload([png.getvalue()], settings, "instance") == 1600
    batch = images.to_batch(image_backbone, images.decode(image_backbone, [png.getvalue()], None))
    assert tuple(batch.shape) == (1, 3, 32, 32)

    spec = BackboneSpec(name="test_vit", pretrained=False, image_size=32, video=VIDEO)
    backbone = load_backbone(spec)
    clip = write_video(tmp_path / "a.mp4", motion_clip("left", np.random.default_rng(0), frames=8, size=32))
    videos = modality_for(spec)
    with pytest.raises(VideoTooLarge, match="instance 0: .* MB; at most 0.001 MB"):
        videos.check_payload([clip.read_bytes()], settings, "instance")
    decoded = videos.decode(backbone, [clip.read_bytes()], max_seconds=60)
    assert decoded[0].shape == (4, 32, 32, 3) and decoded[0].dtype == np.uint8
    assert tuple(videos.to_batch(backbone, decoded).shape) == (1, 12, 32, 32)
    with pytest.raises(DatasetError, match="instance 0: not a readable video"):
        videos.decode(backbone, [b"garbage"], max_seconds=60)
