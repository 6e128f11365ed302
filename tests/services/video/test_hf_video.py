"""Video through Hugging Face datasets: a few synthetic motion clips (services/video/synthetic.py) written by the
`datasets` library with a `Video` feature (the clips' bytes with their names, as Parquet; their bytes alone, as a
save_to_disk folder) or as rows naming the clip files, read as a video dataset (the `video` column found where
`image_column` is left at its default), planned as a video job, extracted to the same cache bytes as the folder of
clips they came from, and trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

import datasets  # noqa: E402

from services.data.datasets import TableRow, read_dataset, read_imagefolder  # noqa: E402
from services.extraction import run_extraction  # noqa: E402
from services.jobs.planner import plan  # noqa: E402
from services.jobs.progress import NullReporter  # noqa: E402
from services.spec import JobSpec  # noqa: E402
from services.training.job import train_job  # noqa: E402
from services.video.synthetic import write_motion  # noqa: E402
from storage.settings import Settings  # noqa: E402
from tests.services.test_extraction_s3 import assert_same_entries  # noqa: E402

BACKBONE = {"name": "test_vit", "pretrained": False, "image_size": 32, "video": {"num_frames": 4, "tubelet": 2}}


def spec(path: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), "val_fraction": 0.5},
            "backbone": BACKBONE,
            "method": {"name": "linear"},
            "training": {"epochs": 2, "lr": 0.05},
        }
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_motion(root, 2, frames=6, size=32)  # 4 classes, 2 clips each
    return root / "train"


def write_layout(clips: Path, out: Path, layout: str) -> Path:
    """The folder's clips as a Hugging Face dataset: `parquet` (bytes and names), `saved` (bytes only) or `named`
    (names only: each row the path of its clip file)."""
    folder = read_imagefolder(clips)
    if layout == "named":
        cells = [{"bytes": None, "path": str(p)} for p in folder.paths]
    else:
        cells = [{"bytes": p.read_bytes(), "path": p.name if layout == "parquet" else None} for p in folder.paths]
    features = datasets.Features({"video": datasets.Video(), "label": datasets.ClassLabel(names=folder.classes)})
    ds = datasets.Dataset.from_dict({"video": cells, "label": folder.labels.tolist()}, features=features)
    if layout == "saved":
        ds.save_to_disk(out)
        return out
    ds.to_parquet(out / "train.parquet", batch_size=3)
    return out / "train.parquet"


@pytest.mark.parametrize("layout", ["parquet", "saved", "named"])
def test_a_hugging_face_video_dataset_is_planned_and_extracted_as_its_clips(
    clips: Path, tmp_path: Path, layout: str
) -> None:
    location = write_layout(clips, tmp_path / "hf", layout)
    folder, hf = read_imagefolder(clips), read_dataset(location)
    assert hf.kind == folder.kind == "video" and hf.classes == folder.classes
    np.testing.assert_array_equal(hf.labels, folder.labels)
    assert isinstance(hf.paths[0], TableRow if layout != "named" else Path)
    assert hf.paths[0].suffix == ("" if layout == "saved" else ".mp4")  # no names: a clip by its Video feature
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path, clips.parent], device="cpu")
    planned = plan(spec(location), settings)
    assert planned.images == len(folder) and planned.classes == 4 and "clip" in planned.message
    a = run_extraction(spec(clips), settings, NullReporter())
    b = run_extraction(spec(location), settings, NullReporter())
    assert a["cache_key"] != b["cache_key"]
    assert_same_entries(settings, a["cache_key"], b["cache_key"])  # the same clips, bit for bit
    if layout == "parquet":
        out = train_job(spec(location), settings, b["cache_key"], NullReporter(), tmp_path / "model")
        assert out["manifest"].classes == folder.classes and out["metrics"]["train_images"] == 4
