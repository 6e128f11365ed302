"""What every kind of input answers (`Modality`), so that the code around it asks instead of branching on video.

A modality owns, for its kind of file: which datasets it takes and what their items are called; how a dataset item
is read (file -> uint8 array, in the loader processes) and transformed, for extraction and for training; how the
backbone is wrapped and what token layout it then has; and how a predict request's payload is checked and decoded,
and becomes the backbone's input batch. Torch-free to import: torch, PIL and PyAV are imported by the methods that
use them, so the planner and the API (the control plane) ask it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypedDict

from services.data.datasets import DatasetError
from services.video.spec import VideoSpec
from storage.specs import VideoRecord

if TYPE_CHECKING:
    import numpy as np
    import torch

    from services.data.datasets import Dataset
    from services.data.loading import BatchReader
    from services.data.transforms import SplitTransform
    from storage.settings import Settings

Kind = Literal["image", "video"]  # a dataset's `kind`, and what a predict request's payload holds
Readers = Callable[[list["np.ndarray"]], "BatchReader"]  # an epoch's batches -> the loaders' reader of them


class Frozen(Protocol):
    """What a modality reads of a loaded backbone (services/backbones.py: `Backbone`)."""

    transform: Any  # the eval transform, whole (timm's torchvision Compose)

    @property
    def split(self) -> SplitTransform: ...

    @property
    def image_size(self) -> int: ...

    def train_transform(self) -> Any: ...


@dataclass(frozen=True)
class TokenLayout:
    """The backbone's tokens past the prefix, as a modality lays them out (services/architectures.py reads it):
    `patches` in all; a ViViT's are time-major, `temporal_positions` x the image's spatial grid."""

    patches: int
    global_pool: str  # timm's pooling of the final tokens: the class token, or the patches' mean (a ViViT's)
    num_frames: int | None = None
    tubelet: int | None = None
    temporal_positions: int | None = None


class CacheIdentity(TypedDict, total=False):
    """What a kind adds to a cache key's preprocessing (storage/cache/meta.py: `KeyPreprocessing`)."""

    video: VideoRecord  # a video backbone's clips: frames, tubelet, init, sampling


class Modality(ABC):
    """One kind of input. `name` is the kind a dataset of it has; `items` what its samples are called in messages;
    `invalid` the error code of a payload of it that cannot be decoded; `video` the clips' spec (None: images)."""

    name: ClassVar[Kind]
    items: ClassVar[str]
    invalid: ClassVar[str]
    training_inputs: ClassVar[str]  # what a job trained on it reads, for its events
    smaller_items: ClassVar[tuple[str, ...]] = ()  # spec changes that make one item cheaper to backpropagate through
    video: VideoSpec | None = None

    # ---- datasets and specs ----------------------------------------------------------------------------------
    def check_dataset(self, kind: str, where: str) -> None:
        """Refuse a dataset of another kind (`where` names it), saying what to change."""
        if kind != self.name:
            raise DatasetError(self.other_dataset(where))

    @abstractmethod
    def other_dataset(self, where: str) -> str:
        """The message for a dataset of the other kind."""

    @abstractmethod
    def check_decode(self, decode: str) -> None:
        """Refuse an `extraction.decode` this kind cannot take (SpecError)."""

    def cache_identity(self) -> CacheIdentity:
        """What the kind adds to a cache entry's preprocessing (its key): nothing for images."""
        return {}

    def extraction_rows(self, batch_size: int | str, bytes_per_item: int) -> int:
        """Items per extraction batch (and cache shard) for `extraction.batch_size`: as given, else `auto_rows`."""
        return self.auto_rows(bytes_per_item) if batch_size == "auto" else int(batch_size)

    @abstractmethod
    def auto_rows(self, bytes_per_item: int) -> int:
        """Items per extraction batch for `extraction.batch_size: auto`, of `bytes_per_item` activations each."""

    # ---- planning --------------------------------------------------------------------------------------------
    def dataset_notes(self) -> list[str]:
        """The plan's notes on a dataset of this kind (services/jobs/planner.py): none for images."""
        return []

    def cache_notes(self, per_item: int, size: Callable[[float], str]) -> list[str]:
        """The plan's notes on a cache of `per_item` bytes an item (`size` writes bytes for people): none for
        images."""
        return []

    def backbone_words(self) -> str:
        """What the backbone is made into, before its shape in a description ("ViViT of 8 frames, tubelet 2, ");
        nothing for images."""
        return ""

    # ---- the backbone ----------------------------------------------------------------------------------------
    def wrap(self, vit: Any, name: str) -> Any:
        """The timm ViT `vit` as this kind's backbone (in place); images take it as it is."""
        return vit

    @abstractmethod
    def layout(self, spatial: int) -> TokenLayout:
        """The token layout of a backbone whose image grid has `spatial` patches."""

    @property
    def channels(self) -> int:
        """The channels of one input to the backbone: RGB, a clip's frames stacked along them."""
        return 3

    def per_item(self, tokens: int) -> str:
        """What one item is, for messages on a backbone of `tokens` tokens (after a verb: " on 8-frame clips ...");
        nothing for images."""
        return ""

    # ---- exporting -------------------------------------------------------------------------------------------
    def timm_refusal(self) -> str | None:
        """Why a model of this kind has no timm checkpoint (services/export/timm_checkpoint.py); None: it may."""
        return None

    @abstractmethod
    def input_layout(self, height: int, width: int) -> str:
        """An input tensor of this kind as an exported graph's metadata describes it."""

    def export_metadata(self) -> dict[str, str]:
        """What an exported graph's metadata adds for this kind (services/export/onnx_graph.py): nothing for
        images."""
        return {}

    # ---- reading a dataset -----------------------------------------------------------------------------------
    @abstractmethod
    def reader(
        self, dataset: Dataset, rows: Sequence[np.ndarray], backbone: Frozen, skip_corrupt: bool, on_device: bool
    ) -> BatchReader:
        """The loaders' reader of `rows` (batches of indices into the dataset) for extraction: deterministic, through
        the backbone's eval steps; `on_device`: encoded files for the GPU's decoder."""

    @abstractmethod
    def training_reader(
        self, dataset: Dataset, backbone: Frozen, skip_corrupt: bool, augment: bool, train: bool
    ) -> tuple[SplitTransform, Readers]:
        """The normalisation and the readers of a training source's epochs: augmented (with `augment`) and jittered
        for the training split (`train`), as evaluated otherwise."""

    # ---- predicting ------------------------------------------------------------------------------------------
    def check_sent(self, model_id: str, sent: Kind | None) -> None:
        """Refuse a payload of the other kind for model `model_id` (`sent`: what the client said it sent, None:
        files, taken as what the model takes)."""
        if sent is not None and sent != self.name:
            raise DatasetError(self.other_payload(model_id))

    @abstractmethod
    def other_payload(self, model_id: str) -> str:
        """The message for a payload of the other kind."""

    @abstractmethod
    def check_payload(self, items: list[bytes], settings: Settings, what: str) -> int:
        """Check a request's encoded files against the limits of `settings` before decoding them (`what` names an
        item; a UserError with its code and status otherwise); returns the pixels they hold, for handing the memory
        back after a large request."""

    @abstractmethod
    def decoding_key(self, backbone_key: tuple, backbone: Frozen) -> Hashable:
        """What decoding depends on: models with equal keys take the very same decoded inputs."""

    @abstractmethod
    def decode(self, backbone: Frozen, items: list[bytes], max_seconds: float | None) -> list[Any]:
        """Encoded files as the backbone's training data was decoded; a DatasetError names the instance."""

    @abstractmethod
    def to_batch(self, backbone: Frozen, decoded: list[Any]) -> torch.Tensor:
        """Decoded inputs as the backbone's float32 input batch on the CPU."""
