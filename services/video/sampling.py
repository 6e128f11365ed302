"""Which frames of a video make its clip: indices into the video's frames (or its span's), in order.

`uniform`: the video is cut into T equal segments and one frame is taken from each: its centre for the cache
(deterministic: one clip per video), a random one online (temporal jitter, as TSN samples). `strided`: T frames
`stride` apart, a window centred in the video for the cache and placed at random online (as ViViT and SlowFast
sample Kinetics). A video with fewer frames than that is padded by repeating frames: uniform sampling repeats
frames evenly, a strided window repeats its last frame.
"""

from __future__ import annotations

import numpy as np


def clip_indices(
    frames: int, num_frames: int, sampling: str, stride: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`num_frames` frame indices (int64, ascending, repeats where the video is short) of a video of `frames`
    frames; `rng` jitters them (None: deterministic)."""
    if frames < 1:
        raise ValueError("a video without frames has no clip")
    if sampling == "uniform":
        offsets = np.full(num_frames, 0.5) if rng is None else rng.random(num_frames)
        positions = (np.arange(num_frames) + offsets) * (frames / num_frames)
        return np.minimum(np.floor(positions).astype(np.int64), frames - 1)
    if sampling == "strided":
        span = (num_frames - 1) * stride + 1
        if frames >= span:
            start = (frames - span) // 2 if rng is None else int(rng.integers(0, frames - span + 1))
            return start + np.arange(num_frames, dtype=np.int64) * stride
        return np.minimum(np.arange(num_frames, dtype=np.int64) * stride, frames - 1)
    raise ValueError(f"unknown sampling {sampling!r}; choose uniform or strided")
