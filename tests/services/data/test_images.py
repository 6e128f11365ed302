"""Decoding by one set of rules (services/data/images.py), against reference arrays computed here with numpy: the exact
pixel limit from the header, 16-bit / 32-bit / float images scaled to 8 bits, EXIF orientation (Pillow's path and the
device path, run on the CPU), transparency on white, and JPEG draft decoding."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from services.data.images import (
    BACKGROUND,
    MAX_IMAGE_PIXELS,
    ImageError,
    TooManyPixels,
    check_budget,
    draft_size,
    load_image,
)
from services.data.loading import EncodedReader, decode_on_device


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_the_pixel_limit_is_exact_and_read_from_the_header() -> None:
    assert load_image(encode(Image.new("L", (10, 10)), "PNG"), max_pixels=100).size == (10, 10)
    with pytest.raises(ImageError, match="10x11 = 110 pixels; at most 100"):
        load_image(encode(Image.new("L", (10, 11)), "PNG"), max_pixels=100)
    side = int(MAX_IMAGE_PIXELS**0.5) + 1  # just above the default limit (Pillow alone would decode up to twice it)
    bomb = encode(Image.new("1", (side, side)), "PNG")  # a few kB
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="image too large"):
        load_image(bomb)
    assert time.perf_counter() - t0 < 1.0  # refused from the header, never decoded


def test_an_unreadable_image_is_named_without_internals() -> None:
    with pytest.raises(ImageError) as info:
        load_image(b"definitely not an image")
    expected = "uploaded image: not a readable image (UnidentifiedImageError: cannot identify image file)"
    assert str(info.value) == expected


def test_a_request_pixel_budget_counts_headers() -> None:
    images = [encode(Image.new("1", (1000, 1000)), "PNG")] * 3
    assert check_budget(images, 3_000_000) == 3_000_000
    with pytest.raises(TooManyPixels, match="3,000,000 pixels together; at most 2,999,999"):
        check_budget(images, 2_999_999)


def test_16_bit_32_bit_and_float_images_are_scaled_to_8_bits() -> None:
    ramp16 = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(32, 64)
    expected = np.round(ramp16 / 257).astype(np.uint8)
    got = np.asarray(load_image(encode(Image.fromarray(ramp16), "PNG")))
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    assert (got[..., 0] == 255).mean() < 0.01  # convert("RGB") alone made 99% of this ramp white

    ramp32 = ramp16.astype(np.int32)
    got = np.asarray(load_image(encode(Image.fromarray(ramp32), "TIFF")))
    np.testing.assert_array_equal(got[..., 1], expected)

    unit = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    got = np.asarray(load_image(encode(Image.fromarray(unit), "TIFF")))
    np.testing.assert_array_equal(got[..., 2], np.round(unit.astype(np.float64) * 255).astype(np.uint8))
    byte_range = unit * 255
    got = np.asarray(load_image(encode(Image.fromarray(byte_range), "TIFF")))
    np.testing.assert_array_equal(got[..., 0], np.round(byte_range.astype(np.float64)).astype(np.uint8))


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, hidden where transparent
    rgba[:, :4, 3] = 0
    rgba[:, 4:, 3] = 128
    got = np.asarray(load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    assert (got[:, :4] == BACKGROUND).all()
    a = 128 / 255
    expected = np.round([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    assert np.abs(got[:, 4:] - expected).max() <= 1

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    got = np.asarray(load_image(encode(palette, "PNG", transparency=0)))
    np.testing.assert_array_equal(got, [[[255, 255, 255], [10, 20, 30]], [[10, 20, 30], [255, 255, 255]]])


# EXIF orientation -> how the stored pixels are turned upright, in numpy terms
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _oriented_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A JPEG of an asymmetric picture whose EXIF says `orientation`, and its stored pixels as Pillow decodes them."""
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (6, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48 x 80, blocky
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_both_paths(orientation: int, tmp_path) -> None:
    data, stored = _oriented_jpeg(orientation)
    np.testing.assert_array_equal(np.asarray(load_image(data)), UPRIGHT[orientation](stored))

    # the device path (decode_jpeg, here on the CPU): upright the same way, from its own decode of the same file
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    reader = EncodedReader([path], [np.array([0])], None, False)
    batch = decode_on_device(reader[0], [path], lambda x: x, torch.device("cpu"), False)
    from torchvision.io import decode_jpeg

    raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(batch.images[0].numpy(), UPRIGHT[orientation](raw))
    assert np.abs(batch.images[0].numpy().astype(int) - UPRIGHT[orientation](stored)).mean() < 1.5  # same picture


def test_large_jpegs_are_draft_decoded_never_below_the_draft_size() -> None:
    data = encode(Image.new("RGB", (2000, 1600), (90, 120, 150)), "JPEG")
    assert load_image(data).size == (2000, 1600)
    assert load_image(data, draft=256).size == (500, 400)  # 1/4: still >= 256 on both sides
    assert load_image(data, draft=800).size == (1000, 800)
    assert load_image(data, draft=900).size == (2000, 1600)  # halving would go below 900
    assert load_image(encode(Image.new("RGB", (2000, 1600)), "PNG"), draft=256).size == (2000, 1600)  # JPEG only
    from timm.data import create_transform

    eval_transform = create_transform(input_size=(3, 224, 224), crop_pct=0.875, is_training=False)
    assert draft_size(eval_transform) == 2 * 256  # twice the shortest side it resizes to
    assert draft_size(create_transform(input_size=(3, 224, 224), is_training=True)) is None  # random crops
