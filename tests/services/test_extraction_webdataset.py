"""The same digits as an ImageFolder and as WebDataset shards (written with `tarfile`, the folder's files as they
are) give the same cache: run_extraction in process, through the loader thread and through loader processes (which
read the shards' members by their offsets), writes bit-equal activations, labels and valid rows for both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.data.datasets import read_imagefolder
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.settings import Settings
from tests.shards import imagefolder_samples, write_shards


def spec_for(path: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": path},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
            "method": {"name": "losa", "rank": 4},
            "extraction": {"batch_size": 16},
        }
    )


@pytest.mark.parametrize("workers", [0, 2], ids=["loader-thread", "loader-processes"])
def test_imagefolder_and_webdataset_give_bit_equal_activations(
    settings: Settings, digits_root: Path, tmp_path: Path, workers: int
) -> None:
    folder = read_imagefolder(digits_root / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    pattern = write_shards(tmp_path / "shards", samples, per_shard=50)
    settings = settings.model_copy(update={"loader_workers": workers})
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    b = run_extraction(spec_for(pattern), settings, NullReporter())
    assert a["loader_workers"] == b["loader_workers"] == workers
    assert a["cache_key"] != b["cache_key"]  # another dataset's fingerprint: an entry of its own
    cache = FeatureCache(settings.cache_location)
    folder_entry, shard_entry = cache.entry(a["cache_key"]), cache.entry(b["cache_key"])
    assert folder_entry.is_complete and shard_entry.is_complete
    got, want = shard_entry.read(), folder_entry.read()
    assert got.shape[0] == len(folder) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(shard_entry.labels(), folder_entry.labels())
    np.testing.assert_array_equal(shard_entry.valid(), folder_entry.valid())
