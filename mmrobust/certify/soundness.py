"""Empirical soundness check of certified radii against a strong, norm-minimising l2 attack.

A certified radius ``r(x)`` claims that no perturbation of l2 norm ``< r(x)`` changes the
prediction. Any successful adversarial example ``x + d`` therefore refutes the certificate if
``||d|| < r(x)``. :func:`min_adversarial_norm` searches, per sample, for the smallest successful
perturbation with l2 PGD on the logit-margin (CW) loss and a per-sample binary search on eps;
:func:`soundness_check` compares it with the certified radii (joint radius vs joint attack, each
uni-modal radius vs an attack on that modality alone).

Per-sample budgets on top of the shared-eps attack: the attack runs on a wrapper model that maps
``u -> x0 + s_i (u - x0)``; an eps-ball around ``x0`` in ``u`` is the ``s_i * eps`` ball in ``x``
(for every modality subset and a joint budget), so one attack call handles a different budget
per sample. The attack is unconstrained (no valid-range clamp), like the certificate. The attacked
batch carries each row's index (:data:`ROW_KEY`), so attacks that forward only some rows (APGD:
the samples not yet broken) still pair every row with its own centre and scale. The model runs
in eval mode and each module is left in the mode it had (no BatchNorm statistic is updated).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta, Split, iterate_batches
from mmrobust.torchutil import eval_mode

#: a hidden key of the batch the attacks see: each row's position in the attacked batch. Attacks
#: index every key of a batch together when they forward a subset of rows (APGD: only the samples
#: still correctly classified), so the wrapper always finds the right ``x0`` and scale per row.
ROW_KEY = "__mmrobust_row__"


class _Rescaled(nn.Module):
    """``u -> model(x0 + s * (u - x0))`` on the attacked modalities, with a per-row ``x0`` and ``s``.

    Give the attack :meth:`batch` (the inputs plus a hidden row-index key): whatever subset or
    order of rows an attack forwards, :meth:`lift` reads the row indices and pairs each row with
    its own ``x0`` and ``s``; a batch without them is refused (never silently misaligned).
    The wrapper is created in eval mode, so an attack's ``eval_mode`` restores the wrapped model
    to eval mode, never to train mode (a train-mode model uses batch statistics in BatchNorm and
    updates its running statistics: every later prediction and certificate would change).
    """

    def __init__(self, model: nn.Module, x0: Batch, scale: torch.Tensor, modalities: Sequence[str]) -> None:
        super().__init__()
        self.model, self.x0, self.scale, self.mods = model, x0, scale, list(modalities)
        self.training = False  # not .eval(): only the flag, the caller's model is left as it is

    def batch(self) -> Batch:
        """The clean inputs plus the hidden row indices (what the attack must be given)."""
        n = self.scale.shape[0]
        return {**self.x0, ROW_KEY: torch.arange(n, device=self.scale.device)}

    def forward(self, inputs: Batch) -> torch.Tensor:
        return self.model(self.lift(inputs))

    def lift(self, inputs: Batch) -> Batch:
        """The model's inputs for ``inputs`` in rescaled coordinates (the row-index key removed)."""
        if ROW_KEY not in inputs:
            raise RuntimeError("_Rescaled: the batch lacks its row indices (attack the inputs of .batch())")
        out = {k: v for k, v in inputs.items() if k != ROW_KEY}
        rows = inputs[ROW_KEY]
        for m in self.mods:
            if inputs[m].shape[0] != rows.shape[0]:
                raise RuntimeError(f"_Rescaled: {inputs[m].shape[0]} rows of '{m}' for {rows.shape[0]} row indices")
            x0 = self.x0[m][rows]
            s = self.scale[rows].view(-1, *([1] * (inputs[m].ndim - 1))).to(inputs[m].dtype)
            out[m] = x0 + s * (inputs[m] - x0)
        return out


def _attack_at(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    eps: torch.Tensor,
    modalities: Sequence[str],
    steps: int,
    restarts: int,
    seed: int,
    loss: str = "cw",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample-eps l2 PGD (joint budget over ``modalities``): ``(success, ||d||)``."""
    from mmrobust.attacks import PGDL2
    from mmrobust.attacks.threat import ThreatModel

    wrapped = _Rescaled(model, inputs, eps, modalities)
    # in the rescaled coordinates every sample's budget is a joint l2 radius of 1 (model input units)
    threat = ThreatModel.parse(None, eps=1.0, norm="l2", budget="joint", modalities=list(modalities))
    attack = PGDL2(wrapped, threat, steps=steps, loss=loss, restarts=restarts, seed=seed)
    with eval_mode(model):
        adv = wrapped.lift(attack(wrapped.batch(), labels))
        with torch.no_grad():
            success = model(adv).argmax(1) != labels
    norms = torch.sqrt(sum(((adv[m] - inputs[m]).flatten(1).double() ** 2).sum(1) for m in modalities))  # type: ignore[arg-type]
    return success, norms


def min_adversarial_norm(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    modalities: Sequence[str],
    start: torch.Tensor,
    steps: int = 50,
    restarts: int = 1,
    search_rounds: int = 8,
    bisect_rounds: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Per sample, the smallest l2 norm of a successful perturbation found (``inf`` if none).

    Phase 1 doubles each sample's eps from ``start`` (> 0) until the attack succeeds (at most
    ``search_rounds`` times); phase 2 bisects between the largest failed eps and the smallest
    success. Misclassified samples get 0. Only still-open samples are attacked in each round.
    """
    with eval_mode(model), torch.no_grad():
        clean_ok = model(inputs).argmax(1) == labels

    def attack(idx: torch.Tensor, e: torch.Tensor, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
        sub = {k: v[idx] for k, v in inputs.items()}
        return _attack_at(model, sub, labels[idx], e.float(), modalities, steps, restarts, seed + rnd)

    return search_min_norm(clean_ok, start.double().clamp_min(1e-12), attack, search_rounds, bisect_rounds)


def search_min_norm(
    clean_ok: torch.Tensor,
    start: torch.Tensor,
    attack: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    search_rounds: int,
    bisect_rounds: int,
) -> torch.Tensor:
    """The eps search shared by :func:`min_adversarial_norm` and the tightness attack radius.

    ``attack(idx, eps, round)`` attacks samples ``idx`` at per-sample l2 budgets ``eps`` and returns
    ``(success, norm of the successful perturbation)``. Phase 1 doubles each open sample's eps from
    ``start`` until an attack succeeds; phase 2 bisects between the largest failed eps and the
    smallest successful norm. Returns the smallest successful norm per sample (``inf``: none found;
    0 where ``clean_ok`` is False).
    """
    n = clean_ok.shape[0]
    best = torch.where(clean_ok, math.inf, 0.0).double()
    lo = torch.zeros(n, dtype=torch.float64)
    eps = start.double().clone()

    def run(idx: torch.Tensor, e: torch.Tensor, rnd: int) -> torch.Tensor:
        ok, norms = attack(idx, e, rnd)
        hit = idx[ok]
        best[hit] = torch.minimum(best[hit], norms[ok].double())
        return ok

    for rnd in range(search_rounds):
        open_ = (clean_ok & torch.isinf(best)).nonzero().squeeze(1)
        if open_.numel() == 0:
            break
        ok = run(open_, eps[open_], rnd)
        lo[open_[~ok]] = eps[open_[~ok]]
        eps[open_[~ok]] *= 2.0
    for rnd in range(bisect_rounds):
        idx = (clean_ok & torch.isfinite(best)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        mid = (lo[idx] + best[idx]) / 2
        ok = run(idx, mid, search_rounds + rnd)
        lo[idx[~ok]] = mid[~ok]
    return best


def soundness_check(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    radii: dict[str, Any],
    max_samples: int = 200,
    steps: int = 50,
    restarts: int = 1,
    losses: Sequence[str] = ("cw", "ce"),
    batch_size: int = 100,
    min_norm_samples: int = 0,
    shrink: float = 1e-3,
) -> dict[str, Any]:
    """Try to refute certified radii with attacks, per threat model (joint, each modality alone).

    ``radii`` is ``{"joint": (N,), "unimodal": {m: (N,)}}`` for the samples of ``split`` (e.g. a
    ``certify_model`` result). For every correctly classified sample with a finite radius ``r``,
    l2 PGD (each loss in ``losses``, ``steps`` steps, ``restarts`` restarts) attacks inside the ball
    of radius ``r * (1 - shrink)`` — the strongest test of the claim "nothing smaller than r
    succeeds". Any success is a *violation*: a perturbation smaller than the certified radius that
    changes the prediction. With ``min_norm_samples > 0`` the smallest successful perturbation is
    also searched (:func:`min_adversarial_norm`) on that many samples, to show how loose the radii
    are (median ratio radius / smallest perturbation found).
    """
    split = split.subset(slice(0, max_samples))
    n = len(split)
    threats: dict[str, list[str]] = {"joint": list(model.modalities)}  # type: ignore[arg-type]
    threats.update({m: [m] for m in model.modalities})  # type: ignore[union-attr]
    out: dict[str, Any] = {
        "samples": n,
        "attack": {"name": "pgd-l2 at each sample's own radius", "losses": list(losses), "steps": steps,
                   "restarts": restarts, "shrink": shrink},
    }  # fmt: skip
    for threat, mods in threats.items():
        rad = torch.as_tensor(radii["joint"] if threat == "joint" else radii["unimodal"][threat], dtype=torch.float64)[
            :n
        ]
        viol = torch.zeros(n, dtype=torch.bool)
        for b, (inputs, labels) in enumerate(iterate_batches(split, batch_size)):
            sl = slice(b * batch_size, b * batch_size + labels.shape[0])
            r = rad[sl]
            idx = (torch.isfinite(r) & (r > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sub = {k: v[idx] for k, v in inputs.items()}
            eps = (r[idx] * (1 - shrink)).float()
            hit = torch.zeros(idx.numel(), dtype=torch.bool)
            for li, loss in enumerate(losses):
                ok, norms = _attack_at(model, sub, labels[idx], eps, mods, steps, restarts, seed=li, loss=loss)
                hit |= ok & (norms < r[idx])
            viol[sl.start + idx] = hit
        checked = int((torch.isfinite(rad) & (rad > 0)).sum())
        entry: dict[str, Any] = {
            "modalities": mods,
            "checked": checked,  # correctly classified samples with a finite radius
            "violations": int(viol.sum()),
            "violation_rate": int(viol.sum()) / checked if checked else 0.0,
        }
        if min_norm_samples > 0:
            k = min(min_norm_samples, n)
            sub_split = split.subset(slice(0, k))
            start = torch.where(torch.isfinite(rad[:k]) & (rad[:k] > 0), rad[:k], torch.ones(k, dtype=torch.float64))
            adv = torch.cat([
                min_adversarial_norm(model, inputs, labels, mods, start[i * batch_size : i * batch_size + labels.shape[0]],
                                     steps=steps)
                for i, (inputs, labels) in enumerate(iterate_batches(sub_split, batch_size))
            ])  # fmt: skip
            pos = (rad[:k] > 0) & torch.isfinite(adv) & (adv > 0)
            entry["min_norm"] = {
                "samples": k,
                "found": int(torch.isfinite(adv).sum()),
                "violations": int((rad[:k] > adv).sum()),
                "median_attack_norm": float(adv[pos].median()) if pos.any() else None,
                "median_radius_over_attack_norm": float((rad[:k][pos] / adv[pos]).median()) if pos.any() else None,
            }
        out[threat] = entry
    return out
