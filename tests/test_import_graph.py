"""The import graph of `orchestrator/` and `tasks/` has no cycle (docs/contracts.md, "Module layering").

Read with `ast`, nothing imported: a module is a .py file under those packages (a package's
`__init__.py` is the package), and A -> B for every `import B`, `from B import x` and
`from pkg import B` in A, at top level or inside a function: a lazy import that closes a cycle is
still a cycle (it only moves the failure to whichever module a process happens to import first).
Imports under `if TYPE_CHECKING:` do not run and do not count; neither do `importlib` paths
(`cells.FAMILY_RUNNERS`), which are the registries' way of naming a module without importing it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "tasks")

Edge = tuple[str, str]


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes in the body of an `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _inside_functions(tree: ast.AST) -> set[int]:
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner.update(id(n) for n in ast.walk(node) if n is not node)
    return inner


def import_edges(modules: dict[str, Path], root: Path = ROOT) -> dict[Edge, list[str]]:
    """(importer, imported) -> where: ["path:line (top|lazy)", ...], runtime imports only."""
    edges: dict[Edge, list[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip, lazy = _type_checking_only(tree), _inside_functions(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package up
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            where = f"{path.relative_to(root).as_posix()}:{node.lineno} ({'lazy' if id(node) in lazy else 'top'})"
            for t in targets:
                if t in modules and t != name:
                    edges.setdefault((name, t), []).append(where)
    return edges


def cycles(edges: dict[Edge, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def describe(components: list[list[str]], edges: dict[Edge, list[str]]) -> str:
    lines = []
    for comp in components:
        lines.append(f"cycle among {len(comp)} modules: {', '.join(comp)}")
        members = set(comp)
        for (a, b), where in sorted(edges.items()):
            if a in members and b in members:
                lines.append(f"  {a} -> {b}   [{'; '.join(where)}]")
    return "\n".join(lines)


def test_the_runtime_import_graph_has_no_cycle():
    modules = module_files(ROOT)
    edges = import_edges(modules)
    # The graph is the real one: lazy imports are in it (cells runs a seg3d group through one).
    assert ("orchestrator.cells", "orchestrator.seg3d_cells") in edges
    assert ("orchestrator.sweep", "orchestrator.cells") in edges and len(modules) > 60
    found = cycles(edges)
    assert not found, "import cycles (break them by moving code down a layer):\n" + describe(found, edges)


def test_the_checker_sees_lazy_cycles_and_skips_type_checking_imports(tmp_path):
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from orchestrator.b import f\nfrom orchestrator import c\n")
    (pkg / "b.py").write_text("def f():\n    from orchestrator import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nimport importlib\n"
                              "if TYPE_CHECKING:\n    from orchestrator.a import x\nelse:\n    pass\n"
                              "M = importlib.import_module('orchestrator.a')\n")
    (pkg / "d.py").write_text("from . import c\nfrom .c import M\n")
    edges = import_edges(module_files(tmp_path, ("orchestrator",)), tmp_path)
    assert edges[("orchestrator.b", "orchestrator.a")] == ["orchestrator/b.py:2 (lazy)"]
    assert ("orchestrator.c", "orchestrator.a") not in edges  # TYPE_CHECKING and importlib: free
    assert ("orchestrator.d", "orchestrator.c") in edges  # relative imports resolve
    found = cycles(edges)
    assert found == [["orchestrator.a", "orchestrator.b"]]
    text = describe(found, edges)
    assert "orchestrator.a -> orchestrator.b   [orchestrator/a.py:1 (top)]" in text
    assert "orchestrator.b -> orchestrator.a   [orchestrator/b.py:2 (lazy)]" in text


@pytest.mark.parametrize("statement", [
    "import orchestrator.cli",
    "import tasks.datasets, tasks.protocols",
    "import orchestrator.cells; orchestrator.cells.run_cell",  # what a Tune trial imports first
    "import orchestrator.sweep",
])
def test_entry_points_import_in_a_fresh_process(statement):
    r = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
