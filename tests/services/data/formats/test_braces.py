"""Brace patterns (services/data/formats/braces.py) expand as WebDataset's `braceexpand` does: zero-padded ranges,
alternatives, nested and combined; malformed or enormous patterns are refused before anything is listed."""

from __future__ import annotations

import re

import pytest

from services.data.formats.braces import PatternError, expand, is_shards


def test_ranges_and_alternatives() -> None:
    assert expand("/d/{000000..000002}.tar") == ["/d/000000.tar", "/d/000001.tar", "/d/000002.tar"]
    assert expand("{8..11}") == ["8", "9", "10", "11"] and expand("{08..11}") == ["08", "09", "10", "11"]
    assert expand("{3..1}") == ["3", "2", "1"]
    assert expand("/d/{train,val}/{0..1}.tar") == ["/d/train/0.tar", "/d/train/1.tar", "/d/val/0.tar", "/d/val/1.tar"]
    assert expand("{a,{b,c}x}") == ["a", "bx", "cx"]
    assert expand("/d/plain.tar") == ["/d/plain.tar"]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("{a}", "neither a range"),
        ("/d/{0..2.tar", "without its `}`"),
        ("/d/0..2}.tar", "without its `{`"),
        ("{0..100000000}", "names 100,000,001 shards; at most 100,000"),
        ("{0..999}{0..999}", "names more than 100,000 shards"),
        ("{0,0}", "more than once"),
    ],
)
def test_malformed_or_enormous_patterns_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(PatternError, match=re.escape(why)):
        expand(pattern)


def test_auto_reads_tar_names_as_shards() -> None:
    assert is_shards("/d/{0..9}.tar") and is_shards("/d/one.TAR") and not is_shards("/d/folder")
