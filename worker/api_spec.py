"""The job spec as the client (worker/client.py) sends it and reads it back in a job's `spec`: TypedDicts mirroring
services/spec/ (the server's JSON schema is the reference), apart from the API's answers (worker/api_types.py).

No `from __future__ import annotations` here: with it, Python 3.11 reads every key as required (`Required` and
`NotRequired` are lost in the strings), and the tests read the keys (tests/worker/test_api_types.py).
"""

from typing import Literal, Required, TypedDict


class WebDatasetBody(TypedDict, total=False):
    """`dataset.webdataset`: which files of a WebDataset sample hold its image and its label."""

    media_keys: list[str]
    label_key: str
    label_field: str
    classes: list[str] | None


class HuggingFaceBody(TypedDict, total=False):
    """`dataset.huggingface`: which columns of a Hugging Face dataset hold its images and labels, and whether its own
    splits are the job's."""

    image_column: str
    label_column: str
    splits: Literal["dataset", "draw"]
    revision: str
    config: str


class DatasetBody(TypedDict, total=False):
    """`dataset`: a server path (a folder, a CSV or JSONL manifest, WebDataset shards, a Hugging Face dataset or
    `hf://` id), an object-store URL (shards, a manifest) or an uploaded dataset's id, and how it is split."""

    path: str | None
    id: str | None
    format: Literal["auto", "imagefolder", "csv", "jsonl", "webdataset", "huggingface"]
    webdataset: WebDatasetBody | None
    huggingface: HuggingFaceBody | None
    val_fraction: float
    test_fraction: float
    test: str | None
    test_id: str | None
    multi_label: bool
    split_seed: int


class VideoBody(TypedDict, total=False):
    """`backbone.video` (services/video/spec.py): the clips a ViViT made of the image ViT sees."""

    num_frames: int
    tubelet: int
    init: Literal["central_frame", "filter_inflation"]
    sampling: Literal["uniform", "strided"]
    frame_stride: int


class BackboneBody(TypedDict, total=False):
    """`backbone`: the frozen timm ViT."""

    name: Required[str]
    pretrained: bool
    checkpoint: str | None
    image_size: int | None
    precision: Literal["auto", "fp32", "bf16"]
    video: VideoBody | None


class MethodBody(TypedDict, total=False):
    """`method`: `name` selects it; its other settings are the method's own (services/methods/<name>/config.py),
    those this package's own specs set named here."""

    name: Required[str]
    rank: int


class TrainingBody(TypedDict, total=False):
    """`training`: the optimisation settings (`auto`: the method's default)."""

    epochs: int | Literal["auto"]
    batch_size: int
    optimizer: Literal["auto", "sgd", "adamw"]
    lr: float | Literal["auto"]
    weight_decay: float | Literal["auto"]
    early_termination: bool | Literal["auto"]
    seed: int


class ExecutionBody(TypedDict, total=False):
    """`execution`: where the method's inputs come from."""

    mode: Literal["auto", "cache", "images", "tail", "online"]
    tail_blocks: int


class JobSpecBody(TypedDict, total=False):
    """A job spec: the body of `POST /jobs`, and a job's `spec` (the server's JSON schema is the reference)."""

    name: str | None
    dataset: Required[DatasetBody]
    backbone: Required[BackboneBody]
    method: Required[MethodBody]
    execution: ExecutionBody
    training: TrainingBody
