"""CROWN: sound certified radii by linear bound propagation through the late-fusion model.

For a sample ``x`` with label ``y`` and every class ``k``, the margin ``g_k(x') = h_y(x') - h_k(x')``
is bounded from below over a ball ``B(x, r)`` by propagating a linear lower bound backwards from
the head through every layer of every encoder (Zhang et al., 2018). The work is split by concern:

* :mod:`mmrobust.certify.crown_ops`: the operators (affine, ReLU, MaxMin, max-pool, residual, graph regions) and
  their relaxations;
* :mod:`mmrobust.certify.crown_layers`: which operators a layer becomes (rules registered in
  :mod:`mmrobust.layer_rules`) and :func:`build_ops`;
* :mod:`mmrobust.certify.crown_encoder`: :class:`EncoderBounds`, bounds through one encoder
  (intermediate bounds, backward pass, concretisation at the input);
* this module: the margins of the whole model, the bisection on the radius and the certifier.

At the input the bound is ``lambda . x' + c`` per modality, and its minimum over the ball is
closed form: ``lambda . x + c - r ||lambda||_*`` (l2: ``||.||_2``, l-inf: ``||.||_1``). The **joint**
ball over all modalities (``sum_m ||d_m||^2 <= r^2``) is one ball over the concatenated input, so
the blocks share one dual norm: ``sum_m (lambda_m . x_m + c_m) - r ||(lambda_1, ..., lambda_M)||_*``.
A **per-modality** ball perturbs modality ``m`` alone; the others contribute their exact values.
The final bound takes, per modality, the best of CROWN, interval propagation and (l2) the sound
Lipschitz bound of the margin row.

The certified radius of a sample is the largest ``r`` (found by bisection, ``steps`` rounds per
sample: doubling/halving from ``start`` until bracketed, then halving the bracket) at which every
``k != y`` lower bound is positive; every ``r`` reported was verified, so the radius is a lower
bound on the distance to the decision boundary. Misclassified samples get 0.

Memory: the backward pass holds a ``(chunk, K, *layer shape)`` float64 tensor per layer
(``chunk * K * 8`` bytes per neuron of the widest layer: 8 samples, 10 classes and a 32x28x28 conv
output take 16 MB); full intermediate CROWN holds ``2N`` such rows for a layer of ``N`` neurons and
is used only where ``2N * (widest earlier layer) <= budget``. Lower ``chunk`` (and the budget) to
fit smaller machines. Larger chunks are slower, not faster: tensors above glibc's mmap threshold
(32 MB at most) are mapped and unmapped on every operation, and the page faults cost as much as the
arithmetic (avdigits JT, 96 samples, 1 thread: 32.7 s at chunk 32 of which 12.1 s system time,
21.4 s and no system time at chunk 8).

Layers without a CROWN rule (see :mod:`mmrobust.layer_rules`) raise a one-line error naming the
layer; the ``sound`` certifier handles more layer types.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmrobust.certify.base import CERTIFIERS, Certificate, Certifier, CertifyContext, Guarantee, Radii
from mmrobust.certify.crown_encoder import EncoderBounds
from mmrobust.certify.crown_layers import build_ops
from mmrobust.certify.crown_ops import run_forward
from mmrobust.certify.sound import sound_row_lipschitz
from mmrobust.data.base import Batch, DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.progress import ProgressFn

NORMS = ("l2", "linf")
INTERMEDIATE = ("auto", "crown", "fast")

#: ``EncoderBounds``, ``build_ops`` and ``run_forward`` live in the crown_* modules; importable from here too
__all__ = ["CrownCertifier", "CrownOptions", "EncoderBounds", "ModelBounds", "build_ops", "crown_radii", "run_forward"]


@dataclass
class CrownOptions:
    """Options of the ``crown`` certifier.

    ``norm``: ``l2`` or ``linf`` ball; ``steps``: bisection rounds per sample (>= 1); ``start``:
    first radius tried (> 0); ``intermediate``: pre-activation bounds by full CROWN (``crown``),
    by interval/Lipschitz propagation only (``fast``) or CROWN where it fits ``budget`` elements per
    sample (``auto``); ``memory``: elements of the largest backward tensor of one intermediate-bound
    pass (rows are chunked to it); ``chunk``: samples bounded at once (memory, see the module docstring);
    ``unimodal``: also certify each modality alone.
    """

    norm: str = "l2"
    steps: int = 12
    start: float = 0.5
    intermediate: str = "auto"
    budget: int = 500_000
    memory: int = 2**23
    chunk: int = 8  # small tensors are reused by malloc; big ones are mapped anew (module docstring)
    unimodal: bool = True
    #: the certifier named in error messages
    where: ClassVar[str] = "crown"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"{self.where}: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}")
        if self.intermediate not in INTERMEDIATE:
            raise ConfigError(
                f"{self.where}: unknown intermediate '{self.intermediate}'; choose from: {', '.join(INTERMEDIATE)}"
            )
        for key in ("steps", "budget", "memory", "chunk"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{self.where}: {key} must be an integer >= 1, got {v!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int | float) or not 0 < self.start < math.inf:
            raise ConfigError(f"{self.where}: start must be a finite number > 0, got {self.start!r}")
        if not isinstance(self.unimodal, bool):
            raise ConfigError(f"{self.where}: unimodal must be true or false, got {self.unimodal!r}")


class ModelBounds:
    """Lower bounds on every margin ``h_y - h_k`` of a late-fusion model over a ball, per sample."""

    def __init__(self, model: LateFusionModel, meta: DatasetMeta, options: CrownOptions) -> None:
        model.eval()
        self.names = list(model.modalities)
        self.enc = {
            m: EncoderBounds(
                model.encoders[m],
                meta.spec(m).shape,
                options.norm,
                options.intermediate,
                options.budget,
                options.memory,
                f"encoders.{m}",  # the model's own parameter names: errors say which modality
            )
            for m in self.names
        }
        self.w = {m: model.head.modality_weight(m).detach().double() for m in self.names}
        self.bias = model.head.bias.detach().double()
        self.norm = options.norm
        # the sound Lipschitz bound of each margin row, L^m[y, k] for (W_y - W_k) . phi_m: a third
        # candidate per modality, so CROWN is never looser than certifier='sound' (l2 only)
        self.row_lip: dict[str, torch.Tensor] = {}
        if self.norm == "l2":
            k = self.bias.shape[0]
            for m in self.names:
                rows = (self.w[m].unsqueeze(1) - self.w[m].unsqueeze(0)).reshape(k * k, -1)
                lip = sound_row_lipschitz(model.encoders[m], meta.spec(m).shape, rows).double()
                self.row_lip[m] = lip.view(k, k)

    def specs(self, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per modality ``C_m[i, k] = W_m[y_i] - W_m[k]`` ``(B, K, d_m)`` and ``beta[i, k] = b_y - b_k``."""
        spec = {m: w[labels].unsqueeze(1) - w.unsqueeze(0) for m, w in self.w.items()}
        return spec, self.bias[labels].unsqueeze(1) - self.bias.unsqueeze(0)

    def logits(self, inputs: Batch) -> torch.Tensor:
        return sum(self.enc[m].forward(inputs[m]) @ self.w[m].T for m in self.names) + self.bias

    def lipschitz_radius(self, inputs: Batch, labels: torch.Tensor, attacked: list[str]) -> torch.Tensor:
        """The sound Lipschitz radius ``min_k (h_y - h_k) / ||(L^m[y, k])_m||`` (0 without l2 row bounds)."""
        if not self.row_lip:
            return torch.zeros(labels.shape[0], dtype=torch.float64)
        spec, beta = self.specs(labels)
        margin = beta + sum((spec[m] * self.enc[m].forward(inputs[m]).unsqueeze(1)).sum(2) for m in self.names)
        lip = torch.stack([self.row_lip[m][labels] for m in attacked]).pow(2).sum(0).sqrt()
        rad = torch.where(lip > 0, margin / lip.clamp_min(1e-300), torch.full_like(margin, math.inf))
        return rad.scatter(1, labels[:, None], math.inf).min(1).values.clamp_min(0) * (1 - 1e-9)

    def lower(self, inputs: Batch, labels: torch.Tensor, r: torch.Tensor, attacked: list[str]) -> torch.Tensor:
        """``(B, K)`` lower bounds of ``h_y - h_k`` over the ball of radius ``r`` (per sample) on the
        concatenation of the ``attacked`` modalities (the others fixed); ``+inf`` at ``k = y``."""
        fixed, options = self.candidates(inputs, labels, r, attacked)
        return self.combine(fixed, options, labels, r)

    def candidates(
        self, inputs: Batch, labels: torch.Tensor, r: torch.Tensor, attacked: list[str]
    ) -> tuple[torch.Tensor, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The fixed part of the margins (bias and the modalities not attacked) and, per attacked
        modality, candidate ``(value, dual)`` pairs with ``term_m >= value - r_m * dual`` over
        ``||d_m|| <= r_m``: CROWN (first), interval propagation (dual 0: it holds on the whole ball)
        and the Lipschitz bound. Leaves each encoder's operators holding this ball's bounds."""
        spec, beta = self.specs(labels)
        fixed = beta.clone()
        options: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for m in self.names:
            exact = (spec[m] * self.enc[m].forward(inputs[m]).unsqueeze(1)).sum(2)
            if m not in attacked:
                fixed = fixed + exact
                continue
            lin, dual, ibp = self.enc[m].bound(inputs[m], r, spec[m])
            cands = [(lin, dual), (ibp, torch.zeros_like(ibp))]
            if m in self.row_lip:
                cands.append((exact, self.row_lip[m][labels]))
            options[m] = cands
        return fixed, options

    def combine(
        self,
        fixed: torch.Tensor,
        options: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        labels: torch.Tensor,
        r: torch.Tensor,
    ) -> torch.Tensor:
        """The best joint bound over every choice of one candidate per modality (they share one dual
        norm); ``+inf`` at ``k = y``."""
        best = torch.full_like(fixed, -math.inf)
        for choice in itertools.product(*options.values()):
            total = fixed + sum(v for v, _ in choice)
            duals = torch.stack([d for _, d in choice])
            total = total - r[:, None] * (duals.pow(2).sum(0).sqrt() if self.norm == "l2" else duals.sum(0))
            best = torch.maximum(best, total)
        return best.scatter(1, labels[:, None], math.inf)


def _bisect(
    bounds: ModelBounds,
    inputs: Batch,
    labels: torch.Tensor,
    attacked: list[str],
    options: CrownOptions,
    floor: torch.Tensor | None = None,
    grow: float = 2.0,
) -> torch.Tensor:
    """Per sample, the largest verified radius over ``options.steps`` rounds (0 if misclassified);
    ``floor``: radii already verified (by a looser bound), searched above; ``grow``: the first radius
    tried is ``grow`` times the verified one (the Lipschitz radius or ``floor``)."""
    n = labels.shape[0]
    with torch.no_grad():
        correct = bounds.logits(inputs).argmax(1) == labels
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    idx = correct.nonzero().squeeze(1)
    if idx.numel() == 0:
        return lo
    # start from the closed-form Lipschitz radius (itself a sound certificate) and search above it
    lo[idx] = bounds.lipschitz_radius({m: v[idx] for m, v in inputs.items()}, labels[idx], attacked)
    if floor is not None:
        lo[idx] = torch.maximum(lo[idx], floor[idx].double())
    r = torch.where(lo > 0, grow * lo, torch.full_like(lo, float(options.start)))
    sub = {m: v[idx] for m, v in inputs.items()}
    for _ in range(options.steps):
        with torch.no_grad():
            ok = (bounds.lower(sub, labels[idx], r[idx], attacked) > 0).all(1)
        lo[idx[ok]] = r[idx[ok]]
        hi[idx[~ok]] = r[idx[~ok]]
        # doubling until a failure, quartering until a success, then halving the bracket
        r = torch.where(torch.isinf(hi), 2 * lo, torch.where(lo == 0, hi / 4, (lo + hi) / 2))
    return lo


def crown_radii(
    model: LateFusionModel,
    meta: DatasetMeta,
    split: Split,
    options: CrownOptions | None = None,
    progress: ProgressFn | None = None,
) -> Radii:
    """CROWN-certified radii (joint, and per modality if ``options.unimodal``) for every sample;
    ``progress`` hears the samples done."""
    options = options or CrownOptions()
    done, total = 0, len(split)
    bounds = ModelBounds(model, meta, options)
    names = bounds.names
    joint: list[torch.Tensor] = []
    uni: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    correct = []
    for inputs, labels in iterate_batches(split, options.chunk):
        with torch.no_grad():
            correct.append(bounds.logits(inputs).argmax(1) == labels)
        joint.append(_bisect(bounds, inputs, labels, names, options))
        if options.unimodal:
            for m in names:
                uni[m].append(_bisect(bounds, inputs, labels, [m], options))
        done += len(labels)
        if progress is not None:
            progress("crown", done, total)
    unimodal = {m: torch.cat(v) for m, v in uni.items() if v}
    return Radii(torch.cat(joint), unimodal, torch.cat(correct))


@CERTIFIERS.register("crown")
class CrownCertifier(Certifier):
    """Sound radii by linear bound propagation (CROWN); see :mod:`mmrobust.certify.crown`."""

    guarantee = Guarantee.SOUND
    Options = CrownOptions

    def certify(self, model: nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        if not isinstance(model, LateFusionModel):
            raise ConfigError(f"crown certifies a LateFusionModel, got {type(model).__name__}")
        t0 = time.perf_counter()
        radii = crown_radii(model, meta, split, self.options, ctx.progress)
        opts = self.options
        info = {"steps": opts.steps, "start": opts.start, "intermediate": opts.intermediate, "chunk": opts.chunk}
        return Certificate(
            self.name, self.guarantee, opts.norm, radii, split.labels, seconds=time.perf_counter() - t0, info=info
        )
