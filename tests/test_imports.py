"""No import circles inside the ``streampress`` package.

Every module of the package is parsed (not run: nothing is imported but the packages
that ``pkgutil.walk_packages`` has to open) and each ``import`` / ``from ... import``
statement, wherever it stands (module level, inside functions, under ``TYPE_CHECKING``),
becomes an edge to the streampress module it names: ``from .x import y`` is an edge to
``x.y`` when that is a module, else to ``x`` (a package's ``__init__`` included). A
package's implicit import of its parent ``__init__`` is not an edge. Any cycle in this
graph fails the test, printed as ``a -> b -> ... -> a``.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import streampress


def _modules() -> dict[str, tuple[Path, bool]]:
    """name -> (source file, is a package) for every module of streampress."""
    root = Path(streampress.__file__).parent
    found = {"streampress": (root / "__init__.py", True)}
    for info in pkgutil.walk_packages(streampress.__path__, "streampress.", onerror=lambda name: None):
        rel = info.name.split(".")[1:]
        path = root.joinpath(*rel, "__init__.py") if info.ispkg else root.joinpath(*rel[:-1], rel[-1] + ".py")
        found[info.name] = (path, info.ispkg)
    return found


def _target(name: str, modules) -> str | None:
    """The streampress module ``name`` stands for: itself, or its longest module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [_target(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [_target(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, modules)
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t is not None and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module (Tarjan's algorithm): one
    cycle through it (``[a, b, ..., a]``, a shortest path back to its first module) and
    all its modules."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for comp in comps:
        start = min(comp)
        # breadth-first from start's successors back to start, inside the component
        paths = {w: [start, w] for w in sorted(graph[start] & comp)}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v] & comp):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        found.append((paths[start], sorted(comp)))
    return found


def test_graph_sees_relative_function_level_and_package_imports():
    graph = import_graph()
    assert "streampress.memory.base" in graph["streampress.session"]  # from .memory.base import ...
    assert "streampress.memory.base" in graph["streampress.memory.retrieval"]  # from .base import ...
    assert "streampress.models.random.qwen" in graph["streampress.models.qwen"]  # inside from_random
    assert "streampress.models" in graph["streampress.cacher.cacher"]  # a name from a package __init__
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in streampress:\n" + "\n".join(
        f"{' -> '.join(cycle)}  (all modules of this circle: {', '.join(comp)})" for cycle, comp in found)
