"""The shape the code keeps (issue 21's targets), checked on every run so that it cannot drift back unseen.

In api/, services/, storage/ and worker/: no function over 80 lines, no file over 450 lines (the guideline is about
400), and few `dict[str, Any]` annotations: the seams between steps are typed values (dataclasses, pydantic models,
TypedDicts for JSON shapes). The same loose dict under another spelling (a bare `dict`, `Mapping[str, Any]`,
`dict[str, object]`, an alias) is counted too, so renaming one does not pass.

`python -m tests.test_code_shape [ROOT]` prints the figures and every offender, for comparing trees.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "services", "storage", "worker")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450
MAX_ANY_DICTS = 40  # `dict[str, Any]`: free-form JSON where a shape truly is the user's (metrics, options)
MAX_LOOSE_DICTS = 50

ANY_DICT = re.compile(r"dict\[str, Any\]")
LOOSE_DICT = re.compile(
    r"(?:Mutable)?Mapping\[str, Any\]|(?::|->) *dict\b(?!\[)|\bdict\[str, object\]|= *dict\[str, Any\]"
)


def sources(root: Path = ROOT) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text()
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def long_functions(files: dict[str, str]) -> list[tuple[int, str]]:
    out = []
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append((lines, f"{name}:{node.name}"))
    return sorted(out, reverse=True)


def long_files(files: dict[str, str]) -> list[tuple[int, str]]:
    return sorted(
        ((text.count("\n"), name) for name, text in files.items() if text.count("\n") > MAX_FILE_LINES), reverse=True
    )


def dict_counts(files: dict[str, str], pattern: re.Pattern[str]) -> dict[str, int]:
    counts = {name: len(pattern.findall(text)) for name, text in files.items()}
    return {name: n for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n}


def test_no_function_is_over_80_lines() -> None:
    assert not long_functions(sources()), long_functions(sources())


def test_no_file_is_over_450_lines() -> None:
    assert not long_files(sources()), long_files(sources())


def test_few_untyped_dicts() -> None:
    files = sources()
    any_dicts, loose = dict_counts(files, ANY_DICT), dict_counts(files, LOOSE_DICT)
    assert sum(any_dicts.values()) < MAX_ANY_DICTS, any_dicts
    assert sum(loose.values()) <= MAX_LOOSE_DICTS, loose


def main(root: Path) -> None:
    files = sources(root)
    for label, rows in (
        ("functions over 80 lines", long_functions(files)),
        ("files over 450 lines", long_files(files)),
    ):
        print(f"{label}: {len(rows)}")
        for lines, name in rows:
            print(f"  {lines:5d} {name}")
    for label, pattern in (("dict[str, Any]", ANY_DICT), ("loose dicts", LOOSE_DICT)):
        counts = dict_counts(files, pattern)
        print(f"{label}: {sum(counts.values())}")
        for name, n in counts.items():
            print(f"  {n:5d} {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
