"""AutoAttack (Croce & Hein 2020) as an attack over a dict of modalities, registered as ``autoattack``.

``build_attack("autoattack", model, meta, eps=8/255, version="standard")`` returns an
:class:`AutoAttack`; ``attack(inputs, labels)`` returns the adversarial inputs: per sample, the
example of the first component that broke it (the clean input where none did), i.e. the
per-sample worst case over the components. The components run in order, each only on the samples
every previous component left correctly classified. :meth:`AutoAttack.detailed` returns the whole
:class:`AutoAttackResult` (clean and robust accuracy, a log per component that ran, the components
skipped and why, warnings from the reference's sanity checks); the last one is also kept in
``attack.result``. Nothing here prints.

Versions (the reference's settings, :data:`VERSION_COMPONENTS`, the one list of the components):

* ``standard``: APGD-CE, APGD-T (targeted DLR, 9 targets), FAB-T (9 targets), Square (5000 queries);
* ``plus``: APGD-CE, APGD-DLR and FAB (5 restarts each), Square, APGD-T, FAB-T;
* ``custom``: the components listed in ``attacks``.

Components that do not apply (DLR with < 3 classes, more targets than wrong classes) are skipped
and the reason is recorded in ``skipped``. Per-modality l-inf budgets ``eps={"image": 8/255,
"audio": 0.1}`` are exact: each attacked modality is divided by its eps, so the per-modality box
becomes the unit l-inf ball every component handles, and the result is mapped back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, NORMS, Attack, build_attack
from mmrobust.attacks.component import AutoAttackComponent, check_applicable
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError
from mmrobust.torchutil import eval_mode

VERSIONS = ("standard", "plus", "custom")
#: (component, restarts) per version, in the reference's order: the one list of the components
VERSION_COMPONENTS: dict[str, tuple[tuple[str, int], ...]] = {
    "standard": (("apgd-ce", 1), ("apgd-t", 1), ("fab-t", 1), ("square", 1)),
    "plus": (("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5), ("square", 1), ("apgd-t", 1), ("fab-t", 1)),
}
#: every component (the "plus" version runs them all)
COMPONENTS = tuple(sorted(name for name, _ in VERSION_COMPONENTS["plus"]))
#: the components of the standard version, in order (the autoattack suite's default components)
STANDARD_COMPONENTS = tuple(name for name, _ in VERSION_COMPONENTS["standard"])


def component_settings(name: str, *, steps: int, queries: int, restarts: int, targets: int) -> dict[str, Any]:
    """The keyword settings of component ``name``: ``queries`` for a query-based one (Square) in
    place of ``steps``, ``targets`` for the targeted ones."""
    cls = ATTACKS.get(name)
    query_based = issubclass(cls, AutoAttackComponent) and cls.query_based
    kw: dict[str, Any] = {"steps": queries if query_based else steps, "restarts": restarts}
    if issubclass(cls, AutoAttackComponent) and cls.targeted:
        kw["targets"] = targets
    return kw


#: share of correctly classified samples whose softmax is exactly one-hot above which we warn
SATURATION_THRESHOLD = 0.05


@dataclass(frozen=True)
class AutoAttackOptions:
    """Settings of one AutoAttack evaluation (validated on construction).

    ``eps`` is one float (a joint budget over ``modalities``) or, for l-inf, ``{modality: eps}``;
    ``modalities`` defaults to the keys of an eps dict, else to every modality of the model.
    ``steps`` are APGD/FAB iterations, ``queries`` Square's budget, ``targets`` the target classes
    of APGD-T/FAB-T, ``attacks`` the components of ``version="custom"`` (ignored otherwise: an
    error if given). ``batch_size`` bounds the samples attacked at once.
    """

    eps: float | Mapping[str, float]
    version: str = "standard"
    norm: str = "linf"
    modalities: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None
    steps: int = 100
    queries: int = 5000
    targets: int = 9
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(
                f"autoattack: unknown version '{self.version}'; choose from: {', '.join(VERSIONS)}", param="version"
            )
        if self.norm not in NORMS:
            raise ConfigError(f"autoattack: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}", param="norm")
        if self.version == "custom":
            if not self.attacks:
                raise ConfigError(
                    f"autoattack: version 'custom' needs attacks (from: {', '.join(COMPONENTS)})", param="attacks"
                )
            for a in self.attacks:
                if a not in COMPONENTS:
                    raise ConfigError(
                        f"autoattack: unknown component '{a}'; choose from: {', '.join(COMPONENTS)}", param="attacks"
                    )
        elif self.attacks is not None:
            raise ConfigError(
                f"autoattack: attacks apply to version 'custom' only, not '{self.version}'", param="attacks"
            )
        values = list(self.eps.values()) if isinstance(self.eps, Mapping) else [self.eps]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"autoattack: eps must be a finite number >= 0, got {v!r}", param="eps")
        if isinstance(self.eps, Mapping):
            if not self.eps:
                raise ConfigError("autoattack: eps dict is empty", param="eps")
            if self.norm != "linf" and len(set(values)) > 1:
                raise ConfigError(
                    "autoattack: per-modality budgets need norm 'linf' (l2 takes one joint eps)", param="norm"
                )
            if self.modalities is not None and set(self.modalities) != set(self.eps):
                raise ConfigError(
                    f"autoattack: modalities {list(self.modalities)} differ from the eps keys {list(self.eps)}",
                    param="modalities",
                )
        for key in ("steps", "queries", "targets", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"autoattack: {key} must be an integer >= 1, got {v!r}", param=key)

    def components(self) -> list[tuple[str, int]]:
        if self.version == "custom":
            assert self.attacks is not None
            return [(a, 1) for a in self.attacks]
        return list(VERSION_COMPONENTS[self.version])


@dataclass
class StageLog:
    """One component's line in the log: ``robust_accuracy`` is cumulative (after this component
    and all before it); ``broken`` counts the samples this component broke first, ``broken_index``
    lists them (positions in the batch)."""

    attack: str
    restarts: int
    attacked: int
    broken: int
    robust_accuracy: float
    seconds: float
    broken_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class AutoAttackResult:
    """What :meth:`AutoAttack.detailed` returns: ``robust`` marks the samples no component broke (always
    False where the clean prediction is wrong); ``adversarial`` holds, per sample, the example of
    the component that broke it (the clean input where none did)."""

    options: AutoAttackOptions
    modalities: list[str]
    eps: dict[str, float]
    clean_accuracy: float
    robust_accuracy: float
    robust: torch.Tensor
    adversarial: Batch
    stages: list[StageLog] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Rescaled(nn.Module):
    """``model`` seen in coordinates ``u_m = x_m / eps_m`` of the attacked modalities."""

    def __init__(self, model: nn.Module, scale: Mapping[str, float]) -> None:
        super().__init__()
        self.model, self.scale = model, dict(scale)

    def forward(self, inputs: Batch) -> torch.Tensor:
        return self.model({k: v * self.scale[k] if k in self.scale else v for k, v in inputs.items()})


def sanity_checks(model: nn.Module, inputs: Batch, labels: torch.Tensor) -> list[str]:
    """The reference's checks, as warnings: randomness in the forward pass, probabilities instead
    of logits, softmax saturated on many samples (CE gradients underflow: gradient masking)."""
    out: list[str] = []
    with eval_mode(model), torch.no_grad():
        a, b = model(inputs), model(inputs)
    if not torch.equal(a, b):
        out.append("the model's output differs between two identical forward passes (randomness in forward?): "
                   "AutoAttack's numbers assume a deterministic model")  # fmt: skip
    if bool((a >= 0).all()) and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-5):
        out.append("the model seems to output probabilities (rows sum to 1): attack logits, not softmax outputs")
    correct = a.argmax(1) == labels
    if bool(correct.any()):
        saturated = (torch.softmax(a[correct].float(), 1).amax(1) == 1.0).float().mean().item()
        if saturated > SATURATION_THRESHOLD:
            out.append(f"softmax saturated (exactly one-hot) on {saturated:.0%} of the correctly classified samples: "
                       "cross-entropy gradients underflow; trust the DLR/targeted and Square rows")  # fmt: skip
    return out


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """The AutoAttack protocol as an attack: ``attack(inputs, labels)`` returns the per-sample worst
    case over the components of ``version`` (see the module doc).

    Args:
        model: ``model(inputs) -> logits`` (run in eval mode).
        eps: one float (a joint budget over ``modalities``) or, for l-inf, ``{modality: eps}``.
        version: ``standard``, ``plus`` or ``custom`` (then ``attacks`` lists the components).
        steps: APGD/FAB iterations; ``queries``: Square's budget; ``targets``: target classes of
            APGD-T/FAB-T; ``batch_size``: samples attacked at once.
        modalities: the attacked modalities (default: the eps keys, else every modality of
            ``meta``, of ``model.modalities`` or, failing both, of the batch).
        meta, valid_range, seed: as for every :class:`~mmrobust.attacks.base.Attack`.
    """

    default_norm = "linf"
    losses = ("worst",)

    def __init__(
        self,
        model: nn.Module,
        eps: float | Mapping[str, float],
        *,
        version: str = "standard",
        attacks: Sequence[str] | None = None,
        norm: str | None = None,
        steps: int = 100,
        queries: int = 5000,
        targets: int = 9,
        modalities: Sequence[str] | None = None,
        meta: DatasetMeta | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        options = AutoAttackOptions(
            eps=dict(eps) if isinstance(eps, Mapping) else eps, version=version, norm=norm or self.default_norm,
            modalities=None if modalities is None else tuple(modalities),
            attacks=None if attacks is None else tuple(attacks), steps=steps, queries=queries, targets=targets,
            seed=seed, batch_size=batch_size,
        )  # fmt: skip
        self._setup(model, options, meta, valid_range)

    @classmethod
    def from_options(
        cls,
        model: nn.Module,
        options: AutoAttackOptions,
        *,
        meta: DatasetMeta | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
    ) -> AutoAttack:
        """The attack of a validated :class:`AutoAttackOptions`."""
        self = cls.__new__(cls)
        self._setup(model, options, meta, valid_range)
        return self

    def _setup(
        self,
        model: nn.Module,
        options: AutoAttackOptions,
        meta: DatasetMeta | None,
        valid_range: Mapping[str, tuple[float, float] | None] | None,
    ) -> None:
        self.model, self.options, self.meta = model, options, meta
        self.norm, self.loss, self.seed = options.norm, "worst", options.seed
        self.generator = torch.Generator().manual_seed(options.seed)
        self.range_override = dict(valid_range or {})
        #: the result of the last call (which components ran, which were skipped and why)
        self.result: AutoAttackResult | None = None
        known = meta.modality_names if meta is not None else list(getattr(model, "modalities", []))
        self.modalities, self.eps = self._budget(known)
        ranges = {s.name: s.valid_range for s in meta.modalities} if meta is not None else {}
        ranges.update(self.range_override)
        self.valid_range = {m: ranges.get(m) for m in self.modalities}
        self.budget = "per-modality" if len(set(self.eps.values())) > 1 else "joint"

    def _budget(self, known: Sequence[str]) -> tuple[list[str], dict[str, float]]:
        """The attacked modalities (possibly none yet: the batch names them) and their eps."""
        o = self.options
        mods = list(o.modalities or (o.eps if isinstance(o.eps, Mapping) else known))
        eps = {m: float(o.eps[m]) for m in mods} if isinstance(o.eps, Mapping) else dict.fromkeys(
            mods, float(o.eps))  # fmt: skip
        return mods, eps

    @property
    def components(self) -> list[str]:
        """The components of the version, in order (some may be skipped on a given model)."""
        return [name for name, _ in self.options.components()]

    def perturb(self, inputs: Batch, labels: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Adversarial inputs (the per-sample worst case over the components) and their logits."""
        res = self.detailed(inputs, labels)
        with eval_mode(self.model), torch.no_grad():
            logits = self.model(res.adversarial)
        return res.adversarial, logits.detach()

    def describe(self) -> dict[str, Any]:
        o = self.options
        eps: Any = self.eps if self.budget == "per-modality" else next(iter(self.eps.values()), o.eps)
        return {"attack": self.name, "loss": self.loss, "norm": self.norm, "modalities": list(self.modalities),
                "budget": self.budget, "eps": eps, "steps": o.steps, "version": o.version,
                "components": self.components, "queries": o.queries, "targets": o.targets}  # fmt: skip

    def detailed(self, inputs: Batch, labels: torch.Tensor) -> AutoAttackResult:
        """Run the protocol on ``(inputs, labels)``; the whole result (also kept in ``self.result``)."""
        model, options, meta = self.model, self.options, self.meta
        known = self.modalities or list(inputs)
        mods, eps = self._budget(known)
        for m in mods:
            if m not in inputs:
                raise ConfigError(f"autoattack: unknown modality '{m}'; the batch has: {', '.join(inputs)}")
        ranges = {s.name: s.valid_range for s in meta.modalities} if meta is not None else {}
        ranges.update(self.range_override)
        mods = [m for m in mods if eps[m] > 0]  # an eps of 0 leaves the modality untouched

        with eval_mode(model), torch.no_grad():
            clean_logits = model(inputs)
        num_classes = int(clean_logits.shape[1])
        robust = clean_logits.argmax(1) == labels
        n = len(labels)
        result = AutoAttackResult(options, mods, eps, float(robust.float().mean()), 0.0, robust,
                                  {k: v.clone() for k, v in inputs.items()},
                                  warnings=sanity_checks(model, inputs, labels))  # fmt: skip
        if not mods:
            result.robust_accuracy = result.clean_accuracy
            self.result = result
            return result

        # exact per-modality l-inf boxes: divide each attacked modality by its eps (a joint budget of 1)
        scale = eps if len(set(eps[m] for m in mods)) > 1 else {}
        target_model = _Rescaled(model, scale) if scale else model
        u_ranges: dict[str, tuple[float, float] | None] = {}
        for m in mods:
            r = ranges.get(m)
            s = scale.get(m, 1.0)
            u_ranges[m] = None if r is None else (r[0] / s, r[1] / s)
        attack_eps = 1.0 if scale else eps[mods[0]]
        square_broke_alone = 0

        for name, restarts in options.components():
            try:
                check_applicable(name, num_classes, options.targets)
            except ConfigError as exc:
                result.skipped.append(f"{name} skipped: {exc}")
                continue
            idx = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            broken_rows: list[torch.Tensor] = []
            kw = component_settings(
                name, steps=options.steps, queries=options.queries, restarts=restarts, targets=options.targets
            )
            attack = build_attack(name, target_model, None, eps=attack_eps, norm=options.norm, modalities=mods,
                                  valid_range=u_ranges, seed=options.seed, num_classes=num_classes, **kw)  # fmt: skip
            for chunk in idx.split(options.batch_size) if len(idx) else ():
                sub = {k: v[chunk] / scale[k] if k in scale else v[chunk] for k, v in inputs.items()}
                adv_u, logits = attack.perturb(sub, labels[chunk])
                hit = logits.argmax(1) != labels[chunk]
                rows = chunk[hit]
                for m in mods:
                    back = adv_u[m][hit] * scale[m] if scale else adv_u[m][hit]
                    # the rescaling round trip may move a coordinate by an ulp: keep the box exact
                    lo, hi = inputs[m][rows] - eps[m], inputs[m][rows] + eps[m]
                    result.adversarial[m][rows] = back.clamp(lo, hi) if options.norm == "linf" and scale else back
                robust[rows] = False
                broken_rows.append(rows)
            broken_index = torch.cat(broken_rows) if broken_rows else torch.zeros(0, dtype=torch.long)
            if name == "square":
                square_broke_alone = len(broken_index)
            result.stages.append(StageLog(name, restarts, len(idx), len(broken_index), float(robust.float().mean()),
                                          time.perf_counter() - t0, broken_index))  # fmt: skip
        if scale:
            # what we report is what the model does on the mapped-back inputs
            with eval_mode(model), torch.no_grad():
                robust &= model(result.adversarial).argmax(1) == labels
        result.robust = robust
        result.robust_accuracy = float(robust.float().mean()) if n else 0.0
        if square_broke_alone > 0 and any(s.attack != "square" for s in result.stages):
            result.warnings.append(f"Square (no gradients) broke {square_broke_alone} sample(s) every gradient attack "
                                   "before it missed: possible gradient masking")  # fmt: skip
        self.result = result
        return result


def run_autoattack(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    options: AutoAttackOptions,
    *,
    meta: DatasetMeta | None = None,
    valid_range: Mapping[str, tuple[float, float] | None] | None = None,
) -> AutoAttackResult:
    """Run the AutoAttack protocol of ``options`` on ``(inputs, labels)``: :meth:`AutoAttack.detailed`."""
    return AutoAttack.from_options(model, options, meta=meta, valid_range=valid_range).detailed(inputs, labels)
