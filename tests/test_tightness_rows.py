"""The per-sample-budget attacks behind tightness and soundness checks: each row keeps its own
centre and scale whatever subset an attack forwards, and the model is evaluated (and left) in
eval mode with its BatchNorm statistics untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.attacks.apgd import APGDCE
from mmrobust.attacks.threat import ThreatModel
from mmrobust.certify.soundness import ROW_KEY, _Rescaled, min_adversarial_norm, soundness_check
from mmrobust.certify.tightness import TightnessOptions, attack_radius, robust_at
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split

FAST = TightnessOptions(samples=12, steps=15, search_rounds=6, bisect_rounds=6, start=0.25)


class _AffineBN(nn.Module):
    """``W_a BN(x_a) + W_b x_b``: affine in eval mode (BN uses its running statistics), not in train mode."""

    modalities = ["a", "b"]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(5)
        self.bn.running_mean.copy_(torch.linspace(-2.0, 2.0, 5))
        self.bn.running_var.copy_(torch.linspace(0.5, 4.0, 5))
        self.a, self.b = nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.a(self.bn(x["a"])) + self.b(x["b"])


def _setup(n: int = 12) -> tuple[_AffineBN, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Model (eval), inputs, labels (its clean predictions) and the exact joint l2 distance to the boundary."""
    model = _AffineBN().eval()
    gen = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(n, 5, generator=gen) * 2, "b": torch.randn(n, 3, generator=gen)}
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    # the affine map's matrix by brute force: logits of unit vectors minus the logits at 0
    zero = {"a": torch.zeros(1, 5), "b": torch.zeros(1, 3)}
    with torch.no_grad():
        c = model(zero)[0]
        cols = [model({**zero, m: torch.eye(d)[i : i + 1]})[0] - c for m, d in (("a", 5), ("b", 3)) for i in range(d)]
    mat = torch.stack(cols, 1).double()  # (K, 8)
    diff = mat[y][:, None, :] - mat[None]  # (n, K, 8): rows of W_y - W_k
    dist = (logits.double()[torch.arange(n), y][:, None] - logits.double()) / diff.norm(dim=2).clamp_min(1e-12)
    dist[torch.arange(n), y] = float("inf")
    return model, x, y, dist.min(1).values


def _state(model: nn.Module) -> tuple[dict[str, bool], dict[str, torch.Tensor]]:
    return {n: m.training for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def test_attack_radius_on_a_batchnorm_model_is_the_exact_distance_and_leaves_the_model_alone():
    model, x, y, exact = _setup()
    modes, params = _state(model)
    adv = attack_radius(model, x, y, ["a", "b"], FAST)
    # no successful perturbation can be shorter than the distance to the boundary (the model in
    # eval mode), and the attacks get within 10% of it
    assert (adv >= exact * (1 - 1e-5)).all(), (adv, exact)
    assert (adv <= exact * 1.1).all(), (adv, exact)
    after_modes, after = _state(model)
    assert after_modes == modes  # still eval everywhere
    assert all(torch.equal(params[k], after[k]) for k in params)  # running statistics untouched


@pytest.mark.parametrize("fn", ["attack_radius", "robust_at", "min_adversarial_norm", "soundness_check"])
def test_each_attack_entry_point_restores_every_module_mode_and_keeps_the_statistics(fn):
    model, x, y, exact = _setup(6)
    model.train()
    model.b.eval()  # a mixed state is restored as it was, module by module
    modes, params = _state(model)
    if fn == "attack_radius":
        attack_radius(model, x, y, ["a", "b"], TightnessOptions(steps=5, search_rounds=2, bisect_rounds=1))
    elif fn == "robust_at":
        robust_at(model, x, y, 0.5, ["a", "b"], TightnessOptions(steps=5, attacks=("pgd-ce", "apgd-ce")))
    elif fn == "min_adversarial_norm":
        min_adversarial_norm(model, x, y, ["a", "b"], torch.ones(6), steps=5, search_rounds=2, bisect_rounds=1)
    else:
        meta = DatasetMeta(
            "ab", [ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "vector", (3,))], ["0", "1", "2"]
        )
        radii = {"joint": exact, "unimodal": {"a": torch.zeros(6), "b": torch.zeros(6)}}
        soundness_check(model, meta, Split(x, y), radii, steps=5, losses=("cw",))
    after_modes, after = _state(model)
    assert after_modes == modes
    assert all(torch.equal(params[k], after[k]) for k in params), fn


def test_rescaled_pairs_every_forwarded_row_with_its_own_centre_and_scale():
    model, x, _, _ = _setup(5)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    wrapped = _Rescaled(model, x, scale, ["a", "b"])
    full = wrapped.batch()
    u = {"a": torch.randn(5, 5), "b": torch.randn(5, 3)}
    for rows in (torch.tensor([4, 0, 2]), torch.tensor([1, 0, 2, 4, 3])):  # a subset; the same size reordered
        sub = {"a": u["a"][rows], "b": u["b"][rows], ROW_KEY: full[ROW_KEY][rows]}
        lifted = {m: x[m][rows] + scale[rows, None] * (u[m][rows] - x[m][rows]) for m in ("a", "b")}
        with torch.no_grad():
            assert torch.allclose(wrapped(sub), model(lifted), atol=1e-6)
    with pytest.raises(RuntimeError, match="row indices"):
        wrapped({"a": u["a"], "b": u["b"]})  # without its row indices: refused, never misaligned


def test_apgd_restarts_on_a_subset_of_rows_keep_each_rows_budget():
    """APGD's second restart forwards only the rows the first did not break."""
    model, x, y, exact = _setup()
    eps = torch.where(torch.arange(12) % 2 == 0, exact * 1.5, exact * 0.8).float()  # half breakable
    wrapped = _Rescaled(model, x, eps, ["a", "b"])
    threat = ThreatModel.parse(None, eps=1.0, norm="l2", budget="joint", modalities=["a", "b"])
    attack = APGDCE(wrapped, threat, steps=10, restarts=3, seed=0, num_classes=3)
    adv = wrapped.lift(attack(wrapped.batch(), y))
    norms = torch.sqrt(sum(((adv[m] - x[m]).double() ** 2).sum(1) for m in ("a", "b")))
    assert (norms <= eps.double() * (1 + 1e-4)).all()  # each row inside its own ball
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    assert not broken[1::2].any()  # a budget below the distance cannot succeed
    assert broken[0::2].all()
