"""The package's module graph has no cycles, counting every import: top-level, inside functions and under
TYPE_CHECKING. Read from the source with `ast`, so a lazy import that would close a loop fails here, not later."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("losa_deploy", "exporters")


def modules(root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every .py file under PACKAGES."""
    found = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _known(name: str, mods: dict) -> str | None:
    """`name` or its closest enclosing module that is ours (None for third-party)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """module -> the modules it imports. `from P import x` points at P.x when that is a module, else at P."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {_known(a.name, mods) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.add(sub if sub in mods else _known(src, mods))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
                    found.append(sorted(comp))
    return found


def test_finder_sees_lazy_and_type_checking_imports(tmp_path):
    """The checker itself: a cycle closed only by a function-level import, and one closed only under
    TYPE_CHECKING, are both found; a package importing its own submodules is not a cycle."""
    pkg = tmp_path / "losa_deploy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import X\n")
    (pkg / "d.py").write_text("import losa_deploy.c\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import g\n")
    (pkg / "sub" / "leaf.py").write_text("from ..a import f\nimport numpy\n")
    (tmp_path / "exporters").mkdir()
    (tmp_path / "exporters" / "e.py").write_text("from losa_deploy.sub import leaf\n")
    graph = import_graph(modules(tmp_path))
    assert graph["losa_deploy.sub.leaf"] == {"losa_deploy.a"}
    assert graph["exporters.e"] == {"losa_deploy.sub.leaf"}
    assert sorted(cycles(graph)) == [["losa_deploy.a", "losa_deploy.b"], ["losa_deploy.c", "losa_deploy.d"]]


def test_no_import_cycles():
    mods = modules()
    assert "losa_deploy.sparse_cpu._lib" in mods and "exporters.common" in mods
    found = cycles(import_graph(mods))
    assert found == [], "import cycles (counting function-level imports): " + "; ".join(" <-> ".join(c) for c in found)
