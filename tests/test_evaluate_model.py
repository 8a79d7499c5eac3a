"""Model-first evaluation: a model built and trained in Python (no run folder) evaluates to the same
numbers as the run folder of that model; the AutoAttack protocol is an attack like its components;
eval.json and benchmark.json carry a schema version and stay readable without one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mmrobust
from mmrobust.attacks import ATTACKS, build_attack
from mmrobust.attacks.autoattack import STANDARD_COMPONENTS, AutoAttack, AutoAttackOptions, run_autoattack
from mmrobust.data import load_data
from mmrobust.eval import evaluate_model
from mmrobust.eval.results import SCHEMA_VERSION, EvalResult
from mmrobust.eval.runner import evaluate_run
from mmrobust.runs import load_run
from tests.conftest import tiny_config

PACKAGE = Path(mmrobust.__file__).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained in Python, and the run folder the same training wrote."""
    from mmrobust.training import train

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("model_first") / "jt"
    fit = train(cfg, out=out)
    return fit.model.eval(), load_data(cfg.data), out


@pytest.mark.parametrize(
    ("suite", "options"),
    [("basic", {}), ("paper", {"steps": 3, "eps": "0.5"}),
     ("autoattack", {"version": "custom", "attacks": "apgd-ce,square", "eps": "0.5", "steps": 3, "queries": 20})],
)  # fmt: skip
def test_evaluate_model_matches_evaluate_run(trained, suite, options):
    model, bundle, run_dir = trained
    test = bundle.test.subset(slice(0, 40))
    ours = evaluate_model(model, bundle.meta, test, suite, batch_size=32, **options)
    theirs = evaluate_run(run_dir, suite, max_samples=40, batch_size=32, **options)
    assert ours.to_json() == theirs.to_json()
    assert ours.split == "test" and ours.samples == 40


def test_evaluate_model_refuses_options_the_suite_ignores(trained):
    model, bundle, _ = trained
    with pytest.raises(mmrobust.errors.ConfigError, match="eps does not apply to the 'basic' suite") as info:
        evaluate_model(model, bundle.meta, bundle.test, "basic", eps="0.5")
    assert info.value.param == "eps"


def test_autoattack_is_a_registered_attack(tiny_run):
    run = load_run(tiny_run)
    x, y = run.data().test.take(slice(0, 40))
    assert "autoattack" in ATTACKS.names() and ATTACKS.get("autoattack") is AutoAttack
    assert STANDARD_COMPONENTS == ("apgd-ce", "apgd-t", "fab-t", "square")
    attack = build_attack("autoattack", run.model, run.meta, eps=0.5, version="custom", attacks=["apgd-ce", "square"],
                          steps=5, queries=30)  # fmt: skip
    adv = attack(x, y)
    assert [s.attack for s in attack.result.stages] == ["apgd-ce", "square"]  # records what ran
    opts = AutoAttackOptions(eps=0.5, version="custom", attacks=("apgd-ce", "square"), steps=5, queries=30)
    same = run_autoattack(run.model, x, y, opts, meta=run.meta)
    for m in x:
        assert torch.equal(adv[m], same.adversarial[m])  # the function and the attack agree exactly
        assert float((adv[m] - x[m]).abs().max()) <= 0.5 + 1e-6
    with torch.no_grad():
        robust = float((run.model(adv).argmax(1) == y).float().mean())
    assert robust == pytest.approx(attack.result.robust_accuracy)
    # the standard version on 4 classes: the targeted components attack min(9, K - 1) = 3 targets
    standard = build_attack("autoattack", run.model, run.meta, eps=0.5, steps=2, queries=10)
    standard(x, y)
    assert [s.attack for s in standard.result.stages] == list(STANDARD_COMPONENTS)
    assert not standard.result.skipped and standard.result.targets == 3
    assert standard.describe()["components"] == list(STANDARD_COMPONENTS)
    assert standard.describe()["targets"] == 3 and "units" in standard.describe()


def test_eval_json_schema_version_and_old_files(tiny_run):
    res = evaluate_run(tiny_run, "basic", max_samples=20)
    doc = res.to_json()
    assert doc["schema_version"] == SCHEMA_VERSION == 2
    assert doc["parameters"] == doc["protocol"] == res.parameters == res.protocol
    old = {k: v for k, v in doc.items() if k not in ("schema_version", "parameters")}  # a version-1 file
    assert EvalResult.from_json(old).to_json() == doc
    with pytest.raises(mmrobust.errors.RunError, match="newer"):
        EvalResult.from_json({**doc, "schema_version": 99})


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any level (function-local and TYPE_CHECKING imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_eval_and_attacks_floors():
    """Only eval/runner.py knows run folders; attacks import no higher floor; memory stays low."""
    for path in sorted((PACKAGE / "eval").glob("*.py")):
        if path.name != "runner.py":
            assert not any(n == "mmrobust.runs" for n in _imports(path)), path
    banned = ("mmrobust.eval", "mmrobust.certify", "mmrobust.training", "mmrobust.runs", "mmrobust.config",
              "mmrobust.memory")  # fmt: skip
    for path in sorted((PACKAGE / "attacks").glob("*.py")):
        bad = [n for n in _imports(path) if n.startswith(banned)]
        assert not bad, (path, bad)
    bad = [n for n in _imports(PACKAGE / "memory.py")
           if n.startswith(("mmrobust.eval", "mmrobust.certify", "mmrobust.runs", "mmrobust.config"))]  # fmt: skip
    assert not bad


def test_benchmark_builds_no_run_for_evaluation():
    source = (PACKAGE / "benchmark.py").read_text()
    assert "Run(" not in source and "evaluate_model(" in source
