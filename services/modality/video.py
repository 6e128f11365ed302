"""Videos: the ViT made an unfactorised ViViT (services/video/backbone.py), one clip per item (`video`: frames,
tubelet, sampling), decoded by PyAV in the loaders, every frame through the backbone's PIL steps (services/video/
decoding.py, loading.py) and normalised on the device into [B, T*3, H, W].

Predict decodes a model's inputs exactly as its training data was: the same PyAV decoding, the deterministic clip of
the cache (segment centres, or the centred window), each frame through the backbone's eval steps. PyAV and Pillow
only (no torch ops), so it runs where images are decoded: the inference service's decoder pool. A request's videos
are checked against the size limit before they are decoded, and against the duration limit as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.errors import SpecError
from services.modality.base import CacheIdentity, Frozen, Kind, Modality, Readers, TokenLayout
from services.video.spec import VideoSpec
from storage.specs import VideoRecord

SHARD_BYTES = 128 * 10**6  # what `extraction.batch_size: auto` sizes a batch of clips by

if TYPE_CHECKING:
    import numpy as np
    import torch

    from services.data.datasets import Dataset
    from services.data.loading import BatchReader
    from services.data.transforms import SplitTransform
    from services.video.decoding import ClipTransform
    from storage.settings import Settings


class Videos(Modality):
    name: ClassVar[Kind] = "video"
    items: ClassVar[str] = "clips"
    invalid: ClassVar[str] = "invalid_video"
    training_inputs: ClassVar[str] = "clips (jittered in time)"
    smaller_items: ClassVar[tuple[str, ...]] = ("fewer frames (backbone.video.num_frames) or a larger tubelet",)

    def __init__(self, video: VideoSpec) -> None:
        self.video = video

    def other_dataset(self, where: str) -> str:
        return f"dataset {where} holds images, but `backbone.video` is set: remove it, or give a dataset of videos"

    def check_decode(self, decode: str) -> None:
        if decode == "device":
            raise SpecError(
                "extraction.decode 'device' decodes JPEG images on the GPU; videos are decoded by PyAV on the CPU "
                "(use 'cpu')"
            )

    def cache_identity(self) -> CacheIdentity:
        # frames, tubelet and init are in the weights' hash too; sampling not
        return {"video": VideoRecord(**self.video.model_dump())}

    def auto_rows(self, bytes_per_item: int) -> int:
        """The clips whose activations fill a shard, at most 32."""
        return max(1, min(32, SHARD_BYTES // max(1, bytes_per_item)))

    def dataset_notes(self) -> list[str]:
        return ["the dataset holds videos: `images` counts clips, one per video (sizes are per clip)"]

    def cache_notes(self, per_item: int, size: Callable[[float], str]) -> list[str]:
        return [
            f"a video cache is large: {size(per_item)} per clip here (Kinetics-400's 240k clips would take "
            f"{size(240_000 * per_item)}); layer subsets (method.layers, extraction.layers), a lossy codec "
            '(extraction.keepbits) or execution.mode "online" (no cache, the backbone on every step) need less'
        ]

    def backbone_words(self) -> str:
        return f"ViViT of {self.video.num_frames} frames, tubelet {self.video.tubelet}, "

    def wrap(self, vit: Any, name: str) -> Any:
        from services.video.backbone import to_vivit

        return to_vivit(vit, self.video, name)

    def layout(self, spatial: int) -> TokenLayout:
        temporal = self.video.temporal_positions
        return TokenLayout(
            patches=temporal * spatial,
            global_pool="avg",
            num_frames=self.video.num_frames,
            tubelet=self.video.tubelet,
            temporal_positions=temporal,
        )

    @property
    def channels(self) -> int:
        return 3 * self.video.num_frames

    def per_item(self, tokens: int) -> str:
        return f" on {self.video.num_frames}-frame clips of {tokens} tokens"

    def timm_refusal(self) -> str | None:
        return (
            "a video model runs on a ViViT built from the image ViT (backbone.video), which is not a timm "
            "architecture; export `onnx` or `adapter`"
        )

    def input_layout(self, height: int, width: int) -> str:
        return (
            f"float32 [N, {self.channels}, {height}, {width}]: {self.video.num_frames} RGB frames of a clip, sampled "
            "as `video` says, stacked along the channels (frame-major)"
        )

    def export_metadata(self) -> dict[str, str]:
        return {"video": self.video.model_dump_json()}

    def _frames(self, backbone: Frozen, augment: bool = False) -> ClipTransform:
        """Every frame through the backbone's eval steps, or one random crop and flip for a whole clip."""
        from services.video.decoding import ClipTransform

        return ClipTransform(backbone.split.pil, size=backbone.image_size, augment=augment)

    def reader(
        self, dataset: Dataset, rows: Sequence[np.ndarray], backbone: Frozen, skip_corrupt: bool, on_device: bool
    ) -> BatchReader:
        from services.video.loading import clip_reader

        return clip_reader(dataset, rows, self._frames(backbone), skip_corrupt, self.video)  # one clip per video

    def training_reader(
        self, dataset: Dataset, backbone: Frozen, skip_corrupt: bool, augment: bool, train: bool
    ) -> tuple[SplitTransform, Readers]:
        from services.video.loading import epoch_reader

        transform = self._frames(backbone, augment and train)
        return backbone.split, epoch_reader(dataset, transform, skip_corrupt, self.video, jitter=train)

    def other_payload(self, model_id: str) -> str:
        return f"model {model_id} was trained on videos: send videos (`video_b64`, the v2 input `video`), not images"

    def check_payload(self, items: list[bytes], settings: Settings, what: str) -> int:
        """VideoTooLarge (413 `video_too_large`) for a video over SIDETUNE_MAX_PREDICT_VIDEO_MB."""
        from services.video.decoding import check_sizes

        check_sizes(items, settings.max_predict_video_mb, what)
        return 0

    def decoding_key(self, backbone_key: tuple, backbone: Frozen) -> Hashable:
        return ("video", backbone_key, self.video.model_dump_json())

    def decode(self, backbone: Frozen, items: list[bytes], max_seconds: float | None) -> list[Any]:
        """The clips (uint8 [T, H, W, 3]); VideoTooLong over `max_seconds`."""
        from services.video.decoding import read_clip

        frames = self._frames(backbone).for_clip(None)
        return [
            read_clip(data, self.video, frames, max_seconds=max_seconds, name=f"instance {i}").frames
            for i, data in enumerate(items)
        ]

    def to_batch(self, backbone: Frozen, decoded: list[Any]) -> torch.Tensor:
        import numpy as np

        return backbone.split.to_input(np.stack(decoded))
