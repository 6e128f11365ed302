"""Held-out evaluation in the train step: a separate test set (`dataset.test`) scored through the backbone and the
selected model as predict scores it, and a job whose validation split would be empty failing with what to change."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

from services.data.datasets import DatasetError, read_imagefolder
from services.data.splits import split
from services.extraction import run_extraction
from services.jobs.planner import plan
from services.jobs.progress import NullReporter
from services.serving.inference import Predictor
from services.spec import JobSpec
from services.training.job import train_job
from storage.artifacts import ArtifactStore
from storage.settings import Settings


def spec(path: Path, method: dict, **dataset) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), **dataset},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": method,
            "extraction": {"batch_size": 32},
            "training": {"epochs": 2, "batch_size": 32},
        }
    )


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("method", [{"name": "linear"}, {"name": "losa", "rank": 4}], ids=["linear", "losa"])
def test_a_separate_test_set_is_scored_as_predict_scores_it(
    settings: Settings, digits_root: Path, tmp_path: Path, method: dict
) -> None:
    holdout = digits_root / "holdout"
    job = spec(digits_root / "train", method, test=str(holdout))
    key = run_extraction(job, settings, NullReporter())["cache_key"]
    out = train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")
    report, m = out["evaluation"], out["metrics"]
    test = read_imagefolder(holdout)
    assert report["split"] == "test" and report["images"] == m["test_images"] == len(test)
    assert m["train_images"] + m["val_images"] == len(read_imagefolder(digits_root / "train"))

    ArtifactStore.from_settings(settings).save_model("model_t", out["weights"], out["manifest"], m)
    predictions = Predictor(settings).predict("model_t", [png_bytes(p) for p in test.paths])
    served = np.mean([p["label"] == test.classes[y] for p, y in zip(predictions, test.labels, strict=True)])
    assert m["test_accuracy"] == pytest.approx(served, abs=1 / len(test) + 1e-9)  # batches may round differently


def test_the_test_split_is_read_as_evaluated_not_augmented(settings: Settings, digits_root: Path, tmp_path: Path):
    """With `augment` the training split is randomly cropped, flipped and jittered; the test split (like validation)
    goes through the evaluation transform, so the report's confusion matrix is the one predict gives."""
    job = JobSpec.model_validate(
        {
            "dataset": {"path": str(digits_root / "train"), "test_fraction": 0.3},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": {"name": "losa", "rank": 4, "layers": 2},
            "execution": {"mode": "online", "augment": True},
            "training": {"epochs": 2, "batch_size": 32},
        }
    )
    out = train_job(job, settings, None, NullReporter(), tmp_path / "ckpt")
    data = read_imagefolder(digits_root / "train")
    test_idx = split(data.labels, job.dataset.val_fraction, 0.3, job.dataset.split_seed)[2]
    assert out["evaluation"]["split"] == "test" and out["evaluation"]["images"] == len(test_idx)

    ArtifactStore.from_settings(settings).save_model("model_aug", out["weights"], out["manifest"], out["metrics"])
    predictions = Predictor(settings).predict("model_aug", [png_bytes(data.paths[i]) for i in test_idx])
    served = confusion_matrix(
        data.labels[test_idx],
        [out["manifest"].classes.index(p["label"]) for p in predictions],
        labels=range(len(data.classes)),
    )
    # the same predictions, but for at most one image whose top two scores another batching may swap (read through
    # the training transforms, the two matrices differed by 42: 21 or more of these 60 images changed class)
    assert np.abs(np.array(out["evaluation"]["confusion_matrix"]) - served).sum() <= 2


def test_a_test_set_with_unknown_classes_fails_naming_them(settings: Settings, digits_root: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(digits_root / "holdout" / "3", other / "three")
    shutil.copytree(digits_root / "holdout" / "4", other / "4")
    job = spec(digits_root / "train", {"name": "linear"}, test=str(other))
    with pytest.raises(DatasetError, match=r"classes the training set does not have: 'three'"):
        plan(job, settings)  # at submission, before anything is extracted or trained
    key = run_extraction(job, settings, NullReporter())["cache_key"]
    with pytest.raises(DatasetError, match=r"classes the training set does not have: 'three'"):
        train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")
    shutil.rmtree(other / "three")
    shutil.copytree(digits_root / "holdout" / "5", other / "5")
    assert plan(job, settings).test_images == len(read_imagefolder(other))


def test_an_empty_validation_split_fails_instead_of_returning_untrained_weights(
    settings: Settings, digits_root: Path, tmp_path: Path
) -> None:
    one_each = tmp_path / "one_each"
    for c in ("0", "1", "2"):
        (one_each / c).mkdir(parents=True)
        first = sorted((digits_root / "train" / c).glob("*.png"))[0]
        shutil.copy(first, one_each / c / first.name)
    job = spec(one_each, {"name": "losa", "rank": 2})
    key = run_extraction(job, settings, NullReporter())["cache_key"]
    with pytest.raises(DatasetError, match="the validation split is empty: each of the 3 classes has a single"):
        train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")


def test_a_test_fraction_that_leaves_no_test_image_is_refused(settings: Settings, digits_root: Path, tmp_path: Path):
    """Two images per class: one validates, one trains, none is left to test on. Refused when the job is planned
    (and by the train step), instead of a report on the validation split."""
    two_each = tmp_path / "two_each"
    for c in ("0", "1", "2"):
        (two_each / c).mkdir(parents=True)
        for first in sorted((digits_root / "train" / c).glob("*.png"))[:2]:
            shutil.copy(first, two_each / c / first.name)
    job = spec(two_each, {"name": "linear"}, test_fraction=0.3)
    with pytest.raises(
        DatasetError,
        match=r"test_fraction 0.3 leaves no test image: with val_fraction 0.2, a class "
        r"needs at least 3 usable images for one to be left to test on \(the largest has 2\)",
    ):
        plan(job, settings)
    key = run_extraction(job, settings, NullReporter())["cache_key"]
    with pytest.raises(DatasetError, match="leaves no test image"):
        train_job(job, settings, key, NullReporter(), tmp_path / "ckpt")
    assert plan(spec(two_each, {"name": "linear"}), settings).test_images == 0  # without test_fraction: planned
