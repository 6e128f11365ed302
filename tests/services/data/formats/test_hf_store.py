"""A Hugging Face dataset's Parquet shards on a real S3-compatible server (moto), written by the `datasets` library:
a folder URL of shards split by their names and a single `.parquet` URL read as their local copies (the same rows,
labels, splits and bytes), the fingerprint from the objects' ETags and footers (a rewritten object changes it),
planning that fetches the footers and label columns but none of the images (bytes counted through a proxy), rows
without bytes named, a store folder without Parquet refused with a reason, and a URL outside the allowed prefixes
refused as the worker reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

import datasets  # noqa: E402

from services.data.datasets import DatasetError, TableRow, read_dataset, read_for_job, read_imagefolder  # noqa: E402
from services.data.formats.base import HuggingFaceOptions  # noqa: E402
from services.paths import ForbiddenPath, UserPaths  # noqa: E402
from services.spec.dataset import DatasetSpec  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.services.data.formats.test_huggingface import digits_dataset  # noqa: E402
from tests.services.data.formats.test_remote import upload  # noqa: E402
from tests.services.test_extraction_s3 import through_proxy  # noqa: E402


def write_parquet(ds: datasets.Dataset, folder: Path, rows_per_group: int = 20) -> Path:
    """`ds` as `push_to_hub` lays it out: `data/train-*.parquet` (two shards) and `data/validation-*.parquet`, the
    last 30 rows the validation split; row groups of `rows_per_group` rows."""
    n = len(ds)
    train, validation = ds.select(range(n - 30)), ds.select(range(n - 30, n))
    for i in range(2):
        shard = train.shard(2, i, contiguous=True)
        shard.to_parquet(folder / "data" / f"train-{i:05d}-of-00002.parquet", batch_size=rows_per_group)
    validation.to_parquet(folder / "data" / "validation-00000-of-00001.parquet", batch_size=rows_per_group)
    return folder


def test_parquet_shards_in_a_store_read_as_their_local_copy(digits_root: Path, tmp_path: Path, s3_url: str) -> None:
    local = write_parquet(digits_dataset(digits_root / "train"), tmp_path / "hf")
    upload(local, f"{s3_url}/hf")
    want, got = read_dataset(local), read_dataset(f"{s3_url}/hf/")  # auto: a folder URL ending in `/`
    assert got.classes == want.classes and len(got) == len(want) and got.kind == "image"
    assert got.root == f"{s3_url}/hf"
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.parts, want.parts)  # the splits by the files' names
    assert np.bincount(got.parts).tolist() == [len(got) - 30, 30]
    assert all(isinstance(p, TableRow) and isinstance(p.file, str) for p in got.paths)
    for i in (0, 1, len(got) - 1):
        assert got.paths[i].read_bytes() == want.paths[i].read_bytes()
        assert got.paths[i].suffix == ".png"
    one = read_dataset(f"{s3_url}/hf/data/validation-00000-of-00001.parquet")
    assert len(one) == 30 and one.parts is None and one.root == f"{s3_url}/hf/data"
    assert read_dataset(f"{s3_url}/hf", "huggingface").fingerprint == got.fingerprint  # no `/` with the format named

    # the fingerprint: the objects' ETags, sizes and footers; the same objects give the same, a rewritten one another
    assert read_dataset(f"{s3_url}/hf/").fingerprint == got.fingerprint
    shard = local / "data" / "train-00001-of-00002.parquet"
    datasets.Dataset.from_parquet(str(shard)).to_parquet(shard, batch_size=7)  # same rows, other row groups
    upload(shard, f"{s3_url}/hf/data/train-00001-of-00002.parquet")
    again = read_dataset(f"{s3_url}/hf/")
    assert again.fingerprint != got.fingerprint
    np.testing.assert_array_equal(again.labels, got.labels)
    assert again.paths[len(again) - 31].read_bytes() == want.paths[len(want) - 31].read_bytes()


def test_planning_fetches_footers_and_labels_not_images(
    digits_root: Path, tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = read_imagefolder(digits_root / "train")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for _ in range(len(folder))]
    rows = {  # each row's "image" 40 kB of noise (stored, not decoded here): the images are what is large
        "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(noise)],
        "label": folder.labels.tolist(),
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    local = write_parquet(datasets.Dataset.from_dict(rows, features=features), tmp_path / "big")
    upload(local, f"{s3_url}/big")
    total = sum(f.stat().st_size for f in local.rglob("*.parquet"))
    with through_proxy(monkeypatch) as proxy:
        got = read_dataset(f"{s3_url}/big/")
        planned = proxy.received
        first = got.paths[0].read_bytes()
        one_group = proxy.received - planned
    assert len(got) == len(folder) and first == noise[0]
    assert total > 20 * 40_000 and planned < total / 20, (planned, total)  # footers and labels only
    assert 20 * 40_000 <= one_group < 2 * 20 * 40_000  # the row's group: 20 images and no more


def test_rows_without_bytes_are_named_or_skipped(tmp_path: Path, s3_url: str) -> None:
    images = [{"bytes": b"\x89PNG-not-decoded", "path": f"{i}.png"} for i in range(4)]
    images[2] = {"bytes": None, "path": "elsewhere/2.png"}  # a name only: no file in a store to read it from
    rows = {"image": images, "label": [0, 1, 0, 1]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "p.parquet", batch_size=4)
    upload(tmp_path / "p.parquet", f"{s3_url}/p.parquet")
    with pytest.raises(DatasetError, match=r"train row 2 \(p.parquet\): no image bytes \(a dataset in a store\)"):
        read_dataset(f"{s3_url}/p.parquet")
    skipped = read_dataset(f"{s3_url}/p.parquet", on_corrupt="skip")
    assert len(skipped) == 3 and any("row 2" in note for note in skipped.skipped_rows)


def test_a_store_folder_without_parquet_is_refused_with_a_reason(
    digits_root: Path, tmp_path: Path, s3_url: str
) -> None:
    digits_dataset(digits_root / "train").save_to_disk(tmp_path / "saved")
    upload(tmp_path / "saved", f"{s3_url}/saved")
    with pytest.raises(DatasetError, match="holds no .parquet object; in an object store a Hugging Face dataset is"):
        read_dataset(f"{s3_url}/saved/")
    with pytest.raises(DatasetError, match=r"train.parquet does not exist"):
        read_dataset(f"{s3_url}/nothing/train.parquet")
    with pytest.raises(DatasetError, match=r"no column 'labels' \(dataset.huggingface.label_column\)"):
        digits_dataset(digits_root / "train").to_parquet(tmp_path / "d.parquet")
        upload(tmp_path / "d.parquet", f"{s3_url}/d.parquet")
        read_dataset(f"{s3_url}/d.parquet", huggingface=HuggingFaceOptions(label_column="labels"))


def test_a_worker_reads_only_under_the_allowed_prefixes(digits_root: Path, tmp_path: Path, s3_url: str) -> None:
    local = write_parquet(digits_dataset(digits_root / "train"), tmp_path / "hf")
    upload(local, f"{s3_url}/hf")

    def paths(prefix: str) -> UserPaths:
        return UserPaths(Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path], allowed_prefixes=[prefix]))

    spec = DatasetSpec(path=f"{s3_url}/hf/")
    assert len(read_for_job(spec, paths(f"{s3_url}/hf/"))) == len(read_dataset(local))
    with pytest.raises(ForbiddenPath, match="outside the allowed object-store prefixes"):
        read_for_job(spec, paths(f"{s3_url}/other/"))
    single = DatasetSpec(path=f"{s3_url}/hf/data/validation-00000-of-00001.parquet", format="huggingface")
    with pytest.raises(ForbiddenPath, match="outside the allowed object-store prefixes"):
        read_for_job(single, paths(f"{s3_url}/hf/data/train"))
