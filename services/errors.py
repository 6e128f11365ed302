"""Typed errors and the one table that maps errors to codes (and HTTP statuses), shared by the API's handlers and
the job steps' failure records. Torch-free.

A `UserError` is an error whose message is the caller's answer: what was wrong and what to change. Each layer
defines its own where it belongs (`DatasetError` in services/data/datasets.py, `NonFiniteLoss` in
services/training/fit.py), with its `code` and `status`; those that several modules raise live here (`SpecError`,
`BackboneError`), so that no module imports another only for its error.
Storage errors (which know nothing of this module) are mapped here, and faults of the disk, the store and Redis
(storage/faults.py): a full disk is `disk_full` (507) wherever it happens, Redis refusing writes 503
`store_refuses_writes`. Anything else is a fault of ours: `internal_error`, reported with a reference id whose
traceback is logged, and nothing of its internals shown.
"""

from __future__ import annotations

import uuid

import redis

from storage.archives import ArchiveError
from storage.cache import CacheError
from storage.faults import (
    DiskFull,
    Incomplete,
    StoreUnavailable,
    as_disk_full,
    is_store_outage,
    refuses_writes,
)
from storage.quotas import QuotaExceeded, TooManyJobs


class UserError(Exception):
    """An error the caller can fix; `code` and `status` (for the API) say which kind."""

    code = "invalid_request"
    status = 422


class SpecError(UserError, ValueError):
    """A job spec that cannot run as given (a field that does not suit the backbone, the method or the settings); the
    message names the field. A ValueError too, so that inside a pydantic validator it becomes a validation error
    (422). Imported from services/spec/, where job specs live; defined here so that every module of the spec (the
    sweeps' too) can raise it."""

    code = "invalid_spec"


class BackboneError(UserError, ValueError):
    """A backbone that cannot be created or used; the message names the cause. Raised by services/backbones.py and
    services/video/backbone.py (a ViT that cannot be made a ViViT); defined here, where both can import it without
    importing each other."""

    code = "invalid_backbone"


# Errors of the layers below, by type: (HTTP status, code). First match wins, so subclasses come first.
KNOWN: dict[type[BaseException], tuple[int, str]] = {
    # 507 Insufficient Storage: the server's disk, not the request, is at fault (a request that alone cannot fit is
    # refused before it runs: 422 `cache_over_quota`, 413 for uploads over the limits)
    DiskFull: (507, "disk_full"),
    StoreUnavailable: (503, "storage_unavailable"),
    Incomplete: (503, "store_incomplete"),
    redis.ConnectionError: (503, "store_unavailable"),
    redis.TimeoutError: (503, "store_unavailable"),
    CacheError: (409, "cache_error"),
    TooManyJobs: (429, "too_many_jobs"),  # a key's jobs queued or running: a retry succeeds once one ends
    QuotaExceeded: (409, "quota_exceeded"),  # a key's bytes: only deleting something of its own helps
    PermissionError: (403, "forbidden_path"),
    FileNotFoundError: (422, "not_found"),
}
# Errors that a retry may cure (a store or Redis restarting): job steps retry them with backoff before failing.
TRANSIENT = (StoreUnavailable, redis.ConnectionError, redis.TimeoutError)


def transient(exc: BaseException) -> bool:
    """Whether a retry of the step may cure `exc`: the store or Redis unreachable, or Redis refusing writes (a full
    disk under its AOF is freed, its memory limit raised)."""
    return isinstance(exc, TRANSIENT) or refuses_writes(exc)


def named(exc: BaseException) -> BaseException:
    """`exc` as the fault it is: a full disk anywhere -> DiskFull, a store outage from a library (botocore, aiohttp,
    a reset connection) -> StoreUnavailable (chained to `exc`); anything else unchanged."""
    if isinstance(exc, DiskFull | StoreUnavailable):
        return exc
    full = as_disk_full(exc)
    if full is not None:
        full.__cause__ = exc
        return full
    if is_store_outage(exc):
        outage = StoreUnavailable(f"the store is unavailable: {type(exc).__name__}: {exc}")
        outage.__cause__ = exc
        return outage
    return exc


def classify(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) of a known error, or None for an internal one."""
    if isinstance(exc, UserError):
        return exc.status, exc.code
    if isinstance(exc, ArchiveError):
        return {"dataset_too_large": 413}.get(exc.code, 422), exc.code
    if refuses_writes(exc):
        return 503, "store_refuses_writes"
    known = next((known for t, known in KNOWN.items() if isinstance(exc, t)), None)
    if known is None and as_disk_full(exc) is not None:  # an OSError(ENOSPC) no caller named
        return KNOWN[DiskFull]
    return known


def reference() -> str:
    """The id an internal error is reported with, and logged under with its traceback."""
    return uuid.uuid4().hex[:12]


def internal_message(ref: str) -> str:
    return f"an internal error occurred (reference {ref}); the server's log has the details under that reference"
