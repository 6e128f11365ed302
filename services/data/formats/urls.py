"""Dataset locations that are URLs: which are object-store URLs (`s3://`, `gs://`, any fsspec scheme but `file://`,
which names a local path, and `hf://`, a Hugging Face Hub id), and which are refused before anything else looks at
them: a URL carrying credentials or a query (a signature, a token) would be stored in the job's record and shown in
its errors, and `.`/`..` segments or empty ones would let a URL read as inside an allowed prefix while naming
something else. Pure Python: the job spec (services/spec/dataset.py) and services/paths.py use it.
"""

from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(location: str) -> str | None:
    """The URL scheme of `location`, lower-cased (`s3`, `file`), or None for a plain path."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


# not object stores: `file://` names a local path, `hf://` a Hugging Face Hub id (formats/huggingface.py loads it
# through the Hub, so the allowed prefixes do not apply)
_NOT_STORES = (None, "file", "hf")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is a URL other than `file://`: an object-store URL or a Hub id, which `url_problem` checks
    before the spec is stored."""
    return isinstance(location, str) and scheme(location) not in (None, "file")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is an object-store URL (any scheme but `file://`, which names a local path, and `hf://`,
    a Hugging Face Hub id)."""
    return isinstance(location, str) and scheme(location) not in _NOT_STORES


def local_path(location: str) -> str:
    """A `file://` URL as the path it names (`file:///data/x` -> `/data/x`); anything else unchanged."""
    return location[len("file://") :] if scheme(location) == "file" else location


def url_problem(url: str) -> str | None:
    """Why an object-store URL is refused, without repeating it (it may hold a secret), or None."""
    rest = url.split("://", 1)[1]
    netloc, _, key = rest.partition("/")
    if "@" in netloc:
        return (
            "credentials are never taken from a URL (it would be stored with the job and shown in its errors); "
            "give them to the service by the environment or a named profile (AWS_PROFILE)"
        )
    if "?" in rest or "#" in rest:
        return "a URL with a query or a fragment (a signature, a token, a version) is not accepted; name the object"
    if not netloc or any(part in ("", ".", "..") for part in key.split("/")[:-1]) or key.split("/")[-1] in (".", ".."):
        return "a URL needs a bucket and a key without empty, `.` or `..` segments"
    return None
