"""The evaluation suites, by name in ``SUITES``: ``basic`` (clean + each modality missing), ``paper``
(the CRMT paper's attacks), ``curves`` (accuracy vs eps per modality) and ``autoattack`` (APGD-CE,
APGD-T, FAB-T, Square). A suite is ``suite(model, meta, split, **options) -> EvalResult``: a model,
its dataset's metadata and the samples; no run folder.

Every gradient attack runs once per loss (``ce`` and ``cw`` by default) and a third row with
``"loss": "worst"`` holds the per-sample worst case over them (a sample is broken if either loss
broke it): that is the number to trust; the gap between the two is also a gradient-masking signal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.autoattack import (
    STANDARD_COMPONENTS,
    AutoAttack,
    AutoAttackOptions,
    component_settings,
    drop_reason,
    effective_targets,
)
from mmrobust.attacks.base import Attack, build_attack
from mmrobust.attacks.losses import LOSSES
from mmrobust.attacks.missing import FILLS
from mmrobust.attacks.threat import ThreatModel, parse_eps_list
from mmrobust.attacks.threat import parse_modality_eps as _parse_modality_eps
from mmrobust.data.base import DatasetMeta, Split, chunk_rows, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.eval.metrics import accuracy, macro_f1, model_device, predict
from mmrobust.eval.results import Curves, EvalResult, EvalRow
from mmrobust.eval.robust import (
    attack_predictions,
    ce_gradient_underflow,
    masking_report,
    missing_predictions,
    result_row,
    worst_predictions,
)
from mmrobust.models.fuse import Fusion, fuse_for_split
from mmrobust.progress import ProgressFn
from mmrobust.registry import Registry
from mmrobust.torchutil import to_device

#: name -> ``suite(model, meta, split, **options) -> EvalResult``; suites compute only (no output of any kind)
SUITES: Registry[Callable[..., EvalResult]] = Registry("evaluation suite")

PAPER_EPS, PAPER_UNIMODAL_EPS = (0.5,), (1.0,)
CURVE_EPS = {"l2": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), "linf": (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)}
AUTOATTACK_EPS = {"linf": (2 / 255, 4 / 255, 8 / 255), "l2": (0.5,)}
#: the default components of the autoattack suite (the standard version's, from the one list)


def parse_eps(
    value: str | float | Sequence[float] | None, what: str = "eps", param: str | None = None
) -> list[float] | None:
    """``"2/255,4/255,0.5"`` -> ``[0.00784..., 0.01568..., 0.5]``; None stays None
    (:func:`mmrobust.attacks.threat.parse_eps_list`, the one eps validator).

    ``what`` names the value in messages (the parameter, e.g. ``unimodal_eps``), ``param`` the
    parameter the error is about (default: ``what``)."""
    return parse_eps_list(value, param or what, what)


def parse_modalities(value: str | Sequence[str] | None, known: Sequence[str]) -> list[str] | None:
    """``"audio,image"`` -> ``["audio", "image"]`` (checked against the model's modalities); None stays None."""
    if value is None:
        return None
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]
    if not names:
        raise ConfigError("modalities: no modality given", param="modalities")
    for m in names:
        if m not in known:
            raise ConfigError(
                f"modalities: unknown modality '{m}'; the model has: {', '.join(known)}", param="modalities"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"modalities: modality listed twice in {','.join(names)}", param="modalities")
    return names


def parse_modality_eps(value: Any, known: Sequence[str]) -> dict[str, float] | None:
    """``"image=8/255,audio=0.1"`` -> ``{"image": 0.0313..., "audio": 0.1}``; None where ``value``
    names no modality (:func:`mmrobust.attacks.threat.parse_modality_eps`)."""
    return _parse_modality_eps(value, known, "eps")


def _check_losses(losses: Sequence[str] | str) -> list[str]:
    names = [s.strip() for s in losses.split(",")] if isinstance(losses, str) else list(losses)
    for n in names:
        if n not in LOSSES:
            raise ConfigError(f"unknown attack loss '{n}'; choose from: {', '.join(LOSSES)}", param="losses")
    if not names:
        raise ConfigError("losses: give at least one of: " + ", ".join(LOSSES), param="losses")
    return names


class _Evaluator:
    """Runs settings on one split and turns predictions into rows (with the worst over losses)."""

    def __init__(self, model: nn.Module, meta: DatasetMeta, split: Split, batch_size: int, seed: int) -> None:
        self.model, self.meta, self.split, self.batch_size, self.seed = model, meta, split, batch_size, seed
        self.labels = split.labels
        self.k = meta.num_classes
        self.clean_preds = predict(self.model, split, batch_size)

    @cached_property
    def fusion(self) -> Fusion:
        """What the gradient attacks run on: a fused copy of the model (same function, cheaper
        passes; :func:`mmrobust.models.fuse.fuse_for_inference`), made on first use."""
        return fuse_for_split(self.model, self.split, model_device(self.model))

    def predictions(self, attack: Attack) -> torch.Tensor:
        """The model's predictions on ``attack``'s adversarial version of the split."""
        return attack_predictions(attack, self.split, self.batch_size, judge=self.model)

    def attack(self, name: str, losses: Sequence[str], threat: ThreatModel, **kw: Any) -> list[EvalRow]:
        """One row per loss plus a ``worst`` row (when there is more than one loss)."""
        rows: list[EvalRow] = []
        preds = []
        for loss in losses:
            attack = build_attack(name, self.fusion.module, self.meta, threat, loss=loss, seed=self.seed, **kw)
            p = self.predictions(attack) if _eps_positive(attack.eps) else self.clean_preds
            preds.append(p)
            rows.append(result_row(attack.describe(), p, self.labels, self.k))
        if len(preds) > 1:
            setting = {**rows[0].setting(), "loss": "worst"}
            rows.append(result_row(setting, worst_predictions(preds, self.labels), self.labels, self.k))
        return rows

    def missing(self, modalities: list[str], fill: str) -> EvalRow:
        p = missing_predictions(self.model, self.split, modalities, fill, self.batch_size)
        setting = {"attack": "missing", "loss": None, "norm": None, "modalities": modalities, "budget": None,
                   "eps": None, "steps": None, "fill": fill}  # fmt: skip
        return result_row(setting, p, self.labels, self.k)

    def finish(
        self, suite: str, rows: list[EvalRow], parameters: dict[str, Any], check_masking: bool = True
    ) -> EvalResult:
        underflow = ce_gradient_underflow(self.model, self.split, self.batch_size) if check_masking else None
        masking, warnings = masking_report(rows, underflow)
        return EvalResult(
            suite=suite, split="", clean_accuracy=accuracy(self.clean_preds, self.labels),
            clean_macro_f1=macro_f1(self.clean_preds, self.labels, self.k), rows=rows, masking=masking,
            warnings=warnings, parameters={**parameters, "samples": len(self.split)},
        )  # fmt: skip


class _Ticker:
    """Counts finished jobs of a suite and reports them to an optional :data:`ProgressFn`."""

    def __init__(self, progress: ProgressFn | None, description: str, total: int) -> None:
        self.progress, self.description, self.total, self.done = progress, description, total, 0
        self.tick(0)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.description, self.done, self.total)


def _eps_positive(eps: dict[str, float]) -> bool:
    return any(v > 0 for v in eps.values())


def _threat(
    meta: DatasetMeta, eps: Any, norm: str, modalities: Sequence[str], budget: str | None = None
) -> ThreatModel:
    return ThreatModel.parse(meta, eps=eps, norm=norm, modalities=list(modalities), budget=budget)


@SUITES.register("basic")
def basic_suite(
    model: nn.Module, meta: DatasetMeta, split: Split, *, fill: str = "zero", batch_size: int = 256, **_: Any
) -> EvalResult:
    """Clean accuracy and accuracy with each modality missing."""
    ev = _Evaluator(model, meta, split, batch_size, seed=0)
    results = [ev.missing([m], fill) for m in meta.modality_names]
    return ev.finish("basic", results, {"fill": fill}, check_masking=False)


@SUITES.register("paper")
def paper_suite(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    *,
    eps: str | Sequence[float] | None = None,
    unimodal_eps: str | Sequence[float] | None = None,
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    losses: Sequence[str] | str = ("ce", "cw"),
    fill: str = "zero",
    random_start: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressFn | None = None,
    **_: Any,
) -> EvalResult:
    """The CRMT paper's attacks: clean; FGM and l2-PGD on all modalities jointly (eps 0.5) and on each
    modality alone (eps 1.0); each modality missing. Every attack with each loss + the worst case."""
    joint = parse_eps(eps, "eps") or list(PAPER_EPS)
    uni = parse_eps(unimodal_eps, "unimodal_eps") or list(PAPER_UNIMODAL_EPS)
    loss_names = _check_losses(losses)
    if fill not in FILLS:
        raise ConfigError(f"unknown fill '{fill}'; choose from: {', '.join(FILLS)}", param="fill")
    ev = _Evaluator(model, meta, split, batch_size, seed)
    mods = meta.modality_names
    pgd = {"steps": steps, "rel_step_size": step_size, "restarts": restarts, "random_start": random_start}
    jobs: list[tuple[str, ThreatModel, dict[str, Any]]] = []
    for e in joint:
        threat = _threat(meta, e, "l2", mods, "joint")
        jobs += [("fgm", threat, {}), ("pgd-l2", threat, pgd)]
    for e in uni:
        for m in mods:
            threat = _threat(meta, e, "l2", [m], "joint")
            jobs += [("fgm", threat, {}), ("pgd-l2", threat, pgd)]
    results: list[EvalRow] = []
    ticker = _Ticker(progress, "paper suite", len(jobs) + len(mods))
    for name, threat, kw in jobs:
        results += ev.attack(name, loss_names, threat, **kw)
        ticker.tick()
    for m in mods:
        results.append(ev.missing([m], fill))
        ticker.tick()
    parameters = {"eps": joint, **_threat(meta, 0.0, "l2", mods).units_fields(), "unimodal_eps": uni,
                  "unimodal_units": {m: _threat(meta, 0.0, "l2", [m]).units[m] for m in mods},
                  "unimodal_scales": {m: _threat(meta, 0.0, "l2", [m]).units_fields()["scales"][m] for m in mods},
                  "steps": steps, "rel_step_size": step_size or 2.5 / steps, "restarts": restarts,
                  "random_start": random_start, "losses": loss_names, "fill": fill, "seed": seed}  # fmt: skip
    return ev.finish("paper", results, parameters)


@SUITES.register("curves")
def curves_suite(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    *,
    eps: str | Sequence[float] | None = None,
    norm: str = "l2",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    losses: Sequence[str] | str = ("ce", "cw"),
    random_start: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressFn | None = None,
    **_: Any,
) -> EvalResult:
    """Accuracy vs eps (PGD, each loss and the worst case) for each modality alone and all jointly
    (paper Fig. 1/4); the result's ``curves`` holds the series."""
    if norm not in CURVE_EPS:
        raise ConfigError(f"unknown norm '{norm}'; choose from: {', '.join(CURVE_EPS)}", param="norm")
    grid = sorted(set(parse_eps(eps, "eps") or list(CURVE_EPS[norm])))
    loss_names = _check_losses(losses)
    ev = _Evaluator(model, meta, split, batch_size, seed)
    mods = meta.modality_names
    targets = [[m] for m in mods] + [list(mods)]
    attack = "pgd-l2" if norm == "l2" else "pgd-linf"
    pgd = {"steps": steps, "rel_step_size": step_size, "restarts": restarts, "random_start": random_start}
    clean = accuracy(ev.clean_preds, ev.labels)
    curves: dict[str, dict[str, list[float]]] = {}
    units: dict[str, dict[str, Any]] = {}
    results: list[EvalRow] = []
    ticker = _Ticker(progress, "robustness curves", len(targets) * len(grid))
    for target in targets:
        label = "+".join(target)
        series: dict[str, list[float]] = {}
        units[label] = _threat(meta, 0.0, norm, target).units_fields()
        for e in grid:
            threat = _threat(meta, e, norm, target)
            rows = ev.attack(attack, loss_names, threat, **pgd) if e > 0 else []
            for r in rows:
                series.setdefault(str(r.loss), []).append(r.accuracy)
            if e == 0:
                for loss in [*loss_names, *(["worst"] if len(loss_names) > 1 else [])]:
                    series.setdefault(loss, []).append(clean)
            results += rows
            ticker.tick()
        curves[label] = series
    out = ev.finish("curves", results, {"norm": norm, "attack": attack, "eps": grid, "units": units,
                                        "steps": steps, "restarts": restarts,
                                        "rel_step_size": step_size or 2.5 / steps, "losses": loss_names,
                                        "seed": seed})  # fmt: skip
    return replace(out, curves=Curves(attack, norm, grid, clean, curves, units))


@SUITES.register("autoattack")
def autoattack_suite(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    *,
    eps: str | Sequence[float] | Mapping[str, float] | None = None,
    norm: str = "linf",
    steps: int = 100,
    queries: int = 5000,
    restarts: int = 1,
    targets: int | None = None,
    attacks: Sequence[str] | str = STANDARD_COMPONENTS,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressFn | None = None,
    version: str | None = None,
    modalities: str | Sequence[str] | None = None,
    **_: Any,
) -> EvalResult:
    """APGD-CE, APGD-T (targeted DLR), FAB-T and Square on all modalities jointly, each alone and
    their per-sample worst case (``"attack": "autoattack"``). The targeted components attack
    ``min(targets, K - 1)`` classes (``targets`` None: 9); components that do not apply to the
    model (DLR with < 3 classes) are dropped with a warning, and the ``autoattack`` row lists the
    components that ran and those dropped (its label then is not the full suite's).
    With ``version`` (standard / plus / custom) the AutoAttack cascade runs instead (the attack
    :class:`~mmrobust.attacks.autoattack.AutoAttack`): components in order, each on the points
    still robust, one row per component with the cumulative robust accuracy and a final
    ``autoattack`` row.

    ``modalities`` (``"image"`` or ``"audio,image"``) attacks only those modalities (default: all);
    ``eps="image=8/255,audio=0.1"`` is one per-modality l-inf setting (cascade only: needs
    ``version``), which also sets the attacked modalities. Budgets are in the units of
    :class:`~mmrobust.attacks.threat.ThreatModel` (l-inf: each modality's stored units)."""
    if norm not in AUTOATTACK_EPS:
        raise ConfigError(f"unknown norm '{norm}'; choose from: {', '.join(AUTOATTACK_EPS)}", param="norm")
    mods = parse_modalities(modalities, meta.modality_names)
    per_modality = parse_modality_eps(eps, meta.modality_names)
    if per_modality is not None:
        if version is None:
            raise ConfigError(
                "eps: per-modality budgets (name=eps) need the AutoAttack cascade: "
                "give version='standard', 'plus' or 'custom'", param="eps",
            )  # fmt: skip
        if norm != "linf":
            raise ConfigError("eps: per-modality budgets (name=eps) need norm='linf'", param="eps")
    grid_values: list[Any] = [per_modality] if per_modality is not None else (
        parse_eps(None if isinstance(eps, Mapping) else eps, "eps") or list(AUTOATTACK_EPS[norm]))  # fmt: skip
    threats = [ThreatModel.parse(meta, eps=e, norm=norm, modalities=mods) for e in grid_values]
    mods = list(threats[0].modalities)
    if targets is not None and (isinstance(targets, bool) or not isinstance(targets, int) or targets < 1):
        raise ConfigError(f"targets must be an integer >= 1, got {targets!r}", param="targets")
    if version is not None:
        custom = None if version != "custom" else tuple(
            s.strip() for s in (attacks.split(",") if isinstance(attacks, str) else attacks))  # fmt: skip
        options = AutoAttackOptions.of(threats[0], version=version, attacks=custom, steps=steps, queries=queries,
                                       targets=targets, seed=seed, batch_size=batch_size)  # fmt: skip
        return _autoattack_cascade(model, meta, split, threats, options, progress)
    names = [s.strip() for s in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    for n in names:
        if n not in STANDARD_COMPONENTS:
            raise ConfigError(
                f"unknown AutoAttack component '{n}'; choose from: {', '.join(STANDARD_COMPONENTS)}", param="attacks"
            )
    ev = _Evaluator(model, meta, split, batch_size, seed)
    used_targets = effective_targets(targets, ev.k)
    skipped: list[str] = []
    dropped: dict[str, str] = {}
    runnable = []
    for n in names:
        reason = drop_reason(n, ev.k, used_targets)
        if reason is None:
            runnable.append(n)
        else:
            skipped.append(f"{n} skipped: {reason}")
            dropped[n] = reason
    if targets is not None and used_targets < targets:
        skipped.append(f"{used_targets} target class(es) attacked, not {targets}: the model has {ev.k} classes")
    results: list[EvalRow] = []
    ticker = _Ticker(progress, "autoattack", len(threats) * len(runnable))
    for threat in threats:
        preds = []
        for n in runnable:
            kw = component_settings(n, steps=steps, queries=queries, restarts=restarts, targets=used_targets)
            attack = build_attack(n, ev.fusion.module, ev.meta, threat, seed=seed, **kw)
            p = ev.predictions(attack) if _eps_positive(threat.eps_map) else ev.clean_preds
            preds.append(p)
            desc = attack.describe()
            if n == "fab-t":
                desc["loss"] = None
            results.append(result_row(desc, p, ev.labels, ev.k))
            ticker.tick()
        if preds:
            setting = {"attack": "autoattack", "loss": "worst", "norm": norm, "modalities": mods, "budget": "joint",
                       "eps": threat.eps_value, **threat.units_fields(), "steps": steps, "components": runnable,
                       "targets": used_targets}  # fmt: skip
            if dropped:
                setting.update(dropped=dict(dropped), num_classes=ev.k)
            results.append(result_row(setting, worst_predictions(preds, ev.labels), ev.labels, ev.k))
    parameters = {"norm": norm, "eps": [t.eps_value for t in threats], **threats[0].units_fields(), "steps": steps,
                  "queries": queries, "restarts": restarts, "targets": used_targets, "targets_requested": targets,
                  "attacks": runnable, "dropped": dropped, "seed": seed}  # fmt: skip
    out = ev.finish("autoattack", results, parameters, check_masking=True)
    return replace(out, warnings=skipped + out.warnings)


def _autoattack_cascade(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    threats: Sequence[ThreatModel],
    options: AutoAttackOptions,
    progress: ProgressFn | None,
) -> EvalResult:
    """The ``version`` mode of the autoattack suite: the :class:`AutoAttack` cascade at each eps."""
    ev = _Evaluator(model, meta, split, options.batch_size, options.seed)
    mods = list(threats[0].modalities)
    results: list[EvalRow] = []
    notes: list[str] = []
    ticker = _Ticker(progress, "autoattack", len(threats))
    used_targets = effective_targets(options.targets, ev.k)
    for threat in threats:
        attack = AutoAttack.from_options(ev.model, AutoAttackOptions.of(threat, version=options.version,
                                         attacks=options.attacks, steps=options.steps, queries=options.queries,
                                         targets=options.targets, seed=options.seed, batch_size=options.batch_size),
                                         meta=ev.meta, threat=threat)  # fmt: skip
        # the cascade runs on a set at once: chunks of bounded memory (one chunk whenever the split fits)
        finals: list[torch.Tensor] = []
        stages: dict[str, list[torch.Tensor]] = {}
        dropped: dict[str, str] = {}
        start = 0
        device = model_device(ev.model)  # the attack's tensors stay on the model's device
        for inputs, labels in iterate_batches(ev.split, chunk_rows(ev.meta)):
            res = attack.detailed(to_device(inputs, device), labels.to(device))
            finals.append(predict(ev.model, Split(res.adversarial, labels.to(device)), options.batch_size))
            for stage in res.stages:
                stages.setdefault(stage.attack, []).append(stage.broken_index.cpu() + start)
            dropped.update(res.dropped)
            notes += [w for w in res.skipped + res.warnings if w not in notes]
            start += len(labels)
        final = torch.cat(finals)
        preds = ev.clean_preds.clone()
        base = {"loss": None, "norm": threat.norm, "modalities": mods, "eps": threat.eps_value,
                "budget": "per-modality" if isinstance(threat.eps_value, dict) else "joint",
                **threat.units_fields(), "steps": options.steps, "version": options.version}  # fmt: skip
        for name, parts in stages.items():  # cumulative: every sample broken so far takes its adversarial prediction
            broken_index = torch.cat(parts)
            preds[broken_index] = final[broken_index]
            results.append(result_row({**base, "attack": name, "cumulative": True, "broken": len(broken_index)},
                                      preds, ev.labels, ev.k))  # fmt: skip
        last = {**base, "attack": "autoattack", "loss": "worst", "components": list(stages), "targets": used_targets}
        if dropped:
            last.update(dropped=dropped, num_classes=ev.k)
        results.append(result_row(last, final, ev.labels, ev.k))
        ticker.tick()
    parameters = {"version": options.version, "norm": options.norm, "eps": [t.eps_value for t in threats],
                  **threats[0].units_fields(), "modalities": mods, "steps": options.steps,
                  "queries": options.queries, "targets": used_targets, "targets_requested": options.targets,
                  "attacks": list(options.attacks or []), "seed": options.seed}  # fmt: skip
    out = ev.finish("autoattack", results, parameters, check_masking=False)
    return replace(out, warnings=notes + out.warnings)
