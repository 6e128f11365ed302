"""Decode a clip with PyAV: the frames that sampling picks, each put through the frames' transform, as uint8
[T, H, W, 3]; and the transforms themselves (the backbone's eval steps per frame, or one random crop and flip for
the whole clip).

Only the frames the clip needs are converted and resized, and decoding stops after the last of them (inter-coded
frames before it must be decoded anyway). The frame count comes from the container when it records one (mp4, avi),
else from demuxing the packets without decoding them (webm, mkv, or a span). A file that PyAV cannot open or decode
raises DatasetError naming it; no decoder error escapes as another type.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from services.data.datasets import DatasetError
from services.errors import UserError
from services.video.sampling import clip_indices
from services.video.spec import VideoSpec

Frames = Callable[[Any], np.ndarray]  # an RGB PIL frame -> uint8 [H, W, 3]


class VideoTooLong(DatasetError):
    """A video longer than the caller allows (predict's limit on clip duration)."""


class VideoTooLarge(UserError):
    """A video file larger than the caller allows (predict's limit on a video's size)."""

    code = "video_too_large"
    status = 413


def check_sizes(items: list[bytes], max_mb: float, what: str = "instance") -> None:
    """VideoTooLarge for a video over `max_mb` (SIDETUNE_MAX_PREDICT_VIDEO_MB), naming it (`what` and its index)."""
    for i, data in enumerate(items):
        if len(data) > max_mb * 2**20:
            raise VideoTooLarge(
                f"{what} {i}: {len(data) / 2**20:.1f} MB; at most {max_mb:g} MB a video (SIDETUNE_MAX_PREDICT_VIDEO_MB)"
            )


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    total: int  # frames in the video (or its span)
    padded: bool  # fewer than the clip needs: frames were repeated


@dataclass(frozen=True)
class ClipTransform:
    """What happens to every frame of a clip. Without `augment`: the backbone's eval PIL steps (resize, centre
    crop), frame by frame, exactly as an image. With it (online training): one random resized crop (scale 0.5-1 of
    the area, aspect 3/4-4/3) and one horizontal flip decision per clip, the same for all its frames, so motion is
    preserved. A flip turns left into right: leave `execution.augment` off where direction is the label."""

    pil: Any  # the eval transform's PIL steps (services.backbones.SplitTransform.pil)
    size: int = 224
    augment: bool = False
    hflip: float = 0.5
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def for_clip(self, rng: np.random.Generator | None) -> Frames:
        if not self.augment:
            return lambda image: np.asarray(self.pil(image), dtype=np.uint8)
        if rng is None:
            raise ValueError("an augmented clip transform needs a random generator")
        drawn: dict[str, Any] = {}

        def frame(image: Any) -> np.ndarray:
            from PIL import Image

            if not drawn:  # drawn on the first frame, whose size the crop needs, and kept for the others
                drawn["box"], drawn["flip"] = self._crop_box(*image.size, rng), rng.random() < self.hflip
            out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=drawn["box"])
            return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if drawn["flip"] else out, np.uint8)

        return frame

    def _crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random crop of `scale` of the area and `ratio` aspect (as torchvision's RandomResizedCrop draws it,
        falling back to the centred largest crop), as a PIL box."""
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side


def _open(source: Path | bytes):
    import av

    return av.open(str(source) if isinstance(source, Path) else io.BytesIO(source), metadata_errors="ignore")


def _seconds(value: int | None, base: Fraction | None) -> float | None:
    return None if value is None or base is None else float(value * base)


def _count(source: Path | bytes, span: tuple[float, float] | None) -> int:
    """Frames of the video's first stream (in `span`, seconds), by demuxing its packets without decoding them."""
    with _open(source) as container:
        stream = container.streams.video[0]
        count = 0
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            t = _seconds(packet.pts, stream.time_base) or 0.0
            if span is None or span[0] <= t < span[1]:
                count += 1
        return count


def read_clip(
    source: Path | bytes,
    video: VideoSpec,
    frames: Frames,
    rng: np.random.Generator | None = None,
    span: tuple[float, float] | None = None,
    max_seconds: float | None = None,
    name: str | None = None,
) -> Clip:
    """The clip of `source` (a file or its bytes) that `video` samples (jittered by `rng`), from its frames in
    `span` (start, end seconds; None: all), each through `frames`. Raises DatasetError naming the file (VideoTooLong
    beyond `max_seconds`)."""
    name = name or (str(source) if isinstance(source, Path) else "uploaded video")
    try:
        return _read(source, video, frames, rng, span, max_seconds, name)
    except DatasetError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, OSError, ValueError, IndexError for bad files
        raise DatasetError(f"{name}: not a readable video ({type(e).__name__}: {e})") from None


def _read(
    source: Path | bytes,
    video: VideoSpec,
    frames: Frames,
    rng: np.random.Generator | None,
    span: tuple[float, float] | None,
    max_seconds: float | None,
    name: str,
) -> Clip:
    with _open(source) as container:
        if not container.streams.video:
            raise DatasetError(f"{name}: no video stream")
        stream = container.streams.video[0]
        if span is not None:
            duration = span[1] - span[0]
        elif container.duration:
            duration = container.duration / 1e6  # in AV_TIME_BASE units
        else:
            duration = _seconds(stream.duration, stream.time_base)
        if max_seconds is not None and duration is not None and duration > max_seconds:
            raise VideoTooLong(f"{name}: {duration:.1f} s long; at most {max_seconds:g} s")
        total = stream.frames if span is None and stream.frames > 0 else 0
    total = total or _count(source, span)
    if total == 0:
        raise DatasetError(f"{name}: no video frames" + (f" between {span[0]:g} s and {span[1]:g} s" if span else ""))
    indices = clip_indices(total, video.num_frames, video.sampling, video.frame_stride, rng)
    wanted, last = set(indices.tolist()), int(indices.max())
    got: dict[int, np.ndarray] = {}
    decoded = -1
    with _open(source) as container:
        stream = container.streams.video[0]
        if span is not None and span[0] > 0:
            container.seek(int(span[0] / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            t = _seconds(frame.pts, stream.time_base)
            if span is not None and t is not None and t < span[0]:
                continue  # decoded from the keyframe before the span
            if span is not None and t is not None and t >= span[1]:
                break
            decoded += 1
            if decoded in wanted:
                got[decoded] = frames(frame.to_image())
            if decoded >= last:
                break
    if not got:
        raise DatasetError(f"{name}: no frame could be decoded")
    # a container that overstated its frame count: the missing last frames repeat the last one decoded
    fill = got[max(got)]
    clip = np.stack([got.get(int(i), fill) for i in indices])
    total = min(total, decoded + 1)
    return Clip(clip, total, total < video.frames_needed)
