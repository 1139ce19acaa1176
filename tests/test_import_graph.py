"""No import cycles inside wadi: the package's modules form a DAG.

Every ``import`` counts, module-level and inside functions (a lazy import hides a
cycle from Python, not from a reader).  ``from pkg import name`` is an edge to the
module that defines ``name``: a submodule, or for a package with a lazy ``_EXPORTS``
table the module that table names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wadi

ROOT = Path(wadi.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets
        ):
            # our own source: a dict literal, possibly with a comprehension inside
            value = eval(compile(ast.Expression(node.value), "<_EXPORTS>", "eval"), {})
            return {k: v.lstrip(".") for k, v in value.items()}
    return {}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items()}

    def resolve(target: str, names: list[str]) -> set[str]:
        found = set()
        for n in names:
            if f"{target}.{n}" in modules:
                found.add(f"{target}.{n}")
            elif n in lazy.get(target, {}):
                found.add(f"{target}.{lazy[target][n]}")
            elif target in modules:
                found.add(target)
        if not names and target in modules:
            found.add(target)
        return found

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        is_pkg = modules[name].name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "wadi" and alias.name in modules:
                        graph[name].add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "wadi":
                    continue
                graph[name] |= resolve(target, [a.name for a in node.names])
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_real_edges():
    graph = import_graph()
    assert "wadi.backbones.parametrization" in graph["wadi.backbones.base"]
    assert "wadi.lorad.layer" in graph["wadi.lorad.model"]


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
