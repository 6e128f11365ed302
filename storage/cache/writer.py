"""The cache writer: whole extraction batches (one shard each) written in parallel, so writing keeps up with the disk.

On a local disk, shards go through tensorstore's zarr3 driver: C++ threads that encode, write and fsync several
shards at once (measured here on 7.4 MB shards: 3-4 GB/s to the page cache, 1.1-1.8 GB/s fsync'd, against
0.4-0.7 GB/s through zarr-python from one thread, with threads not helping it). The files are plain Zarr v3:
zarr-python reads them, and writes the entry's metadata and small arrays. On an fsspec URL (s3://, memory://)
zarr-python writes each shard, several threads at a time.

A batch's `valid` rows and its `batch_done` flag are written after its shard is durable, so a crash at any point
leaves at most the shards in flight to redo. Both writers store `CacheEntry.stored(...)`, so the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorstore as ts

from storage.cache import files
from storage.cache.entry import CacheEntry
from storage.faults import retrying


class ShardWriter:
    """`submit(batch, acts, valid)` returns at once (blocking only while `in_flight` batches are still being written);
    `close()` waits for every write and raises the first error. `ready` (optional) is called in a writer thread
    before `acts` is read (e.g. waiting on a device-to-host copy), `done` once `acts` may be reused."""

    def __init__(self, entry: CacheEntry, in_flight: int = 3) -> None:
        self.entry, self.in_flight = entry, max(1, in_flight)
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="cache-writer")
        self._slots = threading.Semaphore(self.in_flight)
        self._futures: list[Future] = []
        self._acts, self._valid, self._done = _tensorstore_arrays(entry) if entry.native else (None, None, None)

    @property
    def engine(self) -> str:
        return "tensorstore" if self._acts is not None else "zarr-python"

    def submit(
        self,
        batch: int,
        acts: Any,
        valid: np.ndarray,
        ready: Callable[[], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> None:
        self._raise_failed()
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._write, batch, acts, valid, ready, done))

    def _write(self, batch: int, acts: Any, valid: np.ndarray, ready: Callable | None, done: Callable | None) -> None:
        try:
            if ready is not None:
                ready()
            if self._acts is not None:
                data = self.entry.stored(batch, np.asarray(acts))
                start, stop = self.entry.batch_range(batch)
                write = self._acts[start:stop].write(data)
                write.copy.result()  # tensorstore holds its own copy from here on
                if done is not None:
                    done()
                    done = None
                write.commit.result()  # written (and fsync'd) before the batch is marked done
                # as CacheEntry.mark_batch does, through tensorstore (zarr-python's group and array opens cost 5 ms)
                self._valid[start:stop].write(np.asarray(valid, bool)).result()
                self._done[batch].write(True).result()
            else:  # an object store: a lost connection or a 503 is tried again (storage/faults.py's policy)
                data = np.asarray(acts)
                retrying(lambda: self.entry.write_batch(batch, data, valid), f"writing cache batch {batch}")
        finally:
            if done is not None:
                done()
            self._slots.release()

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self._futures = [f for f in self._futures if not f.done()]

    def close(self) -> None:
        """Wait for every write; the first error is raised (after all have ended: no write is left running)."""
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)
            self._futures = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # an error upstream: let the writes in flight end, keep the upstream error
            self._pool.shutdown(wait=True)


def _tensorstore_arrays(entry: CacheEntry) -> tuple[Any, Any, Any]:
    """The entry's `acts`, `valid` and `batch_done` opened for writing with tensorstore (local disks)."""

    def open_array(name: str, context: ts.Context) -> Any:
        path = files.join(entry.root, "features.zarr", name) + "/"
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}, "open": True}
        return ts.open(spec, write=True, context=context).result()

    # The flags skip the fsync: they are written once their shard is durable, so losing them in a crash only makes
    # the batch be written again (two more fsyncs per shard cost about a fifth of the writer's bandwidth here).
    flags = ts.Context({"file_io_sync": False})
    return open_array("acts", ts.Context()), open_array("valid", flags), open_array("batch_done", flags)
