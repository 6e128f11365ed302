"""Faults of the disk, the store and Redis, named in one place, and the one policy that retries what may pass.

- A full disk (ENOSPC, EDQUOT, and tensorstore's `RESOURCE_EXHAUSTED` that wraps them) becomes `DiskFull`, which names
  the directory, what was being written, the bytes it still needed and the bytes free there.
- A store outage: lost or refused connections (botocore's, aiohttp's, the OS's), timeouts, and S3's 5xx and `SlowDown`
  answers. `store_call` retries them briefly inside one operation (`IN_CALL`); what outlasts that becomes
  `StoreUnavailable`, which a job step hands to the task layer, which retries the whole step with longer waits
  (`TASK`, worker/tasks.py); a step resumes from what it finished (cache batches, checkpoints).
- Redis refusing writes (`MISCONF` after a failed AOF write or snapshot, `OOM` under maxmemory with noeviction,
  `READONLY` on a replica) while it still answers reads: `refuses_writes`.
- A folder on the store that is not whole (no completion marker, a file missing or of another size): `Incomplete`,
  raised by storage/store.py's readers; not an outage, so never retried here.

Knows nothing of HTTP (services/errors.py maps these to statuses) and imports neither botocore nor aiohttp: their
errors are recognised by class name, so this module works where s3fs is not installed.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis

log = logging.getLogger("sidetune.faults")
T = TypeVar("T")


class Incomplete(RuntimeError):
    """A folder that is not whole: no completion marker, or a file it lists is missing or has another size."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore: `RESOURCE_EXHAUSTED: Error writing local file "<path>": ... [os_error_code='28']`
_TS_FULL = re.compile(rf"os_error_code='(?:{errno.ENOSPC}|{errno.EDQUOT})'|No space left on device|Disk quota exceeded")
_TS_FILE = re.compile(r'local file "([^"]+)"')


@dataclass(frozen=True)
class Policy:
    """Retries with exponential backoff and jitter: `attempts` tries in all, waiting `first_s`, then twice as long
    each time (at most `cap_s`), each wait varied by up to a quarter."""

    attempts: int
    first_s: float
    cap_s: float

    def delays(self) -> Iterator[float]:
        for i in range(self.attempts - 1):
            base = min(self.cap_s, self.first_s * 2**i)
            yield base * random.uniform(0.75, 1.25)


# Inside one store operation (a file written, a batch of the cache): rides out a reset connection or a burst of 503s.
IN_CALL = Policy(attempts=3, first_s=0.5, cap_s=2.0)
# A job's step (worker/tasks.py): retried after 5, 10, 20 and 40 s, so an outage of about a minute is survived; the
# step resumes from what it finished. The job fails if the fifth try meets an outage too.
TASK = Policy(attempts=5, first_s=5.0, cap_s=40.0)


class StoreUnavailable(RuntimeError):
    """The store could not be reached, or failed otherwise than with a missing file; the message names it."""


class DiskFull(RuntimeError):
    """No space left (or the quota reached) where something was being written. `where`: the directory (or store URL)
    named to the caller; `need`: bytes it still needed, when known; `free`: bytes free there, when measurable."""

    def __init__(self, where: str, what: str = "", need: int | None = None, free: int | None = None) -> None:
        self.where, self.what, self.need, self.free = str(where), what, need, free
        parts = [f"the disk is full: no space left under {self.where}"]
        if what:
            parts[0] += f" for {what}"
        figures = []
        if need is not None:
            figures.append(f"about {_human(need)} more needed")
        if free is not None:
            figures.append(f"{_human(free)} free")
        if figures:
            parts.append(f"({', '.join(figures)})")
        super().__init__(" ".join(parts) + "; free space there or put it on a larger disk, then retry")


def _human(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or during, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent); None if unknown."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def full_disk_path(exc: BaseException) -> str | None:
    """If `exc` (or what it was raised from) is a full disk: the file it names, or "" when it names none."""
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return e.where
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return str(e.filename or "")
        if isinstance(e, ValueError | RuntimeError) and "RESOURCE_EXHAUSTED" in str(e) and _TS_FULL.search(str(e)):
            found = _TS_FILE.search(str(e))
            return found.group(1) if found else ""
    return None


def as_disk_full(
    exc: BaseException, where: str | Path | None = None, what: str = "", need: int | None = None
) -> DiskFull | None:
    """`exc` as a DiskFull naming `where` (default: the file the error names), or None if it is no full disk."""
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return e
    path = full_disk_path(exc)
    if path is None:
        return None
    where = str(where) if where is not None else path or "an unknown directory"
    local = "://" not in where or where.startswith("file://")
    return DiskFull(where, what, need, free_bytes(where.removeprefix("file://")) if local else None)


@contextmanager
def naming_disk_full(where: str | Path, what: str = "", need: int | Callable[[], int] | None = None) -> Iterator[None]:
    """A full disk inside the block is raised as DiskFull naming `where` (and `need`: bytes, or a function giving
    them, computed only on failure); anything else passes unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if full_disk_path(e) is None:
            raise
        needed = need() if callable(need) else need
        raise as_disk_full(e, where, what, needed) from e


# ---- the store ------------------------------------------------------------------------------------------------------
_BOTO_TRANSIENT = {"ConnectionError", "HTTPClientError"}  # botocore: endpoint unreachable, reset, read timeouts
_AIOHTTP_TRANSIENT = {"ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"}
_S3_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "503",
    "500",
}


def _named(e: BaseException, package: str, names: set[str]) -> bool:
    return any(c.__module__.split(".")[0] == package and c.__name__ in names for c in type(e).__mro__)


def is_store_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is an error a retry may cure: a lost or refused connection, a
    timeout, or an S3 answer of 5xx or SlowDown. A missing file, refused credentials or a full disk are not."""
    if full_disk_path(exc) is not None or isinstance(exc, redis.RedisError):  # Redis's are its own (services/errors)
        return False
    for e in _chain(exc):
        if isinstance(e, StoreUnavailable | ConnectionError | TimeoutError):
            return True
        if _named(e, "botocore", _BOTO_TRANSIENT) or _named(e, "aiohttp", _AIOHTTP_TRANSIENT):
            return True
        if _named(e, "fsspec", {"FSTimeoutError"}):
            return True
        response = getattr(e, "response", None)  # botocore's ClientError: the S3 answer
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or response.get("Error", {}).get("Code") in _S3_TRANSIENT_CODES:
                return True
    return False


def retrying(call: Callable[[], T], what: str, policy: Policy | None = None) -> T:
    """`call()`, tried again after a store outage (`is_store_outage`) as `policy` (default `IN_CALL`) says; the last
    outage is raised as it came (the caller names it). Anything else is raised at once."""
    delays = (policy or IN_CALL).delays()
    while True:
        try:
            return call()
        except Exception as e:
            if not is_store_outage(e) or isinstance(e, StoreUnavailable):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            log.warning("%s: %s: %s; trying again in %.1f s", what, type(e).__name__, e, delay)
            time.sleep(delay)


def store_call(url: str, call: Callable[[], T], what: str = "", need: int | None = None) -> T:
    """One operation on the store at `url`: outages retried (`IN_CALL`); a missing file stays FileNotFoundError;
    a full disk is DiskFull naming the store (`need`: the bytes being written); anything else (an outage that
    lasted, refused credentials) is StoreUnavailable naming the store."""
    try:
        return retrying(call, f"{what} on the store {url}" if what else f"the store {url}")
    except (FileNotFoundError, Incomplete, StoreUnavailable, DiskFull):
        raise
    except Exception as e:  # s3fs raises botocore's and aiohttp's own errors, not OSErrors, for a lost endpoint
        full = as_disk_full(e, url, what, need)
        if full is not None:
            raise full from e
        raise StoreUnavailable(f"the store {url} is unavailable: {type(e).__name__}: {e}") from e


# ---- Redis ----------------------------------------------------------------------------------------------------------
# the error's own text, or redis-py's "Command # 2 (SET ...) of pipeline caused error: MISCONF ..."
# at the start of Redis's answer, inside a pipeline's ("caused error: ...") or a script's ("@user_script: 5: -MISCONF")
_REFUSAL = re.compile(r"(?:^|caused error: |@user_script: ?\d+: )-?(?:MISCONF|OOM|READONLY|NOREPLICAS)\b")


def refuses_writes(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing a write while it still answers: a failed AOF write or snapshot (`MISCONF`, as
    a full disk causes), `OOM` (maxmemory with noeviction), `READONLY` (a replica)."""
    if isinstance(exc, redis.OutOfMemoryError | redis.ReadOnlyError):
        return True
    return isinstance(exc, redis.ResponseError) and _REFUSAL.search(str(exc)) is not None


def refusal_text(exc: BaseException) -> str:
    """Redis's answer as it gave it: redis-py strips the code from the errors it has classes for (`OOM`, `READONLY`)."""
    prefix = {redis.OutOfMemoryError: "OOM ", redis.ReadOnlyError: "READONLY "}.get(type(exc), "")
    return prefix + str(exc)
