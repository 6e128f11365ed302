"""`method: auto`: the linear probe and LoSA from one feature cache, the better on validation kept, both reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from services.training.job import train_job
from storage.settings import Settings


def spec(path: Path | str, **training) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"path": str(path), "test_fraction": 0.2},
            "backbone": {"name": "test_vit", "pretrained": False},
            "method": {"name": "auto"},
            "extraction": {"batch_size": 32},
            "training": {"batch_size": 32, **training},
        }
    )


def test_auto_keeps_the_better_on_validation_and_reports_both(digits_root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[digits_root], device="cpu")
    job = spec(digits_root / "train", epochs=4)
    extracted = run_extraction(job, settings, NullReporter())
    reporter = NullReporter()
    out = train_job(job, settings, extracted["cache_key"], reporter, tmp_path / "ckpt")
    m = out["metrics"]
    rows = m["auto"]["candidates"]
    assert [r["method"] for r in rows] == ["linear", "losa"] and m["auto"]["by"] == "val_accuracy"
    # the validation figure chooses (a tie keeps the probe); the test split is reported for both and chooses nothing
    best = max(rows, key=lambda r: (r["val_accuracy"], r["method"] == "linear"))
    assert m["auto"]["selected"] == best["method"] == out["manifest"].method.name
    assert m["val_accuracy"] == best["val_accuracy"] and m["test_accuracy"] == best["test_accuracy"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert m["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in rows), abs=2e-3)
    losa = next(r for r in rows if r["method"] == "losa")
    assert losa["val_accuracy"] > 0
    # one cache for both (LoSA's layers and tokens hold the probe's); each candidate checkpoints in its own folder
    assert extracted["cache_key"] == out["manifest"].cache_key
    assert (tmp_path / "ckpt" / "losa" / "checkpoint.safetensors").exists()
    assert any("method auto: " in e["message"] and " kept (" in e["message"] for e in reporter.events)


def test_auto_takes_no_sweep_and_only_the_cache() -> None:
    with pytest.raises(ValueError, match="method 'auto' chooses by itself"):
        JobSpec.model_validate(
            {
                "dataset": {"path": "x"},
                "backbone": {"name": "test_vit"},
                "method": {"name": "auto"},
                "sweep": {"lr": [0.1, 0.2]},
            }
        )
    with pytest.raises(ValueError, match="not available for method 'auto'"):
        JobSpec.model_validate(
            {
                "dataset": {"path": "x"},
                "backbone": {"name": "test_vit"},
                "method": {"name": "auto"},
                "execution": {"mode": "online"},
            }
        )
