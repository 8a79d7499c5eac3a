"""Evaluation of a (frozen or calibrated) zero-shot model, one modality at a time.

Per modality: clean accuracy and macro precision / recall / F1; at every l-inf budget, the robust
accuracy of the AutoAttack protocol (:func:`mmrobust.attacks.autoattack.run_autoattack`: APGD-CE,
APGD-T, FAB-T, Square in that order, each on the samples the earlier ones left correct, on the
modality's valid input range; a component that does not apply to the class count is skipped and the
reason recorded), the accuracy after each component (cumulative, as AutoAttack logs it) and the
worst case's macro precision / recall / F1. Budgets are visited from the smallest: a sample broken
at a smaller budget stays broken at a larger one (its example lies inside the larger ball), so only
the samples still robust are attacked again. The mean cosine similarity between clean and
adversarial embeddings uses APGD-CE examples of *every* sample (a measure of how far the attack
moves the embedding, independent of which samples the protocol attacked). Across modalities:
class-level retrieval recall@k from each modality's queries (clean and APGD-CE-perturbed at the
largest budget) into each other modality's clean items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.attacks.autoattack import AutoAttackOptions, check_applicable, run_autoattack
from mmrobust.attacks.base import Attack, build_attack
from mmrobust.calibration.metrics import mean_cosine, recall_at_k
from mmrobust.calibration.options import EvalOptions
from mmrobust.calibration.pipeline import BindModel
from mmrobust.calibration.setup import check_finite
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.eval.metrics import accuracy, macro_precision_recall_f1

#: the attack whose examples (of every sample) feed the embedding-cosine and retrieval numbers
EMBEDDING_ATTACK = "apgd-ce"


@dataclass
class Scores:
    """Accuracy and macro precision / recall / F1 of one set of predictions."""

    accuracy: float
    precision: float
    recall: float
    f1: float

    @classmethod
    def of(cls, preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Scores:
        return cls(accuracy(preds, labels), *macro_precision_recall_f1(preds, labels, num_classes))


@dataclass
class BudgetResult:
    """One l-inf budget: the accuracy after each AutoAttack component (cumulative), the per-sample
    worst case, and the mean cosine between clean and APGD-CE embeddings."""

    eps: float
    by_attack: dict[str, float]
    worst: Scores
    embedding_cosine: float


@dataclass
class ModalityEvaluation:
    modality: str
    clean: Scores
    budgets: list[BudgetResult]
    skipped: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """Everything measured on one model; ``embeddings`` (clean, L2-normalised, per modality) and
    ``labels`` are kept for plots and are not part of :meth:`to_dict`."""

    options: EvalOptions
    modalities: dict[str, ModalityEvaluation]
    retrieval: list[dict[str, Any]]
    samples: int
    embeddings: dict[str, torch.Tensor] = field(repr=False)
    labels: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "protocol": self.options.to_dict(),
            "modalities": {
                m: {
                    "clean": vars(e.clean),
                    "budgets": [
                        {
                            "eps": b.eps,
                            "by_attack": b.by_attack,
                            "worst": vars(b.worst),
                            "embedding_cosine": b.embedding_cosine,
                        }
                        for b in e.budgets
                    ],  # fmt: skip
                    "skipped": e.skipped,
                    "warnings": e.warnings,
                }
                for m, e in self.modalities.items()
            },
            "retrieval": self.retrieval,
        }


def runnable_attacks(options: EvalOptions, num_classes: int) -> tuple[list[str], list[str]]:
    """The components that apply to ``num_classes`` and a reason for each one skipped."""
    run, skipped = [], []
    for name in options.attacks:
        try:
            check_applicable(name, num_classes, options.targets)
            run.append(name)
        except ConfigError as exc:
            skipped.append(f"{name} skipped: {exc}")
    return run, skipped


def evaluate(model: BindModel, meta: DatasetMeta, split: Split, options: EvalOptions | None = None) -> Evaluation:
    """Evaluate every modality of ``model`` on ``split`` (see the module docstring)."""
    options = options or EvalOptions()
    labels = split.labels
    k = model.num_classes
    names, skipped = runnable_attacks(options, k)
    results: dict[str, ModalityEvaluation] = {}
    clean_emb: dict[str, torch.Tensor] = {}
    adv_emb: dict[str, torch.Tensor] = {}
    for m in model.modalities:
        x = split.inputs[m]
        clf = model.classifier(m)
        z = _embed(model, m, x, options.batch_size)
        check_finite(z, m, "evaluation")
        clean_emb[m] = F.normalize(z, dim=1)
        clean_preds = model.cosine_logits(m, z).argmax(1)
        worst = clean_preds.clone()  # per sample: the prediction on its worst example so far
        warnings: list[str] = []
        budgets = []
        for eps in options.eps:
            by_attack, found = _autoattack(clf, meta, m, x, labels, worst, eps, names, options)
            warnings += [w for w in found if w not in warnings]
            embedding = build_attack(EMBEDDING_ATTACK, clf, meta, eps=eps, norm="linf", modalities=[m],
                                     steps=options.steps, seed=options.seed)  # fmt: skip
            za = F.normalize(_embed(model, m, _attack(embedding, m, x, labels, options.batch_size), options.batch_size),
                             dim=1)  # fmt: skip
            if eps == options.eps[-1]:
                adv_emb[m] = za  # retrieval under attack uses the largest budget
            budgets.append(BudgetResult(eps, by_attack, Scores.of(worst, labels, k), mean_cosine(clean_emb[m], za)))
        results[m] = ModalityEvaluation(m, Scores.of(clean_preds, labels, k), budgets, list(skipped), warnings)
    retrieval = []
    for q in model.modalities:
        for g in model.modalities:
            if q == g:
                continue
            row: dict[str, Any] = {"query": q, "gallery": g, "clean": recall_at_k(clean_emb[q], labels, clean_emb[g],
                                                                                 labels, options.retrieval_k)}  # fmt: skip
            row["adversarial"] = recall_at_k(adv_emb[q], labels, clean_emb[g], labels, options.retrieval_k)
            row["adversarial_eps"] = max(options.eps)
            retrieval.append(row)
    return Evaluation(options, results, retrieval, len(split), clean_emb, labels)


def _autoattack(
    clf: nn.Module,
    meta: DatasetMeta,
    m: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    worst: torch.Tensor,
    eps: float,
    names: list[str],
    options: EvalOptions,
) -> tuple[dict[str, float], list[str]]:
    """AutoAttack at one budget on the samples ``worst`` still gets right; updates ``worst`` in place
    with the predictions on the examples found and returns the accuracy after each component and
    the protocol's warnings."""
    n = len(labels)
    idx = (worst == labels).nonzero().squeeze(1)
    if not names or not len(idx):
        return dict.fromkeys(names, len(idx) / max(n, 1)), []
    aa = run_autoattack(
        clf, {m: x[idx]}, labels[idx],
        AutoAttackOptions(eps=eps, version="custom", attacks=tuple(names), modalities=(m,), steps=options.steps,
                          queries=options.queries, targets=options.targets, seed=options.seed,
                          batch_size=options.batch_size),
        meta=meta,
    )  # fmt: skip
    with torch.no_grad():
        adv = aa.adversarial[m]
        worst[idx] = torch.cat([clf({m: adv[i : i + options.batch_size]}).argmax(1)
                                for i in range(0, len(adv), options.batch_size)])  # fmt: skip
    # the protocol's accuracies are over the attacked subset; the rest was broken before
    by_attack = {s.attack: s.robust_accuracy * len(idx) / n for s in aa.stages}
    return by_attack, aa.warnings


@torch.no_grad()
def _embed(model: BindModel, m: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.embed(m, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _attack(attack: Attack, m: str, x: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Adversarial inputs of ``attack``, batch by batch."""
    xs = []
    for inputs, y in iterate_batches(Split({m: x}, labels), batch_size):
        xs.append(attack.perturb(inputs, y)[0][m])
    return torch.cat(xs)
