"""Attacks that actually attack: every attack beats a do-nothing and a random-noise attack of the
same budget; targeted attacks reach their target; FAB finds the exact minimal distance in a box;
Square breaks a model whose gradients are masked; the AutoAttack protocol runs its components on
the points still robust and reports what it skipped and why.

Each test here fails on a no-op version of the attack it covers (see docs/attacks.md, "How the
attacks are tested", for the mutation each test was checked against).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack
from mmrobust.attacks.projection import project_onto_hyperplane_in_box
from mmrobust.errors import ConfigError
from mmrobust.runs import load_run

# (attack, norm, eps, settings); budgets where random noise of the same size barely hurts
STRENGTH = [
    ("fgm", "l2", 2.0, {}),
    ("fgsm", "linf", 0.5, {}),
    ("pgd-l2", "l2", 2.0, {"steps": 10}),
    ("pgd-linf", "linf", 0.5, {"steps": 10}),
    ("apgd-ce", "l2", 2.0, {"steps": 10}),
    ("apgd-ce", "linf", 0.5, {"steps": 10}),
    ("apgd-dlr", "linf", 0.5, {"steps": 10}),
    ("apgd-t", "l2", 2.0, {"steps": 10, "targets": 3}),
    ("apgd-t", "linf", 0.5, {"steps": 10, "targets": 3}),
    ("fab-t", "l2", 2.0, {"steps": 10, "targets": 3}),
    ("fab-t", "linf", 0.5, {"steps": 10, "targets": 3}),
    ("fab", "l2", 2.0, {"steps": 10}),
    ("square", "l2", 2.0, {"steps": 200}),
    ("square", "linf", 0.5, {"steps": 200}),
]


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def batch(run):
    return run.data().test.take(slice(0, 80))


def _acc(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _noise(x, norm: str, eps: float, seed: int):
    """The strongest of a few random perturbations of the budget (per sample), as an attack would."""
    gen = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(v.shape, generator=gen) for k, v in x.items()}
    if norm == "linf":
        return {k: v + eps * d[k].sign() for k, v in x.items()}
    total = torch.stack([v.flatten(1).pow(2).sum(1) for v in d.values()]).sum(0).sqrt()
    return {k: v + eps * d[k] / total.view(-1, *[1] * (v.dim() - 1)) for k, v in x.items()}


def _noise_accuracy(model, x, y, norm, eps, tries: int = 5) -> float:
    correct = torch.ones_like(y, dtype=torch.bool)
    with torch.no_grad():
        for s in range(tries):
            correct &= model(_noise(x, norm, eps, s)).argmax(1) == y
    return float(correct.float().mean())


@pytest.mark.parametrize(("name", "norm", "eps", "kw"), STRENGTH, ids=[f"{a[0]}-{a[1]}" for a in STRENGTH])
def test_attack_beats_nothing_and_noise(run, batch, name, norm, eps, kw):
    x, y = batch
    clean = _acc(run.model, x, y)
    noise = _noise_accuracy(run.model, x, y, norm, eps)
    assert noise > clean - 0.15  # the budget is one where random noise hardly matters
    attack = build_attack(name, run.model, run.meta, eps=eps, norm=norm, **kw)
    adv, logits = attack.perturb(x, y)
    acc = _acc(run.model, adv, y)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert acc < noise - 0.3, (name, norm, clean, noise, acc)


# --- targeted attacks on a constructed linear model ----------------------------------------------


class Linear(nn.Module):
    """``logits = W x + b`` on one vector modality ``"v"``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(weight)
            self.lin.bias.copy_(bias)
        self.modalities = ["v"]
        self.num_classes = weight.shape[0]

    def forward(self, inputs):
        return self.lin(inputs["v"])


def _decoy_model(norm: str) -> Linear:
    """Class 0 is predicted near x = 0 and class 1 scores second, but class 2's boundary is nearer
    (a dense direction over 50 coordinates): an untargeted attack goes to 2, a targeted one to 1.
    In 100 dimensions a random start (anywhere in the ball) is far from class 2's boundary; the
    constant classes 4 and 5 keep the targeted DLR's denominator (z_pi3, z_pi4) off class 2."""
    w = torch.zeros(6, 100)
    w[1, 0] = 1.0  # class 1 needs x_0 >= 0.5 (l2 and l-inf distance 0.5)
    w[2, 1:51] = 0.2 if norm == "linf" else 0.85  # class 2: l-inf distance 0.3, l2 distance 0.5
    w[3, 51] = 1.0
    return Linear(w, torch.tensor([3.0, 2.5, 0.0, -30.0, 2.0, 1.9]))


@pytest.mark.parametrize("name", ["apgd-t", "fab-t"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_attacks_reach_their_target(name, norm):
    model = _decoy_model(norm)
    x = {"v": 0.01 * torch.randn(8, 100, generator=torch.Generator().manual_seed(0))}
    y = torch.zeros(8, dtype=torch.long)
    assert bool((model(x).argsort(1)[:, -2] == 1).all())  # class 1 is the runner-up: target 1
    adv = build_attack(name, model, None, eps=0.6, norm=norm, steps=20, targets=1)(x, y)
    assert bool((model(adv).argmax(1) == 1).all())
    # an untargeted attack of the same budget goes to the nearer class 2 instead
    untargeted = build_attack("apgd-ce", model, None, eps=0.6, norm=norm, steps=20)(x, y)
    assert bool((model(untargeted).argmax(1) == 2).all())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_t_breaks_through_its_second_target(norm):
    """The runner-up class 1 is out of reach (slope 0.1: distance 5), the third class 4 is within
    eps (slope 2: distance 0.5). APGD-T with 2 targets breaks every sample through class 4 on its
    second target; an attack that follows the untargeted DLR loss keeps pushing the runner-up."""
    w = torch.zeros(6, 100)
    w[1, 0] = 0.1
    if norm == "l2":
        w[4, 2] = 2.0
    else:  # spread over 50 coordinates, so that a random corner of the box does not reach class 4
        w[4, 50:] = 0.04
    model = Linear(w, torch.tensor([3.0, 2.5, -30.0, -30.0, 2.0, 1.0]))
    x = {"v": 0.01 * torch.randn(8, 100, generator=torch.Generator().manual_seed(0))}
    y = torch.zeros(8, dtype=torch.long)
    assert bool((model(x).argsort(1)[:, -3] == 4).all())  # class 4 is the second target
    adv = build_attack("apgd-t", model, None, eps=0.6, norm=norm, steps=20, targets=2)(x, y)
    assert bool((model(adv).argmax(1) == 4).all())
    dlr = build_attack("apgd-dlr", model, None, eps=0.6, norm=norm, steps=20)(x, y)
    assert bool((model(dlr).argmax(1) == 0).all())


# --- FAB: minimal-norm points on the decision boundary inside the box -----------------------------


def _exact_box_distance(w: torch.Tensor, r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, norm: str):
    """Minimal ||d|| with w.d = r, lo <= d <= hi, by bisection on the clipped-ray parameter (float64)."""
    w, r, lo, hi = (t.double() for t in (w, r, lo, hi))
    a, b = torch.zeros_like(r), torch.full_like(r, 1e6)

    def ray(s):
        raw = s[:, None] * w if norm == "l2" else s[:, None] * w.sign()
        return torch.maximum(torch.minimum(raw, hi), lo)

    for _ in range(200):
        mid = (a + b) / 2
        reach = (w * ray(mid)).sum(1) >= r
        a, b = torch.where(reach, a, mid), torch.where(reach, mid, b)
    d = ray(b)
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_finds_the_exact_boundary_in_a_box(norm):
    # two classes that differ along w; samples near the top of the [0, 1] box with w pointing up
    # in most coordinates, so the unconstrained projection would leave the box
    gen = torch.Generator().manual_seed(1)
    d = 20
    w = torch.rand(d, generator=gen) + 0.2
    w[:3] = -0.5
    weight = torch.stack([torch.zeros(d), w, torch.zeros(d) - 1, torch.zeros(d) - 1])
    bias = torch.tensor([0.0, -float(w[3:].sum()) + 0.75, -100.0, -100.0])
    model = Linear(weight, bias)
    x = {"v": 0.9 + 0.08 * torch.rand(16, d, generator=gen)}
    y = torch.zeros(16, dtype=torch.long)
    margin = -(x["v"] @ w + bias[1])  # needed progress w . delta
    assert bool((margin > 0).all())
    exact = _exact_box_distance(w.expand(16, d), margin, -x["v"], 1 - x["v"], norm).float()
    unconstrained = margin / (w.norm() if norm == "l2" else w.abs().sum())
    assert bool((exact > 1.2 * unconstrained).all())  # the box really binds
    adv = build_attack("fab-t", model, None, eps=10.0, norm=norm, steps=20, targets=1, valid_range={"v": (0.0, 1.0)})(
        x, y
    )
    delta = (adv["v"] - x["v"]).double()
    dist = (delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)).float()
    assert bool((model(adv).argmax(1) == 1).all())  # adversarial (towards the target)
    assert float(adv["v"].min()) >= 0 and float(adv["v"].max()) <= 1
    assert bool((dist >= exact * (1 - 1e-4)).all())  # no point is closer than the exact distance
    assert bool((dist <= exact * 1.02).all()), (dist / exact).max()  # and FAB's is within 2 % of it
    gap = model(adv)[:, 1] - model(adv)[:, 0]  # on the boundary: the remaining margin is small
    assert bool((gap <= 0.03 * margin).all())


def test_projection_is_exact_against_bisection():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 9, generator=gen, dtype=torch.float64)
    x = torch.rand(32, 9, generator=gen, dtype=torch.float64)
    r = 1.5 * torch.randn(32, generator=gen, dtype=torch.float64)
    for norm in ("l2", "linf"):
        d = project_onto_hyperplane_in_box(w, r, -x, 1 - x, norm)
        within = bool(((x + d >= -1e-12) & (x + d <= 1 + 1e-12)).all())
        assert within
        # where the hyperplane meets the box the step lands on it with the exact minimal norm
        reach = ((w * (x + d)).sum(1) - (w * x).sum(1) - r).abs() < 1e-9
        assert int(reach.sum()) > 16
        sign = torch.where(r < 0, -1.0, 1.0).double()
        exact = _exact_box_distance(w[reach] * sign[reach, None], (r * sign)[reach], -x[reach], 1 - x[reach], norm)
        got = d[reach].norm(dim=1) if norm == "l2" else d[reach].abs().amax(1)
        assert torch.allclose(got, exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_untargeted_fab_restarts_start_at_random_points_of_half_the_budget(monkeypatch, norm):
    """The reference's FAB restarts: the first run starts at the clean input, every further one at
    a fresh random point at distance eps/2; and the "plus" version runs 5 of them."""
    from mmrobust.attacks.fab import FAB

    model = Linear(torch.eye(3, 10) * 0.1, torch.tensor([5.0, 0.0, 0.0]))  # unbreakable at eps 0.3
    x = {"v": torch.zeros(4, 10)}
    y = torch.zeros(4, dtype=torch.long)
    starts: list[torch.Tensor] = []
    real = FAB._closest_boundary

    def spy(self, packed, xs, labels):
        starts.append((xs - packed.x0).detach().clone())
        return real(self, packed, xs, labels)

    monkeypatch.setattr(FAB, "_closest_boundary", spy)
    adv = build_attack("fab", model, None, eps=0.3, norm=norm, steps=2, restarts=3)(x, y)
    assert torch.equal(adv["v"], x["v"])  # nothing found within eps: the clean input is returned
    assert len(starts) == 3 * 2  # 3 runs of 2 steps
    first, second, third = starts[0], starts[2], starts[4]
    assert torch.equal(first, torch.zeros_like(first))
    for d in (second, third):
        size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
        assert torch.allclose(size, torch.full_like(size, 0.15), atol=1e-6)
    assert not torch.allclose(second, third)
    res = run_autoattack(model, x, y, AutoAttackOptions(eps=0.3, norm=norm, version="plus", steps=2, queries=5,
                                                        targets=2))  # fmt: skip
    assert [(s.attack, s.restarts) for s in res.stages][:3] == [("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5)]


# --- Square against a model with masked gradients ---------------------------------------------------


class Quantised(nn.Module):
    """``model`` behind a rounding step (to 1/2): its input gradient is exactly zero everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)

    def forward(self, inputs):
        return self.model({k: torch.round(2 * v) / 2 for k, v in inputs.items()})


def test_square_breaks_masked_gradients_where_gradient_attacks_fail(run, batch):
    x, y = batch
    model = Quantised(run.model).eval()
    clean = _acc(model, x, y)
    grad = build_attack("apgd-ce", model, run.meta, eps=0.5, norm="linf", steps=10)(x, y)
    square = build_attack("square", model, run.meta, eps=0.5, norm="linf", steps=200)(x, y)
    noise = _noise_accuracy(model, x, y, "linf", 0.5)
    assert _acc(model, grad, y) >= min(clean, noise) - 0.05  # zero gradients: no better than noise
    assert _acc(model, square, y) < min(noise, _acc(model, grad, y)) - 0.3


# --- the AutoAttack protocol ------------------------------------------------------------------------


def test_protocol_runs_in_order_on_remaining_points(run, batch):
    x, y = batch
    opts = AutoAttackOptions(eps=0.5, norm="linf", version="custom", attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
                             steps=10, queries=100, targets=3)  # fmt: skip
    res = run_autoattack(run.model, x, y, opts, meta=run.meta)
    assert [s.attack for s in res.stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    robust_before = res.clean_accuracy
    for s in res.stages:
        assert s.attacked == round(robust_before * len(y))  # only the points still robust
        assert s.robust_accuracy == pytest.approx(robust_before - s.broken / len(y))
        robust_before = s.robust_accuracy
    assert res.robust_accuracy == pytest.approx(res.stages[-1].robust_accuracy)
    assert res.robust_accuracy < res.clean_accuracy - 0.3
    assert res.robust_accuracy == pytest.approx(_acc(run.model, res.adversarial, y))  # scores what it returns
    # and at least as strong as its first component alone
    alone = build_attack("apgd-ce", run.model, run.meta, eps=0.5, norm="linf", steps=10)(x, y)
    assert res.robust_accuracy <= _acc(run.model, alone, y)
    for m in ("strong", "weak"):
        assert float((res.adversarial[m] - x[m]).abs().max()) <= 0.5 + 1e-5


def test_protocol_per_modality_linf_budgets_and_single_modality(run, batch):
    x, y = batch
    eps = {"strong": 0.1, "weak": 0.6}
    res = run_autoattack(run.model, x, y, AutoAttackOptions(eps=eps, version="custom", attacks=("apgd-ce", "square"),
                                                            steps=10, queries=100), meta=run.meta)  # fmt: skip
    for m, e in eps.items():
        dev = (res.adversarial[m] - x[m]).abs().amax(1)
        assert float(dev.max()) <= e + 1e-6
        assert float(dev.max()) > 0.9 * e  # each modality spends its own budget
    assert res.robust_accuracy < res.clean_accuracy
    single = run_autoattack(run.model, x, y, AutoAttackOptions(eps=0.6, modalities=("weak",), version="custom",
                                                               attacks=("apgd-ce",), steps=10), meta=run.meta)  # fmt: skip
    assert torch.equal(single.adversarial["strong"], x["strong"])
    assert not torch.equal(single.adversarial["weak"], x["weak"])


def test_protocol_skips_what_does_not_apply_and_warns(run, batch):
    x, y = batch
    # 4 classes: the targeted components attack min(9, K - 1) = 3 targets; every component runs
    res = run_autoattack(run.model, x, y, AutoAttackOptions(eps=0.3, steps=5, queries=50), meta=run.meta)
    assert [s.attack for s in res.stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert res.targets == 3 and not res.skipped and not res.dropped and res.label == "autoattack"
    # asked for more targets than there are wrong classes: min(targets, K - 1), said in a warning
    res9 = run_autoattack(run.model, x, y, AutoAttackOptions(eps=0.3, steps=2, queries=10, targets=9), meta=run.meta)
    assert res9.targets == 3 and any("3 target class(es) attacked, not 9" in w for w in res9.warnings)
    # a two-class model: DLR does not apply
    model = Linear(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(2))
    xv = {"v": torch.randn(20, 4, generator=torch.Generator().manual_seed(1))}
    res2 = run_autoattack(model, xv, model(xv).argmax(1), AutoAttackOptions(eps=0.1, version="plus", steps=3,
                                                                            queries=20, targets=1))  # fmt: skip
    assert any("apgd-dlr skipped" in s and ">= 3 classes" in s for s in res2.skipped)
    assert set(res2.dropped) == {"apgd-dlr", "apgd-t"} and "fab-t" in res2.components
    assert res2.label.startswith("autoattack (apgd-ce, fab") and "apgd-dlr, apgd-t dropped: 2 classes" in res2.label
    # sanity checks: a saturated softmax, and randomness in the forward pass
    loud = run_autoattack(Scaled(run.model, 1e4), x, y, AutoAttackOptions(eps=0.0), meta=run.meta)
    assert any("softmax saturated" in w for w in loud.warnings)
    assert not any("softmax saturated" in w for w in res.warnings)
    noisy = run_autoattack(Noisy(run.model), x, y, AutoAttackOptions(eps=0.0), meta=run.meta)
    assert any("randomness" in w for w in noisy.warnings)


def test_protocol_options_validate():
    with pytest.raises(ConfigError, match="unknown version 'fast'"):
        AutoAttackOptions(eps=0.1, version="fast")
    with pytest.raises(ConfigError, match="needs attacks"):
        AutoAttackOptions(eps=0.1, version="custom")
    with pytest.raises(ConfigError, match="unknown component 'pgd'"):
        AutoAttackOptions(eps=0.1, version="custom", attacks=("pgd",))
    with pytest.raises(ConfigError, match="per-modality budgets need norm 'linf'"):
        AutoAttackOptions(eps={"a": 0.1, "b": 0.2}, norm="l2")
    with pytest.raises(ConfigError, match="eps must be finite"):
        AutoAttackOptions(eps=float("nan"))
    with pytest.raises(ConfigError, match="queries must be an integer"):
        AutoAttackOptions(eps=0.1, queries=0)


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, inputs):
        return self.factor * self.model(inputs)


class Noisy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model({k: v + 0.01 * torch.randn_like(v) for k, v in inputs.items()})


def test_autoattack_suite_version_runs_the_protocol(tiny_run):
    from mmrobust.eval.runner import evaluate_run

    res = evaluate_run(tiny_run, suite="autoattack", version="custom", attacks="apgd-ce,square", eps="0.5",
                       steps=5, queries=50, max_samples=60)  # fmt: skip
    rows = [r for r in res.rows if r.eps == 0.5]
    assert [r.attack for r in rows] == ["apgd-ce", "square", "autoattack"]
    assert rows[0].accuracy >= rows[1].accuracy == rows[2].accuracy  # cumulative, the last one is the suite's
    assert rows[2].accuracy < res.clean_accuracy - 0.3
    standard = evaluate_run(tiny_run, suite="autoattack", version="standard", eps="0.5", steps=3, queries=20,
                            max_samples=30)  # fmt: skip
    # 4 classes: the targeted components attack min(9, K - 1) = 3 targets, every component runs
    last = standard.rows[-1]
    assert last.attack == "autoattack" and last.extra["targets"] == 3 and "dropped" not in last.extra
    assert last.extra["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and last.label.startswith("autoattack ")
    with pytest.raises(ConfigError, match="unknown version"):
        evaluate_run(tiny_run, suite="autoattack", version="fast", eps="0.5", max_samples=10)
