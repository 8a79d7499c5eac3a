"""The paper / curves / autoattack suites through the CLI: eval.json shape, worst case, warnings."""

from __future__ import annotations

import json
import shutil

import pytest

from mmrobust.cli import main
from mmrobust.eval.compare import comparison_tables
from mmrobust.eval.results import EvalResult
from mmrobust.io import load_tensors, save_tensors
from mmrobust.runs import seal_run

ROW_KEYS = {"attack", "loss", "modalities", "budget", "eps", "steps", "accuracy", "macro_f1"}


@pytest.fixture(scope="module")
def paper_eval(tiny_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paper") / "jt"
    shutil.copytree(tiny_run, run_dir)
    rc = main(["evaluate", str(run_dir), "--suite", "paper", "--steps", "4", "--eps", "0.5,2", "--max-samples", "80",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    return json.loads((run_dir / "eval.json").read_text()), run_dir


def test_paper_suite_eval_json_shape(paper_eval):
    ev, run_dir = paper_eval
    assert isinstance(ev["clean_accuracy"], float)
    assert set(ev["worst_case"]) >= {"accuracy", "by_attack"} and isinstance(ev["warnings"], list)
    assert json.loads((run_dir / "eval_paper.json").read_text()) == ev
    assert (run_dir / "paper_suite.png").stat().st_size > 1000
    for r in ev["results"]:
        assert ROW_KEYS <= set(r), r
        assert isinstance(r["modalities"], list) and r["modalities"]
    settings = {(r["attack"], tuple(r["modalities"]), r["eps"]) for r in ev["results"]}
    mods = ("strong", "weak")
    for attack in ("fgm", "pgd-l2"):
        for eps in (0.5, 2.0):
            assert (attack, mods, eps) in settings  # joint, at each --eps
        for m in mods:
            assert (attack, (m,), 1.0) in settings  # each modality alone at the paper's 1.0
    assert ("missing", ("strong",), None) in settings and ("missing", ("weak",), None) in settings


def test_paper_suite_worst_case_over_losses(paper_eval):
    ev, _ = paper_eval
    groups: dict[tuple, dict[str, float]] = {}
    for r in ev["results"]:
        if r["attack"] != "missing":
            groups.setdefault((r["attack"], tuple(r["modalities"]), r["eps"]), {})[r["loss"]] = r["accuracy"]
    for key, accs in groups.items():
        assert set(accs) == {"ce", "cw", "worst"}, key
        assert accs["worst"] <= min(accs["ce"], accs["cw"]) + 1e-9
        assert accs["worst"] <= ev["clean_accuracy"]
    assert ev["worst_case"]["accuracy"] == min(r["accuracy"] for r in ev["results"])
    assert ev["worst_case"]["by_attack"]["pgd-l2"] == min(
        r["accuracy"] for r in ev["results"] if r["attack"] == "pgd-l2"
    )
    # a bigger budget never helps the model
    worst = {(k[1], k[2]): v["worst"] for k, v in groups.items() if k[0] == "pgd-l2"}
    assert worst[(("strong", "weak"), 2.0)] <= worst[(("strong", "weak"), 0.5)]
    assert not ev["gradient_masking"]["suspected"]
    back = EvalResult.from_json(ev)
    assert back.to_json() == ev  # eval.json reads back into the same typed result
    multi, uni = comparison_tables("tiny", {"jt": [back]})
    assert "pgd-l2 strong+weak eps 2 worst" in [c.header for c in multi.columns]
    assert multi.rows["jt"][0].mean == ev["clean_accuracy"]
    assert "strong missing" in [c.header for c in uni.columns]


def test_masked_model_is_flagged(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "masked"
    shutil.copytree(tiny_run, run_dir)
    state = load_tensors(run_dir / "model.safetensors")
    for k in list(state):
        if k.startswith("head."):  # logits x1000: CE saturates, predictions unchanged
            state[k] = state[k] * 1000.0
    save_tensors(run_dir / "model.safetensors", state)
    seal_run(run_dir)  # the edit is on purpose
    rc = main(["evaluate", str(run_dir), "--suite", "paper", "--steps", "4", "--eps", "2", "--unimodal-eps", "2",
               "--max-samples", "80", "--no-progress"])  # fmt: skip
    assert rc == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    masking = [w for w in ev["warnings"] if "gradient masking" in w]
    assert len(masking) == 2  # both signals: the CE-vs-CW gap and the CE-gradient underflow
    assert ev["gradient_masking"]["suspected"]
    assert ev["gradient_masking"]["ce_gradient_underflow"]["share"] > 0.5
    assert ev["gradient_masking"]["max_ce_cw_gap"] > 0.05
    out = capsys.readouterr()
    assert "masking?" in out.out and "gradient masking suspected" in out.err.replace("\n", " ")


def test_curves_suite_and_plot(tiny_run, tmp_path):
    run_dir = tmp_path / "curves"
    shutil.copytree(tiny_run, run_dir)
    assert (
        main(
            [
                "evaluate",
                str(run_dir),
                "--suite",
                "curves",
                "--eps",
                "0.5,1.5",
                "--steps",
                "3",
                "--max-samples",
                "80",
                "--no-progress",
            ]
        )
        == 0
    )
    ev = json.loads((run_dir / "eval.json").read_text())
    cur = ev["curves"]
    assert cur["eps"] == [0.5, 1.5] and set(cur["targets"]) == {"strong", "weak", "strong+weak"}
    for series in cur["targets"].values():
        assert set(series) == {"ce", "cw", "worst"}
        assert series["worst"][1] <= series["worst"][0] <= ev["clean_accuracy"]
    assert (run_dir / "robustness_curves.png").stat().st_size > 1000


def test_autoattack_suite_targets_fit_the_class_count(tiny_run, tmp_path):
    run_dir = tmp_path / "aa"
    shutil.copytree(tiny_run, run_dir)
    rc = main(["evaluate", str(run_dir), "--suite", "autoattack", "--norm", "linf", "--eps", "8/255,0.1",
               "--steps", "3", "--queries", "10", "--max-samples", "40", "--no-progress"])  # fmt: skip
    assert rc == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    # 4 classes: APGD-T and FAB-T attack min(9, K - 1) = 3 targets; every component runs
    assert not any("skipped" in w for w in ev["warnings"])
    attacks = {r["attack"] for r in ev["results"]}
    assert attacks == {"apgd-ce", "apgd-t", "fab-t", "square", "autoattack"}
    assert {r["targets"] for r in ev["results"] if r["attack"] in ("apgd-t", "fab-t", "autoattack")} == {3}
    assert ev["parameters"]["targets"] == 3
    assert [r["eps"] for r in ev["results"] if r["attack"] == "autoattack"] == [pytest.approx(8 / 255), 0.1]
    for r in ev["results"]:
        if r["attack"] == "autoattack":
            same = [o["accuracy"] for o in ev["results"] if o["eps"] == r["eps"] and o["attack"] != "autoattack"]
            assert r["accuracy"] <= min(same)


def test_cli_rejects_bad_options(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--suite", "paper", "--eps", "abc", "--no-progress"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--suite", "nope"]) == 2
    assert main(["evaluate", str(tiny_run), "--suite", "paper", "--losses", "ce,foo", "--no-progress"]) == 2
    assert main(["evaluate", str(tiny_run), "--suite", "basic", "--eps", "1"]) == 2
    assert "eps does not apply to the 'basic' suite" in capsys.readouterr().err


def test_autoattack_cli_single_modality_and_per_modality_linf(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "aa_mod"
    shutil.copytree(tiny_run, run_dir)
    common = ["--suite", "autoattack", "--version", "custom", "--attacks", "apgd-ce,square", "--steps", "5",
              "--queries", "30", "--max-samples", "40", "--no-progress"]  # fmt: skip
    # one modality: only it is attacked, and it is named in every row
    assert main(["evaluate", str(run_dir), *common, "--modalities", "weak", "--eps", "0.5"]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert {tuple(r["modalities"]) for r in ev["results"]} == {("weak",)}
    weak_only = next(r["accuracy"] for r in ev["results"] if r["attack"] == "autoattack")
    # per-modality l-inf budgets: a per-modality row with both eps; a larger budget on the strong
    # modality breaks more than the weak modality alone
    assert main(["evaluate", str(run_dir), *common, "--eps", "strong=0.5,weak=0.1"]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    row = next(r for r in ev["results"] if r["attack"] == "autoattack")
    assert row["budget"] == "per-modality" and row["eps"] == {"strong": 0.5, "weak": 0.1}
    assert sorted(row["modalities"]) == ["strong", "weak"]
    assert row["accuracy"] < weak_only
    # bad values: one line each, exit 2
    bad = [
        (["--modalities", "video", "--eps", "0.5"], "modalities: unknown modality 'video'"),
        (["--eps", "strong=0.5,video=0.1"], "eps: unknown modality 'video'"),
        (["--eps", "strong=0.5,0.1"], "mixes name=eps and bare values"),
        (["--eps", "strong=abc"], "not a number"),
        (["--eps", "strong=0.5", "--modalities", "weak"], "differ from the modalities in"),
    ]
    for extra, msg in bad:
        assert main(["evaluate", str(run_dir), *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    no_version = ["--suite", "autoattack", "--eps", "strong=0.5,weak=0.1", "--no-progress"]
    assert main(["evaluate", str(run_dir), *no_version]) == 2
    assert "need the AutoAttack cascade" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--suite", "paper", "--modalities", "weak", "--no-progress"]) == 2
    assert "modalities does not apply to the 'paper' suite" in capsys.readouterr().err
