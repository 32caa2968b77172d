"""Layering rules for the shardserve package, checked on its static import graph.

The graph is built with `ast` from the source files (nothing is imported): every `import` / `from ... import`
anywhere in a module counts -- module level, inside functions, classes, try/except -- except those in the body of
an `if TYPE_CHECKING:` block. Relative imports are resolved. `from a.b import c` is an edge to `a.b` and, when
`a.b.c` is a module, to `a.b.c` as well. Only edges to shardserve's own modules are kept; the implicit import of
parent packages (`import a.b.c` also runs `a/__init__.py`) is not counted.

Rules:
  (i)   there is no import cycle anywhere in shardserve;
  (ii)  no module under shardserve/engine/ imports an executor implementation (anything in shardserve.executor
        other than shardserve.executor.base and shardserve.executor.factory);
  (iii) shardserve/step.py, which holds the messages passed between engine, executor and worker, imports none of
        shardserve.engine, shardserve.executor, shardserve.worker -- neither directly nor through another module.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

PACKAGE = "shardserve"
ENGINE_PACKAGE = f"{PACKAGE}.engine"
EXECUTOR_PACKAGE = f"{PACKAGE}.executor"
EXECUTOR_INTERFACES = frozenset({f"{EXECUTOR_PACKAGE}.base", f"{EXECUTOR_PACKAGE}.factory"})
STEP_MODULE = f"{PACKAGE}.step"
STEP_FORBIDDEN_PACKAGES = (f"{PACKAGE}.engine", f"{PACKAGE}.executor", f"{PACKAGE}.worker")

Graph = dict[str, set[str]]


# ---- building the graph ---------------------------------------------------------------------------------------

def _package_dir() -> Path:
    """The source directory of the shardserve package, found without importing (running) it."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"cannot locate the {PACKAGE} package"
    return Path(next(iter(spec.submodule_search_locations)))


def discover_modules(package_dir: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under package_dir (packages map to __init__.py)."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if any(not p.isidentifier() for p in parts):  # not importable (e.g. a scripts-only folder with a dash)
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking_test(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` (any `x.TYPE_CHECKING`)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def iter_runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, at any depth, except inside the body of `if TYPE_CHECKING:`.

    The `else:` branch of such a block does run, so its imports are kept.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking_test(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a `from X import ...` statement, relative levels resolved."""
    if not node.level:
        return node.module or ""
    # the package the importing module lives in: the module itself for an __init__.py, else its parent
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package (level {node.level})")
    parts = parts[: len(parts) - (node.level - 1)]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def import_targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """All module names (known or not) an import statement refers to, per the rules in the module docstring."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _resolve_from_base(module, is_package, node)
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def build_import_graph(modules: dict[str, Path]) -> Graph:
    """module -> the set of shardserve modules it imports (self-imports dropped)."""
    graph: Graph = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in iter_runtime_imports(tree):
            for target in import_targets(module, is_package, node):
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


# ---- graph algorithms -----------------------------------------------------------------------------------------

def strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); each component sorted, in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def find_cycles(graph: Graph) -> list[list[str]]:
    """The import cycles: components of more than one module, plus any module that imports itself."""
    return [c for c in strongly_connected_components(graph) if len(c) > 1 or c[0] in graph.get(c[0], ())]


def shortest_path(graph: Graph, start: str, goals: Iterable[str],
                  within: Iterable[str] | None = None) -> list[str] | None:
    """A shortest path start -> ... -> goal (goal in goals, path of at least one edge), optionally within a node set."""
    goal_set, allowed = set(goals), (set(within) if within is not None else None)
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if allowed is not None and succ not in allowed:
                continue
            if succ in goal_set:
                path = [succ, node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if succ not in seen:
                seen.add(succ)
                parent[succ] = node
                queue.append(succ)
    return None


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """'modules: a, b, c; e.g. a -> b -> c -> a' for one cycle component."""
    first = component[0]
    example = shortest_path(graph, first, [first], within=component)
    return f"modules: {', '.join(component)}; e.g. {' -> '.join(example or [first, first])}"


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ---- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = discover_modules(_package_dir())
    assert PACKAGE in found and len(found) > 20, f"suspiciously few modules found: {sorted(found)}"
    return found


@pytest.fixture(scope="module")
def graph(modules) -> Graph:
    g = build_import_graph(modules)
    assert sum(len(v) for v in g.values()) > 20, "the import graph has almost no edges: the builder is broken"
    return g


# ---- self-tests of the machinery (so the rule tests cannot pass vacuously) -----------------------------------

def test_cycle_finder_on_synthetic_graph():
    g: Graph = {
        "a": {"b"}, "b": {"c"}, "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"}, "e": set(),                     # acyclic tail
        "f": {"g"}, "g": {"f"},                     # f <-> g
        "h": {"h"},                                 # self-loop
        "i": {"d", "missing"},                      # edge to an unknown node is ignored
    }
    assert find_cycles(g) == [["a", "b", "c"], ["f", "g"], ["h"]]
    assert describe_cycle(g, ["a", "b", "c"]) == "modules: a, b, c; e.g. a -> b -> c -> a"
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []
    # deep chain closed into one big loop: no recursion-limit trouble, one component with every node
    n = 5000
    chain: Graph = {f"m{i}": {f"m{(i + 1) % n}"} for i in range(n)}
    (big,) = find_cycles(chain)
    assert len(big) == n


def test_graph_builder_on_synthetic_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import sub\n",
        "a.py": "import os\nfrom . import b\nfrom .sub import c as _c\n",
        "b.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg import a\nelse:\n    from pkg.sub import d\n"
            "def f():\n    import pkg.sub.c\n"
            "class K:\n    def g(self):\n        from .sub.d import thing\n"
        ),
        "sub/__init__.py": "from . import c\nfrom .. import b\nfrom ..a import x\n",
        "sub/c.py": "from ..sub import *\nimport typing\nif typing.TYPE_CHECKING:\n    import pkg.a\n",
        "sub/d.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    mods = discover_modules(pkg, "pkg")
    assert sorted(mods) == ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"]
    g = build_import_graph(mods)
    assert g == {
        "pkg": {"pkg.sub"},
        "pkg.a": {"pkg", "pkg.b", "pkg.sub", "pkg.sub.c"},
        "pkg.b": {"pkg.sub", "pkg.sub.d", "pkg.sub.c"},
        "pkg.sub": {"pkg.sub.c", "pkg", "pkg.b", "pkg.a"},
        "pkg.sub.c": {"pkg.sub"},
        "pkg.sub.d": set(),
    }
    assert find_cycles(g) == [["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]]


# ---- the rules -------------------------------------------------------------------------------------------------

def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s) in shardserve:\n" + "\n".join(
        "  " + describe_cycle(graph, c) for c in cycles)


def test_engine_imports_no_executor_implementation(graph):
    bad = sorted(
        (src, dst)
        for src, targets in graph.items() if _in_package(src, ENGINE_PACKAGE)
        for dst in targets if dst.startswith(EXECUTOR_PACKAGE + ".") and dst not in EXECUTOR_INTERFACES
    )
    assert not bad, (
        f"engine modules must reach executors only through {sorted(EXECUTOR_INTERFACES)}; found:\n"
        + "\n".join(f"  {src} -> {dst}" for src, dst in bad))


def test_step_module_imports_no_engine_executor_or_worker(modules, graph):
    assert STEP_MODULE in modules, (
        f"{STEP_MODULE} (shardserve/step.py) does not exist: it must hold the step messages shared by "
        "engine, executor and worker")
    forbidden = [m for m in modules if any(_in_package(m, p) for p in STEP_FORBIDDEN_PACKAGES)]
    direct = sorted(t for t in graph[STEP_MODULE] if t in forbidden)
    assert not direct, f"{STEP_MODULE} imports {direct} directly"
    path = shortest_path(graph, STEP_MODULE, forbidden)
    assert path is None, f"{STEP_MODULE} reaches a forbidden package through its imports: {' -> '.join(path)}"
