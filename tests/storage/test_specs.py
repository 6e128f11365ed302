"""The typed JSON that storage holds (storage/specs.py: a job record's spec and resolved job; storage/manifests.py: a
model's config.json) names every field of the models it is the JSON of (services/spec, services/jobs/resolved.py,
services/models/manifest.py), and the models' dumps validate against it."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from pydantic import BaseModel, TypeAdapter

from services.jobs.resolved import MemoryBudgets, ResolvedJob, ResolvedSplit
from services.methods import CONFIGS
from services.methods.auto import AutoConfig
from services.models.manifest import Features, Manifest, Preprocessing
from services.spec import BackboneSpec, DatasetSpec, ExecutionSpec, ExtractionSpec, JobSpec, TrainingSpec
from services.spec.dataset import WebDatasetSpec
from services.spec.extraction import EveryKth, LastK
from services.spec.sweep import SweepSpec
from services.video.spec import VideoSpec
from storage import manifests, specs
from storage.cache.meta import DataConfig

PAIRS = [
    (specs.SpecRecord, JobSpec),
    (specs.DatasetSpecRecord, DatasetSpec),
    (specs.WebDatasetSpecRecord, WebDatasetSpec),
    (specs.BackboneSpecRecord, BackboneSpec),
    (specs.VideoRecord, VideoSpec),
    (specs.ExtractionSpecRecord, ExtractionSpec),
    (specs.EveryKthRecord, EveryKth),
    (specs.LastKRecord, LastK),
    (specs.ExecutionSpecRecord, ExecutionSpec),
    (specs.TrainingSpecRecord, TrainingSpec),
    (specs.SweepSpecRecord, SweepSpec),
    (specs.ResolvedRecord, ResolvedJob),
    (specs.SplitRecord, ResolvedSplit),
    (specs.BudgetsRecord, MemoryBudgets),
    (manifests.ManifestRecord, Manifest),
    (manifests.FeaturesRecord, Features),
    (DataConfig, Preprocessing),
]


@pytest.mark.parametrize(("record", "model"), PAIRS, ids=[r.__name__ for r, _ in PAIRS])
def test_each_record_names_the_fields_of_its_model_in_order(record: type, model: type[BaseModel]) -> None:
    assert list(typing.get_type_hints(record)) == list(model.model_fields)


def test_the_method_record_names_every_methods_fields() -> None:
    fields = {name for config in [*CONFIGS.values(), AutoConfig] for name in config.model_fields}
    assert set(typing.get_type_hints(specs.MethodRecord)) == fields
    assert specs.MethodRecord.__required_keys__ == {"name"}


SPECS = [
    {"dataset": {"path": "/d"}, "backbone": {"name": "vit_tiny_patch16_224"}, "method": {"name": "linear"}},
    {
        "name": "every part",
        "dataset": {"path": "/d", "test": "/t", "multi_label": True, "split_seed": 3},
        "backbone": {"name": "vit_tiny_patch16_224", "image_size": 64, "video": {"num_frames": 4}},
        "method": {"name": "losa", "layers": [0, 2]},
        "extraction": {"layers": {"every": 2}, "batch_size": 32, "codec": "zstd", "keepbits": 7},
        "training": {"lr": 0.01, "epochs": 3, "clip_grad_norm": None},
        "sweep": {"rank": [4, 8], "layers": ["all", 2, [0, 1]]},
    },
    {
        "dataset": {"path": "/d/{0..3}.tar", "webdataset": {"label_key": "json", "classes": ["a", "b"]}},
        "backbone": {"name": "vit_tiny_patch16_224"},
        "method": {"name": "linear"},
    },
    {
        "dataset": {"path": "/d"},
        "backbone": {"name": "vit_tiny_patch16_224"},
        "method": {"name": "lora", "targets": ["qkv"]},
        "extraction": {"layers": {"last": 2}},
        "execution": {"mode": "tail", "tail_blocks": 1},
    },
]


@pytest.mark.parametrize("body", SPECS)
def test_a_dumped_spec_and_resolved_job_validate_as_their_records(body: dict) -> None:
    spec = JobSpec.model_validate(body)
    dumped = spec.model_dump(mode="json")
    assert TypeAdapter(specs.SpecRecord).validate_python(dumped) == dumped
    labels = np.arange(20) % 2
    parts = (np.arange(0, 12), np.arange(12, 16), np.arange(16, 20))
    resolved = ResolvedJob(
        spec=spec,
        mode=spec.mode,
        needs_cache=spec.needs_cache,
        images=20,
        classes=2,
        test_images=4,
        cached_layers=[0, 2],
        cached_token_mode="all",
        split=ResolvedSplit.of(labels, parts, spec.dataset),
        budgets=MemoryBudgets(host_bytes=1, gpu_bytes=None),
    )
    record = resolved.record()
    assert TypeAdapter(specs.ResolvedRecord).validate_python(record) == record
