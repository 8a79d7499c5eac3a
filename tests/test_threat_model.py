"""The threat model: parsing and validation (once), units and scales, and units in every result file."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.autoattack import AutoAttack, AutoAttackOptions, run_autoattack
from mmrobust.attacks.threat import ThreatModel, check_eps, parse_eps_list
from mmrobust.cli import main
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import STANDARDISED, DatasetMeta, ModalitySpec, Normalization
from mmrobust.errors import ConfigError
from mmrobust.eval.api import evaluate_model
from mmrobust.models.fusion import ModelConfig, build_model

PIXELS = "pixel intensity in [0, 1]"


def _meta(classes: int = 3) -> DatasetMeta:
    return DatasetMeta("units", [
        ModalitySpec("image", "image", (1, 4, 4), (0.0, 1.0), PIXELS, Normalization((0.5,), (0.25,))),
        ModalitySpec("audio", "sequence", (3, 5), None, "waveform amplitude",
                     Normalization((0.0, 0.0, 0.0), (1.0, 2.0, 4.0), axis=0)),
        ModalitySpec("text", "vector", (6,)),
    ], [f"c{i}" for i in range(classes)])  # fmt: skip


class _Linear(nn.Module):
    """A linear model on the flattened modalities (large weights: attacks use their whole budget)."""

    def __init__(self, meta: DatasetMeta, seed: int = 0) -> None:
        super().__init__()
        self.modalities = meta.modality_names
        g = torch.Generator().manual_seed(seed)
        d = sum(int(torch.tensor(s.shape).prod()) for s in meta.modalities)
        self.w = nn.Parameter(torch.randn(d, meta.num_classes, generator=g) * 3)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([inputs[m].flatten(1) for m in self.modalities], 1) @ self.w


def _batch(meta: DatasetMeta, n: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = {s.name: torch.randn(n, *s.shape, generator=g) for s in meta.modalities}
    x["image"] = torch.rand(n, 1, 4, 4, generator=g)
    return x, torch.randint(0, meta.num_classes, (n,), generator=g)


# --- parsing and validation ----------------------------------------------------------------------
def test_parse_accepts_what_users_type():
    meta = _meta()
    t = ThreatModel.parse(meta, eps="8/255", norm="linf", modalities="image")
    assert t.eps == pytest.approx(8 / 255) and t.modalities == ("image",) and t.budget == "joint"
    assert t.units == {"image": PIXELS} and t.scales == {"image": (1.0,)} and t.ranges == {"image": (0.0, 1.0)}
    assert t.describe() == f"l-inf 8/255 (image: {PIXELS})"
    per = ThreatModel.parse(meta, eps="image=8/255,audio=0.1", norm="linf")
    assert per.budget == "per-modality" and per.eps == {"image": pytest.approx(8 / 255), "audio": 0.1}
    assert per.modalities == ("image", "audio")
    assert per == ThreatModel.parse(meta, eps={"image": 8 / 255, "audio": "0.1"}, norm="linf")
    assert ThreatModel.parse(meta, eps=0.5).modalities == ("image", "audio", "text")  # default: all, l2 joint
    assert parse_eps_list("2/255, 0.5") == [pytest.approx(2 / 255), 0.5]


@pytest.mark.parametrize(("kwargs", "param", "match"), [
    ({"eps": -1.0}, "eps", "finite and >= 0"),
    ({"eps": float("inf")}, "eps", "finite and >= 0"),
    ({"eps": float("nan")}, "eps", "finite and >= 0"),
    ({"eps": "abc"}, "eps", "not a number"),
    ({"eps": "1/0"}, "eps", "not a number"),
    ({"eps": True}, "eps", "must be a number"),
    ({"eps": "video=0.1"}, "eps", "unknown modality 'video'"),
    ({"eps": "image=0.1,0.2"}, "eps", "mixes name=eps"),
    ({"eps": "image=0.1,image=0.2"}, "eps", "given twice"),
    ({"eps": "image=-0.1"}, "eps", "finite and >= 0"),
    ({"eps": {"image": 0.1, "audio": 0.2}, "budget": "joint"}, "eps", "joint budget takes one eps"),
    ({"eps": {"image": 0.1}, "modalities": ["image", "audio"]}, "modalities", "differ from the modalities"),
    ({"eps": 0.1, "modalities": ["video"]}, "modalities", "unknown modality 'video'"),
    ({"eps": 0.1, "modalities": ["image", "image"]}, "modalities", "listed twice"),
    ({"eps": 0.1, "modalities": []}, "modalities", "no modality"),
    ({"eps": 0.1, "norm": "l1"}, "norm", "unknown norm 'l1'"),
    ({"eps": 0.1, "budget": "shared"}, "budget", "unknown budget 'shared'"),
])  # fmt: skip
def test_parse_errors_name_the_parameter(kwargs: dict[str, Any], param: str, match: str):
    with pytest.raises(ConfigError, match=match) as err:
        ThreatModel.parse(_meta(), **kwargs)
    assert err.value.param == param
    assert "--" not in str(err.value)


def test_direct_construction_is_validated_and_json_round_trips():
    with pytest.raises(ConfigError, match="joint budget takes one eps") as err:
        ThreatModel("l2", "joint", {"a": 1.0}, ("a",))
    assert err.value.param == "eps"
    with pytest.raises(ConfigError, match="scale of 'a' must be finite and > 0"):
        ThreatModel("l2", "joint", 1.0, ("a",), {"a": (0.0,)})
    with pytest.raises(ConfigError, match="not attacked"):
        ThreatModel("l2", "joint", 1.0, ("a",), units={"b": "x"})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        check_eps(-0.5)
    meta = _meta()
    for t in (ThreatModel.parse(meta, eps=2.0, norm="l2"), ThreatModel.parse(meta, eps="image=8/255,text=0.1",
                                                                            norm="linf")):  # fmt: skip
        doc = json.loads(json.dumps(t.to_json()))
        assert ThreatModel.from_json(doc) == t
    # a document without units reads as standardised, scale 1
    old = ThreatModel.from_json({"norm": "l2", "budget": "joint", "eps": 0.5, "modalities": ["a", "b"]})
    assert old.units == {"a": STANDARDISED, "b": STANDARDISED} and old.scales == {"a": (1.0,), "b": (1.0,)}
    assert not old.scaled


def test_units_and_scales_follow_the_convention():
    meta = _meta()
    joint = ThreatModel.parse(meta, eps=2.0, norm="l2")
    # joint l2: every modality measured on x / std (std 1 for data stored standardised)
    assert joint.scales == {"image": (0.25,), "audio": (1.0, 2.0, 4.0), "text": (1.0,)}
    assert joint.scale_axes == {"audio": 0}
    assert joint.units["image"].startswith(STANDARDISED) and joint.units["text"] == STANDARDISED
    # per-modality l2: stored units for a scalar normalisation, standardised for a per-coefficient one
    per = ThreatModel.parse(meta, eps="image=1,audio=1", norm="l2")
    assert per.scales == {"image": (1.0,), "audio": (1.0, 2.0, 4.0)}
    assert per.units["image"] == PIXELS and per.units["audio"].startswith(STANDARDISED)
    # l-inf: stored units, whatever the normalisation
    linf = ThreatModel.parse(meta, eps=8 / 255, norm="linf")
    assert linf.scales == dict.fromkeys(meta.modality_names, (1.0,))
    assert linf.units == {"image": PIXELS, "audio": "waveform amplitude", "text": STANDARDISED}
    assert "image: " + PIXELS in linf.describe()


# --- the scales inside the packing -----------------------------------------------------------------
def _scaled_norms(adv: dict[str, torch.Tensor], x: dict[str, torch.Tensor], t: ThreatModel) -> torch.Tensor:
    total = torch.zeros(len(next(iter(x.values()))), dtype=torch.float64)
    for m in t.modalities:
        s = torch.tensor(t.scales[m], dtype=torch.float64)
        shape = [1] * x[m].dim()
        if len(t.scales[m]) > 1:
            shape[1 + t.scale_axes[m]] = len(t.scales[m])
        total += (((adv[m] - x[m]).double() / s.reshape(shape)) ** 2).flatten(1).sum(1)
    return total.sqrt()


@pytest.mark.parametrize("name", ["pgd-l2", "fgm", "apgd-ce", "square"])
def test_joint_l2_budget_is_measured_in_scaled_units(name: str):
    meta = _meta()
    model = _Linear(meta)
    x, y = _batch(meta)
    t = ThreatModel.parse(meta, eps=1.0, norm="l2", modalities=["image", "audio"])
    kw = {"steps": 5} if name != "fgm" else {}
    adv = build_attack(name, model, meta, t, **kw)(x, y)
    scaled = _scaled_norms(adv, x, t)
    raw = torch.sqrt(sum(((adv[m] - x[m]).double() ** 2).flatten(1).sum(1) for m in t.modalities))
    assert bool((scaled <= 1.0 + 1e-5).all())
    # the budget was used, and in other units than stored ones: an attack ignoring the scales would
    # keep the raw norm <= eps (and then the scaled norm, with image std 0.25, would exceed eps)
    assert float(scaled.max()) > 0.9 and float(raw.max()) > 1.1
    assert torch.equal(adv["text"], x["text"])  # untouched: bit-identical
    assert float(adv["image"].min()) >= 0.0 and float(adv["image"].max()) <= 1.0  # the valid range, in pixels


def test_linf_budget_is_in_stored_units_per_modality():
    meta = _meta()
    model = _Linear(meta)
    x, y = _batch(meta)
    t = ThreatModel.parse(meta, eps="image=8/255,audio=0.1", norm="linf")
    adv = build_attack("pgd-linf", model, meta, t, steps=5)(x, y)
    assert float((adv["image"] - x["image"]).abs().max()) <= 8 / 255 + 1e-6
    assert float((adv["image"] - x["image"]).abs().max()) > 0.9 * 8 / 255
    assert float((adv["audio"] - x["audio"]).abs().max()) <= 0.1 + 1e-6
    assert float(adv["image"].min()) >= 0.0 and float(adv["image"].max()) <= 1.0
    assert torch.equal(adv["text"], x["text"])
    # the AutoAttack protocol honours the same per-modality boxes
    aa = AutoAttack(model, t, version="custom", attacks=["apgd-ce", "square"], steps=5, queries=20, meta=meta)
    res = aa.detailed(x, y)
    assert float((res.adversarial["image"] - x["image"]).abs().max()) <= 8 / 255 + 1e-6
    assert float((res.adversarial["audio"] - x["audio"]).abs().max()) <= 0.1 + 1e-6
    assert torch.equal(res.adversarial["text"], x["text"])
    row = aa.describe()
    assert row["units"] == {"image": PIXELS, "audio": "waveform amplitude"} and row["budget"] == "per-modality"


def test_standardised_data_keep_todays_numbers():
    """Stored standardised (no normalisation): scale 1, the packing is the identity (bit-identical)."""
    bundle = load_data(DataConfig("synthetic", 0, {"classes": 3, "dim": 8, "n_train": 20, "n_val": 5, "n_test": 20}))
    meta = bundle.meta
    model = build_model(meta, ModelConfig(feature_dim=8))
    x, y = bundle.test.take(slice(0, 20))
    t = ThreatModel.parse(meta, eps=0.5, norm="l2")
    assert not t.scaled
    a = build_attack("pgd-l2", model, meta, t, steps=3, seed=4)(x, y)
    b = build_attack("pgd-l2", model, meta, eps=0.5, steps=3, seed=4)(x, y)  # the eps keyword of before
    for m in x:
        assert torch.equal(a[m], b[m])


# --- AutoAttack for any class count ----------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3])
def test_autoattack_runs_what_applies_on_few_classes(classes: int):
    opts = {"classes": classes, "dim": 8, "n_train": 40, "n_val": 10, "n_test": 30}
    bundle = load_data(DataConfig("synthetic", 0, opts))
    model = build_model(bundle.meta, ModelConfig(feature_dim=8))
    x, y = bundle.test.take(slice(0, 30))
    res = run_autoattack(model, x, y, AutoAttackOptions(eps=0.5, steps=3, queries=20), meta=bundle.meta)
    assert res.targets == classes - 1  # min(9, K - 1)
    if classes == 2:
        assert res.components == ["apgd-ce", "fab-t", "square"] and set(res.dropped) == {"apgd-t"}
        assert res.label == "autoattack (apgd-ce, fab-t, square; apgd-t dropped: 2 classes)"
    else:
        assert res.components == ["apgd-ce", "apgd-t", "fab-t", "square"] and not res.dropped
        assert res.label == "autoattack"
    result = evaluate_model(model, bundle.meta, bundle.test, "autoattack", eps="0.5", steps=3, queries=20,
                            version="standard")  # fmt: skip
    last = result.rows[-1]
    assert last.attack == "autoattack" and last.extra["targets"] == classes - 1
    if classes == 2:
        assert last.extra["dropped"].keys() == {"apgd-t"} and "apgd-t dropped: 2 classes" in last.label
        assert last.label.startswith("autoattack (apgd-ce, fab-t, square;")
    else:
        assert "dropped" not in last.extra and last.label.startswith("autoattack ")


# --- units in every result file --------------------------------------------------------------------
_BUDGET_KEYS = ("eps", "radii", "median_joint_radius_correct", "attack_radius", "unimodal_eps")


def _budget_fields_without_units(doc: Any, where: str = "") -> list[str]:
    """Every dict holding a (non-null) budget or radius field but no ``units`` beside it."""
    bad: list[str] = []
    if isinstance(doc, dict):
        has_budget = any(doc.get(k) is not None for k in _BUDGET_KEYS)
        if has_budget and not isinstance(doc.get("units"), dict):
            bad.append(where or "<top>")
        for k, v in doc.items():
            if k in ("options", "units", "unimodal_units"):
                continue
            bad += _budget_fields_without_units(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            bad += _budget_fields_without_units(v, f"{where}[{i}]")
    return bad


def test_every_budget_and_radius_in_result_files_states_its_units(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    common = ["--max-samples", "20", "--no-progress"]
    assert main(["evaluate", str(run), "--suite", "paper", "--steps", "2", *common]) == 0
    assert main(["evaluate", str(run), "--suite", "curves", "--eps", "0.5", "--steps", "2", *common]) == 0
    assert main(["evaluate", str(run), "--suite", "autoattack", "--eps", "strong=0.1,weak=0.2", "--version",
                 "custom", "--attacks", "apgd-ce,square", "--steps", "2", "--queries", "10", *common]) == 0  # fmt: skip
    assert main(["evaluate", str(run), "--suite", "autoattack", "--eps", "0.1", "--steps", "2", "--queries", "10",
                 *common]) == 0  # fmt: skip
    assert main(["certify", str(run), "--certifier", "empirical", "--tightness", "3"]) == 0
    files = ["eval_paper.json", "eval_curves.json", "eval_autoattack.json", "certify.json"]
    for name in files:
        doc = json.loads((run / name).read_text())
        assert _budget_fields_without_units(doc) == [], name
    paper = json.loads((run / "eval_paper.json").read_text())
    attacked = [r for r in paper["results"] if r["eps"] is not None]
    assert attacked and all(set(r["units"]) == set(r["modalities"]) for r in attacked)
    assert all(set(r["scales"]) == set(r["modalities"]) for r in attacked)
    # the checker does catch a budget without units (and old files read as standardised)
    stripped = {**attacked[0]}
    del stripped["units"]
    assert _budget_fields_without_units({"results": [stripped]}) == [".results[0]"]
    from mmrobust.eval.results import EvalRow

    assert EvalRow.from_json(stripped).units == dict.fromkeys(stripped["modalities"], STANDARDISED)
