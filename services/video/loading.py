"""Clips for the loader processes of services/data/loading.py: `ClipReader` is a `BatchReader` whose item is a batch of
clips, uint8 [B, T, H, W, 3], decoded by PyAV in the loader processes (so decoding scales with the cores) and
normalised on the device by `SplitTransform.to_input`, as images are. Corrupt videos are handled as corrupt images
(`on_corrupt`); a video shorter than the clip is padded by repeating frames, with a note for the job's events.

Sampling is deterministic without a seed (the cache holds one clip per video) and jittered with one (online
training: each epoch draws a seed, and each video's jitter follows from it and the video's position, so a run is
reproducible whatever the number of loader processes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.data.datasets import Dataset
from services.data.formats.samples import InFile, Item, readable
from services.data.loading import BatchReader
from services.video.decoding import ClipTransform, read_clip
from services.video.spec import VideoSpec
from storage.cache.meta import DataConfig


class ClipReader(BatchReader):
    """Item k: the clips of the videos in `batches[k]` (indices into `paths`), each frame through `transform`;
    `spans` (seconds, NaN: none) per video, `seed` None for the deterministic clip."""

    def __init__(
        self,
        paths: Sequence[Item],
        batches: Sequence[np.ndarray],
        transform: ClipTransform,
        skip_corrupt: bool,
        video: VideoSpec,
        spans: np.ndarray | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(paths, batches, transform, skip_corrupt)
        self.video, self.spans, self.seed = video, spans, seed

    def load(self, i: int, data: bytes | None = None) -> tuple[np.ndarray, str | None]:
        rng = None if self.seed is None else np.random.default_rng((self.seed, int(i)))
        span = None
        if self.spans is not None and not np.isnan(self.spans[i]).any():
            span = (float(self.spans[i, 0]), float(self.spans[i, 1]))
        item = self.paths[i]
        source = data if data is not None else readable(item) if isinstance(item, InFile) else Path(item)
        clip = read_clip(source, self.video, self.pil.for_clip(rng), rng, span, name=str(item))
        note = None
        if clip.padded:
            note = (
                f"{self.paths[i]}: {clip.total} frames, fewer than the {self.video.frames_needed} a clip needs; "
                "padded by repeating frames"
            )
        return clip.frames, note


def clip_transform(data_config: DataConfig, pil: Callable[[Any], Any], augment: bool = False) -> ClipTransform:
    """The backbone's frame transform (its eval PIL steps), or the clip-wide random crop and flip at its size."""
    return ClipTransform(pil, size=int(data_config["input_size"][-1]), augment=augment)


def clip_reader(
    dataset: Dataset,
    batches: Sequence[np.ndarray],
    transform: ClipTransform,
    skip_corrupt: bool,
    video: VideoSpec,
    seed: int | None = None,
) -> ClipReader:
    return ClipReader(dataset.paths, batches, transform, skip_corrupt, video, dataset.spans, seed)


def padding_event(notes: list[str]) -> str | None:
    """One event line for a batch's padded videos."""
    if not notes:
        return None
    return f"{len(notes)} video(s) shorter than the clip: " + "; ".join(notes)


def epoch_reader(dataset: Dataset, transform: ClipTransform, skip_corrupt: bool, video: VideoSpec, jitter: bool):
    """For `ImageSource(reader=...)`: each call (one per epoch) makes the reader of that epoch's batches, with a
    fresh seed drawn from torch's generator (seeded by the training run) when clips are jittered."""
    import torch

    def make(batches: list[np.ndarray]) -> ClipReader:
        seed = int(torch.randint(2**62, ())) if jitter else None
        return clip_reader(dataset, batches, transform, skip_corrupt, video, seed)

    return make
