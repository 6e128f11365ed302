"""The inference service's predict path, as the routes call it: a model loaded off the event loop (cold loads in the
loader pool, never on the batching thread, so warm models keep answering), the inputs checked against the request's
pixel budget from their headers and decoded in the decoder pool as the model's training data was (services/serving/
decode.py), then the request's rows awaited in a batch (services/serving/batching.py). Awaiting parks no thread.

`predict_many` answers several models from one request: its inputs are decoded once for models that decode alike,
transformed once per backbone, and every model on a backbone reads the same forward.

Torch-free to import (the API imports the inference app for its OpenAPI document); `Serving.start` builds the
Predictor and the Batcher, importing torch, in the inference service only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.serving import decode
from services.serving.requests import Encoded, PredictError, Prediction, instance_bytes
from services.serving.threads import ExitingPool
from storage.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from services.modality.base import Kind
    from services.serving.batching import Batcher
    from services.serving.inference import Predictor
    from services.serving.loaded import LoadedModel


Items = Sequence[bytes] | Sequence[Encoded]  # encoded files, or v1 instances holding them as base64

# A request this small is checked and decoded on the event loop: a hop to the decoder pool and back costs more than
# decoding a few small images (tens of microseconds each), and the pixel budget, read from the headers first, bounds
# what decoding may expand them to. Larger requests, and videos, decode in the pool, off the loop.
INLINE_BYTES = 64 * 1024
INLINE_PIXELS = 512 * 512


@dataclass(frozen=True)
class Answer:
    """One model's answer to a request: the loaded model and class probabilities [n, classes]."""

    model: LoadedModel
    probs: np.ndarray


class Serving:
    """The Predictor, its Batcher and the two pools the predict path uses: `decoder` (Pillow and PyAV, one thread
    per core) and `loader` (cold model loads; its threads exit when idle: services/serving/threads.py)."""

    def __init__(self, predictor: Predictor, batcher: Batcher, settings: Settings) -> None:
        self.predictor, self.batcher, self.settings = predictor, batcher, settings
        self.decoder = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="predict-decoder")
        self.loader: Executor = ExitingPool(2, "model-loader")

    @classmethod
    def start(cls, settings: Settings, registered: Callable[[list[str]], set[str]] | None = None) -> Serving:
        from services.serving.batching import Batcher  # torch, in the serving process only
        from services.serving.inference import Predictor

        predictor = Predictor(settings, registered=registered)
        return cls(predictor, Batcher.from_settings(predictor), settings)

    def close(self) -> None:
        """Run what is queued in the batcher, then stop it and the pools."""
        self.batcher.close()
        for pool in (self.decoder, self.loader):
            pool.shutdown(wait=False, cancel_futures=True)

    async def in_decoder(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the decoder pool (CPU work on a request's bytes), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    # ---- models ------------------------------------------------------------------------------------------------
    async def model(self, model_id: str) -> LoadedModel:
        """The loaded model. One not in the store is 503 `model_unavailable` naming it (its record exists); one not
        whole there is 503 `store_incomplete` (storage.store.Incomplete), never half-loaded."""
        model = self.predictor.cached(model_id)
        if model is not None:
            return model
        try:
            return await asyncio.get_running_loop().run_in_executor(self.loader, self.predictor.load, model_id)
        except FileNotFoundError as e:
            raise PredictError(
                f"model {model_id!r} is registered but not in the store: {e}", "model_unavailable", 503, 5
            ) from None

    # ---- predicting --------------------------------------------------------------------------------------------
    async def predict(self, model_id: str, items: Items, sent: Kind | None = None, what: str = "instance") -> Answer:
        """Encoded files (images, or videos for a model trained on clips) for one model: bytes, or v1 instances
        (base64). `sent`: the kind the client said it sent (None: files, whatever the
        model takes; a mismatch with the model is 400; instances say it themselves); `what` names an item in
        errors."""
        return (await self.predict_many([model_id], items, sent, what))[0]

    async def predict_many(
        self, model_ids: list[str], items: Items, sent: Kind | None = None, what: str = "instance"
    ) -> list[Answer]:
        """Encoded files for several models (checked by the caller: services/serving/requests.py), decoded once for
        the models that decode alike; one backbone forward for all the models on it. The request's CPU work (base64,
        the pixel budget, decoding) is one call, in the decoder pool or, for a small request, on the loop."""
        # Cold ones one after the other: a backbone of random init (pretrained=False) is seeded through torch's global
        # generator, which a side model built in another loader thread meanwhile would draw from.
        models = [await self.model(m) for m in model_ids]
        inputs, pixels = await self._inputs(models, items, sent, what)
        try:
            probs = await asyncio.wrap_future(self.batcher.submit_many(models, inputs))
        finally:
            del inputs
            if pixels >= decode.TRIM_PIXELS:
                await self.in_decoder(decode.release_memory)
        return [Answer(m, p) for m, p in zip(models, probs, strict=True)]

    async def _inputs(
        self, models: list[LoadedModel], items: Items, sent: Kind | None, what: str
    ) -> tuple[list[list[Any]], int]:
        """Each model's decoded inputs (one list for the models that decode alike) and the pixels the images hold
        (0 for videos): a small request's on the loop, others' in the decoder pool (`INLINE_BYTES` says why)."""
        if sum(_size(item) for item in items) > INLINE_BYTES:
            return await self.in_decoder(self._decoded, models, items, sent, what)
        encoded, pixels = self._checked(models, items, sent, what)
        if 0 < pixels <= INLINE_PIXELS:
            return self._decode(models, encoded), pixels
        return await self.in_decoder(self._decode, models, encoded), pixels

    def _decoded(
        self, models: list[LoadedModel], items: Items, sent: Kind | None, what: str
    ) -> tuple[list[list[Any]], int]:
        """`_inputs`, in one call (the decoder pool's): each hop between threads costs a wake-up."""
        encoded, pixels = self._checked(models, items, sent, what)
        return self._decode(models, encoded), pixels

    def _checked(
        self, models: list[LoadedModel], items: Items, sent: Kind | None, what: str
    ) -> tuple[list[bytes], int]:
        """The encoded files (base64 instances decoded) and the pixels the images hold (0 for videos), after the
        checks of their kind, the videos' sizes and the images' pixel budget."""
        if items and not isinstance(items[0], bytes | bytearray):
            items, sent = instance_bytes(items)
        return list(items), decode.check(models, items, sent, self.settings, what)

    def _decode(self, models: list[LoadedModel], items: list[bytes]) -> list[list[Any]]:
        decoded: dict[Hashable, list[Any]] = {}
        for m in models:
            key = decode.decoding(m)
            if key not in decoded:
                decoded[key] = decode.for_model(m, items, self.settings.max_predict_video_s)
        return [decoded[decode.decoding(m)] for m in models]

    async def predict_decoded(self, model_id: str, images: list[Any]) -> Answer:
        """Decoded images (PIL, e.g. the v2 `pixels` input) for one model."""
        model = await self.model(model_id)
        return Answer(model, await asyncio.wrap_future(self.batcher.submit(model, images)))

    def predictions(self, answer: Answer, threshold: float | None = None, top_k: int | None = None) -> list[Prediction]:
        """The v1 output of an answer: one {"label", "scores"(, "labels")} per input."""
        return self.predictor.format(answer.model, answer.probs, threshold, top_k)


def _size(item: bytes | Encoded) -> int:
    if isinstance(item, bytes | bytearray):
        return len(item)
    return len(item.image_b64 or item.video_b64 or "")
