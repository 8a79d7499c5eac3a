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

* ``standard``: APGD-CE, APGD-T (targeted DLR), FAB-T, Square (5000 queries);
* ``plus``: APGD-CE, APGD-DLR and FAB (5 restarts each), Square, APGD-T, FAB-T;
* ``custom``: the components listed in ``attacks``.

Any class count: the targeted components attack ``min(targets, K - 1)`` target classes (``targets``
defaults to the reference's 9; the number used is recorded in the result), and components that do
not apply (the DLR losses need >= 3 classes) are dropped, the reason recorded in ``skipped`` and
``dropped``; a row of such a run lists the components that ran and is not labelled as the full suite.

The budget is a :class:`~mmrobust.attacks.threat.ThreatModel` (its units and scales apply as for
every attack). Per-modality l-inf budgets ``eps={"image": 8/255, "audio": 0.1}`` are exact: each
attacked modality's scale is multiplied by its eps, so the per-modality box becomes the unit joint
l-inf ball every component handles, and the packing maps the result back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, Attack
from mmrobust.attacks.component import AutoAttackComponent, check_applicable
from mmrobust.attacks.threat import NORMS, ThreatModel, parse_eps_value, parse_modality_eps
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError
from mmrobust.models.fuse import Fusion, fuse_for_inference
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
#: the reference's number of target classes of APGD-T/FAB-T (used as ``min(DEFAULT_TARGETS, K - 1)``)
DEFAULT_TARGETS = 9


def effective_targets(targets: int | None, num_classes: int) -> int:
    """The target classes the targeted components attack: ``min(targets, K - 1)`` (``targets``
    None: :data:`DEFAULT_TARGETS`); there are only ``K - 1`` wrong classes to target."""
    return max(1, min(DEFAULT_TARGETS if targets is None else targets, num_classes - 1))


def drop_reason(name: str, num_classes: int, targets: int) -> str | None:
    """Why component ``name`` does not apply to ``num_classes`` classes (None where it does)."""
    try:
        check_applicable(name, num_classes, targets)
    except ConfigError as exc:
        return str(exc)
    return None


def components_label(ran: list[str], dropped: Mapping[str, str], num_classes: int | None = None) -> str:
    """``autoattack (apgd-ce, fab-t, square; apgd-t dropped: 2 classes)``; just ``autoattack``
    where nothing was dropped."""
    if not dropped:
        return "autoattack"
    why = f"{num_classes} classes" if num_classes is not None else "does not apply"
    return f"autoattack ({', '.join(ran)}; {', '.join(dropped)} dropped: {why})"


def component_settings(name: str, *, steps: int, queries: int, restarts: int, targets: int) -> dict[str, Any]:
    """The keyword settings of component ``name``: ``queries`` for a query-based one (Square) in
    place of ``steps``, ``targets`` for the targeted ones."""
    cls = ATTACKS.get(name)
    query_based = issubclass(cls, AutoAttackComponent) and cls.query_based
    kw: dict[str, Any] = {"steps": queries if query_based else steps, "restarts": restarts}
    if issubclass(cls, AutoAttackComponent) and cls.targeted:
        kw["targets"] = targets
    if issubclass(cls, AutoAttackComponent):
        kw["early_stop"] = True  # only which samples break is reported: no work on broken ones
    return kw


#: share of correctly classified samples whose softmax is exactly one-hot above which we warn
SATURATION_THRESHOLD = 0.05


@dataclass(frozen=True)
class AutoAttackOptions:
    """Settings of one AutoAttack evaluation (validated on construction, the budget by
    :mod:`mmrobust.attacks.threat`).

    ``eps`` is one eps (a float or ``"8/255"``; a joint budget over ``modalities``) or, for l-inf,
    ``{modality: eps}`` (or ``"image=8/255,audio=0.1"``); ``modalities`` defaults to the keys of an
    eps dict, else to every modality of the model. ``steps`` are APGD/FAB iterations, ``queries``
    Square's budget, ``targets`` the target classes of APGD-T/FAB-T (None: 9; always at most
    ``K - 1``), ``attacks`` the components of ``version="custom"`` (ignored otherwise: an error if
    given). ``batch_size`` bounds the samples attacked at once. ``fuse``: the components attack a
    fused copy of the model (BatchNorm folded, channels-last weights:
    :func:`mmrobust.models.fuse.fuse_for_inference`, checked against the model's logits first);
    whether a sample is broken is always decided by the model itself.
    """

    eps: float | Mapping[str, float]
    version: str = "standard"
    norm: str = "linf"
    modalities: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None
    steps: int = 100
    queries: int = 5000
    targets: int | None = None
    seed: int = 0
    batch_size: int = 256
    fuse: bool = True

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
        per = parse_modality_eps(self.eps, None)
        if per is not None:
            object.__setattr__(self, "eps", per)
            if self.norm != "linf" and len(set(per.values())) > 1:
                raise ConfigError(
                    "autoattack: per-modality budgets need norm 'linf' (l2 takes one joint eps)", param="norm"
                )
            if self.modalities is not None and set(self.modalities) != set(per):
                raise ConfigError(
                    f"autoattack: modalities {list(self.modalities)} differ from the eps keys {list(per)}",
                    param="modalities",
                )
        else:
            object.__setattr__(self, "eps", parse_eps_value(self.eps, "eps", "autoattack"))
        if not isinstance(self.fuse, bool):
            raise ConfigError(f"autoattack: fuse must be true or false, got {self.fuse!r}", param="fuse")
        for key in ("steps", "queries", "batch_size") + (("targets",) if self.targets is not None else ()):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"autoattack: {key} must be an integer >= 1, got {v!r}", param=key)

    def components(self) -> list[tuple[str, int]]:
        if self.version == "custom":
            assert self.attacks is not None
            return [(a, 1) for a in self.attacks]
        return list(VERSION_COMPONENTS[self.version])

    def threat(
        self,
        meta: DatasetMeta | None,
        known: Sequence[str] | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
    ) -> ThreatModel:
        """The threat model of these options on ``meta`` (or on the modalities ``known``)."""
        eps: Any = self.eps
        modalities = self.modalities
        if isinstance(eps, Mapping) and len(set(eps.values())) == 1:  # one eps: a joint budget on those modalities
            modalities, eps = modalities or tuple(eps), next(iter(eps.values()))
        return ThreatModel.parse(meta, eps=eps, norm=self.norm, modalities=modalities, valid_range=valid_range,
                                 known=known)  # fmt: skip

    @classmethod
    def of(cls, threat: ThreatModel, **settings: Any) -> AutoAttackOptions:
        """The options of ``threat`` with the protocol ``settings`` (version, steps, ...)."""
        eps: Any = threat.eps_value
        return cls(eps=eps, norm=threat.norm, modalities=threat.modalities, **settings)


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
    #: the target classes the targeted components attacked (``min(targets, K - 1)``)
    targets: int | None = None
    num_classes: int | None = None
    #: the components that did not apply, and why
    dropped: dict[str, str] = field(default_factory=dict)
    threat: ThreatModel | None = None
    #: what the components attacked (:meth:`mmrobust.models.fuse.Fusion.describe`)
    fusion: str = ""

    @property
    def components(self) -> list[str]:
        """The components that ran."""
        return [s.attack for s in self.stages]

    @property
    def label(self) -> str:
        return components_label(self.components, self.dropped, self.num_classes)


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
        threat: the :class:`~mmrobust.attacks.threat.ThreatModel` (joint, or per-modality l-inf);
            an eps is accepted too (parsed with ``meta``, ``norm`` (default l-inf), ``modalities``,
            ``valid_range``; without metadata the modalities default to ``model.modalities``, else
            to the batch's).
        version: ``standard``, ``plus`` or ``custom`` (then ``attacks`` lists the components).
        steps: APGD/FAB iterations; ``queries``: Square's budget; ``targets``: target classes of
            APGD-T/FAB-T (None: 9; at most ``K - 1`` are used); ``batch_size``: samples attacked at once;
            ``fuse``: attack a fused copy of the model (see :class:`AutoAttackOptions`).
        seed: as for every :class:`~mmrobust.attacks.base.Attack`.
    """

    default_norm = "linf"
    losses = ("worst",)

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel | Any = None,
        *,
        version: str = "standard",
        attacks: Sequence[str] | None = None,
        steps: int = 100,
        queries: int = 5000,
        targets: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        fuse: bool = True,
        meta: DatasetMeta | None = None,
        eps: Any = None,
        norm: str | None = None,
        modalities: Sequence[str] | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
        budget: str | None = None,
    ) -> None:
        if eps is not None:
            if threat is not None:
                raise ConfigError("autoattack: eps given twice (as the threat and as eps)", param="eps")
            threat = eps
        settings: dict[str, Any] = {
            "version": version, "attacks": None if attacks is None else tuple(attacks), "steps": steps,
            "queries": queries, "targets": targets, "seed": seed, "batch_size": batch_size, "fuse": fuse}  # fmt: skip
        if isinstance(threat, ThreatModel):
            ThreatModel.coerce(threat, norm=norm, modalities=modalities, valid_range=valid_range, budget=budget)
            self._setup(model, AutoAttackOptions.of(threat, **settings), meta, None, threat)
            return
        if threat is None:
            raise ConfigError("autoattack: no budget given", param="eps")
        options = AutoAttackOptions(eps=threat, norm=norm or self.default_norm,
                                    modalities=None if modalities is None else tuple(modalities), **settings)  # fmt: skip
        self._setup(model, options, meta, valid_range)

    @classmethod
    def from_options(
        cls,
        model: nn.Module,
        options: AutoAttackOptions,
        *,
        meta: DatasetMeta | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
        threat: ThreatModel | None = None,
    ) -> AutoAttack:
        """The attack of a validated :class:`AutoAttackOptions` (``threat``: its budget, already parsed)."""
        self = cls.__new__(cls)
        self._setup(model, options, meta, valid_range, threat)
        return self

    def _setup(
        self,
        model: nn.Module,
        options: AutoAttackOptions,
        meta: DatasetMeta | None,
        valid_range: Mapping[str, tuple[float, float] | None] | None,
        threat: ThreatModel | None = None,
    ) -> None:
        self.model, self.options, self.meta = model, options, meta
        self.loss, self.seed = "worst", options.seed
        self.generator = torch.Generator().manual_seed(options.seed)
        self.range_override = dict(valid_range or {})
        #: the result of the last call (which components ran, which were skipped and why)
        self.result: AutoAttackResult | None = None
        known = meta.modality_names if meta is not None else list(getattr(model, "modalities", []))
        if threat is not None:
            if threat.norm != "linf" and len(set(threat.eps_map.values())) > 1:
                raise ConfigError("autoattack: per-modality budgets need norm 'linf' (l2 takes one joint eps)",
                                  param="norm")  # fmt: skip
            self.threat = threat
        elif known or options.modalities or isinstance(options.eps, Mapping):
            self.threat = options.threat(meta, known or None, self.range_override or None)
        # else: the batch names the modalities (resolved on the first call)

    def _resolve(self, inputs: Batch) -> ThreatModel:
        if not hasattr(self, "threat"):
            self.threat = self.options.threat(self.meta, list(inputs), self.range_override or None)
        for m in self.threat.modalities:
            if m not in inputs:
                raise ConfigError(f"autoattack: unknown modality '{m}'; the batch has: {', '.join(inputs)}",
                                  param="modalities")  # fmt: skip
        return self.threat

    @property
    def components(self) -> list[str]:
        """The components of the version, in order (some may be dropped on a given model)."""
        return [name for name, _ in self.options.components()]

    def perturb(self, inputs: Batch, labels: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Adversarial inputs (the per-sample worst case over the components) and their logits."""
        res = self.detailed(inputs, labels)
        with eval_mode(self.model), torch.no_grad():
            logits = self.model(res.adversarial)
        return res.adversarial, logits.detach()

    def describe(self) -> dict[str, Any]:
        o, res = self.options, self.result
        d = {**super().describe(), "steps": o.steps, "version": o.version, "queries": o.queries,
             "components": self.components if res is None else res.components,
             "targets": o.targets if res is None else res.targets, "fuse": o.fuse}  # fmt: skip
        if res is not None and res.dropped:
            d["dropped"] = dict(res.dropped)
            d["num_classes"] = res.num_classes
        return d

    def detailed(self, inputs: Batch, labels: torch.Tensor) -> AutoAttackResult:
        """Run the protocol on ``(inputs, labels)``; the whole result (also kept in ``self.result``)."""
        model, options = self.model, self.options
        threat = self._resolve(inputs)
        eps = threat.eps_map
        mods = [m for m in threat.modalities if eps[m] > 0]  # an eps of 0 leaves the modality untouched

        with eval_mode(model), torch.no_grad():
            clean_logits = model(inputs)
        num_classes = int(clean_logits.shape[1])
        targets = effective_targets(options.targets, num_classes)
        robust = clean_logits.argmax(1) == labels
        n = len(labels)
        result = AutoAttackResult(options, mods, eps, float(robust.float().mean()), 0.0, robust,
                                  {k: v.clone() for k, v in inputs.items()},
                                  warnings=sanity_checks(model, inputs, labels), targets=targets,
                                  num_classes=num_classes, threat=threat)  # fmt: skip
        if not mods:
            result.robust_accuracy = result.clean_accuracy
            self.result = result
            return result

        # exact per-modality l-inf boxes: each modality's scale times its eps (a joint budget of 1)
        per_modality = len({eps[m] for m in mods}) > 1
        if per_modality:
            component_threat = ThreatModel(
                threat.norm, "joint", 1.0, tuple(mods), {m: tuple(s * eps[m] for s in threat.scales[m]) for m in mods},
                {m: threat.units[m] for m in mods}, {m: threat.ranges[m] for m in mods},
                {m: a for m, a in threat.scale_axes.items() if m in mods})  # fmt: skip
        else:
            component_threat = ThreatModel(
                threat.norm, "joint", eps[mods[0]], tuple(mods), {m: threat.scales[m] for m in mods},
                {m: threat.units[m] for m in mods}, {m: threat.ranges[m] for m in mods},
                {m: a for m, a in threat.scale_axes.items() if m in mods})  # fmt: skip
        square_broke_alone = 0
        fusion = (
            fuse_for_inference(model, {k: v[: options.batch_size] for k, v in inputs.items()})
            if options.fuse else Fusion(model, reason="fuse off")
        )  # fmt: skip
        result.fusion = fusion.describe()

        for name, restarts in options.components():
            reason = drop_reason(name, num_classes, targets)
            if reason is not None:
                result.skipped.append(f"{name} skipped: {reason}")
                result.dropped[name] = reason
                continue
            idx = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            broken_rows: list[torch.Tensor] = []
            kw = component_settings(name, steps=options.steps, queries=options.queries, restarts=restarts,
                                    targets=targets)  # fmt: skip
            attack = ATTACKS.get(name)(fusion.module, component_threat, seed=options.seed, num_classes=num_classes,
                                       **kw)  # fmt: skip
            for chunk in idx.split(options.batch_size) if len(idx) else ():
                sub = {k: v[chunk] for k, v in inputs.items()}
                adv, logits = attack.perturb(sub, labels[chunk])
                if fusion.fused:  # broken or not: the model's own verdict, not the copy's
                    with eval_mode(model), torch.no_grad():
                        logits = model(adv)
                hit = logits.argmax(1) != labels[chunk]
                rows = chunk[hit]
                for m in mods:
                    back = adv[m][hit]
                    s = threat.scales[m]
                    if per_modality and options.norm == "linf" and len(s) == 1:
                        # the rescaling round trip may move a coordinate by an ulp: keep the box exact
                        bound = eps[m] * s[0]
                        back = back.clamp(inputs[m][rows] - bound, inputs[m][rows] + bound)
                    result.adversarial[m][rows] = back
                robust[rows] = False
                broken_rows.append(rows)
            broken_index = torch.cat(broken_rows) if broken_rows else torch.zeros(0, dtype=torch.long)
            if name == "square":
                square_broke_alone = len(broken_index)
            result.stages.append(StageLog(name, restarts, len(idx), len(broken_index), float(robust.float().mean()),
                                          time.perf_counter() - t0, broken_index))  # fmt: skip
        if per_modality or threat.scaled:
            # what we report is what the model does on the mapped-back inputs
            with eval_mode(model), torch.no_grad():
                robust &= model(result.adversarial).argmax(1) == labels
        result.robust = robust
        result.robust_accuracy = float(robust.float().mean()) if n else 0.0
        if square_broke_alone > 0 and any(s.attack != "square" for s in result.stages):
            result.warnings.append(f"Square (no gradients) broke {square_broke_alone} sample(s) every gradient attack "
                                   "before it missed: possible gradient masking")  # fmt: skip
        if options.targets is not None and targets < options.targets:
            result.warnings.append(f"{targets} target class(es) attacked, not {options.targets}: the model has "
                                   f"{num_classes} classes")  # fmt: skip
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
