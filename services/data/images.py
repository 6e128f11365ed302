"""Decoding an image file into the RGB pixels every path of sidetune sees (loaders, training, predict), by one set of
rules, so that a model sees at predict time what it was trained on:

- Size: refused from the header, before any decoding, above `max_pixels` (exactly: Pillow's own guard only stops
  at twice its limit); predict also bounds the pixels of a whole request (`check_budget`).
- JPEG draft decoding: a JPEG at least four times larger than needed (`draft`: twice the size the transform
  resizes to) is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself, never below that size: a fraction of the
  time and memory, and the antialiased resize that follows sees no difference worth the name.
- EXIF orientation is applied (a phone's portrait photo stands upright).
- 16-bit and 32-bit integer images (`I;16`, `I`) are scaled to 8 bits (v / 257); float images (`F`) from [0, 1]
  (or [0, 255] when a value exceeds 1) to 8 bits; `convert("RGB")` alone would clip them to black and white.
- Transparency is composited on `BACKGROUND` (white), not dropped (which shows whatever colour the transparent
  pixels happen to hold).

Decoding on the device (services/data/loading.py: `decode_jpeg(..., apply_exif_orientation=True)`) follows the same
rules for JPEGs (8-bit, opaque by nature); every other format is decoded here first.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: larger images are refused, not decoded
BACKGROUND = (255, 255, 255)
PIXELS = "v2"  # the version of these rules, part of the feature cache's key: changing them must not reuse a cache


class ImageError(UserError, ValueError):
    """An image that cannot be decoded or is too large; the message names it."""

    code = "invalid_image"


class TooManyPixels(ImageError):
    """A predict request whose images hold more pixels together than the request budget."""

    code = "too_many_pixels"
    status = 413


def _open(source: Path | bytes, name: str) -> Any:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our exact check below replaces Pillow's warning at 1x and error at 2x
    try:
        return Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except Exception as e:  # Pillow raises many types for bad bytes
        raise ImageError(f"{name}: not a readable image ({_reason(e)})") from e


def _reason(e: Exception) -> str:
    """Pillow's message without the repr of our in-memory buffer (`<_io.BytesIO object at 0x...>`)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")


def _name(source: Path | bytes) -> str:
    return str(source) if isinstance(source, Path) else "uploaded image"


def image_pixels(source: Path | bytes) -> int:
    """Width x height from the header, without decoding."""
    return header(source)[0]


def header(source: Path | bytes) -> tuple[int, int]:
    """(width x height, EXIF orientation 1-8) from the header, without decoding."""
    with _open(source, _name(source)) as im:
        orientation = im.getexif().get(0x0112, 1)
        return im.size[0] * im.size[1], orientation if orientation in range(1, 9) else 1


def orient(image: Any, orientation: int) -> Any:
    """A [..., H, W] tensor turned upright by its EXIF orientation, as Pillow's `ImageOps.exif_transpose` turns an
    image (decode_jpeg applies the orientation on the CPU only)."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def check_budget(images: Iterable[bytes], budget: int) -> int:
    """The pixels of a request's images from their headers; TooManyPixels if they exceed `budget` together."""
    total = 0
    for i, data in enumerate(images):
        try:
            total += image_pixels(data)
        except ImageError as e:
            raise ImageError(f"instance {i}: {e}") from None
    if total > budget:
        raise TooManyPixels(
            f"the images hold {total:,} pixels together; at most {budget:,} per request (send fewer or smaller images)"
        )
    return total


def draft_size(transform: Any) -> int | None:
    """The draft size for a transform that starts by resizing to a fixed shortest side S: 2 S. None otherwise (e.g. a
    random resized crop, which may zoom into a small part of the image)."""
    steps = getattr(transform, "transforms", [transform])
    first = steps[0] if steps else None
    if type(first).__name__ != "Resize":
        return None
    size = first.size
    side = size if isinstance(size, int) else size[0] if len(size) == 1 else min(size)
    return 2 * int(side)


def to_rgb(im: Any) -> Any:
    """A loaded PIL image in any mode -> RGB by the rules above."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.round(np.clip(a, 0, 65535) / 257).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        im = Image.fromarray(np.round(np.clip(a * scale, 0, 255)).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    source: Path | bytes, draft: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
) -> Any:
    """Decode an image to an RGB PIL image by the rules above; ImageError naming the file (or `name`, what the bytes
    are) or the cause otherwise."""
    from PIL import ImageOps

    name = name or _name(source)
    with _open(source, name) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(f"{name}: image too large ({w}x{h} = {w * h:,} pixels; at most {max_pixels:,})")
        try:
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:
            raise ImageError(f"{name}: not a readable image ({_reason(e)})") from e
