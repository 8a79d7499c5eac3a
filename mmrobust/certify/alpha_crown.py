"""alpha-CROWN: CROWN with the lower slopes of the unstable ReLUs optimised on the bound.

Plain CROWN (:mod:`mmrobust.certify.crown`) bounds an unstable ReLU (``l < 0 < u``) from below by
``a z`` with ``a = 1`` if ``u > -l`` else 0. Any ``a`` in ``[0, 1]`` is a valid lower line, so the
slopes can be chosen to make the final bound as large as possible: alpha-CROWN (Xu et al., 2021,
"Fast and complete") treats them as free variables, one per **sample, margin class and neuron**,
and maximises the bound of each margin ``h_y - h_k`` over them by projected gradient ascent (Adam,
clipped to ``[0, 1]`` after every step). The bound is differentiable in the slopes: the backward
pass of CROWN runs with autograd on (the weights and the intermediate bounds stay constants).

What is optimised, for a ball of radius ``r``: the joint bound of each margin, i.e. the best
choice, per attacked modality, of the optimised CROWN term ``lambda_m . x_m + c_m`` (dual
``||lambda_m||_*``), the interval bound or the sound Lipschitz bound (shared dual norm, see
:meth:`ModelBounds.combine`) among the choices that use CROWN somewhere (the modalities not
attacked are exact). Every iterate is a sound bound; per margin the best iterate's CROWN terms are
kept and become one more candidate of the final combination (beside plain CROWN, interval
propagation and the Lipschitz bound), so the bound is never below plain CROWN's. The intermediate (pre-activation) bounds are plain CROWN's (``intermediate``).

Optimised slopes: ReLU, MaxMin (the ReLU of ``a - b``) and LeakyReLU (its ReLU part); the smooth
activations and max pooling keep their fixed relaxations.

Radius: the plain CROWN radius is found first (:func:`mmrobust.certify.crown._bisect`), then the
bisection goes on above it with the optimised bound (``steps`` more rounds from :data:`GROW` times
the plain radius, doubling while it holds, then halving the bracket; at each radius tried
the slopes start from plain CROWN's and take at most ``iterations`` steps, stopping as soon as every
margin of the sample is positive, or when no margin still negative gained 0.1% in :data:`STALL` steps). ``seconds`` caps the optimisation time per sample (all its
radii, joint and per modality, together): past it the search uses plain CROWN, which keeps the
radius sound. The certificate's ``info["alpha_crown"]`` says how much the optimisation tightened
the radii (median ratio to plain CROWN's) and what it cost.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmrobust.certify.base import CERTIFIERS, Certificate, Certifier, CertifyContext, Guarantee, Radii
from mmrobust.certify.crown import CrownOptions, ModelBounds, _bisect
from mmrobust.certify.crown_encoder import dual_norm
from mmrobust.certify.crown_ops import default_slope, run_backward, slope_ops
from mmrobust.data.base import Batch, DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.progress import ProgressFn

#: the first radius the optimised bound tries is GROW times plain CROWN's (gains are tens of percent at most)
GROW = 1.25
#: gradient steps without progress (0.1% on every margin still negative) after which a radius is given up
STALL = 5

__all__ = ["AlphaCrownCertifier", "AlphaCrownOptions", "AlphaModelBounds", "alpha_crown_radii"]


@dataclass
class AlphaCrownOptions(CrownOptions):
    """Options of the ``alpha-crown`` certifier: those of ``crown`` (:class:`CrownOptions`) and

    ``iterations``: gradient steps on the slopes at each radius tried (>= 1); ``lr``: Adam's step
    size (> 0); ``seconds``: optimisation time per sample (> 0; past it, plain CROWN).
    """

    iterations: int = 20
    lr: float = 0.1
    seconds: float = 10.0
    where: ClassVar[str] = "alpha-crown"

    def __post_init__(self) -> None:
        super().__post_init__()
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ConfigError(f"alpha-crown: iterations must be an integer >= 1, got {it!r}", param="iterations")
        for key in ("lr", "seconds"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
                raise ConfigError(f"alpha-crown: {key} must be a finite number > 0, got {v!r}", param=key)


@dataclass
class AlphaStats:
    """What the optimisation did: calls (radii where plain CROWN failed and the slopes were
    optimised), gradient steps, calls cut short by the time budget, bounds it made positive."""

    calls: int = 0
    steps: int = 0
    budget_stops: int = 0
    skipped: int = 0  # radii checked with plain CROWN only (budget spent)
    stalls: int = 0  # calls stopped early because the bounds stopped improving


class AlphaModelBounds(ModelBounds):
    """:class:`ModelBounds` whose :meth:`lower` optimises the lower slopes where plain CROWN fails.

    ``optimise`` off gives plain CROWN; ``deadline`` (a ``time.perf_counter()`` value) ends the
    optimisation (plain CROWN after it).
    """

    def __init__(self, model: LateFusionModel, meta: DatasetMeta, options: AlphaCrownOptions) -> None:
        super().__init__(model, meta, options)
        self.options = options
        self.optimise = True
        self.deadline = math.inf
        self.stats = AlphaStats()

    def lower(self, inputs: Batch, labels: torch.Tensor, r: torch.Tensor, attacked: list[str]) -> torch.Tensor:
        fixed, options = self.candidates(inputs, labels, r, attacked)
        plain = self.combine(fixed, options, labels, r)
        if not self.optimise:
            return plain
        todo = ~(plain > 0).all(1)
        if not todo.any():
            return plain
        if time.perf_counter() >= self.deadline:
            self.stats.skipped += 1
            return plain
        others = {m: cands[1:] for m, cands in options.items()}  # all but plain CROWN's (first)
        best = self.optimise_slopes(inputs, labels, r, attacked, fixed, others, plain, todo)
        for m, cand in best.items():
            options[m].append(cand)
        return self.combine(fixed, options, labels, r)

    def _objective(
        self,
        fixed: torch.Tensor,
        terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
        others: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        r: torch.Tensor,
    ) -> torch.Tensor:
        """The best joint bound over the choices of one candidate per modality that use the optimised
        CROWN term ``terms[m]`` for at least one modality (the others: ``others[m]``, constants).
        Differentiable in the slopes; the l2 norm is kept away from 0, where its root has no gradient."""
        names = list(terms)
        best: torch.Tensor | None = None
        for choice in itertools.product(*[[terms[m], *others[m]] for m in names]):
            if all(c is not terms[m] for c, m in zip(choice, names, strict=True)):
                continue  # nothing to optimise in it: the plain bound has it already
            total = fixed + sum(v for v, _ in choice)
            duals = torch.stack([d for _, d in choice])
            norm = duals.pow(2).sum(0).clamp_min(1e-200).sqrt() if self.norm == "l2" else duals.sum(0)
            total = total - r[:, None] * norm
            best = total if best is None else torch.maximum(best, total)
        assert best is not None
        return best

    def optimise_slopes(
        self,
        inputs: Batch,
        labels: torch.Tensor,
        r: torch.Tensor,
        attacked: list[str],
        fixed: torch.Tensor,
        others: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        plain: torch.Tensor,
        todo: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per attacked modality the ``(lin, dual)`` CROWN terms of the best slopes found, per margin.

        Uses the operators' bounds from the :meth:`candidates` call just made (same ``inputs``, ``r``).
        """
        opts, stats = self.options, self.stats
        stats.calls += 1
        spec, _ = self.specs(labels)
        k = fixed.shape[1]
        margins = torch.ones_like(fixed, dtype=torch.bool).scatter(1, labels[:, None], False)
        alphas: list[torch.Tensor] = []
        ops_of: dict[str, list[Any]] = {}
        for m in attacked:
            ops_of[m] = slope_ops(self.enc[m].ops)
            for op in ops_of[m]:
                lo, hi = op.slope_bounds()
                alpha = default_slope(lo, hi).unsqueeze(1).expand(lo.shape[0], k, *lo.shape[1:]).clone()
                op.alpha = alpha.requires_grad_(True)
                alphas.append(op.alpha)
        x = {m: inputs[m].double() for m in attacked}
        best_val = torch.full_like(fixed, -math.inf)
        history: list[torch.Tensor] = []
        best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Adam (written out: torch.optim imports torch._dynamo, seconds on first use)
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in alphas]
        try:
            for it in range(opts.iterations + 1):
                with torch.enable_grad():
                    terms = {}
                    for m in attacked:
                        a, c = run_backward(self.enc[m].ops, spec[m])
                        terms[m] = ((a * x[m].unsqueeze(1)).flatten(2).sum(2) + c, dual_norm(a, self.norm))
                    joint = self._objective(fixed, terms, others, r)
                val = joint.detach()
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                for m, (lin, dual) in terms.items():
                    old = best.get(m)
                    lin_d, dual_d = lin.detach(), dual.detach()
                    best[m] = (lin_d, dual_d) if old is None else (
                        torch.where(better, lin_d, old[0]), torch.where(better, dual_d, old[1])
                    )  # fmt: skip
                need = todo[:, None] & margins & (torch.maximum(plain, best_val) <= 0)
                done = not bool(need.any())
                if done or it == opts.iterations or not alphas:
                    break
                history.append(best_val)
                if len(history) > STALL:  # no margin still negative gained 0.1% in STALL steps: give up
                    gain = (best_val - history.pop(0))[need]
                    if bool((gain <= 1e-3 * (1e-3 + best_val[need].abs())).all()):
                        stats.stalls += 1
                        break
                if time.perf_counter() >= self.deadline:
                    stats.budget_stops += 1
                    break
                # ascent on the margins still not proved (each margin has its own slopes)
                with torch.enable_grad():
                    loss = -(joint * need).sum()
                grads = torch.autograd.grad(loss, alphas, allow_unused=True)
                with torch.no_grad():
                    for p, g, (m1, m2) in zip(alphas, grads, moments, strict=True):
                        if g is None:
                            continue
                        g = torch.nan_to_num(g)
                        m1.mul_(0.9).add_(g, alpha=0.1)
                        m2.mul_(0.999).addcmul_(g, g, value=0.001)
                        step = (m1 / (1 - 0.9 ** (it + 1))) / ((m2 / (1 - 0.999 ** (it + 1))).sqrt() + 1e-8)
                        p.sub_(opts.lr * step).clamp_(0.0, 1.0)  # descent on -bound, projected on [0, 1]
                stats.steps += 1
        finally:
            for ops in ops_of.values():
                for op in ops:
                    op.alpha = None
        return best


def alpha_crown_radii(
    model: LateFusionModel,
    meta: DatasetMeta,
    split: Split,
    options: AlphaCrownOptions | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Radii, Radii, dict[str, Any]]:
    """alpha-CROWN radii, plain CROWN radii (joint, and per modality if ``options.unimodal``) and the
    cost ``{"crown_seconds", "alpha_seconds", "calls", "steps", "budget_stops", "skipped", "stalls"}``."""
    options = options or AlphaCrownOptions()
    bounds = AlphaModelBounds(model, meta, options)
    names = bounds.names
    threats: list[tuple[str, list[str]]] = [("joint", names)]
    if options.unimodal:
        threats += [(m, [m]) for m in names]
    plain: dict[str, list[torch.Tensor]] = {t: [] for t, _ in threats}
    opt: dict[str, list[torch.Tensor]] = {t: [] for t, _ in threats}
    correct = []
    crown_s = alpha_s = 0.0
    done, total = 0, len(split)
    for inputs, labels in iterate_batches(split, options.chunk):
        with torch.no_grad():
            correct.append(bounds.logits(inputs).argmax(1) == labels)
        t0 = time.perf_counter()
        bounds.optimise = False
        base = {t: _bisect(bounds, inputs, labels, att, options) for t, att in threats}
        t1 = time.perf_counter()
        bounds.optimise, bounds.deadline = True, t1 + options.seconds * len(labels)
        for t, att in threats:
            plain[t].append(base[t])
            opt[t].append(_bisect(bounds, inputs, labels, att, options, floor=base[t], grow=GROW))
        crown_s += t1 - t0
        alpha_s += time.perf_counter() - t1
        done += len(labels)
        if progress is not None:
            progress("alpha-crown", done, total)
    corr = torch.cat(correct)

    def radii(parts: dict[str, list[torch.Tensor]]) -> Radii:
        uni = {m: torch.cat(parts[m]) for m in names if m in parts}
        return Radii(torch.cat(parts["joint"]), uni, corr)

    s = bounds.stats
    cost = {"crown_seconds": crown_s, "alpha_seconds": alpha_s, "calls": s.calls, "steps": s.steps,
            "budget_stops": s.budget_stops, "skipped": s.skipped, "stalls": s.stalls}  # fmt: skip
    return radii(opt), radii(plain), cost


def tightening(alpha: torch.Tensor, plain: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """How much larger the alpha-CROWN radii are than plain CROWN's, over the correct samples with a
    positive plain radius: median and mean ratio, the fraction improved (by more than 0.1%)."""
    keep = correct.bool() & (plain > 0)
    ratio = alpha[keep] / plain[keep]
    if ratio.numel() == 0:
        return {"samples": 0, "median_ratio": None, "mean_ratio": None, "improved": None}
    return {
        "samples": int(ratio.numel()),
        "median_ratio": float(ratio.median()),
        "mean_ratio": float(ratio.mean()),
        "improved": float((ratio > 1.001).double().mean()),
    }


@CERTIFIERS.register("alpha-crown")
class AlphaCrownCertifier(Certifier):
    """Sound radii by CROWN with optimised lower slopes (alpha-CROWN); see :mod:`mmrobust.certify.alpha_crown`."""

    guarantee = Guarantee.SOUND
    Options = AlphaCrownOptions

    def certify(self, model: nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        if not isinstance(model, LateFusionModel):
            raise ConfigError(f"alpha-crown certifies a LateFusionModel, got {type(model).__name__}")
        t0 = time.perf_counter()
        radii, plain, cost = alpha_crown_radii(model, meta, split, self.options, ctx.progress)
        opts = self.options
        n = max(len(split), 1)
        report = {
            "joint": tightening(radii.joint, plain.joint, radii.correct),
            **{m: tightening(v, plain.unimodal[m], radii.correct) for m, v in radii.unimodal.items()},
            "crown_seconds_per_sample": cost["crown_seconds"] / n,
            "alpha_seconds_per_sample": cost["alpha_seconds"] / n,
            **cost,
            "crown_radii": {
                "joint": plain.joint.tolist(),
                "unimodal": {m: v.tolist() for m, v in plain.unimodal.items()},
            },
        }
        info = {"steps": opts.steps, "start": opts.start, "intermediate": opts.intermediate, "chunk": opts.chunk,
                "iterations": opts.iterations, "lr": opts.lr, "alpha_crown": report}  # fmt: skip
        return Certificate(
            self.name, self.guarantee, opts.norm, radii, split.labels, seconds=time.perf_counter() - t0, info=info
        )
