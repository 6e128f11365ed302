"""WebDataset shards get the limits uploaded archives have (storage/archives.py; services/data/formats/webdataset.py),
from the server's settings when a job reads them: shards written by the test with `tarfile`, on the local disk and
on a real S3-compatible server (moto). A sample whose image is itself an archive (zip, tar, gzip), or whose label
file is one, or whose image is larger than an upload may be, fails the job naming its shard and member, or is left
out with `on_corrupt: skip`; a shard with more members than an upload may have, or a tar header larger than the
uploads' `MAX_READ`, fails naming the shard, or is left out. Archives beside a sample's image are never read, so
they are no fault."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zipfile
from pathlib import Path

import fsspec
import pytest

from services.data.datasets import DatasetError, read_dataset, read_for_job
from services.paths import UserPaths
from services.spec.dataset import DatasetSpec
from storage.archives import MAX_READ, archive_in
from storage.settings import Settings
from tests.services.data.formats.test_webdataset import png_bytes
from tests.shards import write_shard


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner.png", png_bytes(5))
    return buf.getvalue()


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("inner.png")
        data = png_bytes(6)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rule(tmp_path: Path, **settings: object) -> UserPaths:
    return UserPaths(Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path], **settings))


def test_the_archive_kinds_are_told_by_their_content() -> None:
    assert archive_in(_zip()) == "zip" and archive_in(_tar()) == "tar" and archive_in(gzip.compress(b"x")) == "gzip"
    for not_one in (png_bytes(1), b"BZh-class", b"PK", b"", b"cat\n", b"x" * 257 + b"ustard"):
        assert archive_in(not_one) is None


def test_a_sample_that_is_an_archive_names_its_shard_and_member(tmp_path: Path) -> None:
    samples = [
        ("a", {"png": png_bytes(1), "cls": b"x", "zip": _zip()}),  # an archive beside the image: never read
        ("b", {"png": _zip(), "cls": b"y"}),
        ("c", {"jpg": gzip.compress(_tar()), "cls": b"x"}),
        ("d", {"png": _tar(), "cls": b"y"}),
        ("e", {"png": png_bytes(2), "cls": gzip.compress(b"y")}),
        ("f", {"png": png_bytes(3), "cls": b"y"}),
    ]
    shard = write_shard(tmp_path / "s.tar", samples)
    spec = DatasetSpec(path=str(shard))
    expected = rf"shard {re.escape(str(shard))} sample 'b': its b.png is a zip archive, not an image or video"
    with pytest.raises(DatasetError, match=expected):
        read_for_job(spec, _rule(tmp_path))
    ds = read_for_job(spec.model_copy(update={"on_corrupt": "skip"}), _rule(tmp_path))
    assert [p.member for p in ds.paths] == ["a.png", "f.png"]
    assert ds.skipped_rows == (
        "shard s.tar sample b: its b.png is a zip archive, not an image or video (an archive inside a shard is never "
        "unpacked), left out",
        "shard s.tar sample c: its c.jpg is a gzip archive, not an image or video (an archive inside a shard is "
        "never unpacked), left out",
        "shard s.tar sample d: its d.png is a tar archive, not an image or video (an archive inside a shard is never "
        "unpacked), left out",
        "shard s.tar sample e: its .cls file is a gzip archive, not a label, left out",
    )


def test_an_image_larger_than_an_upload_may_be_names_its_member(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    big = buf.getvalue()
    samples = [("a", {"png": png_bytes(1), "cls": b"x"}), ("b", {"png": big, "cls": b"y"})]
    shard = write_shard(tmp_path / "s.tar", [*samples, ("c", {"png": png_bytes(2), "cls": b"y"})])
    rule = _rule(tmp_path, max_dataset_mb=2048 / 2**20)  # 2 KiB: the small image fits, the noise does not
    with pytest.raises(DatasetError, match=rf"sample 'b': its b.png is {len(big):,} bytes, more than an uploaded"):
        read_for_job(DatasetSpec(path=str(shard)), rule)
    assert (
        "SIDETUNE_MAX_DATASET_MB" in read_for_job(DatasetSpec(path=str(shard), on_corrupt="skip"), rule).skipped_rows[0]
    )
    assert len(read_for_job(DatasetSpec(path=str(shard)), _rule(tmp_path))) == 3  # the default limit: 4 GB


def test_a_shard_with_more_members_than_an_upload_fails_naming_it(tmp_path: Path) -> None:
    small = write_shard(
        tmp_path / "sh" / "0.tar", [(f"k{i}", {"png": png_bytes(i), "cls": b"xy"[i % 2 : i % 2 + 1]}) for i in range(4)]
    )
    large = write_shard(
        tmp_path / "sh" / "1.tar", [(f"k{i}", {"png": png_bytes(i), "cls": b"xy"[i % 2 : i % 2 + 1]}) for i in range(6)]
    )
    spec = DatasetSpec(path=f"{tmp_path}/sh/{{0..1}}.tar")
    rule = _rule(tmp_path, max_dataset_files=10)
    with pytest.raises(
        DatasetError, match=rf"shard {re.escape(str(large))}: it has more than 10 members \(at 'k5.png'\)"
    ):
        read_for_job(spec, rule)
    ds = read_for_job(spec.model_copy(update={"on_corrupt": "skip"}), rule)
    assert len(ds) == 4 and {p.shard for p in ds.paths} == {small}
    assert ds.skipped_rows[0].startswith("shard 1.tar: it has more than 10 members")
    assert len(read_dataset(spec.path)) == 10  # read outside a job: no server, no limits


def test_a_tar_header_larger_than_uploads_take_fails_naming_the_shard(tmp_path: Path) -> None:
    shard = tmp_path / "pax.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, value in (("a", b"x"), ("b", b"y")):
            for ext, data in (("png", png_bytes(len(key))), ("cls", value)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if key == "b":
                    info.pax_headers = {"comment": "x" * (MAX_READ + 10)}
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(
        DatasetError, match=rf"shard {re.escape(str(shard))}: a tar extended header of \d+ bytes is too long"
    ):
        read_for_job(DatasetSpec(path=str(shard)), _rule(tmp_path))


def test_an_archive_in_a_shard_on_the_store_is_told_as_on_disk(settings: Settings, s3_url: str, tmp_path: Path) -> None:
    local = write_shard(
        tmp_path / "s.tar",
        [
            ("a", {"png": png_bytes(1), "cls": b"x"}),
            ("b", {"png": _zip(), "cls": b"y"}),
            ("c", {"png": png_bytes(2), "cls": b"y"}),
        ],
    )
    fs, path = fsspec.core.url_to_fs(f"{s3_url}/s.tar")
    fs.put(str(local), path)
    rule = UserPaths(settings.model_copy(update={"allowed_prefixes": [s3_url]}))
    spec = DatasetSpec(path=f"{s3_url}/s.tar", on_corrupt="skip")
    ds = read_for_job(spec, rule)
    assert [p.member for p in ds.paths] == ["a.png", "c.png"]
    assert ds.skipped_rows == (
        "shard s.tar sample b: its b.png is a zip archive, not an image or video (an archive inside a shard is never "
        "unpacked), left out",
    )
