"""The fast extraction path (loader processes, several shards written at once through tensorstore) writes exactly the
cache the single-threaded path writes (a loader thread, one zarr-python writer on an fsspec URL), and that cache is
plain Zarr v3 that zarr-python reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.settings import Settings


def spec_for(path: Path, **extraction) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), "on_corrupt": "skip"},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
            "method": {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 16, **extraction},
        }
    )


@pytest.mark.parametrize("extraction", [{}, {"codec": "zstd", "keepbits": 5}], ids=["none", "zstd+keepbits5"])
def test_parallel_extraction_is_bit_identical_to_the_single_threaded_path(
    settings: Settings, digits_root: Path, tmp_path: Path, extraction: dict
) -> None:
    spec = spec_for(digits_root / "train", **extraction)
    fast = settings.model_copy(update={"loader_workers": 2, "cache_writers": 4})
    plain = settings.model_copy(
        update={"loader_workers": 0, "cache_writers": 1, "cache_url": f"file://{tmp_path / 'plain-cache'}"}
    )
    a = run_extraction(spec, fast, NullReporter())
    b = run_extraction(spec, plain, NullReporter())
    assert (a["loader_workers"], a["writer"]) == (2, "tensorstore")
    assert (b["loader_workers"], b["writer"]) == (0, "zarr-python")
    fast_entry = FeatureCache(fast.cache_location).entry(a["cache_key"])
    plain_entry = FeatureCache(plain.cache_location).entry(b["cache_key"])
    assert a["cache_key"] == b["cache_key"] and fast_entry.is_complete and plain_entry.is_complete
    got, want = fast_entry.read(), plain_entry.read()
    assert got.shape == (len(fast_entry.labels()), 6, 17, 64) and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fast_entry.valid(), plain_entry.valid())
    np.testing.assert_array_equal(fast_entry.labels(), plain_entry.labels())
    # tensorstore's shards, read by plain zarr-python without sidetune
    acts = zarr.open_array(str(fast_entry.features / "acts"), mode="r")
    np.testing.assert_array_equal(acts[:], want)
    if extraction.get("keepbits"):  # rounded to 5 mantissa bits: the low 5 of float16's 10 are zero
        assert not (want.view(np.uint16) & 0b11111).any()


@pytest.fixture
def jpegs(tmp_path: Path) -> tuple[Path, Path]:
    """Two classes of smooth 120x90 JPEGs, one PNG among them, and a JPEG cut short; returns (root, the bad one)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    for i in range(16):
        folder = tmp_path / "jpegs" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.stack([(x * rng.uniform(0.5, 2) + y * rng.uniform(0, 1)) % 256 for _ in range(3)], -1)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.{'png' if i == 3 else 'jpg'}", quality=92)
    bad = tmp_path / "jpegs" / "c0" / "cut.jpg"
    bad.write_bytes((tmp_path / "jpegs" / "c0" / "0.jpg").read_bytes()[:200])
    return tmp_path / "jpegs", bad


def test_decoding_on_the_device_is_a_cache_of_its_own_close_to_pillows(settings: Settings, jpegs) -> None:
    """`extraction.decode = "device"`: JPEGs through torchvision's decode_jpeg (nvJPEG on a GPU; libjpeg here), the
    PNG through Pillow, every image resized by torchvision on the device; the truncated JPEG is skipped and named."""
    root, bad = jpegs
    cpu = run_extraction(spec_for(root), settings, NullReporter())
    dev = run_extraction(spec_for(root, decode="device"), settings, NullReporter())
    assert dev["cache_key"] != cpu["cache_key"] and not dev["cache_hit"]
    assert cpu["skipped"] == [str(bad)] and dev["skipped"] == [str(bad)]
    cache = FeatureCache(settings.cache_dir)
    a = cache.entry(cpu["cache_key"]).read().astype(np.float32)
    b = cache.entry(dev["cache_key"]).read().astype(np.float32)
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert 0 < rel < 0.1, rel  # the same images, resized by another implementation
