"""The import graph of api/, services/, storage/ and worker/ has no cycles.

Every import counts: those at the top of a module, inside functions (deferred to dodge a circle at import time is
still a circle in the design) and under `TYPE_CHECKING`. Read with `ast`, so nothing is imported to check it.

`python -m tests.test_imports` prints the package-level graph (api, worker, services.<sub>, storage.<sub>) and any
module cycles, for comparing a tree before and after a change.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "services", "storage", "worker")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its `__init__.py`)."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: dict[str, Path]) -> Iterator[str]:
    """The modules of the packages that one import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        names: list[str] = []
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        bases, names = [base], [alias.name for alias in node.names]
    for base in bases:
        # `from pkg import submodule` loads the submodule; the package itself counts only for a name it defines
        submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
        yield from submodules
        if names and len(submodules) == len(names):
            continue
        # the deepest module of the dotted name that is one of ours
        parts = base.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in known:
                yield ".".join(parts[:i])
                break


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the modules of the packages it imports}, every import statement anywhere in its source."""
    known = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(_imported(node, name, is_package, known))
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path whose last module imports its first) for each strongly connected component."""
    return [_cycle_in(graph, component) for component in components(graph)]


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node: nodes that import each other, directly or not
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    first = min(component)
    parents: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def group(module: str) -> str:
    """A module's package for the package-level graph: `api`, `worker`, `services.<sub>`, `storage.<sub>`."""
    parts = module.split(".")
    return parts[0] if parts[0] in ("api", "worker") else ".".join(parts[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = out.setdefault(group(module), set())
        edges.update(group(t) for t in targets if group(t) != group(module))
    return out


def test_no_import_cycles() -> None:
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in found)


def test_a_cycle_is_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def main(root: Path = ROOT) -> None:
    graph = module_graph(root)
    packages = package_graph(graph)
    for package, targets in sorted(packages.items()):
        print(f"{package} -> {', '.join(sorted(targets)) or '-'}")
    found = cycles(graph)
    print(f"module cycles: {len(found)}")
    for c in found:
        print("  " + " -> ".join([*c, c[0]]))
    # between packages a circle is allowed (their modules do not form one), but worth seeing
    for component in components(packages):
        print(f"packages that import each other: {', '.join(sorted(component))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
