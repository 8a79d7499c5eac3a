"""The AutoAttack speed-ups spend less work and find the same broken samples.

``early_stop`` (what the AutoAttack protocol turns on) drops broken samples from APGD's and FAB's
batches and runs APGD-T/FAB-T over several targets in one batch (here all: ``target_rows`` 256); Square on a late-fusion model
runs only the encoder of the modality a query changes. Each test checks both halves: the same
result as the plain attack, and less work (rows through the model, encoder calls), so it fails if
the speed-up were a no-op or changed the attack.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.base import BestTracker
from mmrobust.attacks.losses import margin
from mmrobust.runs import load_run


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def batch(run):
    return run.data().test.take(slice(0, 60))


class Counting(nn.Module):
    """``model`` behind a counter of the rows it is called on (and no late-fusion shortcut)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, inputs):
        self.rows += len(next(iter(inputs.values())))
        return self.model(inputs)


def _broken(model, adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(adv).argmax(1) != y


def test_best_tracker_keeps_the_best_row_of_each_sample():
    """Rows offered for the same sample at once (one per target) end as if offered one by one."""
    gen = torch.Generator().manual_seed(0)
    n, k, d = 6, 4, 3
    labels = torch.randint(0, k, (n,), generator=gen)
    for trial in range(20):
        x0 = torch.randn(n, d, generator=gen)
        logits0 = torch.randn(n, k, generator=gen)
        index = torch.randint(0, n, (15,), generator=gen)
        xs, logits = torch.randn(15, d, generator=gen), 3 * torch.randn(15, k, generator=gen)
        together, one_by_one = BestTracker(x0, logits0, labels), BestTracker(x0, logits0, labels)
        together.update(xs, logits, index)
        for i in range(len(index)):
            one_by_one.update(xs[i : i + 1], logits[i : i + 1], index[i : i + 1])
        assert torch.equal(together.broken, one_by_one.broken), trial
        assert torch.equal(together.margin, one_by_one.margin), trial
        assert torch.equal(together.x, one_by_one.x), trial
        assert torch.equal(together.margin, margin(together.logits, labels))


@pytest.mark.parametrize(("name", "norm", "eps"), [("apgd-ce", "l2", 1.5), ("apgd-ce", "linf", 0.3),
                                                   ("fab-t", "l2", 1.5), ("fab-t", "linf", 0.3)])  # fmt: skip
def test_early_stop_breaks_the_same_samples_with_less_work(run, batch, name, norm, eps):
    """APGD-CE (same random start) and FAB-T (deterministic first run): exactly the same samples."""
    x, y = batch
    kw = {"steps": 10, **({"targets": 3} if name == "fab-t" else {})}
    broken, rows = {}, {}
    for stop in (False, True):
        model = Counting(run.model).eval()
        atk = build_attack(name, model, run.meta, eps=eps, norm=norm, seed=0, early_stop=stop, target_rows=256, **kw)
        adv = atk(x, y)
        rows[stop], broken[stop] = model.rows, _broken(run.model, adv, y)
        delta = torch.cat([(adv[m] - x[m]).flatten(1) for m in x], 1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
        assert float(size.max()) <= eps * (1 + 1e-5)
    assert 0 < int(broken[True].sum()) < len(y)  # the setting is one where it matters
    assert torch.equal(broken[True], broken[False])
    assert rows[True] < rows[False], rows


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_t_batched_targets_as_strong_with_less_work(run, batch, norm):
    """APGD-T over its 3 targets in one batch: the random starts are drawn differently, so the
    broken samples may differ by chance, by at most a couple of samples here; never less work."""
    x, y = batch
    eps = 1.5 if norm == "l2" else 0.3
    broken, rows = {}, {}
    for stop in (False, True):
        model = Counting(run.model).eval()
        atk = build_attack(
            "apgd-t", model, run.meta, eps=eps, norm=norm, steps=10, targets=3, early_stop=stop, target_rows=256
        )
        broken[stop] = _broken(run.model, atk(x, y), y)
        rows[stop] = model.rows
    assert 0 < int(broken[True].sum()) < len(y)
    assert abs(int(broken[True].sum()) - int(broken[False].sum())) <= 2
    assert rows[True] < rows[False], rows


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_square_runs_only_the_changed_modality_encoder(run, batch, norm):
    """The same queries, accepted or not alike (float64, so no rounding decides a comparison), with
    one encoder per query instead of all of them."""
    x, y = batch
    model = copy.deepcopy(run.model).double().eval()
    x = {m: v.double() for m, v in x.items()}
    eps = 1.5 if norm == "l2" else 0.3
    calls = {"strong": 0, "weak": 0}

    def hook(name):
        def count(module, args, output):
            calls[name] += 1

        return count

    for m in calls:
        model.encoders[m].register_forward_hook(hook(m))
    fast = build_attack("square", model, run.meta, eps=eps, norm=norm, steps=150, seed=3)
    adv_fast, logits_fast = fast.perturb(x, y)
    fast_calls = dict(calls)
    calls.update(strong=0, weak=0)
    plain = build_attack("square", Counting(model).eval(), run.meta, eps=eps, norm=norm, steps=150, seed=3)
    adv_plain, logits_plain = plain.perturb(x, y)
    for m in x:
        assert torch.allclose(adv_fast[m], adv_plain[m], atol=1e-9)
    assert torch.allclose(logits_fast, logits_plain, atol=1e-9)
    assert 0 < int((logits_fast.argmax(1) != y).sum()) < len(y)
    # every query runs one encoder instead of both
    assert fast_calls["strong"] + fast_calls["weak"] < 0.7 * (calls["strong"] + calls["weak"]), (fast_calls, calls)
