"""Brace patterns naming many shards, as WebDataset writes them (`shards/{000000..000999}.tar`, the `braceexpand`
convention): `{a..b}` an integer range, zero-padded to the wider bound when a bound starts with 0, and `{x,y,z}`
alternatives, nested and combined (`{train,val}/{00..09}.tar`). Every `{` opens one of the two; a pattern naming
more than `MAX_SHARDS` paths is refused before they are listed (a request cannot make the server enumerate
billions of names). Pure Python: the job spec (services/spec/dataset.py) expands patterns with it at submission.
"""

from __future__ import annotations

import re

MAX_SHARDS = 100_000
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


class PatternError(ValueError):
    """A brace pattern that cannot be expanded; the message says why."""


def is_shards(location: str) -> bool:
    """Whether `dataset.format: auto` reads `location` as WebDataset shards: a tar file, or a pattern of them."""
    return location.lower().endswith(".tar")


def expand(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """Every path `pattern` names, in order (a pattern without braces names itself); PatternError if it is
    malformed or names more than `limit` paths."""
    out = _expand(pattern, limit)
    if len(set(out)) != len(out):
        raise PatternError(f"{pattern!r} names some shards more than once")
    return out


def _group(s: str) -> tuple[int, int] | None:
    """The first top-level `{...}` of `s`, as the indices of its braces; None without one."""
    start = s.find("{")
    close = s.find("}")
    if close >= 0 and (start < 0 or close < start):
        raise PatternError(f"{s!r} has a `}}` without its `{{`")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return start, i
    raise PatternError(f"{s!r} has a `{{` without its `}}`")


def _split_top(body: str) -> list[str]:
    """`body` split at its top-level commas."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return [*parts, body[last:]]


def _alternatives(body: str, limit: int) -> list[str]:
    match = _RANGE.fullmatch(body)
    if match:
        a, b = match.groups()
        lo, hi = int(a), int(b)
        count = abs(hi - lo) + 1
        if count > limit:
            raise PatternError(f"{{{body}}} names {count:,} shards; at most {limit:,}")
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(n).zfill(width) for n in range(lo, hi + step, step)]
    parts = _split_top(body)
    if len(parts) < 2:
        raise PatternError(f"{{{body}}} is neither a range (`{{000..009}}`) nor alternatives (`{{a,b}}`)")
    return parts


def _expand(s: str, limit: int) -> list[str]:
    found = _group(s)
    if found is None:
        return [s]
    i, j = found
    prefix, tails = s[:i], _expand(s[j + 1 :], limit)
    out: list[str] = []
    for alternative in _alternatives(s[i + 1 : j], limit):
        for head in _expand(alternative, limit):
            if len(out) + len(tails) > limit:
                raise PatternError(f"{s!r} names more than {limit:,} shards")
            out.extend(prefix + head + tail for tail in tails)
    return out
