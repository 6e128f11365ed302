"""The JSON depth count (api/json_depth.py) against a plain byte-by-byte count, on random JSON texts fed in random
chunks: brackets inside strings, escaped quotes and backslashes, escapes split across chunks."""

from __future__ import annotations

import json
import random

import pytest

from api.json_depth import DepthScanner


def deepest(text: bytes) -> int:
    """The reference: one byte at a time."""
    depth = most = 0
    in_string = escaped = False
    for byte in text:
        c = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            most = max(most, depth)
        elif c in "]}":
            depth -= 1
    return most


def random_json(rng: random.Random, depth: int) -> object:
    if depth == 0 or rng.random() < 0.2:
        # strings full of what the count must ignore: brackets, quotes, backslashes, runs of them
        return rng.choice(
            [rng.randint(0, 255), "".join(rng.choice('[]{}"\\ab') for _ in range(rng.randint(0, 12))), None, True, 1.5]
        )
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {"k" + "\\" * rng.randint(0, 3) + "]": random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def feed(text: bytes, rng: random.Random, limit: int = 10_000) -> DepthScanner:
    scanner, i = DepthScanner(limit), 0
    while i < len(text):
        n = rng.randint(1, 7)
        scanner.feed(text[i : i + n])
        i += n
    return scanner


@pytest.mark.parametrize("seed", range(3))
def test_the_count_matches_a_byte_by_byte_one_in_any_chunks(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        text = json.dumps(random_json(rng, rng.randint(0, 12))).encode()
        assert feed(text, rng).deepest == deepest(text), text


def test_a_limit_is_reported_as_soon_as_it_is_passed() -> None:
    assert DepthScanner(64).feed(b"[" * 64 + b"]" * 64)
    scanner = DepthScanner(64)
    assert scanner.feed(b"[" * 64) and not scanner.feed(b"[")
    assert DepthScanner(2).feed(b'{"a": "[[[[[[[[\\"[[[["}')  # inside a string, an escaped quote included
    assert not DepthScanner(2).feed(b'{"a": "\\\\"}[[[')  # an escaped backslash ends the string: three more
