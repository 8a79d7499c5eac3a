"""Robust accuracy over a split, worst case over losses, and the gradient-masking detector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import Attack
from mmrobust.attacks.losses import ce_loss
from mmrobust.attacks.missing import MissingModality
from mmrobust.data.base import Split, iterate_batches
from mmrobust.eval.metrics import accuracy, macro_f1, model_device, predict
from mmrobust.eval.results import EvalRow, MaskingGap, MaskingReport, Underflow
from mmrobust.models.transform import Standardize
from mmrobust.torchutil import eval_mode, to_device

#: a CE-vs-CW accuracy gap above this on the same setting flags gradient masking
GAP_THRESHOLD = 0.05
#: a share of correctly classified samples with an exactly-zero CE input gradient above this flags it
UNDERFLOW_THRESHOLD = 0.05


def attack_predictions(
    attack: Attack,
    split: Split,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    judge: nn.Module | None = None,
) -> torch.Tensor:
    """Predicted labels on the adversarial version of every sample of ``split`` (batches on ``device``;
    None: the attacked model's). ``judge``: the model whose predictions on the adversarial inputs
    are returned (in eval mode), where the attack ran on another copy of it (e.g. a fused one);
    None (or the attacked model itself): the attack's own logits."""
    device = model_device(attack.model) if device is None else device
    preds = []
    for inputs, labels in iterate_batches(split, batch_size):
        inputs = to_device(inputs, device)
        adv, logits = attack.perturb(inputs, labels.to(device))
        if judge is not None and judge is not attack.model:
            with eval_mode(judge), torch.no_grad():
                logits = judge(adv)
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds)


def missing_predictions(model: nn.Module, split: Split, modalities: Sequence[str], fill: str, batch_size: int = 256,
                        device: str | torch.device | None = None) -> torch.Tensor:  # fmt: skip
    """Predicted labels with ``modalities`` replaced by ``fill`` (defined in the model's standardised
    space, see :class:`~mmrobust.attacks.missing.MissingModality`)."""
    transforms = getattr(model, "transforms", None) or {}
    scales = {m: (t.mean, t.std) for m, t in transforms.items() if isinstance(t, Standardize)}
    return predict(
        model,
        split,
        batch_size,
        device=device,
        transform=MissingModality(list(modalities), fill, standardization=scales),
    )


def result_row(setting: Mapping[str, Any], preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> EvalRow:
    """One result row: the setting (an attack's ``describe()``) plus accuracy and macro-F1."""
    return EvalRow.from_setting(setting, accuracy(preds, labels), macro_f1(preds, labels, num_classes))


def worst_predictions(preds: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per-sample worst case over several attacks: a wrong prediction wherever any attack found one."""
    worst = preds[0].clone()
    for p in preds[1:]:
        fooled = p != labels
        worst = torch.where((worst == labels) & fooled, p, worst)
    return worst


def ce_gradient_underflow(
    model: nn.Module, split: Split, batch_size: int = 256, device: str | torch.device | None = None
) -> Underflow:
    """Share of correctly classified samples whose CE input gradient (all modalities) is exactly 0.

    With logits of magnitude ~1000 the softmax saturates to exactly one-hot in float32, CE and its
    gradient underflow to zero, and a CE attack cannot move the sample: the model looks robust
    while a margin (CW) attack may still break it.
    """
    device = model_device(model) if device is None else device
    n_correct = n_zero = 0
    top = []
    with eval_mode(model):
        for inputs, labels in iterate_batches(split, batch_size):
            inputs = {k: v.detach().requires_grad_(True) for k, v in to_device(inputs, device).items()}
            labels = labels.to(device)
            with torch.enable_grad():
                logits = model(inputs)
                grads = torch.autograd.grad(ce_loss(logits, labels).sum(), list(inputs.values()))
            sq = torch.stack([g.detach().flatten(1).pow(2).sum(1) for g in grads]).sum(0)
            correct = logits.argmax(1) == labels
            n_correct += int(correct.sum())
            n_zero += int((correct & (sq == 0)).sum())
            top.append(logits.detach().abs().amax(1).cpu())
    median = float(torch.cat(top).median()) if top else None
    return Underflow(n_zero / n_correct if n_correct else 0.0, n_zero, n_correct, median)


def masking_report(rows: Sequence[EvalRow], underflow: Underflow | None) -> tuple[MaskingReport, list[str]]:
    """Both gradient-masking signals, as a :class:`MaskingReport` plus human-readable warnings."""
    warnings: list[str] = []
    gaps = []
    by_setting: dict[tuple, tuple[EvalRow, dict[str, float]]] = {}
    for r in rows:
        if r.loss in ("ce", "cw"):
            by_setting.setdefault(r.key, (r, {}))[1][r.loss] = r.accuracy
    for first, accs in by_setting.values():
        if "ce" in accs and "cw" in accs:
            gap = round(accs["ce"] - accs["cw"], 6)  # accuracies are float32 counts: no spurious 0.0500001
            gaps.append(MaskingGap(first.label, accs["ce"], accs["cw"], gap, is_masking_gap(gap, first.steps)))
    flagged = [g for g in gaps if g.flagged]
    if flagged:
        worst = max(flagged, key=lambda g: g.gap)
        warnings.append(
            f"gradient masking suspected: CE attacks report up to {worst.gap:.3f} higher accuracy than CW "
            f"({worst.setting}: CE {worst.ce:.3f} vs CW {worst.cw:.3f}; {len(flagged)} iterative setting(s) with a "
            f"gap > {GAP_THRESHOLD}); the CE numbers overstate robustness — read the worst-case column"
        )
    if underflow is not None and underflow.share > UNDERFLOW_THRESHOLD:
        warnings.append(
            f"gradient masking suspected: the CE input gradient is exactly 0 (softmax saturated) for "
            f"{underflow.share:.1%} of correctly classified samples ({underflow.zero_gradient}/{underflow.correct}; "
            f"median max |logit| {underflow.median_max_abs_logit:.1f}); CE-based attacks cannot move them"
        )
    return MaskingReport(bool(warnings), underflow, gaps, GAP_THRESHOLD, UNDERFLOW_THRESHOLD), warnings


def is_masking_gap(gap: float | None, steps: int | None) -> bool:
    """A CE-vs-CW gap counts only for iterative attacks: one FGM step legitimately differs by loss,
    while two converged PGD runs should agree unless CE's gradient is masked."""
    return gap is not None and round(gap, 6) > GAP_THRESHOLD and (steps or 1) > 1
