"""The attack interface and the threat-model arithmetic shared by every gradient attack.

An attack perturbs any subset of a batch's modalities. The attacked modalities are packed into one
flat ``(N, D)`` tensor (a view per modality is unpacked for the forward pass), so norms, steps,
projections and clamps are a few vectorised ops whatever the number and shapes of modalities, and
the untouched modalities are passed through as the very same tensors (bit-identical).

Budgets: ``joint`` bounds the norm of the concatenated perturbation (``sum_m ||delta_m||^2 <= eps^2``
for l2, ``max_m ||delta_m||_inf <= eps`` for l-inf); ``per-modality`` bounds each attacked
modality's perturbation by its own eps (a float for all, or ``{modality: eps}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmrobust.attacks.losses import get_loss, margin
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError
from mmrobust.registry import Registry
from mmrobust.torchutil import eval_mode

NORMS = ("l2", "linf")
BUDGETS = ("joint", "per-modality")
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
    when no attacked modality declares a range.
    """

    inputs: Batch
    modalities: list[str]
    slices: list[tuple[str, int, int, tuple[int, ...]]]
    x0: torch.Tensor
    group: torch.Tensor
    eps: torch.Tensor
    lo: torch.Tensor | None
    hi: torch.Tensor | None

    @property
    def num_groups(self) -> int:
        return int(self.eps.shape[0])

    def unpack(self, x: torch.Tensor) -> Batch:
        out = dict(self.inputs)
        for m, start, stop, shape in self.slices:
            out[m] = x[:, start:stop].reshape(x.shape[0], *shape)
        return out

    def take(self, index: torch.Tensor) -> Packed:
        """The same packing restricted to the rows ``index`` (used to attack only unbroken samples)."""
        return Packed(
            {k: v[index] for k, v in self.inputs.items()}, self.modalities, self.slices, self.x0[index],
            self.group, self.eps,
            None if self.lo is None else self.lo[index], None if self.hi is None else self.hi[index],
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
        eps: the budget; a float, or for ``budget="per-modality"`` a dict ``{modality: eps}``.
        norm: ``"l2"`` or ``"linf"``.
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (logit margin).
        modalities: the modalities to perturb (default: all); the others stay bit-identical.
        budget: ``"joint"`` or ``"per-modality"``.
        meta: dataset metadata: validates modality names and supplies each modality's valid range.
        valid_range: ``{modality: (lo, hi)}`` overriding ``meta``; modalities without a range are
            not clamped.
        seed: seed of the attack's own random generator (random starts, random search).
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
        eps: float | Mapping[str, float],
        *,
        norm: str | None = None,
        loss: str = "ce",
        modalities: Sequence[str] | None = None,
        budget: str = "joint",
        meta: DatasetMeta | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.norm = norm or self.default_norm
        if self.norm not in NORMS:
            raise ConfigError(f"{self.name}: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}")
        if budget not in self.budgets:
            raise ConfigError(f"{self.name}: unknown budget '{budget}'; choose from: {', '.join(self.budgets)}")
        if loss not in self.losses:
            raise ConfigError(f"{self.name}: unknown loss '{loss}'; choose from: {', '.join(self.losses)}")
        self.loss = loss
        self.budget = budget
        known = meta.modality_names if meta is not None else list(getattr(model, "modalities", []))
        if modalities is None:
            modalities = list(eps) if isinstance(eps, Mapping) else known
        self.modalities = _check_modalities(list(modalities), known, self.name)
        self.eps = _check_eps(eps, self.modalities, budget, self.name)
        ranges = {s.name: s.valid_range for s in meta.modalities} if meta is not None else {}
        if valid_range is not None:
            _check_modalities(list(valid_range), known or list(valid_range), self.name)
            ranges.update(valid_range)
        self.valid_range = {m: ranges.get(m) for m in self.modalities}
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

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
        eps: Any = (
            self.eps
            if self.budget == "per-modality" and len(set(self.eps.values())) > 1
            else self.eps[self.modalities[0]]
        )
        return {"attack": self.name, "loss": self.loss, "norm": self.norm, "modalities": list(self.modalities),
                "budget": self.budget, "eps": eps}  # fmt: skip

    # --- for subclasses -----------------------------------------------------------------------
    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the adversarial flat tensor ``(N, D)`` and its logits; the model is in eval mode."""
        raise NotImplementedError

    def pack(self, inputs: Batch) -> Packed:
        first = inputs[self.modalities[0]]
        n, device, dtype = first.shape[0], first.device, first.dtype
        slices, flats, groups, los, his = [], [], [], [], []
        start = 0
        for gi, m in enumerate(self.modalities):
            x = inputs[m]
            d = x[0].numel() if n else int(math.prod(x.shape[1:]))
            slices.append((m, start, start + d, tuple(x.shape[1:])))
            flats.append(x.reshape(n, d))
            groups.append(torch.full((d,), gi if self.budget == "per-modality" else 0, dtype=torch.long))
            r_lo, r_hi = self.valid_range[m] or (-math.inf, math.inf)
            los.append(torch.full((d,), float(r_lo), dtype=dtype))
            his.append(torch.full((d,), float(r_hi), dtype=dtype))
            start += d
        x0 = torch.cat(flats, 1) if len(flats) > 1 else flats[0]
        if self.budget == "per-modality":
            eps = torch.tensor([self.eps[m] for m in self.modalities], dtype=dtype, device=device)
        else:
            eps = torch.tensor([self.eps[self.modalities[0]]], dtype=dtype, device=device)
        lo: torch.Tensor | None = None
        hi: torch.Tensor | None = None
        if any(self.valid_range[m] is not None for m in self.modalities):
            lo = torch.minimum(torch.cat(los).to(device)[None], x0)
            hi = torch.maximum(torch.cat(his).to(device)[None], x0)
        return Packed(dict(inputs), self.modalities, slices, x0, torch.cat(groups).to(device), eps, lo, hi)

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


def _check_modalities(names: list[str], known: list[str], who: str) -> list[str]:
    if not names:
        raise ConfigError(f"{who}: no modality to attack")
    if len(set(names)) != len(names):
        raise ConfigError(f"{who}: modality listed twice in {names}")
    for m in names:
        if known and m not in known:
            raise ConfigError(f"{who}: unknown modality '{m}'; the model has: {', '.join(known)}")
    return names


def _check_eps(eps: float | Mapping[str, float], modalities: list[str], budget: str, who: str) -> dict[str, float]:
    if isinstance(eps, Mapping):
        if budget == "joint" and len({float(v) for v in eps.values()}) > 1:
            raise ConfigError(f"{who}: a joint budget takes one eps, got {dict(eps)}; use budget='per-modality'")
        extra = set(eps) - set(modalities)
        if extra:
            raise ConfigError(f"{who}: eps given for modality {sorted(extra)} that is not attacked ({modalities})")
        lacking = [m for m in modalities if m not in eps]
        if lacking:
            raise ConfigError(f"{who}: no eps for attacked modality {lacking}")
        values = {m: float(eps[m]) for m in modalities}
    else:
        values = {m: float(eps) for m in modalities}
    for m, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{who}: eps must be a finite number >= 0, got {v} for '{m}'")
    return values


def build_attack(name: str, model: nn.Module, meta: DatasetMeta | None = None, **kwargs: Any) -> Attack:
    """Build a registered attack by name, e.g. ``build_attack("pgd-l2", model, meta, eps=0.5, loss="cw")``."""
    cls = ATTACKS.get(name)
    try:
        return cls(model, meta=meta, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"attack '{name}': {exc}") from None
