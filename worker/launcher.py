"""The embedded stack: Redis (unless SIDETUNE_REDIS_URL is set), an extract worker, a train worker, the inference
service and the API, each a separate process on 127.0.0.1, as docker-compose.yml runs them. Used by `sidetune
serve`, `sidetune demo` and the end-to-end tests (which also start single processes of it, as machines of their own).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from storage.redis_server import RedisServer
from storage.settings import Settings


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for stacks started side by side: tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir or settings.data_path / "logs"
        self.redis: RedisServer | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    @property
    def inference_url(self) -> str:
        return self.settings.inference_location

    def env(self) -> dict[str, str]:
        """The environment of the children: this process's, and every setting given to this Stack's Settings."""
        env = dict(os.environ)
        for name in self.settings.model_fields_set:
            value = getattr(self.settings, name)
            if value is not None:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                env[f"SIDETUNE_{name.upper()}"] = text.lower() if isinstance(value, bool) else text
        env["SIDETUNE_REDIS_URL"] = self.redis.url if self.redis else self.settings.broker_url
        env["SIDETUNE_DATA_DIR"] = str(self.settings.data_path)
        env["SIDETUNE_API_HOST"] = self.settings.api_host
        env["SIDETUNE_API_PORT"] = str(self.settings.api_port)
        env["SIDETUNE_ALLOWED_ROOTS"] = ",".join(str(r) for r in self.settings.roots)
        env["SIDETUNE_INFERENCE_HOST"] = self.settings.inference_host
        env["SIDETUNE_INFERENCE_PORT"] = str(self.settings.inference_port)
        env["SIDETUNE_DEVICE"] = self.settings.device
        env["SIDETUNE_LOG_FORMAT"] = self.settings.log_format
        env["SIDETUNE_METRICS_PUBLIC"] = str(self.settings.metrics_public).lower()
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        """Start `sidetune <args>` as a child in its own session (so a terminal's Ctrl-C reaches us first)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float = 120.0) -> Stack:
        if not self.settings.redis_url:
            self.redis = RedisServer(self.settings.redis_dir, self.settings.embedded_redis_port).start()
        self.spawn("extract-worker", "worker", "--queues", "extract")
        self.spawn("train-worker", "worker", "--queues", "train")
        self.spawn("inference", "inference")
        self.spawn("api", "api")
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float, urls: list[str] | None = None) -> None:
        """Until every URL answers 200 (default: the API's /readyz and the inference service's readiness); stops
        the stack if a child exits or time runs out."""
        pending = list(urls or [f"{self.api_url}/readyz", f"{self.inference_url}/v2/health/ready"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text()[-3000:]
                    self.stop()
                    raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")
            try:
                while pending and httpx.get(pending[0], timeout=2).status_code == 200:
                    pending.pop(0)
                if not pending:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the stack was not ready within {timeout_s}s ({pending[0]}); see logs in {self.log_dir}")

    def stop(self, timeout_s: float = 10.0) -> None:
        # Workers get SIGQUIT (Celery's cold shutdown returns unacknowledged tasks to the queue); every
        # step resumes from what it finished, so nothing is lost. The API and the inference service get SIGTERM.
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if "worker" in name else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.redis:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
