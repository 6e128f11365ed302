"""A loader's batch of samples from shards in an object store (a real S3-compatible server, moto) is read by one
ranged request per run of members close together in a shard (formats/samples.py: `read_together`), not one request a
sample: the bytes are each member's own, a batch across two shards is two requests, and a shard cut short since it
was listed leaves its missing members to their own read, which names the shard."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from services.data.datasets import DatasetError, read_for_job, read_imagefolder
from services.data.formats import remote, samples
from services.paths import UserPaths
from services.spec.dataset import DatasetSpec
from storage.settings import Settings
from tests.shards import imagefolder_samples, write_shards


@pytest.fixture
def on_s3(settings: Settings, digits_root: Path, tmp_path: Path, s3_url: str):
    """The digits as shards of 40 samples on the store, read as a job reads them; the ranged requests counted."""
    folder = read_imagefolder(digits_root / "train")
    write_shards(tmp_path / "shards", imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist()), 40)
    fs, path = fsspec.core.url_to_fs(f"{s3_url}/shards")
    fs.put(str(tmp_path / "shards"), path, recursive=True)
    paths = UserPaths(settings.model_copy(update={"allowed_prefixes": [s3_url]}))
    return read_for_job(DatasetSpec(path=f"{s3_url}/shards/{{000000..000004}}.tar"), paths), tmp_path / "shards"


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    seen: list[tuple[str, int, int]] = []
    read = remote.read_range

    def counted(url: str, start: int, size: int, what: str = "object") -> bytes:
        seen.append((url, start, size))
        return read(url, start, size, what)

    monkeypatch.setattr(remote, "read_range", counted)
    return seen


def test_a_batch_of_consecutive_samples_is_one_request(on_s3, requests) -> None:
    dataset, _ = on_s3
    got = samples.read_together(dataset.paths, list(range(8, 24)))
    assert len(requests) == 1 and sorted(got) == list(range(8, 24))
    assert all(got[i] == dataset.paths[i].read_bytes() for i in got)  # each member's own bytes
    requests.clear()
    across = samples.read_together(dataset.paths, list(range(30, 50)))  # shards 0 and 1
    assert sorted(across) == list(range(30, 50))
    assert [url for url, _, _ in requests] == [dataset.paths[30].shard, dataset.paths[49].shard]


def test_a_shard_cut_short_leaves_its_missing_members_to_their_own_read(on_s3, requests) -> None:
    dataset, local = on_s3
    shard = dataset.paths[0].shard
    cut = dataset.paths[20].offset + 10  # inside member 20
    fs, path = fsspec.core.url_to_fs(shard)
    fs.pipe_file(path, (local / "000000.tar").read_bytes()[:cut])
    got = samples.read_together(dataset.paths, list(range(0, 40)))
    assert sorted(got) == list(range(20))
    with pytest.raises(DatasetError, match=r"000000\.tar/.*: the shard ends inside this file"):
        dataset.paths[20].read_bytes()
