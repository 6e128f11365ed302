"""What a predict request may hold, checked before anything is decoded or loaded, and its inputs' bytes: the counts
(images, models), a threshold only for multi-label models, models of one kind, base64 instances of one kind; and what
one input's answer holds (`Prediction`). Torch-free: the routes call these on the event loop. Each refusal is a
`PredictError` naming the field, with its own status and code (services/errors.py maps it for the API)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TYPE_CHECKING, NotRequired, Protocol, TypedDict

from services.errors import UserError

if TYPE_CHECKING:
    from services.modality.base import Kind
    from storage.redis.records import ModelRecord


class PredictError(UserError):
    """A predict request the service cannot take; the message names the instance, input or field."""

    def __init__(
        self, message: str, code: str = "invalid_request", status: int = 400, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.status, self.retry_after_s = code, status, retry_after_s


class Prediction(TypedDict):
    """One input's v1 answer (services/serving/inference.py: `format_predictions`; api/schemas.py: `Prediction`)."""

    label: str  # the most probable class (multi-label: the highest-scoring tag)
    scores: dict[str, float]  # by class, in the model's order or the top k's, highest first
    labels: NotRequired[list[str]]  # multi-label models: the tags scoring at least the threshold


class Encoded(Protocol):
    """A v1 instance: one of its fields holds the base64 text of a file."""

    image_b64: str | None
    video_b64: str | None


def record_kind(record: ModelRecord) -> Kind:
    """What a model's record says it takes: video files for a model trained on clips, images otherwise."""
    return "image" if record.get("video") is None else "video"


def check_count(n: int, limit: int) -> None:
    if n > limit:
        raise PredictError(f"{n} images; at most {limit} per request", "too_many_images", 413)


def check_threshold(records: Sequence[ModelRecord], threshold: float | None) -> None:
    """A threshold applies to multi-label models only: 422 naming the first single-label one."""
    if threshold is None:
        return
    for record in records:
        if not record.get("multi_label"):
            raise PredictError(
                f"threshold: model {record['id']!r} is single-label (one class per input, the most probable); a "
                "threshold applies to multi-label models only",
                status=422,
            )


def check_models(model_ids: list[str], limit: int) -> None:
    """The model list of a multi-model predict: at least one, at most `limit`, each once (422 otherwise)."""
    if not model_ids:
        raise PredictError("models: the list is empty; name at least one model id", status=422)
    if len(model_ids) > limit:
        raise PredictError(
            f"models: {len(model_ids)} models; at most {limit} per request (SIDETUNE_MAX_PREDICT_MODELS)",
            "too_many_models",
            422,
        )
    seen: set[str] = set()
    for i, model_id in enumerate(model_ids):
        if model_id in seen:
            raise PredictError(f"models.{i}: {model_id!r} is listed twice; list each model once", status=422)
        seen.add(model_id)


def check_one_kind(records: Sequence[ModelRecord]) -> Kind:
    """The kind of input the models take: one for all of them (one request's inputs are decoded once, as one kind);
    400 naming one of each otherwise."""
    first: dict[Kind, ModelRecord] = {}
    for record in records:
        first.setdefault(record_kind(record), record)
    if len(first) > 1:
        raise PredictError(
            f"models: {first['video']['id']} was trained on videos and {first['image']['id']} on images; one "
            "request's inputs are one kind: send the video models and the image models in separate requests"
        )
    return next(iter(first))


def instance_bytes(instances: Sequence[Encoded]) -> tuple[list[bytes], Kind]:
    """The instances' bytes and their kind (a request holds one)."""
    kind = _kind(instances[0])
    items = []
    for i, inst in enumerate(instances):
        if _kind(inst) != kind:
            raise PredictError(f"instances.{i}: one request holds images or videos, not both")
        field = f"{kind}_b64"
        try:
            items.append(base64.b64decode(getattr(inst, field), validate=True))
        except (binascii.Error, ValueError):
            raise PredictError(f"instances.{i}.{field}: not valid base64", f"invalid_{kind}") from None
    return items, kind


def _kind(instance: Encoded) -> Kind:
    return "image" if instance.video_b64 is None else "video"
