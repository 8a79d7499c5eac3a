"""Memory budgets and batch sizing of the heavy passes (see docs/scale.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmrobust import memory
from mmrobust.attacks import PGDL2
from mmrobust.certify.lipschitz import empirical_lipschitz, lipschitz_batch
from mmrobust.cli import main
from mmrobust.data.base import iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.memory import given_batch, input_gradient_plan, parse_bytes, plan_batch
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.training.crmt import CRMTAT, CRMTATOptions, raw_scores_of

MB = 2**20


def test_sizes_parse_and_bad_sizes_are_one_line_errors(tiny_run, capsys):
    assert parse_bytes("8GB") == 8 * 2**30
    assert parse_bytes("512MiB") == 512 * MB
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "-1GB", "0", "8XB"):
        with pytest.raises(ConfigError, match="memory budget"):
            parse_bytes(bad)
    assert main(["evaluate", str(tiny_run), "--memory-budget", "lots"]) == 2
    err = capsys.readouterr().err
    # the library names the parameter (memory_budget); the CLI may map it to its flag (--memory-budget)
    assert err.count("\n") == 1 and ("--memory-budget" in err or "memory_budget" in err)


def test_plan_respects_a_tiny_budget():
    def fn(n: int) -> None:  # 8 MiB per sample, touched so it is resident
        torch.ones(n * 2 * MB, dtype=torch.float32).sum()

    plan = plan_batch(fn, 40 * MB, cap=1000)
    assert 6 * MB <= plan.per_sample_bytes <= 12 * MB
    assert 2 <= plan.batch_size <= 4 and plan.predicted_bytes() <= 40 * MB
    assert plan_batch(fn, "4GB", cap=7).batch_size == 7  # the cap wins when memory is plentiful


def test_chunked_lipschitz_equals_unchunked(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig("orthogonal", 16)).eval()
    rows = {m: model.head.basis(m).detach() for m in model.modalities}
    data = tiny_bundle.train.subset(slice(0, 24))
    plan, chunk = lipschitz_batch(model, data, rows, 1)  # a 1-byte budget: one sample, one row at a time
    assert plan.batch_size == 1 and chunk == 1
    chunked = empirical_lipschitz(model, data, rows, memory_budget=1)
    whole = empirical_lipschitz(model, data, rows, batch_size=24)
    for m in rows:
        torch.testing.assert_close(chunked[m], whole[m], rtol=1e-5, atol=1e-7)
    assert input_gradient_plan(model, data, 1).batch_size == 1
    assert input_gradient_plan(model, data, "4GB").batch_size == 24  # at most the split


def test_attack_check_reuses_the_attack_logits(tiny_bundle, monkeypatch):
    """CRMT's attack check (run by CRMT-AT) used to run the model again on the attack's output; the
    attack's own logits of that output give identical accuracies with one forward less per batch."""
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig("orthogonal", 16)).eval()
    strategy = CRMTAT(CRMTATOptions(step2_check_steps=3), tiny_bundle.meta)
    trainer = SimpleNamespace(model=model, val=tiny_bundle.val, device=torch.device("cpu"), memory_budget="auto")
    tau = {m: torch.full((tiny_bundle.meta.num_classes,), 0.5) for m in model.modalities}
    scores, labels = raw_scores_of(model, tiny_bundle.val)
    a1 = {m: p.detach().clone() for m, p in model.head.a.items()}
    a2 = {m: 1.5 * v for m, v in a1.items()}
    monkeypatch.setattr(memory, "input_gradient_plan", lambda *a, **k: given_batch(256))  # no probe forwards
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    new = strategy._attack_check(trainer, tau, scores, labels, a1, a2)
    new_calls = calls[0]

    def old() -> dict[str, float]:  # the previous computation: model(attack(inputs)) per batch
        from mmrobust.certify.bounds import orthogonal_bound

        bound = orthogonal_bound(scores, a1, model.head.bias.detach(), labels, tau)
        eps = float(bound[bound > 0].median())
        accs = {}
        for name, a in (("step1", a1), ("step2", a2)):
            with torch.no_grad():
                for m, p in model.head.a.items():
                    p.copy_(a[m])
            attack = PGDL2(model, eps, steps=3, loss="cw", meta=tiny_bundle.meta, seed=0)
            correct = 0
            for inputs, y in iterate_batches(tiny_bundle.val, 256):
                with torch.no_grad():
                    correct += int((model(attack(inputs, y)).argmax(1) == y).sum())
            accs[name] = correct / len(tiny_bundle.val)
        return {"eps": eps, **accs}

    calls[0] = 0
    reference = old()
    assert new is not None and new == reference
    assert new_calls == calls[0] - 2  # one batch per state, one forward less each
