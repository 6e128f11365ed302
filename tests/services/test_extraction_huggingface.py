"""The same digits as an ImageFolder and as a Hugging Face dataset (written by the `datasets` library with the
folder's PNG bytes embedded, as Arrow files, Parquet shards on disk or Parquet shards on a moto S3 server; or as an
imagefolder with a metadata.csv naming copies of its files) give the same cache: run_extraction in process, through
the loader thread and through loader processes (which read each image from the Arrow or Parquet file in place, the
object's row group by ranged requests, or from its file), writes bit-equal activations, labels and valid rows for
both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

from services.data.datasets import read_imagefolder  # noqa: E402
from services.extraction import run_extraction  # noqa: E402
from services.jobs.progress import NullReporter  # noqa: E402
from storage.cache import FeatureCache  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.services.data.formats.test_hf_imagefolder import write_metadata_folder  # noqa: E402
from tests.services.data.formats.test_huggingface import digits_dataset  # noqa: E402
from tests.services.test_extraction_s3 import s3_parquet  # noqa: E402
from tests.services.test_extraction_webdataset import spec_for  # noqa: E402


@pytest.mark.parametrize(
    ("layout", "workers"),
    [("arrow", 0), ("parquet", 2), ("parquet-s3", 2)],
    ids=["arrow-loader-thread", "parquet-loader-processes", "parquet-in-s3-loader-processes"],
)
def test_imagefolder_and_huggingface_give_bit_equal_activations(
    settings: Settings, digits_root: Path, tmp_path: Path, layout: str, workers: int, request: pytest.FixtureRequest
) -> None:
    ds = digits_dataset(digits_root / "train")
    location = str(tmp_path / "hf")
    if layout == "arrow":
        ds.save_to_disk(tmp_path / "hf", max_shard_size="20KB")  # several Arrow files
    elif layout == "parquet":
        for i in range(3):
            ds.shard(3, i, contiguous=True).to_parquet(tmp_path / "hf" / f"train-{i:05d}-of-00003.parquet")
    else:  # the same shards on a moto S3 server, read where they are (row groups of 20 rows)
        s3_url = request.getfixturevalue("s3_url")
        location = s3_parquet(digits_root, tmp_path, s3_url)
        settings = settings.model_copy(update={"allowed_prefixes": [s3_url]})
    settings = settings.model_copy(update={"loader_workers": workers})
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    b = run_extraction(spec_for(location), settings, NullReporter())
    assert a["loader_workers"] == b["loader_workers"] == workers and a["cache_key"] != b["cache_key"]
    cache = FeatureCache(settings.cache_location)
    folder_entry, hf_entry = cache.entry(a["cache_key"]), cache.entry(b["cache_key"])
    assert folder_entry.is_complete and hf_entry.is_complete
    got, want = hf_entry.read(), folder_entry.read()
    assert got.shape[0] == len(ds) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(hf_entry.labels(), folder_entry.labels())
    np.testing.assert_array_equal(hf_entry.valid(), folder_entry.valid())


def test_an_imagefolder_with_metadata_gives_the_imagefolders_activations(
    settings: Settings, digits_root: Path, tmp_path: Path
) -> None:
    # the same images copied flat into `train/` with a metadata.csv naming each and its class
    write_metadata_folder(digits_root / "train", tmp_path / "hf", splits=False)
    settings = settings.model_copy(update={"loader_workers": 2})
    a = run_extraction(spec_for(str(digits_root / "train")), settings, NullReporter())
    b = run_extraction(spec_for(str(tmp_path / "hf")), settings, NullReporter())
    assert a["cache_key"] != b["cache_key"]  # other files: an entry of their own
    cache = FeatureCache(settings.cache_location)
    folder_entry, hf_entry = cache.entry(a["cache_key"]), cache.entry(b["cache_key"])
    assert folder_entry.is_complete and hf_entry.is_complete
    got, want = hf_entry.read(), folder_entry.read()
    assert got.shape[0] == len(read_imagefolder(digits_root / "train")) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(hf_entry.labels(), folder_entry.labels())
    np.testing.assert_array_equal(hf_entry.valid(), folder_entry.valid())
