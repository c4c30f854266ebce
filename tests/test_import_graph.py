"""The import graph of `orchestrator/`, `tasks/` and `analysis/` has no cycle, and neither has the
graph of their folders (docs/contracts.md, "Layout").

Read with `ast`, nothing imported: a module is a .py file under those packages (a package's
`__init__.py` is the package), and A -> B for every `import B`, `from B import x` and
`from pkg import B` in A, at top level or inside a function: a lazy import that closes a cycle is
still a cycle (it only moves the failure to whichever module a process happens to import first).
The runtime graph leaves out imports under `if TYPE_CHECKING:`; the full graph counts them too,
since a type two modules need belongs below both. `importlib` paths are not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "tasks", "analysis")

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


def import_edges(modules: dict[str, Path], root: Path = ROOT, type_only: bool = False) -> dict[Edge, list[str]]:
    """(importer, imported) -> where: ["path:line (top|lazy)", ...]; runtime imports only unless
    `type_only` (then `if TYPE_CHECKING:` imports count too)."""
    edges: dict[Edge, list[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = set() if type_only else _type_checking_only(tree)
        lazy = _inside_functions(tree)
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


def folder_of(module: str) -> str:
    """The concept a module belongs to: its package folder (`orchestrator.cells.dense` ->
    `orchestrator.cells`); a module at the top of a package is its own node (`orchestrator.cli`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def folder_edges(edges: dict[Edge, list[str]], modules: dict[str, Path]) -> dict[Edge, list[str]]:
    out: dict[Edge, list[str]] = {}
    for (a, b), where in edges.items():
        fa = a if modules[a].name == "__init__.py" and a.count(".") == 1 else folder_of(a)
        fb = b if modules[b].name == "__init__.py" and b.count(".") == 1 else folder_of(b)
        if fa != fb and not fb.startswith(fa + ".") and not fa.startswith(fb + "."):
            out.setdefault((fa, fb), []).extend(where)
    return out


def test_the_runtime_import_graph_has_no_cycle():
    modules = module_files(ROOT)
    edges = import_edges(modules)
    # The graph is the real one: lazy imports are in it (a Tune trial's runner imports every family).
    assert ("orchestrator.cells.run", "orchestrator.cells.seg3d") in edges
    assert ("orchestrator.sweep.driver", "orchestrator.cells.run") in edges and len(modules) > 90
    found = cycles(edges)
    assert not found, "import cycles (break them by moving code down a layer):\n" + describe(found, edges)


def test_no_cycle_even_counting_type_only_imports():
    modules = module_files(ROOT)
    edges = import_edges(modules, type_only=True)
    found = cycles(edges)
    assert not found, "cycles through TYPE_CHECKING imports (move the type below both):\n" + describe(found, edges)


def test_folders_form_layers():
    """No cycle among the folders (store, grid, extraction, cells, plan, sweep, console, the top
    modules, tasks' packages, analysis), type-only imports included: each concept depends only on
    the ones below it (docs/contracts.md draws the layers)."""
    modules = module_files(ROOT)
    edges = folder_edges(import_edges(modules, type_only=True), modules)
    assert ("orchestrator.sweep", "orchestrator.cells") in edges
    found = cycles(edges)
    assert not found, "folder cycles:\n" + describe(found, edges)


def test_ray_backend_imports_no_medscale_code():
    """ray_backend takes decode functions, encoder classes and the cell runner as arguments."""
    modules = module_files(ROOT)
    edges = import_edges(modules, type_only=True)
    assert not [b for (a, b) in edges if a == "orchestrator.ray_backend"]


def test_no_product_module_imports_monai_or_torch_optim():
    """Each costs seconds of CPU in every trial process (MONAI's package init; torch.optim's step
    imports torch._dynamo): the heads use tasks/protocols/blocks.py, losses.py and optim.py, tested
    bit-equal to them. A regression here is silent otherwise: the results would not change."""
    found = []
    for name, path in module_files(ROOT).items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{name}: {n}" for n in names if n.split(".")[0] == "monai" or n.startswith("torch.optim")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "optim" and isinstance(node.value.value, ast.Name) \
                    and node.value.value.id == "torch":
                found.append(f"{name}: torch.optim.{node.attr}")
    assert not found, found


def test_orchestrator_layout_limits():
    """At most 8 modules at the top of orchestrator/, none over 400 lines anywhere, and one class
    per name across orchestrator/ (a newcomer never meets two different `Plan`s)."""
    top = [p for p in (ROOT / "orchestrator").glob("*.py")]
    assert len(top) <= 8, sorted(p.name for p in top)
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
    classes: dict[str, list[str]] = {}
    for p in (ROOT / "orchestrator").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(str(p.relative_to(ROOT)))
    assert not {k: v for k, v in classes.items() if len(v) > 1}


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
    "import orchestrator.cells.run; orchestrator.cells.run.run_cell",  # what a Tune trial imports first
    "import orchestrator.sweep.driver",
    "import analysis.report",
])
def test_entry_points_import_in_a_fresh_process(statement):
    r = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
