"""Dynamic micro-batching for predict: concurrent requests are gathered and run as one `Predictor.run`.

One thread per Predictor runs the batches (a device computes one batch at a time anyway). `submit` takes a loaded
model and decoded images and returns a future (`submit_many`: several models on the same inputs, which share each
backbone's forward): the inference service decodes (Pillow, no torch) and loads the model
(a cold load: in a loader thread) before it submits, so a bad image or an unknown model fails that request before it
joins a batch, and a cold load never stalls the batches of warm models; it awaits the future without parking a
thread. The batcher's thread does the torch work: it transforms each request's images (a failure there fails that
request alone), then runs the batch, and each future gets its own rows of the result. `predict` is the same for a
caller that blocks (decoding and loading on its own thread). Torch runs on that one
thread only because each thread that runs torch ops gets its own OpenMP team, and with more OpenMP threads than
cores libgomp stops spin-waiting between parallel regions: one more team (the transforms in the callers' threads)
made every backbone forward 15-20% slower on 2 cores. The transforms (resize, crop, normalise: about 1 ms an
image on a CPU core) are therefore serial; decoding, usually the larger part, stays parallel in the callers.

When to run a batch: requests that arrive while a batch is running queue up and form the next batch (up to
`max_batch` images; a request is never split, so one larger than `max_batch` runs alone). A request that finds the
batcher idle runs at once, so a lone request never waits. Only under load, when the batch just run held several
requests, does the next batch wait up to `max_wait_s` after its first request's arrival for others to join: clients
that have just got their answers send their next request within a few milliseconds, and without that wait the first
of them would run alone and split the load into a batch of one and a batch of the rest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from services.serving.inference import Predictor, Request
from services.serving.loaded import LoadedModel
from services.serving.requests import Prediction


@dataclass(eq=False)
class _Pending:
    models: list[LoadedModel]
    inputs: list[list[Any]]  # each model's decoded images (or clips); models that decode alike share one list
    many: bool  # the result is a list (one array per model), not one array
    arrived: float = field(default_factory=time.monotonic)
    result: Future = field(default_factory=Future)  # class probabilities [n, classes] (a list of them: `many`)
    rows: int = field(init=False)  # the inputs' count: what the request adds to a batch

    def __post_init__(self) -> None:
        self.rows = len(self.inputs[0])


class Batcher:
    """`submit(model, images)` (a future) or `predict(model_id, images)` from any number of threads; `close()` runs
    what is queued and stops the thread."""

    def __init__(self, predictor: Predictor, max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_s
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, predictor: Predictor) -> Batcher:
        s = predictor.settings
        return cls(predictor, s.predict_max_batch, s.predict_max_wait_ms / 1000)

    def submit(self, model: LoadedModel, images: list[Any]) -> Future:
        """Queue decoded images for a loaded model; the future gets their class probabilities [n, classes]."""
        return self._queued(_Pending([model], [images], many=False))

    def submit_many(self, models: list[LoadedModel], inputs: list[list[Any]]) -> Future:
        """Queue one request for several loaded models: `inputs[i]` are models[i]'s decoded images, the very same
        list for models that decode alike. Each distinct list is transformed once per backbone, so models on one
        backbone share its forward (`Predictor.inputs_many`). The future gets one probabilities array per model."""
        return self._queued(_Pending(models, inputs, many=True))

    def _queued(self, pending: _Pending) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the predict batcher is closed")
            if self._thread is None:  # started on first use, so that a Batcher that is never used costs nothing
                self._thread = threading.Thread(target=self._loop, name="predict-batcher", daemon=True)
                self._thread.start()
            self._queue.append(pending)
            self._cond.notify()
        return pending.result

    def predict(self, model_id: str, images: list[bytes], threshold: float | None = None) -> list[Prediction]:
        """Like `Predictor.predict`, run in a batch with the requests that arrive together with this one."""
        model = self.predictor.load(model_id)  # an unknown model fails this request only
        decoded = self.predictor.decode_for(model, images)  # so does a DatasetError
        return self.predictor.format(model, self.submit(model, decoded).result(), threshold)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _next_batch(self, under_load: bool) -> list[_Pending]:
        """Blocks for the first request, then takes what fits, waiting for more until the deadline (none when idle)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return []
                self._cond.wait()
            deadline = self._queue[0].arrived + (self.max_wait_s if under_load else 0.0)
            batch: list[_Pending] = []
            images = 0
            while True:
                while self._queue and (not batch or images + self._queue[0].rows <= self.max_batch):
                    batch.append(self._queue.popleft())
                    images += batch[-1].rows
                left = deadline - time.monotonic()
                if self._queue or images >= self.max_batch or left <= 0:  # full (the next one does not fit) or due
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        under_load = False
        while batch := self._next_batch(under_load):
            under_load = len(batch) > 1
            # A future whose caller went away (its awaiting task cancelled) is dropped; the others can no longer be
            # cancelled, so setting their result below cannot fail.
            batch = [p for p in batch if p.result.set_running_or_notify_cancel()]
            ready: list[tuple[_Pending, int]] = []  # each request and where its models' rows start in `requests`
            requests: list[Request] = []
            try:
                for p in batch:
                    try:
                        ready.append((p, len(requests)))
                        requests += self.predictor.inputs_many(p.models, p.inputs)
                        p.inputs = []  # the decoded images are not needed once transformed: free them now
                    except Exception as e:  # noqa: BLE001 - this request's own failure, raised by its caller
                        ready.pop()
                        p.result.set_exception(e)
                if ready:
                    probs = self.predictor.run(requests)
                    for p, first in ready:
                        mine = probs[first : first + len(p.models)]
                        p.result.set_result(mine if p.many else mine[0])
            except Exception as e:  # noqa: BLE001 - handed to every request of the batch, whose callers raise it
                for p, _ in ready:
                    if not p.result.done():
                        p.result.set_exception(e)
