"""Two-stage calibration of one projection head per modality (encoders and centres stay frozen).

Stage 1 (distillation): AdamW on ``||g(f(x)) - f(x)||^2`` over clean training data, so the head
starts as (nearly) the identity and the calibrated model starts where the frozen one is.

Stage 2 (adversarial fine-tuning): every batch is attacked with APGD-CE (l-inf, budget ``eps``)
against the *current* pipeline, then one AdamW step on one of

* ``l2``:      ``||g(f(x_adv)) - g1(f(x))||^2`` with ``g1`` the frozen stage-1 head;
* ``ce``:      cross-entropy of ``cos(g(f(x_adv)), c_k) / T`` (T = ``ce_temperature``);
* ``infonce``: InfoNCE of the pairs ``(g(f(x_adv_i)), g1(f(x_i)))`` against the batch's other clean
  anchors, ``-log softmax_j(cos(a_i, t_j) / 0.07)[i]``.

Optional: ``eps_warmup`` epochs of a linear eps curriculum (``eps * epoch / (warmup + 1)``) and
``clean_weight`` times the same loss on the clean input added to the adversarial one. Every
epoch's history row records the training budget, the head's accuracy on the attack's examples and
on the clean inputs (before each step: 0 adversarial accuracy means the attack fools the current
pipeline) and the root-mean-square gradient norm of the trainable parameters.

Early stopping keeps the epoch (0 = the stage-1 head) with the best
``0.25 * clean + 0.75 * adversarial`` accuracy on the *validation* split.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.calibration.options import CalibrationOptions
from mmrobust.calibration.pipeline import BindModel, FrozenEncoder, ProjectionHead
from mmrobust.calibration.setup import CalibrationSetup, check_finite
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError

#: weights of clean and adversarial validation accuracy in the early-stopping score
CLEAN_WEIGHT, ADV_WEIGHT = 0.25, 0.75


@dataclass
class HeadResult:
    """One modality's trained head and how it got there.

    ``history`` has one row per stage-2 epoch (epoch 0 = the stage-1 head before fine-tuning) with
    the training loss and the validation accuracies; ``best_epoch`` is the one kept.
    """

    modality: str
    head: nn.Module
    stage1_loss: list[float]
    history: list[dict[str, float]]
    best_epoch: int
    trainable_parameters: int
    head_parameters: int
    encoder_parameters: int | None

    @property
    def trainable_fraction(self) -> float | None:
        """Trainable parameters over all parameters of the pipeline (None for an opaque encoder)."""
        if self.encoder_parameters is None:
            return None
        return self.trainable_parameters / (self.encoder_parameters + self.head_parameters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage1_loss": self.stage1_loss, "history": self.history, "best_epoch": self.best_epoch,
            "trainable_parameters": self.trainable_parameters, "head_parameters": self.head_parameters,
            "encoder_parameters": self.encoder_parameters, "trainable_fraction": self.trainable_fraction,
        }  # fmt: skip


@dataclass
class CalibrationResult:
    """The calibrated model (frozen encoders + the trained heads) and per-modality details."""

    options: CalibrationOptions
    model: BindModel
    heads: dict[str, HeadResult]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.options.to_dict(), "wall_time_s": self.wall_time_s,
                "heads": {m: h.to_dict() for m, h in self.heads.items()}}  # fmt: skip


def calibrate(
    setup: CalibrationSetup,
    options: CalibrationOptions | None = None,
    modalities: list[str] | None = None,
    on_epoch: Callable[[str, dict[str, float]], None] | None = None,
) -> CalibrationResult:
    """Train one head per modality (stage 1, then stage 2) and return the calibrated model.

    ``on_epoch(modality, row)`` is called after every stage-2 epoch (progress display).
    """
    options = options or CalibrationOptions()
    if options.lora_rank > 0:
        _require_peft()
    mods = modalities or setup.model.modalities
    for m in mods:
        if m not in setup.model.modalities:
            raise ConfigError(f"unknown modality '{m}'; choose from: {', '.join(setup.model.modalities)}")
    start = time.perf_counter()
    results = {m: _calibrate_modality(setup, m, options, on_epoch) for m in mods}
    model = setup.model.with_heads({m: r.head for m, r in results.items()})
    return CalibrationResult(options, model, results, time.perf_counter() - start)


def _calibrate_modality(
    setup: CalibrationSetup, m: str, opt: CalibrationOptions, on_epoch: Callable[[str, dict[str, float]], None] | None
) -> HeadResult:
    torch.manual_seed(opt.seed)
    model, train, val = setup.model, setup.data.train, setup.data.val
    z_train = _features(model, m, train.inputs[m], opt.batch_size)
    check_finite(z_train, m, "training")
    head = ProjectionHead(model.dim(m), opt.hidden)
    stage1 = distill(head, z_train, opt)
    teacher = copy.deepcopy(head).requires_grad_(False)
    with torch.no_grad():
        anchors = teacher(z_train)  # g1(f(x)): the clean targets of the l2 and infonce losses
    trainable = _with_lora(head, opt) if opt.lora_rank > 0 else head
    calibrated = model.with_heads({m: trainable})
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)

    def evaluate(epoch: int, loss: float, diagnostics: dict[str, float] | None = None) -> dict[str, float]:
        clean, adv = _val_accuracy(calibrated, setup.meta, m, val, opt)
        row = {"epoch": epoch, "train_loss": loss, "val_clean": clean, "val_adv": adv,
               "val_score": CLEAN_WEIGHT * clean + ADV_WEIGHT * adv, **(diagnostics or {})}  # fmt: skip
        if on_epoch is not None:
            on_epoch(m, row)
        return row

    history = [evaluate(0, float("nan"))]
    best_state, best_epoch, stale = copy.deepcopy(trainable.state_dict()), 0, 0
    optimiser = torch.optim.AdamW(
        [p for p in trainable.parameters() if p.requires_grad], lr=opt.lr, weight_decay=opt.weight_decay
    )
    indexed = Split({m: train.inputs[m], "index": torch.arange(len(train)).float()}, train.labels)
    centres = model.centres(m)
    for epoch in range(1, opt.epochs + 1):
        eps = epoch_eps(opt, epoch)
        attack = build_attack(opt.train_attack, calibrated.classifier(m), setup.meta, eps=eps, norm="linf",
                              modalities=[m], steps=opt.attack_steps, seed=opt.seed)  # fmt: skip
        total, count, clean_hits, adv_hits, grad_sq = 0.0, 0, 0, 0, 0.0
        for inputs, labels in iterate_batches(indexed, opt.batch_size, shuffle=True, seed=opt.seed, epoch=epoch):
            x, idx = inputs[m], inputs["index"].long()
            x_adv = attack({m: x}, labels)[m]
            with torch.no_grad():
                z_adv = model.features(m, x_adv)
            trainable.train()
            out = trainable(z_adv)
            loss = stage2_loss(opt, out, anchors[idx], labels, centres)
            if opt.clean_weight > 0:
                loss = loss + opt.clean_weight * stage2_loss(
                    opt, trainable(z_train[idx]), anchors[idx], labels, centres
                )
            with torch.no_grad():  # accuracy of the head *before* this step, on the attack's examples and clean
                adv_hits += int(((F.normalize(out, dim=1) @ centres.T).argmax(1) == labels).sum())
                clean_hits += int((model.cosine_logits(m, trainable(z_train[idx])).argmax(1) == labels).sum())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            grad_sq += sum(float(p.grad.pow(2).sum()) for p in trainable.parameters() if p.grad is not None)
            optimiser.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        steps = max(1, -(-count // opt.batch_size))
        diagnostics = {"train_eps": eps, "train_adv_acc": adv_hits / max(count, 1),
                       "train_clean_acc": clean_hits / max(count, 1), "grad_norm": (grad_sq / steps) ** 0.5}  # fmt: skip
        row = evaluate(epoch, total / max(count, 1), diagnostics)
        history.append(row)
        if row["val_score"] > history[best_epoch]["val_score"]:
            best_state, best_epoch, stale = copy.deepcopy(trainable.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= opt.patience:
                break
    trainable.load_state_dict(best_state)
    final = _merge_lora(trainable) if opt.lora_rank > 0 else trainable
    final.requires_grad_(False).eval()
    encoder = model.encoders[m]
    assert isinstance(encoder, FrozenEncoder)
    return HeadResult(
        m, final, stage1, history, best_epoch, n_trainable,
        sum(p.numel() for p in head.parameters()), encoder.num_parameters(),
    )  # fmt: skip


def epoch_eps(opt: CalibrationOptions, epoch: int) -> float:
    """The training budget of stage-2 epoch ``epoch`` (1-based): ``eps`` once the curriculum of
    ``eps_warmup`` epochs is over, growing linearly towards it before (``eps * epoch / (warmup + 1)``)."""
    return opt.eps * min(1.0, epoch / (opt.eps_warmup + 1))


def distill(head: nn.Module, z: torch.Tensor, opt: CalibrationOptions) -> list[float]:
    """Stage 1: fit ``head`` to the identity on the frozen embeddings ``z``; mean loss per epoch."""
    optimiser = torch.optim.AdamW(head.parameters(), lr=opt.stage1_lr, weight_decay=opt.weight_decay)
    losses = []
    gen = torch.Generator().manual_seed(opt.seed)
    for _ in range(opt.stage1_epochs):
        order = torch.randperm(len(z), generator=gen)
        total = 0.0
        for start in range(0, len(z), opt.batch_size):
            zb = z[order[start : start + opt.batch_size]]
            loss = (head(zb) - zb).pow(2).sum(1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(zb)
        losses.append(total / len(z))
    return losses


def stage2_loss(
    opt: CalibrationOptions, z_adv: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor
) -> torch.Tensor:
    """The stage-2 loss of a batch: adversarial embeddings ``g(f(x_adv))``, clean anchors
    ``g1(f(x))`` from the frozen stage-1 head, labels and the (normalised) class centres."""
    if opt.loss == "l2":
        return (z_adv - anchors).pow(2).sum(1).mean()
    if opt.loss == "ce":
        return F.cross_entropy(F.normalize(z_adv, dim=1) @ centres.T / opt.ce_temperature, labels)
    logits = F.normalize(z_adv, dim=1) @ F.normalize(anchors, dim=1).T / opt.infonce_temperature
    return F.cross_entropy(logits, torch.arange(len(z_adv), device=z_adv.device))


@torch.no_grad()
def _features(model: BindModel, m: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.features(m, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _val_accuracy(
    model: BindModel, meta: DatasetMeta, m: str, val: Split, opt: CalibrationOptions
) -> tuple[float, float]:
    """Clean and adversarial accuracy (under the training attack) of modality ``m`` on the validation split."""
    clf = model.classifier(m)
    attack = build_attack(opt.train_attack, clf, meta, eps=opt.eps, norm="linf", modalities=[m], steps=opt.attack_steps,
                          seed=opt.seed + 1)  # fmt: skip
    clean = adv = 0
    for inputs, labels in iterate_batches(val, 256):
        batch = {m: inputs[m]}
        with torch.no_grad():
            clean += int((clf(batch).argmax(1) == labels).sum())
        _, logits = attack.perturb(batch, labels)
        adv += int((logits.argmax(1) == labels).sum())
    return clean / len(val), adv / len(val)


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "LoRA (lora_rank > 0) needs the 'peft' package: pip install 'mmrobust[calibration]'"
        ) from None


def _with_lora(head: nn.Module, opt: CalibrationOptions) -> nn.Module:
    """``head`` with rank-r LoRA adapters on its linear layers (base weights frozen), via peft."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, mod in head.named_modules() if isinstance(mod, nn.Linear)]
    config = LoraConfig(r=opt.lora_rank, lora_alpha=opt.lora_alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(head, config)


def _merge_lora(model: Any) -> nn.Module:
    """Fold the adapters into the base weights: a plain head again (saved like any other)."""
    merged = model.merge_and_unload()
    assert isinstance(merged, nn.Module)
    return merged
