"""The embedded stack: Redis (unless SIDETUNE_REDIS_URL is set), an extract worker, a train worker, the inference
service and the API, each a separate process on 127.0.0.1, as docker-compose.yml runs them, and the supervisor that
keeps them running. Used by `sidetune serve`, `sidetune demo` and the end-to-end tests (which also start single
processes of it, as machines of their own).

Supervision (`Stack.start` starts it; docker compose's `restart:` does the same for containers): a child that exits,
however it exits, is started again after a backoff (0.5 s, doubling for each quick exit in a row, at most 30 s) with a
log line naming it, its exit status and the delay; the embedded Redis likewise, from its own data dir (AOF), so
nothing acknowledged is lost. Work in flight survives: a dead worker's step is requeued by the watchdog and resumes
from what was finished. The stack stops only when told to (`stop`, which `sidetune serve` calls on SIGINT, SIGTERM or
SIGHUP): workers get SIGQUIT (Celery's cold shutdown returns unacknowledged tasks to the queue), the API and the
inference service SIGTERM, stragglers SIGKILL after a timeout, Redis last.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from storage.redis_server import RedisServer
from storage.settings import Settings

log = logging.getLogger("sidetune.supervisor")

BACKOFF_S = 0.5  # the first restart's delay, doubled for each quick exit in a row
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a child that ran this long before exiting starts again from the first delay


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for stacks started side by side: tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class _Child:
    """A supervised process: how to start it again, and its restart state."""

    args: tuple[str, ...]
    proc: subprocess.Popen | None
    started: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # exits in a row, each within STABLE_S of its start
    restart_at: float | None = None  # when the exited process is due to start again
    restarts: int = 0


class Stack:
    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir or settings.log_path  # None: the children write to this process's stderr
        self.redis: RedisServer | None = None
        self.children: dict[str, _Child] = {}
        self.restarts: dict[str, int] = {}  # by name, "redis" included: what the supervisor restarted
        self._redis_state = _Child((), None)  # the restart state of the embedded Redis
        self._lock = threading.RLock()  # children and Redis: the supervisor thread and stop() both touch them
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The current process of each child (a snapshot: a restarted child has a new one)."""
        with self._lock:
            return {name: child.proc for name, child in self.children.items()}

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

    @property
    def logs_where(self) -> str:
        return str(self.log_dir) if self.log_dir is not None else "this process's stderr"

    def _popen(self, name: str, args: tuple[str, ...]) -> subprocess.Popen:
        command = [sys.executable, "-m", "worker.cli", *args]
        # Its own session: a terminal's Ctrl-C reaches `serve` alone, which stops the children in order.
        if self.log_dir is None:  # SIDETUNE_LOG_DIR=stderr: the children inherit this process's stdout and stderr
            return subprocess.Popen(command, env=self.env(), start_new_session=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                command, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        """Start `sidetune <args>` as a child named `name`, supervised once the stack runs (`start`)."""
        proc = self._popen(name, args)
        with self._lock:
            self.children[name] = _Child(args, proc)
        return proc

    def retire(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop supervising child `name` and stop it (an extra worker a test started, say)."""
        with self._lock:
            child = self.children.pop(name, None)
        if child is not None:
            _terminate({name: child.proc}, timeout_s)

    def start(self, timeout_s: float = 120.0, stop: threading.Event | None = None) -> Stack:
        """Start every process, wait until the API and the inference service are ready, then supervise them. `stop`:
        an event that ends the wait early (a signal during start-up)."""
        if not self.settings.redis_url:
            self.redis = RedisServer(self.settings.redis_dir, self.settings.embedded_redis_port).start()
        self.spawn("extract-worker", "worker", "--queues", "extract")
        self.spawn("train-worker", "worker", "--queues", "train")
        self.spawn("inference", "inference")
        self.spawn("api", "api")
        self.wait_ready(timeout_s, stop=stop)
        self._stopping.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        return self

    def wait_ready(self, timeout_s: float, urls: list[str] | None = None, stop: threading.Event | None = None) -> None:
        """Until every URL answers 200 (default: the API's /readyz and the inference service's readiness); stops
        the stack if a child exits meanwhile (a start-up failure: a port in use, a bad setting) or time runs out."""
        pending = list(urls or [f"{self.api_url}/readyz", f"{self.inference_url}/v2/health/ready"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    log_file = None if self.log_dir is None else self.log_dir / f"{name}.log"
                    tail = log_file.read_text()[-3000:] if log_file else "(its output went to this process's stderr)"
                    self.stop()
                    raise RuntimeError(f"{name} exited with {describe_exit(proc.returncode)}:\n{tail}")
            try:
                while pending and httpx.get(pending[0], timeout=2).status_code == 200:
                    pending.pop(0)
                if not pending:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if stop and stop.is_set():
            return
        self.stop()
        raise RuntimeError(
            f"the stack was not ready within {timeout_s}s ({pending[0]}); see the logs in {self.logs_where}"
        )

    # ---- supervision -------------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._check_redis()
                    for name, child in list(self.children.items()):
                        self._check(name, child)
            except Exception:  # the supervisor must outlive anything it meets; say what happened and go on
                log.exception("supervisor: unexpected error")

    @staticmethod
    def _due(name: str, child: _Child, code: int | None) -> bool:
        """Whether an exited child (code not None) is due to start again; schedules it (and logs) on first sight."""
        now = time.monotonic()
        if code is None:
            return False
        if child.restart_at is None:
            ran = now - child.started
            child.quick_exits = child.quick_exits + 1 if ran < STABLE_S else 1
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (child.quick_exits - 1))
            child.restart_at = now + delay
            log.warning(
                "%s exited with %s after %.1f s; restarting it in %.1f s (restart %d)",
                name,
                describe_exit(code),
                ran,
                delay,
                child.restarts + 1,
            )
        return now >= child.restart_at

    def _restarted(self, name: str, child: _Child) -> None:
        child.restart_at, child.started, child.restarts = None, time.monotonic(), child.restarts + 1
        self.restarts[name] = self.restarts.get(name, 0) + 1

    def _check(self, name: str, child: _Child) -> None:
        if self._due(name, child, child.proc.poll()):  # poll() also reaps it: no zombie is left
            child.proc = self._popen(name, child.args)
            self._restarted(name, child)
            log.warning("%s restarted (pid %d)", name, child.proc.pid)

    def _check_redis(self) -> None:
        # None: none embedded, running, stopped on purpose (whoever stopped it starts it), or being started or stopped
        code = self.redis.exit_code() if self.redis else None
        if code is None:
            self._redis_state.restart_at = None
            return
        self._redis_state.started = self.redis.started_at  # its last start, by the supervisor or by anyone else
        if not self._due("redis", self._redis_state, code):
            return
        try:
            self.redis.start()  # from the same data dir: the AOF brings back everything acknowledged
        except Exception as e:  # the failed process stays in `process`, exited: the next check retries, later
            self._redis_state.restart_at = None  # (its quick exit doubles the delay)
            log.error("redis did not restart: %s", e)
            return
        self._restarted("redis", self._redis_state)
        log.warning("redis restarted (pid %d) from %s", self.redis.process.pid, self.redis.data_dir)

    # ---- stopping ----------------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        self._supervisor = None
        with self._lock:
            procs = {name: child.proc for name, child in self.children.items()}
            self.children.clear()
        _terminate(procs, timeout_s)
        if self.redis:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    """Workers get SIGQUIT (Celery's cold shutdown returns unacknowledged tasks to the queue; every step resumes from
    what it finished), the others SIGTERM; whoever is still there after `timeout_s` is killed. All are reaped."""
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT if "worker" in name else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
