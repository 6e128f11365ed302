"""A thread pool whose threads exit when they find no work: for the torch work of the inference service that is not
a batch (cold model loads, exports).

Why not a ThreadPoolExecutor: every thread that runs a parallel torch op gets an OpenMP team of its own, which lives
as long as that thread. libgomp counts the threads of every team in the process, and once they outnumber the cores
it stops spin-waiting between parallel regions (a hundred spins, then sleep). A loader thread that once loaded a model
kept its team for good, and from then on every backbone forward of the batcher ran in that mode, unlike the same
forward in a process with one team (the baseline of bench/serve.py): on idle cores 15-20% slower (the batcher's
reason to run torch on one thread, services/serving/batching.py), while under heavy load from other processes much
faster than spinning (measured on 2 shared cores: vit_small 0.3 s against 2.4 s), so the service's latency and the
baseline's answered to different things. A thread of this pool exits once the queue is empty, and its team with it
(the process's threads went from 9 to 7), so the batcher's team is alone again as soon as the loads are done.
Starting a thread costs about 0.1 ms; a load or an export costs seconds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ExitingPool(Executor):
    """At most `max_workers` threads, started when work arrives and exiting when none is left; work beyond them
    queues (never a thread per waiting call)."""

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers, self.name = max_workers, name
        self._queue: deque[tuple[Future, Callable[..., Any], tuple, dict]] = deque()
        self._lock = threading.Lock()
        self._running = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"{self.name}: cannot schedule new work after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if self._running < self.max_workers:
                self._running += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._running}", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running -= 1
                    return
                future, fn, args, kwargs = self._queue.popleft()
            if not future.set_running_or_notify_cancel():  # its caller went away
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; with `cancel_futures`, the queued work is cancelled. Never waits: what runs finishes in its
        (daemon) thread."""
        with self._lock:
            self._shutdown = True
            queued = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for future, *_ in queued:
            future.cancel()
