"""How tight is a certificate? Compare each certified radius with the smallest adversarial radius found.

For ``N`` correctly classified samples, :func:`attack_radius` searches the smallest l2 budget at
which our strongest attacks change the prediction: l2 PGD on the cross-entropy and on the margin
(CW) loss plus APGD-CE, all with a per-sample budget (the model is wrapped as
``u -> x + s_i (u - x)``, so one call handles a different eps per sample; each row carries its
index, so subset forwards stay aligned; success is judged in eval mode). The search doubles each
sample's eps from ``start`` until an attack succeeds, then bisects between the largest failed and
the smallest successful eps; the radius is the norm of the smallest successful perturbation (an
*upper* bound on the distance to the decision boundary; ``inf`` if none was found).

:func:`tightness` returns per sample ``ratio = certified / attack radius`` and its median. A sound
certificate satisfies ``certified <= attack radius`` for every sample: any sample where it does not
is a **violation**, i.e. a bug in the certifier (for a probabilistic certificate, an event of
probability at most ``alpha`` per sample, or a bug).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmrobust.certify.soundness import _Rescaled, search_min_norm
from mmrobust.data.base import Batch, Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.torchutil import eval_mode

ATTACKS = ("pgd-ce", "pgd-cw", "apgd-ce")


@dataclass
class TightnessOptions:
    """``samples``: correctly classified samples to attack (the first ones of the split); ``steps``:
    iterations per attack; ``attacks``: subset of :data:`ATTACKS`; ``search_rounds`` doublings and
    ``bisect_rounds`` halvings of eps; ``start``: first eps tried; ``batch``: samples per attack call."""

    samples: int = 50
    steps: int = 50
    attacks: tuple[str, ...] = ATTACKS
    search_rounds: int = 8
    bisect_rounds: int = 8
    start: float = 0.5
    batch: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("samples", "steps", "search_rounds", "bisect_rounds", "batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"tightness: {key} must be an integer >= 1, got {v!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int | float) or not 0 < self.start < math.inf:
            raise ConfigError(f"tightness: start must be a finite number > 0, got {self.start!r}")
        self.attacks = tuple(self.attacks)
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise ConfigError(f"tightness: unknown attack(s) {bad}; choose from: {', '.join(ATTACKS)}")


@dataclass
class Tightness:
    """Per-sample comparison for one threat model (``joint`` or a modality name)."""

    threat: str
    indices: torch.Tensor  # (N,) positions in the split of the samples compared
    certified: torch.Tensor  # (N,)
    attack_radius: torch.Tensor  # (N,) smallest successful perturbation norm (inf: none found)
    ratio: torch.Tensor  # (N,) certified / attack radius (0 where no attack succeeded)
    median_ratio: float | None  # over samples where an attack succeeded
    violations: int  # samples with certified > attack radius


def _attack(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, eps: torch.Tensor, mods: Sequence[str], name: str,
    o: TightnessOptions, seed: int, num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One attack at a per-sample l2 budget: ``(success, ||delta||)``."""
    from mmrobust.attacks.apgd import APGDCE
    from mmrobust.attacks.gradient import PGDL2
    from mmrobust.attacks.threat import ThreatModel

    wrapped = _Rescaled(model, inputs, eps, mods)
    # in the rescaled coordinates every sample's budget is a joint l2 radius of 1 (model input units)
    threat = ThreatModel.parse(None, eps=1.0, norm="l2", budget="joint", modalities=list(mods))
    attack: PGDL2 | APGDCE
    if name == "apgd-ce":
        attack = APGDCE(wrapped, threat, steps=o.steps, seed=seed, num_classes=num_classes)
    else:
        attack = PGDL2(wrapped, threat, steps=o.steps, loss=name[4:], seed=seed)
    with eval_mode(model):  # success is judged in eval mode, on the lifted input (model input units)
        adv = wrapped.lift(attack(wrapped.batch(), labels))
        with torch.no_grad():
            success = model(adv).argmax(1) != labels
    norms = torch.stack([((adv[m] - inputs[m]).flatten(1).double() ** 2).sum(1) for m in mods]).sum(0).sqrt()
    return success, norms


def robust_at(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, eps: float, modalities: Sequence[str],
    options: TightnessOptions | None = None,
) -> torch.Tensor:  # fmt: skip
    """Per sample, whether it is classified correctly and survives every attack of ``options.attacks``
    at the joint l2 budget ``eps`` over ``modalities`` (the worst case over CE/CW PGD and APGD-CE)."""
    o = options or TightnessOptions()
    with eval_mode(model), torch.no_grad():
        logits = model(inputs)
    ok = logits.argmax(1) == labels
    for a, name in enumerate(o.attacks):
        idx = ok.nonzero().squeeze(1)  # the attacks run on samples still correct (each attack's survivors)
        if idx.numel() == 0:
            break
        e = torch.full((idx.numel(),), float(eps))
        sub = {m: v[idx] for m, v in inputs.items()}
        success, _ = _attack(model, sub, labels[idx], e, modalities, name, o, o.seed + a, logits.shape[1])
        ok[idx[success]] = False
    return ok


def attack_radius(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, modalities: Sequence[str], options: TightnessOptions
) -> torch.Tensor:
    """Per sample, the smallest l2 norm (jointly over ``modalities``) of a successful perturbation
    found by any of ``options.attacks``; ``inf`` if none, 0 if the sample is misclassified."""
    o = options
    with eval_mode(model), torch.no_grad():
        logits = model(inputs)
    k = logits.shape[1]

    def run(idx: torch.Tensor, e: torch.Tensor, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every attack at ``e``: success of any, and the smallest successful norm (inf: none)."""
        sub = {m: v[idx] for m, v in inputs.items()}
        hit = torch.zeros(idx.numel(), dtype=torch.bool)
        smallest = torch.full((idx.numel(),), math.inf, dtype=torch.float64)
        for a, name in enumerate(o.attacks):
            s, nrm = _attack(model, sub, labels[idx], e.float(), modalities, name, o, o.seed + 97 * rnd + a, k)
            smallest[s] = torch.minimum(smallest[s], nrm[s])
            hit |= s
        return hit, smallest

    start = torch.full((labels.shape[0],), float(o.start), dtype=torch.float64)
    return search_min_norm(logits.argmax(1) == labels, start, run, o.search_rounds, o.bisect_rounds)


def tightness(
    model: LateFusionModel,
    split: Split,
    certified: torch.Tensor,
    threat: str = "joint",
    options: TightnessOptions | None = None,
) -> Tightness:
    """Compare ``certified`` (per-sample radii of ``split``, l2) with attack radii on the first
    ``options.samples`` correctly classified samples, for ``threat`` (``"joint"`` or a modality)."""
    o = options or TightnessOptions()
    names = model.modalities
    if threat != "joint" and threat not in names:
        raise ConfigError(f"tightness: unknown threat '{threat}'; choose from: joint, {', '.join(names)}")
    if certified.shape[0] != len(split):
        raise ConfigError(f"tightness: {certified.shape[0]} certified radii for a split of {len(split)} samples")
    with eval_mode(model), torch.no_grad():
        preds = torch.cat(
            [model(split.take(slice(i, i + o.batch))[0]).argmax(1) for i in range(0, len(split), o.batch)]
        )
    indices = (preds == split.labels).nonzero().squeeze(1)[: o.samples]
    mods = names if threat == "joint" else [threat]
    adv = torch.cat([
        attack_radius(model, *split.take(indices[i : i + o.batch]), mods, o) for i in range(0, indices.numel(), o.batch)
    ]) if indices.numel() else torch.zeros(0, dtype=torch.float64)  # fmt: skip
    return compare(threat, indices, certified[indices], adv)


def compare(threat: str, indices: torch.Tensor, certified: torch.Tensor, attack: torch.Tensor) -> Tightness:
    """Ratios and violations of ``certified`` radii against ``attack`` radii of the same samples
    (samples with no successful attack, or misclassified ones with radius 0, have no ratio)."""
    cert = certified.double()
    found = torch.isfinite(attack) & (attack > 0)
    ratio = torch.where(found, cert / attack.clamp_min(1e-300), torch.zeros_like(cert))
    return Tightness(
        threat,
        indices,
        cert,
        attack,
        ratio,
        float(ratio[found].median()) if found.any() else None,
        int((cert > attack).sum()),
    )
