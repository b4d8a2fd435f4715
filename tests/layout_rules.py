"""The import order of the project's layers, read from the source (AST), for ``tests/test_layout.py``.

Layers, lowest first; a module may import its own package and any package of a lower layer, nothing else:

    utils  <-  haze, metrics  <-  model  <-  losses, sampler, dataset  <-  pipelines, training
           <-  entry scripts (inference_*.py, train_*.py, evaluate.py), app.py, tools/, benchmarks/

No module imports an entry script (the scripts are a few lines that call their pipeline), nothing outside ``tests``
imports ``tests``, no module edits ``sys.path``, and the module import graph (every import, lazy ones inside
functions too) has no cycle.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("haze", "metrics"),
    ("model",),
    ("losses", "sampler", "dataset"),
    ("pipelines", "training"),
    ("scripts", "app", "tools", "benchmarks"),
)
LIBRARY = {pkg for layer in LAYERS[:-1] for pkg in layer}
SKIP_DIRS = {".git", ".ci", "tests", "__pycache__", "weights", "configs", "docs", "inputs", "results", "runs",
             "experiments"}


@dataclass(frozen=True)
class Edge:
    """``importer`` (a module name) imports ``imported`` (a project module) at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of the project outside tests and hidden folders."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            mods[".".join(parts)] = path
    return mods


def entry_scripts(mods: dict[str, Path]) -> set[str]:
    """The root-level scripts (``inference_*.py``, ``train_*.py``, ``evaluate.py``; app.py is a top-level program)."""
    return {m for m in mods if "." not in m and (m.startswith(("inference_", "train_")) or m == "evaluate")}


def group_of(module: str, scripts: set[str]) -> str:
    """The layer group of a module: its top package, or ``scripts`` for an entry script."""
    return "scripts" if module in scripts else module.split(".")[0]


def layer_of(group: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if group in layer), None)


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a dotted import target) is or lies in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in mods:
            return candidate
    return None


def import_edges(root: Path) -> tuple[list[Edge], list[str]]:
    """Every import of a project module by a project module, and every ``sys.path`` edit (as ``path:line``)."""
    mods = project_modules(root)
    edges, path_edits = [], []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] if base else []
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "sys" and node.attr == "path":
                    path_edits.append(f"{path.relative_to(root)}:{node.lineno}")
            for target in targets:
                if target.split(".")[0] == "tests":
                    edges.append(Edge(module, ".".join(target.split(".")[:2]), str(path.relative_to(root)), node.lineno))
                    continue
                resolved = _resolve(target, mods)
                if resolved is not None and resolved != module:
                    edges.append(Edge(module, resolved, str(path.relative_to(root)), node.lineno))
    return edges, path_edits


def layer_violations(root: Path) -> list[str]:
    """Imports against the layer order, of an entry script, or of the tests; one line each."""
    mods = project_modules(root)
    scripts = entry_scripts(mods)
    edges, _ = import_edges(root)
    bad = []
    for edge in edges:
        src, dst = group_of(edge.importer, scripts), group_of(edge.imported, scripts)
        where = f"{edge.path}:{edge.line}: {edge.importer} imports {edge.imported}"
        if dst == "scripts":
            bad.append(f"{where} (an entry script)")
        elif dst == "tests":
            bad.append(f"{where} (the tests)")
        elif src == dst:
            continue
        elif layer_of(src) is None or layer_of(dst) is None:
            bad.append(f"{where} (a folder outside the layers: {src if layer_of(src) is None else dst})")
        elif layer_of(dst) >= layer_of(src):
            bad.append(f"{where} ({dst} is not below {src})")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """The cycles of the module import graph: its strongly connected components of more than one module."""
    graph: dict[str, set[str]] = {}
    for edge in import_edges(root)[0]:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    return strongly_connected(graph)


def package_cycles(root: Path) -> list[list[str]]:
    """The cycles of the graph of layer groups (top packages, and the entry scripts as one group ``scripts``)."""
    scripts = entry_scripts(project_modules(root))
    graph: dict[str, set[str]] = {}
    for edge in import_edges(root)[0]:
        src, dst = group_of(edge.importer, scripts), group_of(edge.imported, scripts)
        graph.setdefault(src, set())
        graph.setdefault(dst, set())
        if src != dst:
            graph[src].add(dst)
    return strongly_connected(graph)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (node -> successors) with more than one node, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles
