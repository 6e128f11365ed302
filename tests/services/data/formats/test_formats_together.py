"""The formats of both halves of issue 22 side by side: `auto` picks each by its location, local or in an object store;
an `hf://` Hub id is no object-store URL (the allowed prefixes never apply to it, though a URL's credentials are still
refused); a Hugging Face dataset's Parquet files named in an object store are under the prefix rule, not read as a
local path; a manifest row naming a Hub id is refused. No store and no Hub are reached: each refusal comes before any
read (tests/services/data/formats/test_hf_store.py reads Parquet files in a store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.data.datasets import DatasetError, format_for, read_dataset, read_for_job
from services.data.formats.urls import is_remote, is_url
from services.paths import ForbiddenPath, UserPaths
from services.spec.dataset import DatasetSpec
from storage.settings import Settings


def test_hub_ids_and_file_urls_are_not_object_store_urls() -> None:
    assert is_remote("s3://bucket/shards/0.tar") and is_remote("gs://bucket/m.jsonl")
    assert not is_remote("hf://org/name") and not is_remote("HF://org/name")
    assert not is_remote("file:///data/x") and not is_remote("/data/x") and not is_remote(Path("/data/x"))
    assert is_url("hf://org/name") and is_url("s3://bucket/x") and not is_url("file:///data/x")


@pytest.mark.parametrize(
    ("location", "name"),
    [
        ("s3://bucket/shards/{000000..000009}.tar", "webdataset"),
        ("s3://bucket/train.csv", "csv"),
        ("s3://bucket/train.jsonl", "jsonl"),
        ("s3://bucket/data/train-00000-of-00001.parquet", "huggingface"),
        ("s3://bucket/ds/", "huggingface"),
        ("s3://bucket/folder", "imagefolder"),
        ("hf://org/name", "huggingface"),
        ("{tmp}/shards/{{000000..000009}}.tar", "webdataset"),
        ("{tmp}/train.csv", "csv"),
        ("file://{tmp}/train.jsonl", "jsonl"),
        ("{tmp}/train.parquet", "huggingface"),
        ("{tmp}/folder", "imagefolder"),
    ],
)
def test_auto_picks_each_format_by_its_location(location: str, name: str, tmp_path: Path) -> None:
    for manifest in ("train.csv", "train.jsonl", "train.parquet"):  # local files are claimed where they exist
        (tmp_path / manifest).write_text("")
    assert format_for(location.format(tmp=tmp_path) if "{tmp}" in location else location).name == name


def test_a_hub_id_is_not_under_the_prefix_rule(tmp_path: Path) -> None:
    paths = UserPaths(Settings(data_dir=tmp_path, allowed_roots=[tmp_path], allowed_prefixes=["hf://org/"]))
    # an allowed prefix `hf://` does not make the Hub an object store: a Hub id is read only as a dataset
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        paths.check_member("dataset.path", "hf://org/name/x.png", "a row")
    # and a Hub id names nothing the rule checks at submission
    assert DatasetSpec(path="hf://org/name").locations() == []
    assert DatasetSpec(path="hf://org/name", format="huggingface").locations() == []


def test_a_hub_id_with_credentials_is_refused_unrepeated() -> None:
    with pytest.raises(ValidationError, match="credentials are never taken from a URL") as e:
        DatasetSpec(path="hf://user:hf_secret@org/name")
    assert "hf_secret" not in e.value.errors()[0]["msg"]  # the message the API answers with


def test_a_hugging_face_dataset_in_an_object_store_is_under_the_prefix_rule(tmp_path: Path) -> None:
    for url in ("s3://bucket/ds/train.parquet", "s3://bucket/ds/"):
        spec = DatasetSpec(path=url, format="huggingface")
        assert spec.locations() == [url]  # what the API checks at submission
        paths = UserPaths(Settings(data_dir=tmp_path, allowed_roots=[tmp_path], allowed_prefixes=["s3://other/"]))
        with pytest.raises(ForbiddenPath, match="outside the allowed object-store prefixes"):
            read_for_job(DatasetSpec(path=url), paths)  # and the worker, before anything is read
    # not a local path: a URL is never looked for on the server's disk
    with pytest.raises(ForbiddenPath, match="outside the allowed object-store prefixes"):
        UserPaths(Settings(data_dir=tmp_path, allowed_roots=[tmp_path])).check_location("dataset.path", "s3://b/x/")


def test_a_manifest_row_naming_a_hub_id_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label\nhf://org/name/x.png,cat\n")
    with pytest.raises(DatasetError, match="line 2: a row names a file, not a Hugging Face dataset"):
        read_dataset(tmp_path / "m.csv")
