"""The shape of the code base, checked: import direction, no import cycles, short functions.

Imports are read from the source (AST), every ``import`` statement counted, including those inside
functions (a cycle through a deferred import is still two modules that cannot be understood, tested
or changed apart) and those under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "trainer", "server", "benchmarks", "protos", "deploy")
LENGTH_CHECKED = ("engine", "trainer", "server")
MAX_FUNCTION_LINES = 80
# Functions owned by another change in flight; the integrator deletes an entry once its owner's branch is merged.
LENGTH_ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            candidates = bases
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # The longest prefix that is one of ours: "engine.graph.shape" -> engine.graph.
            parts = candidate.split(".")
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in modules:
                    if prefix != name:
                        targets.add(prefix)
                    break
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_walk_sees_real_edges() -> None:
    graph = _graph()
    assert "engine.graph" in graph["engine.backends.onnxruntime"]
    assert "trainer.rundir" in graph["trainer.fit"] and "engine.model" in graph["trainer.fit"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (directly or round a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_dependencies_point_one_way() -> None:
    # CONVENTIONS.md: trainer, server and benchmarks import engine; engine imports none of them; protos nothing of ours.
    forbidden = {"engine": ("trainer", "server", "benchmarks", "deploy"),
                 "protos": ("engine", "trainer", "server", "benchmarks", "deploy")}
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in sorted(targets)
             if target.split(".")[0] in forbidden.get(module.split(".")[0], ())]
    assert not wrong, wrong


def _long_functions() -> dict[tuple[str, str], int]:
    long = {}
    for package in LENGTH_CHECKED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long[(path.relative_to(ROOT).as_posix(), node.name)] = lines
    return long


def test_no_function_is_longer_than_80_lines() -> None:
    long = _long_functions()
    unexpected = {k: v for k, v in long.items() if k not in LENGTH_ALLOWED}
    assert not unexpected, "split these (file, function: lines): " + ", ".join(
        f"{f} {name}: {n}" for (f, name), n in sorted(unexpected.items()))
    stale = [k for k in LENGTH_ALLOWED if k not in long]
    assert not stale, f"no longer too long, delete from LENGTH_ALLOWED: {stale}"
