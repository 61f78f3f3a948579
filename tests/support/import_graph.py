"""The project's import graph, read with `ast` (nothing is imported), for tests/test_layout.py.

Every `import` / `from ... import` statement of a project module counts, wherever it is:
at module level, inside functions (the imports that used to hide circles), and inside
`if TYPE_CHECKING:` blocks (marked, because they never run). A target is the longest dotted
prefix that is a project module, and `from pkg import name` points at `pkg.name` when that is
a submodule. Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, but those
package edges are left out: a package's `__init__` importing its own submodules, which import
siblings through the package path, is the normal layout, not a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "fleet", "simulators")


@dataclass(frozen=True)
class ImportEdge:
    """One import statement of `source` that reaches project module `target`."""

    source: str
    target: str
    path: str  # of the source file, relative to the repository
    line: int
    in_function: bool
    type_checking: bool
    text: str  # the statement's source lines

    def where(self) -> str:
        how = " (in a function)" if self.in_function else ""
        how += " (TYPE_CHECKING only)" if self.type_checking else ""
        return f"{self.path}:{self.line}{how}"


def module_files(packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the given top-level packages."""
    found: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(node: ast.AST, in_function: bool = False, type_checking: bool = False
                ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, type_checking
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _statements(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
            for stmt in child.orelse:
                yield from _statements(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
        else:
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _statements(child, nested, type_checking)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _targets(stmt: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: dict[str, Path]) -> set[str]:
    if isinstance(stmt, ast.Import):
        names = [alias.name for alias in stmt.names]
    else:
        base = stmt.module or ""
        if stmt.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (stmt.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" for alias in stmt.names]
    found = {_resolve(n, modules) for n in names}
    return {t for t in found if t is not None and t != module}


def import_edges(packages: Iterable[str] = PACKAGES) -> list[ImportEdge]:
    """Every import statement between project modules (see the module docstring)."""
    modules = module_files(packages)
    edges: list[ImportEdge] = []
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source, filename=str(path))
        for stmt, in_function, type_checking in _statements(tree):
            text = "\n".join(lines[stmt.lineno - 1 : (stmt.end_lineno or stmt.lineno)])
            for target in sorted(_targets(stmt, module, path.name == "__init__.py", modules)):
                edges.append(ImportEdge(module, target, str(path.relative_to(ROOT)), stmt.lineno,
                                        in_function, type_checking, text))
    return edges


@dataclass(frozen=True)
class Circle:
    """Modules that import each other, directly or through one another (a strongly connected
    component of the graph), with one way round as an example and every edge inside it."""

    modules: list[str]
    example: list[str]  # a -> b -> ... -> a
    edges: list[ImportEdge]

    def describe(self) -> str:
        lines = [f"{len(self.modules)} modules: {', '.join(self.modules)}",
                 "  e.g. " + " -> ".join(self.example)]
        lines += [f"  {e.source} -> {e.target}: {e.where()}" for e in self.edges]
        return "\n".join(lines)


def circles(edges: Iterable[ImportEdge]) -> list[Circle]:
    """Every import circle between the edges' modules."""
    edges = list(edges)
    found = []
    for modules, example in cycles(edges):
        inside = sorted({(e.source, e.target): e for e in edges
                         if e.source in modules and e.target in modules}.values(),
                        key=lambda e: (e.source, e.target))
        found.append(Circle(sorted(modules), example, inside))
    return found


def cycles(edges: Iterable[ImportEdge]) -> list[tuple[set[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle
    through it written as a path `a -> b -> ... -> a`."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(comp, _cycle_in(graph, comp)) for comp in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to `start`
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")
