"""WebDataset shards (services/data/formats/webdataset.py), written with `tarfile` in the test: the samples of a
pattern read in order with their labels (`.cls` index or name, a `.json` field, multi-label lists), decoded from the
shards as from the files they came from; and clear refusals for what would go wrong: a pattern that matches nothing
or some shards missing, a sample without an image or a label, a label not among the classes, a shard cut short
(mid-sample, or at a file's end) or compressed, a shard outside the allowed roots."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from services.data.datasets import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    DatasetError,
    ShardMember,
    load_image,
    read_dataset,
    read_for_job,
    read_imagefolder,
)
from services.data.formats.base import MEDIA_KEYS, WebDatasetOptions
from services.paths import ForbiddenPath, UserPaths
from services.spec import DatasetSpec, JobSpec
from storage.settings import Settings
from tests.shards import imagefolder_samples, write_shard, write_shards


@pytest.fixture
def digits_shards(digits_root: Path, tmp_path: Path) -> tuple[str, Path]:
    """The digits ImageFolder as shards of 32 samples (the folder's order, class names as `.cls`); returns (the
    pattern, the folder)."""
    folder = read_imagefolder(digits_root / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    return write_shards(tmp_path / "shards", samples, per_shard=32), digits_root / "train"


def png_bytes(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def test_the_shards_read_as_the_imagefolder_they_were_written_from(digits_shards) -> None:
    pattern, folder_root = digits_shards
    folder = read_imagefolder(folder_root)
    shards = read_dataset(pattern)  # auto: a pattern ending in .tar is WebDataset shards
    assert shards.classes == folder.classes and len(shards) == len(folder)
    np.testing.assert_array_equal(shards.labels, folder.labels)
    assert all(isinstance(item, ShardMember) for item in shards.paths) and shards.kind == "image"
    first = shards.paths[0]
    assert str(first).endswith("000000.tar/0_" + folder.paths[0].stem + ".png") and first.suffix == ".png"
    for i in (0, 77, len(folder) - 1):
        np.testing.assert_array_equal(np.asarray(load_image(shards.paths[i])), np.asarray(load_image(folder.paths[i])))
    assert read_dataset(pattern).fingerprint == shards.fingerprint != folder.fingerprint
    assert sorted(set(shards.paths) & set(read_dataset(pattern).paths)) == shards.paths  # as the planner compares


def test_the_fingerprint_follows_the_shards(tmp_path: Path) -> None:
    samples = [(f"s{i}", {"png": png_bytes(i), "cls": str(i % 2).encode()}) for i in range(4)]
    shard = write_shard(tmp_path / "a.tar", samples)
    before = read_dataset(shard).fingerprint
    write_shard(shard, samples[:3] + [("s3", {"png": png_bytes(99), "cls": b"1"})])
    assert read_dataset(shard).fingerprint != before  # another image in the shard: another cache entry


def test_json_labels_indices_and_names_through_the_classes(tmp_path: Path) -> None:
    labels = [{"y": 0}, {"y": "dog"}, {"y": 1}, {"y": "cat"}]
    samples = [(f"k{i}", {"jpg": png_bytes(i), "json": json.dumps(y).encode()}) for i, y in enumerate(labels)]
    shard = write_shard(tmp_path / "one.tar", samples)
    options = WebDatasetOptions(label_key="json", label_field="y", classes=("cat", "dog"))
    ds = read_dataset(shard, webdataset=options)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1, 0]
    with pytest.raises(DatasetError, match=r"sample 'k1': label 'dog' is not one of dataset.webdataset.classes"):
        read_dataset(shard, webdataset=WebDatasetOptions(label_key="json", label_field="y", classes=("cat", "cow")))
    with pytest.raises(DatasetError, match=r"sample 'k0': its .json file has no field 'label'"):
        read_dataset(shard, webdataset=WebDatasetOptions(label_key="json"))
    out_of_range = write_shard(tmp_path / "two.tar", [("a", {"png": png_bytes(1), "cls": b"7"})] + samples[:0])
    with pytest.raises(DatasetError, match=r"label 7 is not an index of dataset.webdataset.classes \(2 classes\)"):
        read_dataset(out_of_range, webdataset=WebDatasetOptions(classes=("cat", "dog")))


def test_multi_label_samples_hold_lists_or_bars(tmp_path: Path) -> None:
    tags = [["cat", "outdoor"], "dog", "cat|dog", []]
    samples = [(f"k{i}", {"png": png_bytes(i), "json": json.dumps({"tags": t}).encode()}) for i, t in enumerate(tags)]
    shard = write_shard(tmp_path / "tags.tar", samples)
    options = WebDatasetOptions(label_key="json", label_field="tags")
    with pytest.raises(DatasetError, match=re.escape("sample 'k3': an empty tag list []")):
        read_dataset(shard, multi_label=True, webdataset=options)
    ds = read_dataset(shard, multi_label=True, on_corrupt="skip", webdataset=options)
    assert ds.classes == ["cat", "dog", "outdoor"] and ds.labels.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    assert ds.skipped_rows == ("shard tags.tar sample k3: an empty tag list [], left out",)


def test_a_sample_without_a_label_or_an_image_fails_naming_it_or_is_skipped(tmp_path: Path) -> None:
    samples = [
        ("a", {"png": png_bytes(1), "cls": b"x"}),
        ("b", {"png": png_bytes(2)}),
        ("c", {"txt": b"caption", "cls": b"y"}),
        ("d", {"png": png_bytes(3), "cls": b"y"}),
    ]
    shard = write_shard(tmp_path / "s.tar", samples)
    with pytest.raises(DatasetError, match=rf"shard {re.escape(str(shard))} sample 'b': no label \(no .cls file"):
        read_dataset(shard)
    ds = read_dataset(shard, on_corrupt="skip")
    assert len(ds) == 2 and ds.classes == ["x", "y"]
    assert ds.skipped_rows[0] == "shard s.tar sample b: no label (no .cls file; dataset.webdataset.label_key), left out"
    assert ds.skipped_rows[1].startswith("shard s.tar sample c: no image or video (none of the extensions jpg")


def test_a_sample_split_across_its_shard_is_refused(tmp_path: Path) -> None:
    shard = write_shard(
        tmp_path / "s.tar",
        [("a", {"png": png_bytes(1)}), ("b", {"png": png_bytes(2), "cls": b"y"}), ("a", {"cls": b"x"})],
    )
    with pytest.raises(DatasetError, match="the files of sample 'a' are not next to each other"):
        read_dataset(shard)


@pytest.mark.parametrize("cut", ["mid-sample", "at a file's end"])
def test_a_truncated_shard_fails_naming_it_or_is_left_out(tmp_path: Path, cut: str) -> None:
    samples = [(f"k{i}", {"png": png_bytes(i * 10), "cls": str(i % 2).encode()}) for i in range(6)]
    pattern = write_shards(tmp_path / "sh", samples, per_shard=3)
    broken = tmp_path / "sh" / "000001.tar"
    data = broken.read_bytes()
    if cut == "mid-sample":  # inside the last sample's image
        whole = data[: data.index(b"k5.png") + 512 + 40]
    else:  # after the last file's padding: every sample is there, tar's end-of-archive blocks are not
        members = read_dataset(tmp_path / "sh" / "000000.tar", on_corrupt="skip").paths
        assert members  # a whole shard reads
        whole = data[: data.index(b"k5.cls") + 1024]
    broken.write_bytes(whole)
    with pytest.raises(DatasetError, match=rf"shard {re.escape(str(broken))}: .*(cut short|unexpected end)"):
        read_dataset(pattern)
    ds = read_dataset(pattern, on_corrupt="skip")
    assert len(ds) == 3 and ds.skipped_rows[0].startswith("shard 000001.tar: ")
    assert ds.skipped_rows[0].endswith(", left out")


def test_a_compressed_shard_is_refused_saying_why(tmp_path: Path) -> None:
    plain = write_shard(tmp_path / "a.tar", [("a", {"png": png_bytes(1), "cls": b"x"})])
    (tmp_path / "b.tar").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DatasetError, match="gzip-compressed; .* shards must be plain .tar files"):
        read_dataset(tmp_path / "b.tar")


def test_a_pattern_that_matches_nothing_or_misses_shards(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"matches no file: none of the 3 shard\(s\) it names exists"):
        read_dataset(f"{tmp_path}/{{0..2}}.tar")
    write_shard(
        tmp_path / "1.tar", [("a", {"png": png_bytes(1), "cls": b"x"}), ("b", {"png": png_bytes(2), "cls": b"y"})]
    )
    with pytest.raises(DatasetError, match=rf"2 of the 3 shards .* do not exist: {re.escape(str(tmp_path / '0.tar'))}"):
        read_dataset(f"{tmp_path}/{{0..2}}.tar")
    with pytest.raises(DatasetError, match=r"\{0\.\.2 has|without its"):
        read_dataset(f"{tmp_path}/{{0..2.tar", fmt="webdataset")


def _rule(root: Path) -> UserPaths:
    return UserPaths(Settings(data_dir=root.parent / "data", allowed_roots=[root]))


def test_shards_outside_the_allowed_roots_are_refused(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "secret"
    samples = [(f"k{i}", {"png": png_bytes(i), "cls": str(i % 2).encode()}) for i in range(4)]
    inside_pattern = write_shards(allowed / "shards", samples, per_shard=2)
    write_shards(outside / "shards", samples, per_shard=2)
    assert len(read_for_job(DatasetSpec(path=inside_pattern), _rule(allowed))) == 4
    with pytest.raises(ForbiddenPath, match=r"dataset.path: '.*secret/shards/000000.tar' is outside the allowed"):
        read_for_job(DatasetSpec(path=f"{outside}/shards/{{000000..000001}}.tar"), _rule(allowed))
    (allowed / "shards" / "000002.tar").symlink_to(outside / "shards" / "000000.tar")
    with pytest.raises(ForbiddenPath, match=r"outside the allowed roots"):
        read_for_job(DatasetSpec(path=f"{allowed}/shards/{{000000..000002}}.tar"), _rule(allowed))
    with pytest.raises(DatasetError, match="1 of the 3 shards") as e:
        read_for_job(
            DatasetSpec(path=f"{allowed}/shards/{{000000,000001,000007}}.tar", test_fraction=0.0), _rule(allowed)
        )
    assert e.value.field == "dataset.path"


def test_the_spec_names_every_shard_for_the_submission_check(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "dataset": {"path": "/data/shards/{00..02}.tar", "webdataset": {"label_key": "json"}},
            "backbone": {"name": "test_vit", "pretrained": False, "image_size": 64},
            "method": {"name": "linear"},
        }
    )
    assert [p for field, p, _ in spec.server_paths() if field == "dataset.path"] == [
        "/data/shards/00.tar",
        "/data/shards/01.tar",
        "/data/shards/02.tar",
    ]
    with pytest.raises(ValueError, match="dataset.webdataset applies to WebDataset shards"):
        DatasetSpec(path="/data/folder", webdataset={})
    with pytest.raises(ValueError, match=r"dataset.path: .*names 1,000,000 shards; at most 100,000"):
        DatasetSpec(path="/data/{0..999999}.tar")


def test_the_media_keys_cover_every_suffix_the_folders_read() -> None:
    assert {f".{k}" for k in MEDIA_KEYS} == IMAGE_SUFFIXES | VIDEO_SUFFIXES


def test_video_samples_read_the_same_clips_as_their_files(tmp_path: Path) -> None:
    from services.data.loading import iterate
    from services.video.decoding import ClipTransform
    from services.video.loading import ClipReader
    from services.video.spec import VideoSpec
    from services.video.synthetic import write_motion

    write_motion(tmp_path / "m", 2, frames=6, size=32)
    folder = read_dataset(tmp_path / "m" / "train")
    samples = imagefolder_samples(folder.paths, folder.classes, folder.labels.tolist())
    shards = read_dataset(write_shards(tmp_path / "shards", samples, per_shard=3))
    assert folder.kind == shards.kind == "video" and shards.classes == folder.classes
    video, batches = VideoSpec(num_frames=4, tubelet=2), [np.arange(0, 5), np.arange(5, len(folder))]

    def clips(dataset, workers: int) -> list[np.ndarray]:
        reader = ClipReader(dataset.paths, batches, ClipTransform(pil=np.asarray), False, video)
        return [b.images.numpy() for b in iterate(reader, workers)]

    want = clips(folder, 0)
    for got in (clips(shards, 0), clips(shards, 2)):
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
