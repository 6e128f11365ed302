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
