"""Lease locks and pins against a real Redis server, with real threads and a real SIGKILLed holder process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from storage.redis.locks import LeaseLock, Pin, Pins, acquire_or_wait

REPO = Path(__file__).resolve().parents[3]
HOLDER = """
import sys, time, redis
from storage.redis.locks import LeaseLock, Pin
r = redis.Redis.from_url(sys.argv[1])
kind, name, lease = sys.argv[2], sys.argv[3], float(sys.argv[4])
held = LeaseLock(r, name, lease).acquire() if kind == "lock" else Pin(r, name, "doomed", lease).acquire()
print("held" if held else "refused", flush=True)
time.sleep(600)
"""


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def name() -> str:
    """A key of this test's own: the session's Redis server is shared."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def doomed_holder(redis_url: str) -> Iterator:
    """Start a process that takes a lock or pin, renews it, and is SIGKILLed by the test (or at teardown)."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, key: str, lease_s: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, redis_url, kind, key, str(lease_s)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_one_of_two_lockers_gets_it_and_the_other_after_release(r: redis.Redis, name: str) -> None:
    a, b = LeaseLock(r, name, lease_s=5), LeaseLock(r, name, lease_s=5)
    assert a.acquire()
    assert not b.acquire()
    assert a.held and not b.held and b.locked()
    assert not b.acquire(blocking=True, timeout_s=0.2)
    assert a.release()
    assert not a.locked()
    with b:
        assert b.held and not a.acquire()
    assert not b.locked()


def test_threads_race_and_exactly_one_wins(r: redis.Redis, name: str) -> None:
    locks = [LeaseLock(r, name, lease_s=5) for _ in range(8)]
    barrier, won = threading.Barrier(len(locks)), []

    def race(lock: LeaseLock) -> None:
        barrier.wait()
        if lock.acquire():
            won.append(lock)

    threads = [threading.Thread(target=race, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


def test_lease_is_renewed_while_held(r: redis.Redis, name: str) -> None:
    with LeaseLock(r, name, lease_s=1.0) as lock:
        time.sleep(3.0)  # three leases
        assert lock.held and not lock.lost
        assert 0 < r.pttl(name) <= 1000
        assert not LeaseLock(r, name, lease_s=1.0).acquire()
    assert not r.exists(name)


def test_a_killed_holder_frees_the_lock_after_its_lease_and_a_waiter_takes_over(
    r: redis.Redis, name: str, doomed_holder
) -> None:
    proc = doomed_holder("lock", name, 1.0)
    time.sleep(2.0)  # past its first lease: its renewal thread keeps it
    waiter = LeaseLock(r, name, lease_s=1.0)
    assert not waiter.acquire()
    proc.kill()
    proc.wait()
    start, waits = time.monotonic(), []
    assert acquire_or_wait(waiter, done=lambda: False, poll_s=0.05, timeout_s=5, on_wait=waits.append)
    elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 1.5  # what was left of the dead holder's lease (between 2/3 and all of 1 s)
    assert waits and waiter.held
    waiter.release()


def test_only_the_owner_can_release(r: redis.Redis, name: str) -> None:
    owner, other = LeaseLock(r, name, lease_s=5), LeaseLock(r, name, lease_s=5)
    assert not other.release()  # never acquired
    assert owner.acquire()
    assert not other.release()
    assert owner.held
    r.set(name, "someone-else")  # the owner's lease ran out and another process took the lock
    assert not owner.release()
    assert r.get(name) == b"someone-else"


def test_renewal_notices_a_lost_lease(r: redis.Redis, name: str) -> None:
    lock = LeaseLock(r, name, lease_s=0.6)
    assert lock.acquire()
    r.delete(name)
    deadline = time.monotonic() + 2
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.lost and not lock.held
    assert not lock.release()


def test_waiter_returns_false_when_the_holder_completes_the_work(r: redis.Redis, name: str) -> None:
    holder, done = LeaseLock(r, name, lease_s=5), threading.Event()
    assert holder.acquire()

    def work() -> None:
        time.sleep(0.5)
        done.set()
        holder.release()

    threading.Thread(target=work).start()
    waits: list[float] = []
    waiter = LeaseLock(r, name, lease_s=5)
    assert not acquire_or_wait(waiter, done.is_set, poll_s=0.05, timeout_s=5, on_wait=waits.append)
    assert len(waits) >= 3 and not waiter.held and not waiter.locked()


def test_waiter_times_out_or_gives_up_from_on_wait(r: redis.Redis, name: str) -> None:
    holder = LeaseLock(r, name, lease_s=5)
    assert holder.acquire()
    with pytest.raises(TimeoutError):
        acquire_or_wait(LeaseLock(r, name), lambda: False, poll_s=0.05, timeout_s=0.3)

    def cancelled(waited: float) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        acquire_or_wait(LeaseLock(r, name), lambda: False, poll_s=0.05, on_wait=cancelled)
    holder.release()


def test_pins_are_renewed_while_held_and_released(r: redis.Redis, name: str) -> None:
    pins = Pins(r)
    with Pin(r, name, "job", ttl_s=0.6) as pin, Pin(r, name, "job", ttl_s=0.6):
        assert pin.held
        time.sleep(1.5)
        assert name in pins.pinned_keys()
        assert not pins.begin_eviction(name)
    assert name not in pins.pinned_keys()
    assert pins.begin_eviction(name)
    pins.end_eviction(name)


def test_a_killed_holders_pin_expires(r: redis.Redis, name: str, doomed_holder) -> None:
    proc = doomed_holder("pin", name, 0.6)
    pins = Pins(r)
    time.sleep(1.2)
    assert name in pins.pinned_keys()
    proc.kill()
    proc.wait()
    time.sleep(0.8)
    assert name not in pins.pinned_keys()
    assert pins.begin_eviction(name)
    pins.end_eviction(name)


def test_no_pin_while_an_entry_is_being_evicted(r: redis.Redis, name: str) -> None:
    pins = Pins(r)
    assert pins.begin_eviction(name)
    with Pin(r, name) as pin:
        assert not pin.held
    assert name not in pins.pinned_keys()
    pins.end_eviction(name)
    with Pin(r, name) as pin:
        assert pin.held
        assert name in pins.pinned_keys()
