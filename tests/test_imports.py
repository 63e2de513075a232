"""The package's import graph has no cycle.

Built statically (ast) over every module under ``src/loopwise``, whatever modules
exist. Two graphs:

- what runs when a module is imported: imports at module level (in ``try``, ``if``
  and ``with`` blocks too), not those under ``if TYPE_CHECKING:`` nor inside
  functions or methods. A cycle there is an ImportError waiting for the right order.
- the same plus the imports inside functions and methods (``TYPE_CHECKING`` still
  left out): an import moved into a function to dodge a cycle is the cycle still
  (a store that imports the agent to find the default store, a base module that
  imports its backends to choose one). Deferred imports that go down the layers
  (an agent that opens the SQLite store only when it needs one) are fine.

Importing ``a.b.c`` from outside package ``a.b`` runs ``a/b/__init__.py`` first:
that edge counts too (a package's own modules importing their package's
``__init__`` do not: it is already being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import loopwise

ROOT = Path(loopwise.__file__).parent
PACKAGE = "loopwise"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (``pkg`` for ``pkg/__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed_imports(body: list[ast.stmt], *, deferred: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when this body runs (not under TYPE_CHECKING; with `deferred`,
    those in its functions and methods too)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += _executed_imports(node.body, deferred=True)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _executed_imports(node.body, deferred=deferred)
            found += _executed_imports(node.orelse, deferred=deferred)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                found += _executed_imports(part, deferred=deferred)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            found += _executed_imports(node.body, deferred=deferred) + _executed_imports(
                getattr(node, "orelse", []), deferred=deferred)
        elif isinstance(node, ast.ClassDef):
            found += _executed_imports(node.body, deferred=deferred)  # (a class body runs at import)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports when imported (with `deferred`, or ever)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _executed_imports(ast.parse(path.read_text(encoding="utf-8")).body, deferred=deferred):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                # `from pkg import name`: a submodule when one is so named, else an attribute.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                if name not in modules:
                    continue
                targets.add(name)
                # Its enclosing packages run first, unless they enclose the importer too.
                parts = name.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not (module == parent or module.startswith(parent + ".")):
                        targets.add(parent)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in import order, the first repeated at the end), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, black) == grey:
                return [*stack[stack.index(nxt):], nxt]
            if color.get(nxt) == white and (found := visit(nxt)):
                return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_at_import_time() -> None:
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}._stores.base" in graph  # (the walk found the package)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_through_imports_inside_functions() -> None:
    graph = import_graph(deferred=True)
    cycle = find_cycle(graph)
    assert cycle is None, ("import cycle (counting imports inside functions): " + " -> ".join(cycle or [])
                           + "; move what both sides need into a module below them")


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_and_function_imports_do_not_count() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "if TYPE_CHECKING:\n    import a\n"
        "try:\n    import b\nexcept ImportError:\n    import c\n"
        "def f():\n    import d\n"
        "class C:\n    import e\n    def m(self):\n        import f\n"
    )

    def names(deferred: bool) -> list[str | None]:
        return [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                for n in _executed_imports(tree.body, deferred=deferred)]

    assert names(False) == ["typing", "os", "b", "c", "e"]
    assert names(True) == ["typing", "os", "b", "c", "d", "e", "f"]


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(package: str, module: str) -> bool:
    return module == f"{PACKAGE}.{package}" or module.startswith(f"{PACKAGE}.{package}.")


def test_stores_and_control_planes_do_not_import_the_driver() -> None:
    graph = import_graph(deferred=True)
    below = [m for m in graph if _in("_stores", m) or _in("_control", m)]
    assert len(below) >= 8, below
    for module in below:
        above = sorted(m for m in _reach(graph, module) if _in("_runtime", m) or _in("_core", m))
        assert not above, f"{module} imports the driver or the core: {above}"


def test_the_core_imports_no_driver_store_view_or_model() -> None:
    """The rules are pure: nothing that does I/O, keeps time or renders is below them."""
    graph = import_graph(deferred=True)
    core = [m for m in graph if _in("_core", m)]
    assert len(core) >= 4, core
    for module in core:
        reached = _reach(graph, module)
        bad = sorted(m for m in reached
                     if any(_in(p, m) for p in ("_runtime", "_stores", "_control", "_views", "_demo", "cli", "models")))
        assert not bad, f"{module} imports {bad}"
