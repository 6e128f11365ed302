"""Images: a ViT as timm builds it, one image per item, read by Pillow (services/data/images.py) through the
backbone's PIL steps in the loaders and normalised on the device; a predict request's files checked against the pixel
budget from their headers, then decoded as the loaders decode them (JPEGs far larger than the backbone's input drafted
down), and transformed by the backbone's whole eval transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.data.datasets import DatasetError, load_image
from services.data.images import check_budget, draft_size
from services.modality.base import Frozen, Kind, Modality, Readers, TokenLayout

if TYPE_CHECKING:
    import numpy as np
    import torch

    from services.data.datasets import Dataset
    from services.data.loading import BatchReader
    from services.data.transforms import SplitTransform
    from storage.settings import Settings


class Images(Modality):
    name: ClassVar[Kind] = "image"
    items: ClassVar[str] = "images"
    invalid: ClassVar[str] = "invalid_image"
    training_inputs: ClassVar[str] = "images"

    def other_dataset(self, where: str) -> str:
        return (
            f'dataset {where} holds videos: set `backbone.video` (e.g. {{"num_frames": 16}}) to run the backbone '
            "as a ViViT on clips"
        )

    def check_decode(self, decode: str) -> None:
        pass  # images are decoded by Pillow in the loaders, or their JPEGs by the GPU's decoder

    def auto_rows(self, bytes_per_item: int) -> int:
        return 32

    def layout(self, spatial: int) -> TokenLayout:
        return TokenLayout(patches=spatial, global_pool="token")

    def input_layout(self, height: int, width: int) -> str:
        return f"float32 [N, 3, {height}, {width}]: RGB"

    def reader(
        self, dataset: Dataset, rows: Sequence[np.ndarray], backbone: Frozen, skip_corrupt: bool, on_device: bool
    ) -> BatchReader:
        from services.data.loading import BatchReader, EncodedReader

        return (EncodedReader if on_device else BatchReader)(dataset.paths, rows, backbone.split.pil, skip_corrupt)

    def training_reader(
        self, dataset: Dataset, backbone: Frozen, skip_corrupt: bool, augment: bool, train: bool
    ) -> tuple[SplitTransform, Readers]:
        from services.data.loading import BatchReader
        from services.data.transforms import SplitTransform

        split = SplitTransform.of(backbone.train_transform()) if augment and train else backbone.split
        return split, lambda rows: BatchReader(dataset.paths, rows, split.pil, skip_corrupt)

    def other_payload(self, model_id: str) -> str:
        return f"model {model_id} was trained on images: send images, not videos"

    def check_payload(self, items: list[bytes], settings: Settings, what: str) -> int:
        """ImageError for an unreadable header or an image over the per-image limit, TooManyPixels (413) over the
        request's budget (SIDETUNE_MAX_PREDICT_PIXELS)."""
        return check_budget(items, settings.max_predict_pixels)

    def decoding_key(self, backbone_key: tuple, backbone: Frozen) -> Hashable:
        return ("image", draft_size(backbone.transform))  # the draft size follows the backbone's resize

    def decode(self, backbone: Frozen, items: list[bytes], max_seconds: float | None) -> list[Any]:
        """PIL images."""
        draft = draft_size(backbone.transform)
        decoded = []
        for i, data in enumerate(items):
            try:
                decoded.append(load_image(data, draft))
            except DatasetError as e:
                raise DatasetError(f"instance {i}: {e}") from None
        return decoded

    def to_batch(self, backbone: Frozen, decoded: list[Any]) -> torch.Tensor:
        import torch

        return torch.stack([backbone.transform(image) for image in decoded])


IMAGES = Images()
