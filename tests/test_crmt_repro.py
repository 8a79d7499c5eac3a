"""CRMT against its reference code: the adapter and step-2 ablations of benchmarks/crmt_vs_reference.py
(against a small stand-in with the reference's call signatures), the reference's row-normalised head,
and step 2 with sound Lipschitz constants."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmrobust.certify.estimators import head_lipschitz, resolve_theorem
from mmrobust.certify.runner import certify_model
from mmrobust.certify.soundness import soundness_check
from mmrobust.config import RunConfig
from mmrobust.data import DataConfig, load_data
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.models.heads import HEADS, OrthogonalHead, RowNormalizedHead
from mmrobust.training import train
from mmrobust.training.crmt import CRMTOptions
from mmrobust.training.crmt_step2 import Step2Data, optimise_modality_weights
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for the reference checkout: the same module layout and call signatures (train.train_CRMT_JT,
# get_lip, the_second_step, val_epoch, obtain_input that moves to CUDA; models.multimodal.MultiModalModel
# with 512-feature 'concat' / 'orth' fusion and a_0 / a_1 weights), far less code.
STANDIN_TRAIN = """
import torch

CALLS = []

def obtain_input(batch):
    return batch["clip"].cuda(), batch["audio"].cuda(), batch["target"].cuda()

def train_CRMT_JT(epoch, data_loader, model, criterion, optimizer, epoch_logger, batch_logger, tb_writer=None, opt=None):
    CALLS.append(("train", opt.methods.rho))
    model.train()
    for batch in data_loader:
        v, a, y = obtain_input(batch)
        optimizer.zero_grad()
        out_v, out_a, out = model(v, a)
        loss = criterion(out, y)
        if opt.methods.rho:
            loss = loss + opt.methods.rho * sum(torch.logsumexp(o, 1) - o.gather(1, y[:, None])[:, 0] for o in (out_v, out_a)).mean()
        loss.backward()
        optimizer.step()

def get_lip(model, train_dataloader, opt, filename="Lip.pt"):
    CALLS.append(("lip", filename))
    lip = torch.ones(2, opt.n_classes)
    torch.save(lip, filename)
    return lip

def the_second_step(epoch, data_loader, model, opt, lip_filename="Lip.pt"):
    CALLS.append(("step2", epoch))
    lip = torch.load(lip_filename)
    a = [model.module.fusion_module.orth_layer.a_0, model.module.fusion_module.orth_layer.a_1]
    optimizer_a = torch.optim.SGD(a, lr=opt.lr * 0.03, momentum=0.9, weight_decay=1e-2)
    for batch in data_loader:
        optimizer_a.zero_grad()
        v, au, y = obtain_input(batch)
        out_v, out_a, out = model(v, au)
        loss = -((a[0][y] * out_v.gather(1, y[:, None])[:, 0].detach() + a[1][y] * out_a.gather(1, y[:, None])[:, 0].detach())
                 / (a[0][y] * lip[0][y] + a[1][y] * lip[1][y])).mean()
        loss.backward()
        optimizer_a.step()

def val_epoch(epoch, data_loader, model, criterion, logger, tb_writer=None):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data_loader:
            v, a, y = obtain_input(batch)
            correct += int((model(v, a)[2].argmax(1) == y).sum())
            total += len(y)
    return 0.0, correct / total
"""
STANDIN_MODEL = """
import torch
import torch.nn as nn

class OrthLayer(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.fc = nn.Linear(1024, k)
        self.a_0 = nn.Parameter(torch.ones(k) * 0.1)
        self.a_1 = nn.Parameter(torch.ones(k) * 0.1)

class Fusion(nn.Module):
    def __init__(self, k, fusion):
        super().__init__()
        self.fusion = fusion
        if fusion == "orth":
            self.orth_layer = OrthLayer(k)
        else:
            self.fc_out = nn.Linear(1024, k)

    def forward(self, v, a):
        if self.fusion == "concat":
            return v, a, self.fc_out(torch.cat((v, a), 1))
        w = self.orth_layer.fc.weight
        outs = []
        for i, x in enumerate((v, a)):
            wi = w[:, 512 * i : 512 * (i + 1)]
            wi = wi - wi.mean(1, keepdim=True)
            outs.append(x @ (wi / wi.norm(dim=1, keepdim=True)).t())
        layer = self.orth_layer
        return outs[0], outs[1], outs[0] * layer.a_0 + outs[1] * layer.a_1 + layer.fc.bias

class MultiModalModel(nn.Module):
    def __init__(self, video_model, audio_model, num_class=101, fusion_method="sum"):
        super().__init__()
        self.visual_net, self.audio_net = video_model, audio_model
        self.fusion_module = Fusion(num_class, fusion_method)

    def forward(self, visual, audio):
        v = torch.flatten(self.visual_net(visual), 1)
        a = torch.flatten(self.audio_net(audio), 1)
        return self.fusion_module(v, a)
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("crmt_vs_reference", ROOT / "benchmarks" / "crmt_vs_reference.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    (root / "models").mkdir()
    (root / "train.py").write_text(textwrap.dedent(STANDIN_TRAIN))
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "multimodal.py").write_text(textwrap.dedent(STANDIN_MODEL))
    return root


@pytest.fixture(scope="module")
def bundle():
    return load_data(DataConfig("synthetic", 0, dict(TINY)))


def _cfg(method: str, head: str = "concat", epochs: int = 2) -> RunConfig:
    cfg = RunConfig()
    cfg.data = DataConfig("synthetic", 0, dict(TINY))
    cfg.model.feature_dim, cfg.model.head = 16, head
    cfg.train.method, cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = method, epochs, 32, False
    cfg.train.optim.lr = 3e-3
    cfg.train.method_options = {"fit_samples": 64, "step2_epochs": 5} if method == "crmt-jt" else {}
    return cfg


# --- the adapter --------------------------------------------------------------------------------


def test_reference_adapter_trains_the_standin_with_our_encoders(bench, standin, bundle):
    ref = bench.import_reference(standin)
    assert "train" not in sys.modules or sys.modules["train"] is not ref.train  # no stray module left behind
    cfg = ModelConfig(feature_dim=512)
    model, record = bench.train_reference(ref, bundle, cfg, "crmt-jt", epochs=3, seed=0)
    calls = ref.train.CALLS
    assert [c[0] for c in calls].count("train") == 3 and all(c[1] == 2.0 for c in calls if c[0] == "train")
    assert not [c for c in calls if c[0] == "step2"]  # 3 epochs: 3 // 3 - 1 = 0 step-2 passes, as the reference
    # the encoders are mmrobust's, built with the same seed (standardisation included)
    torch.manual_seed(0)
    ours = build_model(bundle.meta, cfg)
    net0 = bench.reference_model(ref, bundle.meta, cfg, 0, "orth")
    visual, audio = bench.reference_slots(bundle.meta)
    for slot, m in ((net0.visual_net, visual), (net0.audio_net, audio)):
        theirs = slot.encoder.state_dict()
        mine = ours.input_encoder(m).state_dict()
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    # the dict view is the reference model: same logits as calling it with (visual, audio)
    x = bundle.test.subset(slice(0, 8)).inputs
    assert torch.equal(model(x), model.model(x[visual], x[audio])[2])
    assert record["best_val_accuracy"] > 0.5 and len(record["val_accuracy"]) == 3


def test_reference_step2_runs_on_the_standin_and_is_reported(bench, standin, bundle):
    ref = bench.import_reference(standin)
    _, record = bench.train_reference(ref, bundle, ModelConfig(feature_dim=512), "crmt-jt", epochs=6, seed=1)
    assert [c[1] for c in ref.train.CALLS if c[0] == "step2"] == [1]  # epochs // 3 - 1 passes, as the reference
    assert any(c[0] == "lip" for c in ref.train.CALLS)
    assert 0 < record["a_max_change"] < 0.05  # SGD at 3e-5 moves the weights, barely
    assert len(record["val_accuracy"]) == 6 + 1 and record["kept"].startswith(("step1", "step2"))
    _, jt = bench.train_reference(ref, bundle, ModelConfig(feature_dim=512), "jt", epochs=1, seed=1)
    assert "a_step1" not in jt and ref.train.CALLS[-1] == ("train", 0.0)  # JT: rho = 0 on concat, no step 2


def test_step2_ablations_and_summary(bench, bundle):
    step1 = train(_cfg("crmt-step1", epochs=4), bundle=bundle)
    model1 = step1.model.eval()
    tau = step1.metrics["crmt"]["tau"]
    a1 = {m: p.detach().clone() for m, p in model1.head.a.items()}
    # the reference's settings: a small move, last weights kept, the step-1 model untouched
    ref_model, ref_rec = bench.reference_step2(model1, bundle, 0, tau, epochs=3)
    assert 0 < ref_rec["a_max_change"] < 0.01
    assert all(torch.equal(model1.head.a[m], a1[m]) for m in a1)
    # ours, unguarded, really moves a^(m)
    ours, rec = bench.mmrobust_step2(model1, bundle, 0, {"fit_samples": 64, "step2_attack_check": False})
    assert rec["kept"] == "step2"
    assert max(float((ours.head.a[m] - a1[m]).abs().max()) for m in a1) > 10 * ref_rec["a_max_change"]
    # attack columns: worst case <= each attack <= clean
    test = bundle.test.subset(slice(0, 30))
    acc = bench.attack_all(ours, bundle.meta, test, eps=1.0, steps=3)
    assert acc["worst"] <= min(acc["paper"], acc["ce"], acc["cw"]) and max(acc["ce"], acc["cw"]) <= acc["clean"]
    # paired-by-seed differences
    records = [{"seed": s, "row": r, **{c: v + (0.1 * s if r == "step 2: none" else 0) for c in bench.ATTACK_COLS}}
               for s in (0, 1) for r, v in (("step 2: none", 0.5), ("step 2: mmrobust unguarded", 0.4))]  # fmt: skip
    _, pairs, summary = bench.summarize(records)
    diff = summary["pairs"]["step 2: mmrobust unguarded - step 2: none"]
    assert diff["points"]["worst"][0] == pytest.approx(-15.0) and diff["seeds_worst_lower"] == 2
    assert diff["points"]["worst"][1] == pytest.approx(float(torch.tensor([-10.0, -20.0]).std()))


def test_without_reference_the_mmrobust_rows_run_and_the_skip_is_said(bench, tmp_path):
    out = tmp_path / "r.json"
    args = SimpleNamespace(
        data="synthetic", epochs=1, feature_dim=16, samples=10, eps=1.0, steps=1, out=str(out), seeds="0"
    )
    records: list[dict] = []
    b = load_data(DataConfig("synthetic", 0, dict(TINY)))
    bench.run_seed(args, None, b, 0, {(0, r) for r in (*bench.STEP2_ROWS, bench.MM_ROWS[1], bench.MM_ROWS[2])},
                   records.append)  # fmt: skip
    assert [r["row"] for r in records] == [bench.MM_ROWS[0]]
    text = bench.report(args, records, ["reference JT (no reference checkout)"], {"setting": "x"})
    assert "Skipped: reference JT" in text and out.is_file() and out.with_suffix(".md").is_file()


# --- the reference's row-normalised head ---------------------------------------------------------------


def _own_whitening(v: torch.Tensor) -> torch.Tensor:
    """The reference's orthogonal weight normalisation with one row per group, via its SVD route."""
    rows = []
    for z in v:
        zc = (z - z.mean())[None]
        u, eig, _ = torch.linalg.svd(zc @ zc.T)
        rows.append((u @ torch.diag(eig.rsqrt()) @ u.T @ zc)[0])
    return torch.stack(rows)


def test_rownorm_head_is_the_reference_map_and_not_an_orthogonal_head():
    head = HEADS.get("reference-rownorm")({"x": 12, "y": 6}, 4)
    assert isinstance(head, RowNormalizedHead) and not isinstance(head, OrthogonalHead)
    for m in ("x", "y"):
        free = head.bases[m].parametrizations.weight.original
        w = head.basis(m)
        assert torch.allclose(w, _own_whitening(free.detach()), atol=1e-5)
        assert torch.allclose(w.norm(dim=1), torch.ones(4), atol=1e-6) and w.mean(1).abs().max() < 1e-6
        gram = w @ w.T
        assert (gram - torch.eye(4)).abs().max() > 0.05  # unit rows, not orthonormal ones
    feats = {"x": torch.randn(5, 12), "y": torch.randn(5, 6)}
    expect = sum(head.a[m] * (feats[m] @ head.basis(m).T) for m in feats) + head.bias
    assert torch.allclose(head(feats), expect, atol=1e-6)
    with pytest.raises(ConfigError, match="feature dimension 1"):
        HEADS.get("reference-rownorm")({"x": 1}, 4)


def test_crmt_trains_the_rownorm_head_and_certifiers_use_theorem_3_3(bundle):
    fit = train(_cfg("crmt-jt", head="reference-rownorm"), bundle=bundle)
    assert isinstance(fit.model.head, RowNormalizedHead) and fit.config.model.head == "reference-rownorm"
    assert fit.metrics["crmt"]["kept"] in ("step1", "step2")
    assert isinstance(train(_cfg("crmt-step1", head="concat", epochs=1), bundle=bundle).model.head, OrthogonalHead)
    assert resolve_theorem(fit.model, "auto") is False
    with pytest.raises(ConfigError, match="RowNormalizedHead"):
        resolve_theorem(fit.model, "3.5")
    assert "reference row-normalised" in head_lipschitz(fit.model, bundle.meta, "sound").theorem


def test_rownorm_sound_radii_survive_attacks(bundle):
    torch.manual_seed(0)
    model = build_model(bundle.meta, ModelConfig(head="reference-rownorm", feature_dim=16))
    for enc in model.encoders.values():  # narrow MLPs keep the sound bound within a small factor
        enc[1], enc[3] = nn.Linear(enc[1].in_features, 16), nn.Linear(16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(bundle.train.inputs), bundle.train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = bundle.test.subset(slice(0, 30))
    res = certify_model(model, bundle.meta, test, "sound")
    r = res.certificate.radii
    assert res.clean_accuracy > 0.6 and float(r.joint.median()) > 1e-3  # a non-trivial certificate
    check = soundness_check(model, bundle.meta, test, {"joint": r.joint, "unimodal": r.unimodal}, steps=10)
    assert all(check[t]["violations"] == 0 for t in ["joint", *model.modalities])
    inflated = soundness_check(model, bundle.meta, test, {"joint": r.joint * 100, "unimodal": r.unimodal}, steps=10)
    assert inflated["joint"]["violations"] > 0  # the check can refute a wrong radius on this head


# --- step 2 with sound constants --------------------------------------------------------------------


def test_step2_with_sound_tau_uses_the_sound_certifier_constants(bundle):
    cfg = _cfg("crmt-jt")
    cfg.train.method_options.update({"step2_tau": "sound", "step2_attack_check": False})
    fit = train(cfg, bundle=bundle)
    rec = fit.metrics["crmt"]
    sound = head_lipschitz(fit.model, bundle.meta, "sound", theorem="3.5").tau
    for m, t in sound.items():
        assert torch.allclose(torch.tensor(rec["step2_tau"][m]), t.float(), rtol=1e-5)
        assert not torch.allclose(torch.tensor(rec["tau"][m]), t.float(), rtol=1e-2)  # not the empirical tau
    assert rec["step1_sound"]["val_mean_radius"] <= rec["step1"]["val_mean_radius"]  # sound constants are larger
    with pytest.raises(ConfigError, match="step2_tau='guess'") as err:
        CRMTOptions(step2_tau="guess").check()
    assert err.value.param == "step2_tau"


def test_step2_result_keeps_the_last_weights_beside_the_best():
    g = torch.Generator().manual_seed(0)
    scores = {m: torch.randn(64, 3, generator=g) for m in ("x", "y")}
    labels = torch.arange(64) % 3
    a0 = {m: torch.ones(3) for m in scores}
    data = Step2Data(scores, labels, scores, labels, a0, torch.zeros(3), {m: torch.ones(3) for m in scores})
    o = SimpleNamespace(step2_optimizer="sgd", step2_lr=0.5, step2_weight_decay=0.0, step2_epochs=4,
                        step2_max_acc_drop=1.0)  # fmt: skip
    res = optimise_modality_weights(data, o, 16, 0)
    assert res.last_a and any(not torch.equal(res.last_a[m], a0[m]) for m in a0)
    assert all(torch.equal(a0[m], torch.ones(3)) for m in a0)
    assert (
        res.best_epoch == 0 or res.history[res.best_epoch - 1]["val_mean_radius"] >= res.history[-1]["val_mean_radius"]
    )
