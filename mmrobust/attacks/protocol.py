"""The AutoAttack protocol (Croce & Hein 2020) as a pure function over a dict of modalities.

``run_autoattack(model, inputs, labels, AutoAttackOptions(...))`` runs the components of a
version in order, each only on the samples every previous component left correctly classified
(a sample counts as broken once any component broke it), and returns an :class:`AutoAttackResult`:
the final adversarial inputs, the clean and robust accuracy, a log per component (robust accuracy
after it, samples it broke, seconds) and warnings from the reference's sanity checks. It never
prints; the CLI and the report render the result.

Versions (the reference's settings):

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mmrobust.attacks.autoattack import check_applicable
from mmrobust.attacks.base import NORMS, build_attack
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError
from mmrobust.torchutil import eval_mode

VERSIONS = ("standard", "plus", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
#: (component, restarts) per version, in the reference's order
VERSION_COMPONENTS: dict[str, tuple[tuple[str, int], ...]] = {
    "standard": (("apgd-ce", 1), ("apgd-t", 1), ("fab-t", 1), ("square", 1)),
    "plus": (("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5), ("square", 1), ("apgd-t", 1), ("fab-t", 1)),
}
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
            raise ConfigError(f"autoattack: unknown version '{self.version}'; choose from: {', '.join(VERSIONS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"autoattack: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}")
        if self.version == "custom":
            if not self.attacks:
                raise ConfigError(f"autoattack: version 'custom' needs attacks (from: {', '.join(COMPONENTS)})")
            for a in self.attacks:
                if a not in COMPONENTS:
                    raise ConfigError(f"autoattack: unknown component '{a}'; choose from: {', '.join(COMPONENTS)}")
        elif self.attacks is not None:
            raise ConfigError(f"autoattack: attacks apply to version 'custom' only, not '{self.version}'")
        values = list(self.eps.values()) if isinstance(self.eps, Mapping) else [self.eps]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"autoattack: eps must be a finite number >= 0, got {v!r}")
        if isinstance(self.eps, Mapping):
            if not self.eps:
                raise ConfigError("autoattack: eps dict is empty")
            if self.norm != "linf" and len(set(values)) > 1:
                raise ConfigError("autoattack: per-modality budgets need norm 'linf' (l2 takes one joint eps)")
            if self.modalities is not None and set(self.modalities) != set(self.eps):
                raise ConfigError(
                    f"autoattack: modalities {list(self.modalities)} differ from the eps keys {list(self.eps)}"
                )
        for key in ("steps", "queries", "targets", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"autoattack: {key} must be an integer >= 1, got {v!r}")

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
    """What :func:`run_autoattack` returns: ``robust`` marks the samples no component broke (always
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


def run_autoattack(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    options: AutoAttackOptions,
    *,
    meta: DatasetMeta | None = None,
    valid_range: Mapping[str, tuple[float, float] | None] | None = None,
) -> AutoAttackResult:
    """Run the AutoAttack protocol of ``options`` on ``(inputs, labels)`` (see the module doc)."""
    known = meta.modality_names if meta is not None else list(getattr(model, "modalities", inputs))
    mods = list(options.modalities or (options.eps if isinstance(options.eps, Mapping) else known))
    for m in mods:
        if m not in inputs:
            raise ConfigError(f"autoattack: unknown modality '{m}'; the batch has: {', '.join(inputs)}")
    eps = {m: float(options.eps[m]) for m in mods} if isinstance(options.eps, Mapping) else dict.fromkeys(
        mods, float(options.eps))  # fmt: skip
    ranges = {s.name: s.valid_range for s in meta.modalities} if meta is not None else {}
    ranges.update(valid_range or {})
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
        kw = {"steps": options.queries if name == "square" else options.steps, "restarts": restarts}
        if name in ("apgd-t", "fab-t"):
            kw["targets"] = options.targets
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
    return result
