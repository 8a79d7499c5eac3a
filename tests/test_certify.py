"""Certified radii (Theorems 3.3 / 3.5, Proposition 3.4), soundness against attacks, CLI and plots."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from mmrobust.certify.bounds import orthogonal_bound
from mmrobust.certify.estimators import head_lipschitz
from mmrobust.certify.lipschitz import score_gradient_norms
from mmrobust.certify.radius import certified_radii, pair_rows
from mmrobust.certify.runner import certify_model
from mmrobust.certify.soundness import min_adversarial_norm, soundness_check
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel, ModelConfig, build_model
from mmrobust.models.heads import ConcatHead

from .conftest import tiny_config


def _linear_model(seed: int = 0) -> tuple[LateFusionModel, DatasetMeta]:
    torch.manual_seed(seed)
    meta = DatasetMeta("lin", [ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "vector", (3,))], ["0", "1", "2"])
    encs = {"a": nn.Sequential(nn.Flatten(), nn.Linear(5, 4)), "b": nn.Sequential(nn.Flatten(), nn.Linear(3, 4))}
    model = LateFusionModel(encs, ConcatHead({"a": 4, "b": 4}, 3), 3).eval()
    return model, meta


def _fit(model: nn.Module, split: Split, epochs: int = 60, lr: float = 1e-2) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(split.inputs), split.labels).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("estimator", ["empirical", "sound"])
def test_linear_model_radius_is_the_exact_distance_to_the_boundary(estimator):
    model, meta = _linear_model()
    x = {"a": torch.randn(40, 5), "b": torch.randn(40, 3)}
    with torch.no_grad():
        y = model(x).argmax(1)  # all correctly classified by construction
    split = Split(x, y)
    res = certify_model(model, meta, split, estimator)
    joint = res.certificate.radii.joint.double()
    # hand computation: margin_k(x + d) = margin_k(x) + g_k . d with g_k = d(h_y - h_k)/dx
    with torch.no_grad():
        a_w = model.head.modality_weight("a") @ model.encoders["a"][1].weight
        b_w = model.head.modality_weight("b") @ model.encoders["b"][1].weight
        logits = model(x).double()
    for i in range(40):
        yi = int(y[i])
        best, best_dir = float("inf"), None
        for k in range(3):
            if k == yi:
                continue
            g = torch.cat([a_w[yi] - a_w[k], b_w[yi] - b_w[k]]).double()
            dist = float(logits[i, yi] - logits[i, k]) / float(g.norm())
            if dist < best:
                best, best_dir = dist, -g / g.norm()
        assert float(joint[i]) == pytest.approx(best, rel=1e-4)
        for scale, flips in ((1 + 1e-3, True), (1 - 1e-3, False)):
            d = best_dir * float(joint[i]) * scale
            xi = {"a": x["a"][i : i + 1] + d[:5].float(), "b": x["b"][i : i + 1] + d[5:].float()}
            with torch.no_grad():
                assert (model(xi).argmax(1).item() != yi) == flips


def test_unimodal_radius_on_a_linear_model_is_exact_along_its_modality():
    model, meta = _linear_model(1)
    x = {"a": torch.randn(20, 5), "b": torch.randn(20, 3)}
    with torch.no_grad():
        y = model(x).argmax(1)
        a_w = model.head.modality_weight("a") @ model.encoders["a"][1].weight
        logits = model(x)
    res = certify_model(model, meta, Split(x, y), "sound")
    for i in range(20):
        yi = int(y[i])
        ks = [k for k in range(3) if k != yi]
        dists = [float(logits[i, yi] - logits[i, k]) / float((a_w[yi] - a_w[k]).norm()) for k in ks]
        k = ks[min(range(2), key=lambda t: dists[t])]
        r = float(res.certificate.radii.unimodal["a"][i])
        assert r == pytest.approx(min(dists), rel=1e-4)
        g = a_w[yi] - a_w[k]
        xi = {"a": x["a"][i : i + 1] - g / g.norm() * r * 1.001, "b": x["b"][i : i + 1]}
        with torch.no_grad():
            assert model(xi).argmax(1).item() != yi


def test_misclassified_samples_get_radius_zero():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [2.0, 2.0, 0.0]])
    labels = torch.tensor([0, 0, 1])  # correct, wrong, a tie (not certified)
    lip = {"a": torch.ones(3, 3).fill_diagonal_(0), "b": 2 * torch.ones(3, 3).fill_diagonal_(0)}
    res = certified_radii(logits, labels, lip)
    assert res["joint"].tolist()[1:] == [0.0, 0.0]
    assert all(res["unimodal"][m].tolist()[1:] == [0.0, 0.0] for m in lip)
    # sample 0: min over k of margin / sqrt(1 + 4) = 2 / sqrt(5); modality a alone: 2 / 1
    assert float(res["joint"][0]) == pytest.approx(2 / 5**0.5)
    assert float(res["unimodal"]["a"][0]) == pytest.approx(2.0)
    assert float(res["unimodal"]["b"][0]) == pytest.approx(1.0)


def test_radius_takes_the_minimum_over_classes_not_just_the_runner_up():
    # the runner-up (class 1) is far in Lipschitz terms; class 2 has a smaller logit but moves fast
    logits = torch.tensor([[5.0, 4.0, 3.0]])
    lip = {"a": torch.tensor([[0.0, 0.1, 10.0], [0.1, 0.0, 1.0], [10.0, 1.0, 0.0]])}
    res = certified_radii(logits, torch.tensor([0]), lip)
    assert float(res["joint"][0]) == pytest.approx(2 / 10)  # class 2, not 1 / 0.1 = 10
    assert int(res["runner_up"][0]) == 1 and float(res["eta"]["a"][0]) == pytest.approx(0.1)


def test_orthogonal_radius_is_at_most_the_runner_up_bound_of_bounds_py(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig(head="orthogonal", feature_dim=16))
    _fit(model, tiny_bundle.train, epochs=30)
    hl = head_lipschitz(model, tiny_bundle.meta, "sound")
    with torch.no_grad():
        out = model(tiny_bundle.test.inputs, return_all=True)
        raw = model.head.raw_scores(out["features"])
    labels = tiny_bundle.test.labels
    ours = certified_radii(out["logits"], labels, hl.pair_lip)["joint"]
    paper = orthogonal_bound(raw, dict(model.head.a), model.head.bias, labels, hl.tau).clamp_min(0).detach()
    assert (ours <= paper.double() * (1 + 1e-5) + 1e-9).all()
    assert torch.isclose(ours, paper.double(), rtol=1e-4).float().mean() > 0.5  # usually the runner-up binds


def test_empirical_pair_tau_matches_per_row_gradient_norms(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig(feature_dim=16)).eval()
    data = tiny_bundle.train.subset(slice(0, 50))
    hl = head_lipschitz(model, tiny_bundle.meta, "empirical", data, fit_samples=None)
    for m in model.modalities:
        rows, c, pairs = pair_rows(model.head.modality_weight(m))
        direct = score_gradient_norms(model, data.inputs, m, rows).max(0).values.double()
        assert torch.allclose(hl.tau[m][pairs[0], pairs[1]], direct, rtol=1e-4)
        assert torch.allclose(hl.pair_lip[m][pairs[0], pairs[1]], direct * c[pairs[0], pairs[1]], rtol=1e-4)


def _trained(head: str, bundle, seed: int = 0) -> LateFusionModel:
    torch.manual_seed(seed)
    model = build_model(bundle.meta, ModelConfig(head=head, feature_dim=16))
    for enc in model.encoders.values():  # narrower MLPs keep the sound bound within a small factor
        enc[1], enc[3] = nn.Linear(enc[1].in_features, 16), nn.Linear(16, 16)
    return _fit(model, bundle.train, epochs=80)


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_sound_radii_never_exceed_the_smallest_adversarial_perturbation_found(tiny_bundle, head):
    model = _trained(head, tiny_bundle)
    test = tiny_bundle.test.subset(slice(0, 40))
    res = certify_model(model, tiny_bundle.meta, test, "sound")
    assert res.is_guarantee is True
    rad = res.certificate.radii.joint.double()
    assert (rad > 0).float().mean() > 0.8 and float(rad.median()) > 1e-3  # a non-trivial certificate
    threats = {"joint": model.modalities, **{m: [m] for m in model.modalities}}
    for threat, mods in threats.items():
        r = rad if threat == "joint" else res.certificate.radii.unimodal[threat].double()
        start = torch.where(r > 0, r, torch.ones_like(r))
        adv = min_adversarial_norm(
            model, test.inputs, test.labels, mods, start, steps=15, search_rounds=6, bisect_rounds=4
        )
        assert (r <= adv * (1 + 1e-4)).all(), threat
        if threat == "joint":  # meaningful: the attack does find perturbations, within a modest factor
            found = torch.isfinite(adv) & (r > 0)
            assert found.float().mean() > 0.8
            assert float((r[found] / adv[found]).median()) > 0.02


def test_soundness_check_counts_violations_of_an_inflated_certificate(tiny_bundle):
    model = _trained("concat", tiny_bundle)
    test = tiny_bundle.test.subset(slice(0, 30))
    res = certify_model(model, tiny_bundle.meta, test, "sound")
    radii = {"joint": res.certificate.radii.joint, "unimodal": res.certificate.radii.unimodal}
    ok = soundness_check(model, tiny_bundle.meta, test, radii, steps=10)
    assert all(ok[t]["violations"] == 0 for t in ["joint", *model.modalities])
    fake = {**radii, "joint": radii["joint"] * 100}
    bad = soundness_check(model, tiny_bundle.meta, test, fake, steps=10)
    assert bad["joint"]["violation_rate"] > 0.5  # a 100x radius is refuted by the attack


def small_cnn_data(n: int) -> tuple[DatasetMeta, Split]:
    """A learnable 3-class image (1x8x8) + sequence (2x8) set; seeds torch with 0 first."""
    torch.manual_seed(0)
    meta = DatasetMeta(
        "cnn", [ModalitySpec("img", "image", (1, 8, 8)), ModalitySpec("seq", "sequence", (2, 8))], ["0", "1", "2"]
    )
    labels = torch.arange(n) % 3
    img = torch.randn(n, 1, 8, 8) * 0.5
    img[:, 0, :4, :4] += (labels == 0).float()[:, None, None] * 2
    img[:, 0, 4:, 4:] += (labels == 1).float()[:, None, None] * 2
    seq = torch.randn(n, 2, 8) * 0.5 + (labels == 2).float()[:, None, None]
    return meta, Split({"img": img, "seq": seq}, labels)


def test_small_cnn_sound_radii_survive_attacks():
    meta, split = small_cnn_data(90)
    model = build_model(meta, ModelConfig(feature_dim=8, encoders={"img": "smallcnn", "seq": "tcn"}))
    model = _fit(model, split, epochs=40)
    res = certify_model(model, meta, split, "sound", radii=[0, 0.01])
    assert res.clean_accuracy > 0.8 and res.accuracy_curve("joint")[0] == pytest.approx(res.clean_accuracy)
    r = res.certificate.radii
    snd = soundness_check(model, meta, split, {"joint": r.joint, "unimodal": r.unimodal}, max_samples=30, steps=10)
    assert all(snd[t]["violations"] == 0 for t in ["joint", "img", "seq"])


def test_three_modalities_get_radii_and_eta_ratios():
    bundle = load_data(DataConfig("synthetic", 0, {"names": "x,y,z", "signal": "3,1,0.5", "noise": "1,1,1",
                                                   "dim": "6,6,6", "n_train": 60, "n_val": 20, "n_test": 30}))  # fmt: skip
    model = _fit(build_model(bundle.meta, ModelConfig(feature_dim=8)), bundle.train, epochs=30)
    res = certify_model(model, bundle.meta, bundle.test, "sound")
    r = res.certificate.radii
    assert set(r.unimodal) == {"x", "y", "z"}
    assert set(res.certificate.info["vulnerability"]["ratio_of_means"]) == {"y/x", "z/x"}
    for m in "xyz":  # attacking one modality is a special case of a joint attack
        assert (r.unimodal[m] >= r.joint - 1e-6).all()


def test_cli_certify_writes_both_estimators_and_plots(tmp_path, capsys):
    from mmrobust.cli import main
    from mmrobust.report.certify_plots import plot_certified_accuracy, plot_eta_heatmaps
    from mmrobust.training import train

    out = tmp_path / "run"
    train(tiny_config(epochs=2), out=out)
    assert main(["certify", str(out), "--lipschitz", "sound", "--radii", "0,0.01,0.1"]) == 0
    assert "GUARANTEE" in capsys.readouterr().out
    assert main(["certify", str(out), "--lipschitz-samples", "50"]) == 0
    assert "ESTIMATE" in capsys.readouterr().out
    doc = json.loads((out / "certify.json").read_text())
    assert doc["schema_version"] == 2 and doc["certifiers"] == doc["estimators"]  # old key kept for one release
    sound, emp = doc["certifiers"]["sound"], doc["certifiers"]["empirical"]
    assert emp["options"]["fit_samples"] == 50 and "max_samples" not in emp["options"]  # --lipschitz-samples
    assert sound["guarantee"] and not emp["guarantee"] and "NOT an upper bound" in emp["note"]
    assert sound["certified_accuracy"]["radii"] == [0.0, 0.01, 0.1]
    assert sound["certified_accuracy"]["joint"][0] == pytest.approx(sound["clean_accuracy"])
    assert len(sound["radii"]["joint"]) == sound["n"] == len(sound["labels"])
    acc = sound["certified_accuracy"]["joint"]
    assert acc == sorted(acc, reverse=True)
    p1 = plot_certified_accuracy({"JT (sound)": sound, "JT": emp}, tmp_path / "ca.png")
    p2 = plot_eta_heatmaps({"sound": sound, "empirical": emp}, tmp_path / "eta.png", doc["class_names"])
    assert p1.stat().st_size > 1000 and p2.stat().st_size > 1000


def test_cli_certify_errors_are_one_line(tmp_path, capsys):
    from mmrobust.cli import main

    assert main(["certify", str(tmp_path / "missing")]) == 2
    assert main(["certify", str(tmp_path), "--radii", "0,-1"]) == 2
    assert main(["certify", str(tmp_path), "--lipschitz", "guess"]) == 2
    assert main(["certify", str(tmp_path), "--cert-opt", "max_sampels=3"]) == 2
    assert main(["certify", str(tmp_path), "--lipschitz", "sound", "--lipschitz-samples", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("mmrobust: error:") for line in err)
    assert "unknown certifier 'guess'; choose from: " in err[2] and "empirical" in err[2] and "sound" in err[2]
    assert (
        "certifier 'empirical': unknown option(s) ['max_sampels']; valid: batch_size, fit_samples, max_samples, theorem"
        in err[3]
    )
    # --lipschitz-samples is the empirical certifier's fit_samples (max_samples before the rename)
    assert re.search(r"certifier 'sound': unknown option\(s\) \['(fit|max)_samples'\]; valid: theorem", err[4])


def test_concat_form_on_an_orthogonal_head_is_never_looser_than_theorem_3_5(tiny_bundle):
    torch.manual_seed(1)
    model = build_model(tiny_bundle.meta, ModelConfig(head="orthogonal", feature_dim=16))
    _fit(model, tiny_bundle.train, epochs=20)
    r35 = certify_model(model, tiny_bundle.meta, tiny_bundle.test, "sound", options={"theorem": "3.5"})
    r33 = certify_model(model, tiny_bundle.meta, tiny_bundle.test, "sound", options={"theorem": "3.3"})
    assert r35.certificate.info["theorem"].startswith("3.5") and r33.certificate.info["theorem"].startswith("3.3")
    assert (r35.key, r33.key) == ("sound@3.5", "sound@3.3")
    a, b = r35.certificate.radii.joint, r33.certificate.radii.joint
    assert (b >= a * (1 - 1e-5)).all() and (b > a * 1.01).any()
    with pytest.raises(ConfigError, match="orthogonal head"):
        certify_model(build_model(tiny_bundle.meta, ModelConfig(feature_dim=16)), tiny_bundle.meta, tiny_bundle.test,
                      "sound", options={"theorem": "3.5"})  # fmt: skip


def test_python_api_sizes_certification_batches_to_the_memory_budget(monkeypatch):
    """certify_model/certify_run size their batches like the CLI unless given ``batch_size``."""
    import mmrobust.certify.runner as runner
    from mmrobust.certify.base import CertifyContext
    from mmrobust.certify.estimators import SoundCertifier
    from mmrobust.memory import BatchPlan

    probes: list[str | int | None] = []

    def plan(model, split, budget, device):
        probes.append(budget)
        return BatchPlan(3, 1, 1, 0, "given")

    class Recording(SoundCertifier):
        def certify(self, model, meta, split, ctx: CertifyContext):
            seen.append(ctx.batch_size)
            return super().certify(model, meta, split, ctx)

    monkeypatch.setattr(runner, "input_gradient_plan", plan)
    model, meta = _linear_model(2)
    split = Split({"a": torch.randn(10, 5), "b": torch.randn(10, 3)}, torch.zeros(10, dtype=torch.long))
    seen: list[int] = []
    certify_model(model, meta, split, Recording(), memory_budget="1GB")
    assert seen == [3] and probes == ["1GB"]  # sized by the probe, with the caller's budget
    certify_model(model, meta, split, Recording(), batch_size=5)
    assert seen == [3, 5] and probes == ["1GB"]  # an explicit batch skips the probe


def test_fit_samples_has_the_deprecated_alias_max_samples():
    import dataclasses

    from mmrobust.certify.estimators import FIT_SAMPLES, EmpiricalOptions
    from mmrobust.certify.runner import build_certifier

    assert EmpiricalOptions().fit_samples == FIT_SAMPLES
    assert EmpiricalOptions(fit_samples=None).fit_samples is None
    with pytest.warns(DeprecationWarning, match="max_samples is deprecated, use fit_samples"):
        opts = build_certifier("empirical", {"max_samples": "7"}).options
    assert opts.fit_samples == 7
    assert dataclasses.replace(opts, theorem="3.3").fit_samples == 7  # the alias does not travel
    with pytest.warns(DeprecationWarning):
        assert EmpiricalOptions(max_samples=None).fit_samples is None
    with pytest.raises(ConfigError, match="give fit_samples or its deprecated alias max_samples, not both") as exc:
        EmpiricalOptions(fit_samples=3, max_samples=4)
    assert exc.value.param == "fit_samples"
    with pytest.raises(ConfigError, match="fit_samples must be an integer >= 1, got 0"):
        EmpiricalOptions(fit_samples=0)
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="max_samples must be an integer >= 1"):
        EmpiricalOptions(max_samples=0)  # the message names the parameter as given


def test_empirical_lipschitz_takes_fit_samples_and_the_old_keyword(tiny_bundle):
    from mmrobust.certify.lipschitz import empirical_lipschitz

    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig(feature_dim=8)).eval()
    rows = {m: model.head.modality_weight(m).detach() for m in model.modalities}
    new = empirical_lipschitz(model, tiny_bundle.train, rows, batch_size=8, fit_samples=12)
    with pytest.warns(DeprecationWarning):
        old = empirical_lipschitz(model, tiny_bundle.train, rows, batch_size=8, max_samples=12)
    assert all(torch.equal(new[m], old[m]) for m in rows)
    with pytest.raises(ConfigError, match="not both"):
        empirical_lipschitz(model, tiny_bundle.train, rows, fit_samples=1, max_samples=1)


def test_load_certify_reads_files_of_every_schema_version(tmp_path):
    from mmrobust.certify.runner import load_certify

    entry = {"estimator": "sound", "guarantee": True}
    (tmp_path / "certify.json").write_text(json.dumps({"run": "r", "estimators": {"sound": entry}}))  # schema 1
    old = load_certify(tmp_path)
    assert old["schema_version"] == 1 and old["certifiers"] == old["estimators"]
    assert old["certifiers"]["sound"]["certifier"] == "sound"
    new = {"schema_version": 2, "certifiers": {"crown": {"certifier": "crown"}}}
    (tmp_path / "certify.json").write_text(json.dumps(new))
    assert load_certify(tmp_path / "certify.json")["estimators"] == {"crown": {"certifier": "crown"}}


def test_registries_find_their_built_ins_without_explicit_imports():
    import subprocess
    import sys

    code = (
        "from mmrobust.certify.base import CERTIFIERS; from mmrobust.models.encoders import ENCODERS; "
        "from mmrobust.models.heads import HEADS; "
        "print(CERTIFIERS.names(), 'lip-cnn' in ENCODERS, HEADS.names(), CERTIFIERS.get('crown').name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    certifiers = "['alpha-crown', 'crown', 'empirical', 'smoothing', 'sound']"
    heads = "['concat', 'orthogonal', 'reference-rownorm']"
    assert out == f"{certifiers} True {heads} crown"


def _imports(path) -> set[str]:
    """Every module a source file imports, function-local imports included."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_compute_modules_do_not_touch_run_folders_and_models_import_no_upper_floor():
    from pathlib import Path

    import mmrobust

    root = Path(mmrobust.__file__).parent
    for f in sorted((root / "certify").glob("*.py")):
        if f.name not in ("runner.py", "results.py", "__init__.py"):
            assert not any(n.startswith("mmrobust.runs") for n in _imports(f)), f.name
    upper = ("mmrobust.certify", "mmrobust.eval", "mmrobust.attacks", "mmrobust.training", "mmrobust.runs",
             "mmrobust.config")  # fmt: skip
    for f in sorted((root / "models").glob("*.py")):
        assert not any(n.startswith(upper) for n in _imports(f)), f.name
