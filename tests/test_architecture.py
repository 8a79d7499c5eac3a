"""The layering of docs/architecture.md, checked on the code's real imports.

Every ``import`` counts: module-level, function-local and ``if TYPE_CHECKING:`` ones (that is how
cycles hide). A node is a subpackage or a top-level module of ``mmrobust``; the package's own
``__init__`` (a lazy façade over everything) is left out.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import mmrobust

ROOT = Path(mmrobust.__file__).parent

#: the floors, lowest first; a node may import nodes on its own floor or below, never above
FLOORS: list[tuple[str, set[str]]] = [
    (
        "ground",
        {
            "errors",
            "registry",
            "plugins",
            "options",
            "io",
            "publish",
            "progress",
            "torchutil",
            "precision",
            "layer_rules",
        },
    ),
    ("data", {"data"}),
    ("models", {"models"}),
    ("attacks", {"attacks", "memory"}),
    ("runs", {"config", "runs"}),
    ("compute", {"certify", "eval"}),
    ("training", {"training"}),
    ("applications", {"benchmark", "calibration", "wrap"}),
    ("report", {"report"}),
    ("demo", {"demo"}),
    ("entry", {"cli", "__main__"}),
]
FLOOR_OF = {node: i for i, (_, nodes) in enumerate(FLOORS) for node in nodes}

#: modules of the compute packages allowed to open a run folder (computation takes a model and data)
RUN_FOLDER_EDGE = {"mmrobust.eval.runner", "mmrobust.certify.runner", "mmrobust.certify.results"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names, with the line), wherever the import sits."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            out += [(f"{module}.{a.name}", node.lineno) for a in node.names]
    return out


def _module_graph() -> dict[str, dict[str, list[str]]]:
    """module -> imported mmrobust module -> [file:line, ...]"""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, dict[str, list[str]]] = {m: defaultdict(list) for m in files}
    for module, path in files.items():
        for target, line in _imports(path):
            while target and target not in files:  # `from pkg import name`: name may be an attribute
                target = target.rpartition(".")[0]
            if target and target != module and target != "mmrobust":
                graph[module][target].append(f"{path.relative_to(ROOT.parent)}:{line}")
    return graph


def _node(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _node_graph() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, targets in _module_graph().items():
        if module == "mmrobust":
            continue
        for target, where in targets.items():
            a, b = _node(module), _node(target)
            if a != b:
                out[a][b] += where
    return out


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def _describe(graph: dict[str, dict[str, list[str]]], component: list[str]) -> str:
    edges = [f"{a} -> {b} ({graph[a][b][0]})" for a in component for b in component if b in graph.get(a, {})]
    return "; ".join(edges)


def test_every_node_has_a_floor() -> None:
    nodes = {_node(m) for m in _module_graph() if m != "mmrobust"}
    assert nodes - set(FLOOR_OF) == set(), "add the new module to FLOORS and docs/architecture.md"


def test_no_import_cycle_between_subpackages() -> None:
    graph = _node_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_describe(graph, c) for c in cycles)


def test_no_import_cycle_between_modules() -> None:
    graph = _module_graph()
    cycles = _cycles(graph)
    assert not cycles, "module import cycles: " + " | ".join(_describe(graph, c) for c in cycles)


def test_imports_never_go_up_a_floor() -> None:
    up = [
        f"{a} ({FLOORS[FLOOR_OF[a]][0]}) imports {b} ({FLOORS[FLOOR_OF[b]][0]}) at {where[0]}"
        for a, targets in _node_graph().items()
        for b, where in targets.items()
        if a in FLOOR_OF and b in FLOOR_OF and FLOOR_OF[b] > FLOOR_OF[a]
    ]
    assert not up, "back-arrows: " + "; ".join(up)


def test_computation_does_not_open_run_folders() -> None:
    bad = [
        f"{module} imports mmrobust.runs ({where[0]})"
        for module, targets in _module_graph().items()
        if _node(module) in ("eval", "certify", "attacks", "models", "data", "memory") and module not in RUN_FOLDER_EDGE
        for target, where in targets.items()
        if target == "mmrobust.runs"
    ]
    assert not bad, "; ".join(bad)


def test_the_checker_sees_hidden_imports(tmp_path: Path) -> None:
    """The import reader counts function-local and TYPE_CHECKING imports (else it proves nothing)."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmrobust.eval import results\n"
        "def f():\n    import mmrobust.runs\n"
    )
    global ROOT
    saved = ROOT
    try:
        ROOT = tmp_path  # _module_name works relative to ROOT.parent
        names = {name for name, _ in _imports(src)}
    finally:
        ROOT = saved
    assert {"mmrobust.eval", "mmrobust.eval.results", "mmrobust.runs"} <= names
    graph = {"a": {"b": ["x:1"]}, "b": {"c": ["y:2"]}, "c": {"a": ["z:3"]}, "d": {"a": ["w:4"]}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("floor", [name for name, _ in FLOORS])
def test_docs_list_every_floor(floor: str) -> None:
    doc = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"**{floor}**" in doc
    for node in dict(FLOORS)[floor]:
        assert f"`{node}`" in doc, f"docs/architecture.md does not mention `{node}`"
