"""The embedded Redis server: a start counts only when its own process answers."""

from __future__ import annotations

import pytest

from storage.redis_server import RedisServer
from worker.launcher import free_port


def test_a_start_on_a_port_another_server_holds_fails_naming_the_bind(tmp_path) -> None:
    port = free_port()
    with RedisServer(tmp_path / "a", port) as first:
        second = RedisServer(tmp_path / "b", port)
        # the first server answers pings on the port; the second's own process fails to bind and that is the answer
        with pytest.raises(RuntimeError, match="Address already in use"):
            second.start()
        assert second.process is not None and second.process.poll() is not None  # exited, handle kept
        assert first.process is not None and first.process.poll() is None


def test_exit_code_tells_a_crash_from_a_stop_on_purpose(tmp_path) -> None:
    """What a supervisor reads: a server that died reports its exit status (restart it); one stopped with `stop()`
    reports None (leave it alone). Starting a running server is a no-op, not a second server."""
    server = RedisServer(tmp_path, free_port()).start()
    pid = server.process.pid
    assert server.start().process.pid == pid and server.exit_code() is None
    server.process.kill()
    server.process.wait()
    assert server.exit_code() == -9
    server.start()
    assert server.process.pid != pid and server.exit_code() is None
    server.stop()
    assert server.process is None and server.exit_code() is None
