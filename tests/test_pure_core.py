"""The evaluation and certification core is pure: no import cycles, no imports of ``report/``,
nothing printed and no file written."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import mmrobust
from mmrobust.certify.runner import certify_run
from mmrobust.eval.runner import evaluate_run

ROOT = Path(mmrobust.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """mmrobust modules imported anywhere in ``tree`` (lazy imports in functions included; imports
    under ``if TYPE_CHECKING:`` excluded: they never run)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mmrobust"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmrobust"):
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found.update(subs or {node.module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmrobust.b import X\n"
        "def f():\n    from mmrobust.c import Y\n"
    )
    assert _imports(tree, {"mmrobust.b", "mmrobust.c"}) == {"mmrobust.c"}


def test_mmrobust_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


CORE = ("mmrobust.eval", "mmrobust.certify", "mmrobust.training", "mmrobust.attacks", "mmrobust.data",
        "mmrobust.models", "mmrobust.benchmark", "mmrobust.calibration")  # fmt: skip


def test_the_core_never_imports_report():
    bad = {
        (mod, dep)
        for mod, deps in import_graph().items()
        if mod.startswith(CORE)
        for dep in deps
        if dep.startswith("mmrobust.report")
    }
    assert not bad


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def quiet_run(tiny_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be seen
    return run_dir


@pytest.mark.parametrize(
    ("suite", "options"),
    [
        ("basic", {}),
        ("paper", {"steps": 2, "eps": "0.5"}),
        ("curves", {"steps": 2, "eps": "0.5,1"}),
        ("autoattack", {"steps": 2, "queries": 5, "eps": "8/255", "targets": 3}),
    ],
)
def test_evaluate_prints_and_writes_nothing(quiet_run, capfd, suite, options):
    before = _files(quiet_run.parent)
    result = evaluate_run(quiet_run, suite=suite, max_samples=30, **options)
    assert result.rows and result.suite == suite
    assert capfd.readouterr() == ("", "")
    assert _files(quiet_run.parent) == before


@pytest.mark.parametrize("certifier", ["empirical", "sound"])
def test_certify_prints_and_writes_nothing(quiet_run, capfd, certifier):
    before = _files(quiet_run.parent)
    result = certify_run(quiet_run, certifier, radii=[0, 0.1], soundness_samples=5, attack_steps=2)
    assert result.n == 120 and result.soundness is not None
    assert capfd.readouterr() == ("", "")
    assert _files(quiet_run.parent) == before
