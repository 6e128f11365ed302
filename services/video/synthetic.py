"""A synthetic motion dataset, and `write_video` (frames -> a file PyAV can read), for the demo, tests and bench.

Each video shows a bright square moving left, right, up or down over a background of fresh noise in every frame.
Every trajectory is centred in time: the square passes its (random) centre at the middle frame, so a class and its
reversal (left and right, up and down) visit the same positions with the same distribution, and only the order of
the frames tells them apart. A frame-averaged model, or a frozen ViViT read out by a linear probe (blind to temporal
order: services/video/spec.py), can tell horizontal from vertical motion but not its direction: at best 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("down", "left", "right", "up")
_DIRECTIONS = {"down": (0, 1), "left": (-1, 0), "right": (1, 0), "up": (0, -1)}  # (dx, dy) per frame, in steps
# codec and pixel format per container: lossless ffv1 in .mkv (exact round trips), common lossy ones elsewhere
CODECS = {
    ".mp4": ("libx264", "yuv420p"),
    ".mov": ("libx264", "yuv420p"),
    ".avi": ("mpeg4", "yuv420p"),
    ".webm": ("libvpx-vp9", "yuv420p"),
    ".mkv": ("ffv1", "bgr0"),
}


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode uint8 frames [T, H, W, 3] (RGB; even H and W) into `path`, the codec chosen by its suffix."""
    import av

    codec, pix_fmt = CODECS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())
    return path


def motion_clip(direction: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the square moving in `direction`, centred in time, over fresh noise."""
    side = size // 4
    dx, dy = _DIRECTIONS[direction]
    travel = size * 0.45  # the path's length; it stays inside the central crop of every timm eval transform
    step = travel / max(frames - 1, 1)
    centre = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size  # symmetric, so a path and its reversal are alike
    colour = rng.integers(200, 256, size=3)
    out = np.clip(rng.normal(96, 28, size=(frames, size, size, 3)), 0, 255).astype(np.uint8)
    for t in range(frames):
        offset = (t - (frames - 1) / 2) * step
        x0 = int(round(centre[0] + dx * offset - side / 2))
        y0 = int(round(centre[1] + dy * offset - side / 2))
        out[t, max(y0, 0) : max(y0 + side, 0), max(x0, 0) : max(x0 + side, 0)] = colour
    return out


def write_motion(
    root: Path,
    per_class: int,
    holdout_per_class: int = 0,
    frames: int = 16,
    size: int = 64,
    seed: int = 0,
    suffix: str = ".mp4",
) -> dict[str, int]:
    """`per_class` videos per class under `root/train/<class>/`, `holdout_per_class` under `root/holdout/<class>/`
    (the same process, other seeds); files that exist are kept. Returns the counts."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("holdout", holdout_per_class)):
        for cls in CLASSES:
            for i in range(n):
                clip = motion_clip(cls, rng, frames, size)  # drawn even when the file exists: the same seeds follow
                path = root / split / cls / f"{cls}_{i:04d}{suffix}"
                if not path.exists():
                    write_video(path, clip)
    return {"train": per_class * len(CLASSES), "holdout": holdout_per_class * len(CLASSES)}
