"""Evaluation of a (frozen or calibrated) zero-shot model, one modality at a time.

Per modality: clean accuracy and macro precision / recall / F1; at every l-inf budget, the accuracy
under each AutoAttack component (APGD-CE, APGD-T, FAB-T, Square; a component that does not apply to
the class count is skipped and the reason recorded) and under their per-sample worst case, with the
worst case's macro precision / recall / F1; the mean cosine similarity between clean and adversarial
(APGD-CE) embeddings. With ``cascade`` (as AutoAttack runs), each component attacks only the samples
that the components before it, and the smaller budgets, left correctly classified: the same
worst case for far fewer attack runs, but ``by_attack`` is then cumulative. Across modalities: class-level retrieval recall@k from each modality's
queries (clean and APGD-CE-perturbed at the largest budget) into each other modality's clean items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mmrobust.attacks.autoattack import check_applicable
from mmrobust.attacks.base import Attack, build_attack
from mmrobust.calibration.metrics import mean_cosine, recall_at_k
from mmrobust.calibration.options import EvalOptions
from mmrobust.calibration.pipeline import BindModel
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.eval.metrics import accuracy, macro_precision_recall_f1
from mmrobust.eval.robust import worst_predictions

#: the component whose adversarial examples feed the embedding-cosine and retrieval numbers
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
    """One l-inf budget: accuracy per component, their per-sample worst case, and the mean cosine
    between clean and adversarial embeddings (None when APGD-CE was not run)."""

    eps: float
    by_attack: dict[str, float]
    worst: Scores
    embedding_cosine: float | None


@dataclass
class ModalityEvaluation:
    modality: str
    clean: Scores
    budgets: list[BudgetResult]
    skipped: list[str]


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
        clean_emb[m] = F.normalize(z, dim=1)
        clean_preds = model.cosine_logits(m, z).argmax(1)
        budgets = []
        carried = clean_preds  # cascade: the worst-case predictions at the previous (smaller) budget
        for eps in options.eps:
            current = carried if options.cascade else clean_preds  # worst case so far at this budget
            cosine = None
            by_attack: dict[str, float] = {}
            for name in names:
                kw: dict[str, Any] = {"steps": options.queries if name == "square" else options.steps,
                                      "restarts": options.restarts}  # fmt: skip
                if name in ("apgd-t", "fab-t"):
                    kw["targets"] = options.targets
                attack = build_attack(name, clf, meta, eps=eps, norm="linf", modalities=[m], seed=options.seed, **kw)
                if options.cascade and name != EMBEDDING_ATTACK:
                    # only the samples no earlier component (nor a smaller budget) broke: an example
                    # inside a smaller ball is inside this one, so they stay broken
                    p = current.clone()
                    idx = (current == labels).nonzero().squeeze(1)
                    if len(idx):
                        p[idx] = _attack(attack, m, x[idx], labels[idx], options.batch_size)[1]
                else:
                    x_adv, p = _attack(attack, m, x, labels, options.batch_size)
                    if name == EMBEDDING_ATTACK:
                        za = F.normalize(_embed(model, m, x_adv, options.batch_size), dim=1)
                        cosine = mean_cosine(clean_emb[m], za)
                        if eps == options.eps[-1]:
                            adv_emb[m] = za  # retrieval under attack uses the largest budget
                current = worst_predictions([current, p], labels)
                by_attack[name] = accuracy(current if options.cascade else p, labels)
            carried = current
            budgets.append(BudgetResult(eps, by_attack, Scores.of(current, labels, k), cosine))
        results[m] = ModalityEvaluation(m, Scores.of(clean_preds, labels, k), budgets, list(skipped))
    retrieval = []
    for q in model.modalities:
        for g in model.modalities:
            if q == g:
                continue
            row: dict[str, Any] = {"query": q, "gallery": g, "clean": recall_at_k(clean_emb[q], labels, clean_emb[g],
                                                                                 labels, options.retrieval_k)}  # fmt: skip
            if q in adv_emb:
                row["adversarial"] = recall_at_k(adv_emb[q], labels, clean_emb[g], labels, options.retrieval_k)
                row["adversarial_eps"] = max(options.eps)
            retrieval.append(row)
    return Evaluation(options, results, retrieval, len(split), clean_emb, labels)


@torch.no_grad()
def _embed(model: BindModel, m: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.embed(m, x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _attack(
    attack: Attack, m: str, x: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial inputs and the predictions on them, batch by batch."""
    xs, preds = [], []
    for inputs, y in iterate_batches(Split({m: x}, labels), batch_size):
        adv, logits = attack.perturb(inputs, y)
        xs.append(adv[m])
        preds.append(logits.argmax(1))
    return torch.cat(xs), torch.cat(preds)
