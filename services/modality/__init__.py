"""Images and videos, one strategy object each: `modality_for(x)` is the modality of a backbone spec, a model's
manifest or a VideoSpec (None: images), and the code around asks it (what a dataset item is read as, the transform,
the backbone's wrapping and token layout, a predict payload's checks and decoding) instead of branching on video.

- `base.py`: `Modality`, what every kind answers; `TokenLayout`; `Kind`, the kinds' names;
- `image.py`: `Images` (`IMAGES`, the one instance);
- `video.py`: `Videos`, one per `VideoSpec`.

Torch-free to import (the planner and the API ask it); each method imports what it runs.
"""

from __future__ import annotations

from typing import Protocol

from services.modality.base import Kind, Modality, TokenLayout
from services.modality.image import IMAGES
from services.modality.video import Videos
from services.video.spec import VideoSpec

__all__ = ["Kind", "Modality", "TokenLayout", "modality_for"]


class Described(Protocol):
    """What names a modality: a BackboneSpec (`backbone.video`), a Manifest (`manifest.video`)."""

    @property
    def video(self) -> VideoSpec | None: ...


def modality_for(of: Described | VideoSpec | None) -> Modality:
    """The modality of `of`: videos where it has a VideoSpec, images otherwise."""
    video = of if of is None or isinstance(of, VideoSpec) else of.video
    return IMAGES if video is None else Videos(video)
