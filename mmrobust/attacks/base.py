"""The attack interface and the threat-model arithmetic shared by every gradient attack.

An attack perturbs any subset of a batch's modalities. The attacked modalities are packed into one
flat ``(N, D)`` tensor (a view per modality is unpacked for the forward pass), so norms, steps,
projections and clamps are a few vectorised ops whatever the number and shapes of modalities, and
the untouched modalities are passed through as the very same tensors (bit-identical).

Every attack takes a :class:`~mmrobust.attacks.threat.ThreatModel`: ``joint`` bounds the norm of
the concatenated scaled perturbation (``sum_m ||delta_m / s_m||^2 <= eps^2`` for l2,
``max_m ||delta_m / s_m||_inf <= eps`` for l-inf); ``per-modality`` bounds each attacked modality's
perturbation by its own eps. The scales ``s_m`` (1 unless the threat model says otherwise, see
:mod:`mmrobust.attacks.threat`) are applied by the packing: :meth:`Attack.pack` divides each
modality by its scale and :meth:`Packed.unpack` multiplies back, so the algorithms work unchanged
in scaled coordinates (valid ranges are scaled alongside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmrobust.attacks.losses import get_loss, margin
from mmrobust.attacks.threat import BUDGETS, NORMS, ThreatModel
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError
from mmrobust.registry import Registry
from mmrobust.torchutil import eval_mode

__all__ = ["ATTACKS", "BUDGETS", "NORMS", "TINY", "Attack", "BestTracker", "Packed", "ThreatModel", "build_attack"]
#: added to norms before dividing by them (zero gradients then give zero steps, not NaN)
TINY = 1e-12

ATTACKS: Registry[type[Attack]] = Registry(
    "attack",
    modules=[f"mmrobust.attacks.{m}" for m in ("gradient", "apgd", "fab", "square", "autoattack")],
)


@dataclass
class Packed:
    """A batch with its attacked modalities flattened into ``x0`` of shape ``(N, D)``.

    ``group`` maps each of the D columns to its budget group (all 0 for a joint budget),
    ``eps`` is the budget per group ``(G,)``, ``lo``/``hi`` the valid range per column widened to
    include the clean input (so clamping can never push a perturbation past its budget), or None
    when no attacked modality declares a range. ``scale`` ``(D,)`` is the threat model's scale per
    column (None where all are 1): ``x0``, ``lo`` and ``hi`` are in scaled coordinates ``x / scale``
    and :meth:`unpack` maps back to stored units.
    """

    inputs: Batch
    modalities: list[str]
    slices: list[tuple[str, int, int, tuple[int, ...]]]
    x0: torch.Tensor
    group: torch.Tensor
    eps: torch.Tensor
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    scale: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        return int(self.eps.shape[0])

    def unpack(self, x: torch.Tensor) -> Batch:
        out = dict(self.inputs)
        if self.scale is not None:
            x = x * self.scale
        for m, start, stop, shape in self.slices:
            out[m] = x[:, start:stop].reshape(x.shape[0], *shape)
        return out

    def take(self, index: torch.Tensor) -> Packed:
        """The same packing restricted to the rows ``index`` (used to attack only unbroken samples)."""
        return Packed(
            {k: v[index] for k, v in self.inputs.items()}, self.modalities, self.slices, self.x0[index],
            self.group, self.eps,
            None if self.lo is None else self.lo[index], None if self.hi is None else self.hi[index], self.scale,
        )  # fmt: skip

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.lo is None else torch.clamp(x, self.lo, self.hi)

    # --- norms and projections per budget group -------------------------------------------------
    def group_norms(self, v: torch.Tensor, norm: str) -> torch.Tensor:
        """``(N, G)`` norms of ``v`` restricted to each group."""
        if self.num_groups == 1:
            return (v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1))[:, None]
        cols = []
        for _, start, stop, _ in self.slices:
            part = v[:, start:stop]
            cols.append(part.norm(dim=1) if norm == "l2" else part.abs().amax(dim=1))
        return torch.stack(cols, 1)

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """Broadcast ``(N, G)`` or ``(G,)`` values to the ``D`` columns."""
        return per_group[..., self.group] if self.num_groups > 1 else per_group[..., :1]

    def normalize(self, g: torch.Tensor, norm: str) -> torch.Tensor:
        """Steepest-ascent direction of unit norm per group (sign for l-inf)."""
        if norm == "linf":
            return g.sign()
        return g / (self.expand(self.group_norms(g, "l2")) + TINY)

    def project(self, delta: torch.Tensor, norm: str, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Project ``delta`` onto the budget ball (per group)."""
        eps = self.eps if eps is None else eps
        if norm == "linf":
            bound = self.expand(eps)
            return torch.maximum(torch.minimum(delta, bound), -bound)
        norms = self.group_norms(delta, "l2")
        factor = torch.clamp(eps / (norms + TINY), max=1.0)
        return delta * self.expand(factor)

    def random_start(self, norm: str, generator: torch.Generator) -> torch.Tensor:
        """A random perturbation inside the ball (l2: random direction, radius ~ U(0, eps))."""
        n, d = self.x0.shape
        if norm == "linf":
            u = torch.rand(n, d, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
            return (2 * u - 1) * self.expand(self.eps)
        g = torch.randn(n, d, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        r = torch.rand(n, self.num_groups, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        return self.normalize(g, "l2") * self.expand(r * self.eps)

    def step_to(self, delta: torch.Tensor, norm: str) -> torch.Tensor:
        """``x0 + delta`` after projection onto the ball and clamping to the valid range."""
        return self.clamp(self.x0 + self.project(delta, norm))


class BestTracker:
    """Per-sample worst case over iterates and restarts.

    A sample's kept example changes when a new one misclassifies it and the kept one did not, or
    when both agree on that and the new one has a larger logit margin. A sample therefore counts as
    broken if *any* iterate of *any* restart broke it.
    """

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.labels = labels
        self.x = x.detach().clone()
        self.logits = logits.detach().clone()
        self.margin = margin(self.logits, labels)
        self.broken = self.logits.argmax(1) != labels

    def update(self, x: torch.Tensor, logits: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Offer ``x`` (rows ``index`` of the batch, or all rows) with its logits."""
        logits = logits.detach()
        labels = self.labels if index is None else self.labels[index]
        m = margin(logits, labels)
        broken = logits.argmax(1) != labels
        if index is not None and len(index) > 1 and int(index.unique().numel()) < len(index):
            # several rows per sample (one per target): offer each sample only its best row (broken
            # first, then the larger margin), so that no row overwrites a better one of its sample
            order = m.argsort(stable=True)
            order = order[broken[order].to(torch.uint8).argsort(stable=True)]  # by (broken, margin)
            pos = torch.arange(len(order), device=order.device)
            last = torch.full((len(self.labels),), -1, dtype=torch.long, device=order.device)
            last = last.scatter_reduce(0, index[order], pos, reduce="amax")
            keep = order[last[last >= 0]]
            index, x, logits, labels, m, broken = (
                index[keep],
                x[keep],
                logits[keep],
                labels[keep],
                m[keep],
                broken[keep],
            )
        old_m = self.margin if index is None else self.margin[index]
        old_b = self.broken if index is None else self.broken[index]
        better = (broken & ~old_b) | ((broken == old_b) & (m > old_m))
        rows = better.nonzero().squeeze(1)
        if index is not None:
            rows_global = index[rows]
        else:
            rows_global = rows
        self.x[rows_global] = x.detach()[rows]
        self.logits[rows_global] = logits[rows]
        self.margin[rows_global] = m[rows]
        self.broken[rows_global] = broken[rows]


class Attack:
    """Base class: ``attack(inputs, labels) -> adversarial inputs`` (a dict like ``inputs``).

    Args:
        model: a multi-modal model, ``model(inputs) -> logits``; it runs in eval mode during the
            attack and no gradient is ever accumulated on its parameters.
        threat: the :class:`~mmrobust.attacks.threat.ThreatModel` (norm, budget, eps, attacked
            modalities, scales, units, valid ranges). An eps (a float, ``"8/255"`` or
            ``{modality: eps}``) is accepted as well and parsed by :meth:`ThreatModel.parse` with
            ``meta`` and the keywords ``norm``, ``budget``, ``modalities``, ``valid_range``.
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (logit margin).
        seed: seed of the attack's own random generator (random starts, random search).
        meta: dataset metadata (only to parse an eps into a threat model).
    """

    name: ClassVar[str] = ""
    default_norm: ClassVar[str] = "l2"
    #: False where ``run`` already returns the logits of its output computed on the whole batch
    rescore: ClassVar[bool] = True
    losses: ClassVar[tuple[str, ...]] = ("ce", "cw")
    budgets: ClassVar[tuple[str, ...]] = BUDGETS

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel | float | str | Mapping[str, Any] | None = None,
        *,
        loss: str = "ce",
        seed: int = 0,
        meta: DatasetMeta | None = None,
        eps: float | str | Mapping[str, Any] | None = None,
        **threat_options: Any,
    ) -> None:
        self.model = model
        if eps is not None:
            if threat is not None:
                raise ConfigError(f"{self.name}: eps given twice (as the threat and as eps)", param="eps")
            threat = eps
        known = meta.modality_names if meta is not None else list(getattr(model, "modalities", []))
        self.threat = ThreatModel.coerce(threat, meta, known=known, default_norm=self.default_norm, **threat_options)
        if self.threat.budget not in self.budgets:
            raise ConfigError(f"{self.name}: budget '{self.threat.budget}' is not supported (only a joint budget: l-inf "
                              "joint = the same eps per modality)" if self.budgets == ("joint",) else
                              f"{self.name}: unknown budget '{self.threat.budget}'; choose from: "
                              f"{', '.join(self.budgets)}", param="budget")  # fmt: skip
        if loss not in self.losses:
            raise ConfigError(
                f"{self.name}: unknown loss '{loss}'; choose from: {', '.join(self.losses)}", param="loss"
            )
        self.loss = loss
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    # the threat model's fields, under the names attacks have always had
    @property
    def norm(self) -> str:
        return self.threat.norm

    @property
    def budget(self) -> str:
        return self.threat.budget

    @property
    def modalities(self) -> list[str]:
        return list(self.threat.modalities)

    @property
    def eps(self) -> dict[str, float]:
        """The eps of every attacked modality."""
        return self.threat.eps_map

    @property
    def valid_range(self) -> dict[str, tuple[float, float] | None]:
        return dict(self.threat.ranges)

    # --- public API ---------------------------------------------------------------------------
    def __call__(self, inputs: Batch, labels: torch.Tensor) -> Batch:
        return self.perturb(inputs, labels)[0]

    def perturb(self, inputs: Batch, labels: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Adversarial inputs and the model's logits on them (saves the caller a forward pass)."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(f"{self.name}: the batch lacks attacked modality {missing}; it has {list(inputs)}")
        packed = self.pack(inputs)
        if len(labels) == 0:  # nothing to attack (e.g. every sample already broken)
            with eval_mode(self.model), torch.no_grad():
                return dict(inputs), self.model(inputs).detach()
        with eval_mode(self.model):
            x, logits = self.run(packed, labels)
            x_out = self._enforce_budget(packed, x.detach())
            # score exactly what we return: points found on a decision boundary (FAB, or scored on a
            # sub-batch) or moved by an ulp in _enforce_budget are scored as they are, not as they were
            if self.rescore or not torch.equal(x_out, x):
                with torch.no_grad():
                    logits = self.forward(packed, x_out)
        return packed.unpack(x_out), logits.detach()

    def describe(self) -> dict[str, Any]:
        """The settings as stored in an ``eval.json`` result row."""
        t = self.threat
        return {"attack": self.name, "loss": self.loss, "norm": t.norm, "modalities": list(t.modalities),
                "budget": t.budget, "eps": t.eps_value, **t.units_fields()}  # fmt: skip

    # --- for subclasses -----------------------------------------------------------------------
    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the adversarial flat tensor ``(N, D)`` and its logits; the model is in eval mode."""
        raise NotImplementedError

    def pack(self, inputs: Batch) -> Packed:
        t = self.threat
        mods = list(t.modalities)
        first = inputs[mods[0]]
        n, device, dtype = first.shape[0], first.device, first.dtype
        slices, flats, groups, los, his, scales = [], [], [], [], [], []
        start = 0
        for gi, m in enumerate(mods):
            x = inputs[m]
            d = x[0].numel() if n else int(math.prod(x.shape[1:]))
            slices.append((m, start, start + d, tuple(x.shape[1:])))
            flats.append(x.reshape(n, d))
            groups.append(torch.full((d,), gi if t.budget == "per-modality" else 0, dtype=torch.long))
            r_lo, r_hi = t.ranges[m] or (-math.inf, math.inf)
            los.append(torch.full((d,), float(r_lo), dtype=dtype))
            his.append(torch.full((d,), float(r_hi), dtype=dtype))
            scales.append(_scale_column(t.scales[m], t.scale_axes.get(m, 0), tuple(x.shape[1:]), dtype))
            start += d
        x0 = torch.cat(flats, 1) if len(flats) > 1 else flats[0]
        scale: torch.Tensor | None = None
        if t.scaled:
            scale = torch.cat(scales).to(device)
            x0 = x0 / scale
        eps_map = t.eps_map
        if t.budget == "per-modality":
            eps = torch.tensor([eps_map[m] for m in mods], dtype=dtype, device=device)
        else:
            eps = torch.tensor([eps_map[mods[0]]], dtype=dtype, device=device)
        lo: torch.Tensor | None = None
        hi: torch.Tensor | None = None
        if any(t.ranges[m] is not None for m in mods):
            r_lo_t, r_hi_t = torch.cat(los).to(device)[None], torch.cat(his).to(device)[None]
            if scale is not None:
                r_lo_t, r_hi_t = r_lo_t / scale, r_hi_t / scale
            lo = torch.minimum(r_lo_t, x0)
            hi = torch.maximum(r_hi_t, x0)
        return Packed(dict(inputs), mods, slices, x0, torch.cat(groups).to(device), eps, lo, hi, scale)

    def forward(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        return self.model(packed.unpack(x))

    def loss_and_grad(
        self, packed: Packed, x: torch.Tensor, labels: torch.Tensor, loss_fn: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, its gradient w.r.t. ``x`` only (never the parameters), and the logits."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(packed, x)
            loss = (loss_fn or get_loss(self.loss))(logits, labels)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad, logits.detach()

    def _enforce_budget(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself when every row is within budget (up to float rounding), else a projected copy."""
        delta = x - packed.x0
        norms = packed.group_norms(delta, self.norm)
        if bool((norms <= packed.eps * (1 + 1e-6) + 1e-7).all()):
            return x
        return packed.clamp(packed.x0 + packed.project(delta, self.norm))


def _scale_column(values: tuple[float, ...], axis: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A modality's scale, one value per flattened entry of a sample of ``shape``."""
    d = int(math.prod(shape))
    if len(values) == 1:
        return torch.full((d,), values[0], dtype=dtype)
    if not 0 <= axis < len(shape) or shape[axis] != len(values):
        raise ConfigError(f"scales: {len(values)} values along axis {axis} do not fit samples of shape {shape}",
                          param="scales")  # fmt: skip
    view = [len(values) if i == axis else 1 for i in range(len(shape))]
    return torch.tensor(values, dtype=dtype).reshape(view).expand(shape).reshape(d)


def build_attack(
    name: str,
    model: nn.Module,
    meta: DatasetMeta | None = None,
    threat: ThreatModel | None = None,
    **attack_options: Any,
) -> Attack:
    """Build a registered attack by name, e.g. ``build_attack("pgd-l2", model, meta, threat, loss="cw")``.

    Instead of ``threat``, ``eps`` (with ``norm``, ``budget``, ``modalities``, ``valid_range``) may be
    given; it is parsed by :meth:`ThreatModel.parse` against ``meta``.
    """
    cls = ATTACKS.get(name)
    try:
        return cls(model, threat, meta=meta, **attack_options)
    except TypeError as exc:
        raise ConfigError(f"attack '{name}': {exc}") from None
