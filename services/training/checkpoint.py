"""The training loop's checkpoint (services/training/fit.py), written after every epoch to the job's checkpoint folder
on the store, so a train worker on any machine resumes a killed job from its last finished epoch: `save` writes the
loop's state (services/training/state.py: LoopState), `resume` restores it.

    checkpoint.safetensors  everything a resume needs, in one atomically written file: each Runs' trainable
                            weights and optimizer state (`runs<i>.*`), the best weights of its configurations
                            stacked along a leading axis (`best<i>.*`), every configuration's curve
                            (`history`, [configurations, epochs, fields]), and in its metadata the epoch, the
                            optimizer scalars and each configuration's best epoch and scores
    checkpoint.json         a small summary for people and the API (epoch, best epoch, each configuration's best
                            score), written after the tensors; a resume never reads it

Both are written in the background while the next epoch trains (`Writer`); a killed worker loses at most the epoch
whose checkpoint was being written, and resumes from the one before.

One file holds the resume state because two can disagree: a worker killed between writing them would otherwise
resume from one epoch's weights under another epoch's number. Curves are arrays, not JSON, because a sweep's curves
grow with every epoch and rewriting them as text each epoch cost more than the epoch's steps for 32 linear heads.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np

from storage.artifacts import as_folder, metadata_from_bytes, tensors_from_bytes, tensors_to_bytes
from storage.store import Folder

if TYPE_CHECKING:
    from services.training.runs import RunsState
    from services.training.state import LoopState

TENSORS, SUMMARY = "checkpoint.safetensors", "checkpoint.json"


class Figures(TypedDict):
    """A configuration's best validation figures so far and their epoch."""

    score: float
    loss: float
    epoch: int


class CheckpointMeta(TypedDict):
    """The checkpoint's metadata (JSON, in the safetensors file's header under "checkpoint"): all that a resume needs
    besides the tensors."""

    epoch: int
    runs: list[RunsState]  # each Runs' own (Runs.checkpoint)
    results: list[Figures]  # per configuration, in the job's order
    history_fields: list[str]
    seconds: float
    seen: int
    stopped: NotRequired[dict[str, int]]  # configuration (a JSON key: a string) -> the epoch after which it stopped


class Writer:
    """Writes checkpoints in the background, one at a time and in order: epoch e's files go to the store while epoch
    e + 1 trains (an upload to an object store can take longer than an epoch). `put` waits for the previous write and
    hands over the next; leaving the `with` block waits for the last, so a finished loop has written every epoch. A
    write that failed raises in the loop, at the next `put` or at the end, unless the loop is already failing."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def put(self, folder: Folder, files: list[tuple[str, bytes]]) -> None:
        self.wait()
        self._pending = self._pool.submit(_write, folder, files)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise  # else the loop's own error is the one to report
        finally:
            self._pool.shutdown(wait=True)


def _write(folder: Folder, files: list[tuple[str, bytes]]) -> None:
    for name, data in files:  # in order: the summary never names an epoch whose tensors are not written
        folder.write_bytes(name, data)


def save(writer: Writer, where: Folder | Path, state: LoopState) -> None:
    """Checkpoint `state` after its epoch: its runs, each one's configurations' best weights ([K, ...]), the figures
    of its results (configurations in the order of the job) and their curves. Serialised now (the weights change with
    the next step), written by `writer`."""
    tensors: dict[str, np.ndarray] = {"history": state.curves[:, : state.epoch]}
    infos = []
    for i, r in enumerate(state.runs):
        t, info = r.checkpoint()
        tensors |= {f"runs{i}.{k}": v for k, v in t.items()} | {f"best{i}.{k}": v for k, v in state.best[i].items()}
        infos.append(info)
    figures: list[Figures] = [{"score": r.score, "loss": r.loss, "epoch": r.epoch} for r in state.results]
    meta: CheckpointMeta = {
        "epoch": state.epoch,
        "runs": infos,
        "results": figures,
        "history_fields": state.fields,
        "seconds": state.seconds,
        "seen": state.seen,
        "stopped": {str(j): e for j, e in state.stopped.items()},
    }
    data = tensors_to_bytes(tensors, metadata={"checkpoint": json.dumps(meta)})
    lead = max(figures, key=lambda f: f["score"])
    # strict JSON for any client: a figure not yet defined (no epoch improved, a diverged loss) is null
    shown = [{k: v if math.isfinite(v) else None for k, v in f.items()} for f in figures]
    summary = {"epoch": state.epoch, "best_epoch": lead["epoch"], "results": shown}
    writer.put(as_folder(where), [(TENSORS, data), (SUMMARY, json.dumps(summary).encode())])


def read(where: Folder | Path, fields: list[str]) -> tuple[dict[str, np.ndarray], CheckpointMeta] | None:
    """The tensors and metadata `save` wrote, or None where there is no checkpoint (or one an earlier version wrote:
    the job trains from the start)."""
    d = as_folder(where)
    if not d.exists(TENSORS):
        return None
    data = d.read_bytes(TENSORS)
    meta = json.loads(metadata_from_bytes(data).get("checkpoint", "null"))
    if not isinstance(meta, dict) or meta.get("history_fields") != fields:
        return None
    return tensors_from_bytes(data), meta


def resume(where: Folder | Path, state: LoopState) -> bool:
    """Restore the checkpoint in `where` into a fresh `state` (LoopState.start): the configurations that had stopped
    leave its runs first, as they left them while training, then the runs, best weights, figures, curves and clocks
    are the checkpoint's. False (state untouched) where there is none to resume from."""
    saved = read(where, state.fields)
    if saved is None:
        return False
    tensors, meta = saved
    stopped = {int(j): e for j, e in meta.get("stopped", {}).items()}
    for epoch in sorted(set(stopped.values())):
        state.stop({j for j, e in stopped.items() if e == epoch}, epoch)
    for i, r in enumerate(state.runs):
        prefix = f"runs{i}."
        r.restore({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["runs"][i])
        state.best[i] = {name: np.array(tensors[f"best{i}.{name}"]) for name in state.best[i]}
    state.epoch, state.seconds, state.seen = meta["epoch"], meta["seconds"], meta["seen"]
    state.curves[:, : state.epoch] = tensors["history"]
    for res, figures in zip(state.results, meta["results"], strict=True):
        res.score, res.loss, res.epoch = figures["score"], figures["loss"], figures["epoch"]
    return True
