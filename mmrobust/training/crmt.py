"""CRMT (Yang et al., ICLR 2024) for any number of modalities, its variants and ablations.

Step 1 trains encoders, the orthonormal bases ``W~^(m)``, the modality weights ``a^(m)`` and the bias
with ``CE(h~(x), y) + rho * L1``; ``L1`` is the LogSumExp uni-modal margin regulariser
``mean_i log sum_m sum_{k != y} exp(s_k^(m) - s_y^(m))``. Step 2 freezes everything but ``a^(m)``
(model in eval mode, so BatchNorm statistics cannot drift) and maximises the mean Theorem 3.5 lower
bound, with the Lipschitz constants ``tau~`` estimated once after step 1. Step 2 is kept only if it
improves the validation criterion (see :func:`CRMTBase.after_training`); both results are recorded.

Methods: ``crmt-jt`` (step 1 + 2), ``crmt-at`` (step 1 on joint-l2 PGD examples), ``crmt-mix``
(step 1 on mixup batches), and the ablations ``ojt`` (orthogonal head + CE), ``crmt-step1`` (no
step 2) and ``crmt-step2`` (OJT + step 2). ``margin="normalized"`` is an option of ours, not the
paper's: it divides each uni-modal score by the feature norm, so the regulariser can no longer be
lowered by inflating features (the gradient-masking route described in docs/crmt.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mmrobust.certify.bounds import orthogonal_bound
from mmrobust.certify.lipschitz import empirical_lipschitz
from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.training.adversarial import joint_pgd_examples
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require, unwrap
from mmrobust.training.crmt_step2 import Step2Data, choose_step2, optimise_modality_weights, summarize
from mmrobust.training.mixup import mixup_batch

if TYPE_CHECKING:
    from mmrobust.training.engine import Trainer

MARGINS = ("faithful", "normalized")


# ---------------------------------------------------------------------------------------------
# losses


def margin_regulariser(
    raw_scores: dict[str, torch.Tensor],
    labels: torch.Tensor,
    labels_b: torch.Tensor | None = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """CRMT's ``L1``: ``mean_i log sum_m sum_k exp(s_k^(m) - t^(m))`` computed with ``logsumexp``.

    ``t^(m) = s_y^(m)`` and the sum runs over ``k != y``. For mixup (``labels_b`` given) the target is
    the mixed score ``t^(m) = lam * s_{y_a}^(m) + (1 - lam) * s_{y_b}^(m)`` inside the exponentials
    and the sum runs over ``k not in {y_a, y_b}``; samples with no such class (2 classes, ``y_a !=
    y_b``) have no margin term and are left out of the mean.
    """
    s = torch.stack(list(raw_scores.values()), 1)  # (N, M, K)
    idx_a = labels[:, None, None].expand(-1, s.shape[1], 1)
    target = s.gather(2, idx_a)
    excluded = F.one_hot(labels, s.shape[2]).bool()
    if labels_b is not None:
        idx_b = labels_b[:, None, None].expand(-1, s.shape[1], 1)
        target = lam * target + (1.0 - lam) * s.gather(2, idx_b)
        excluded = excluded | F.one_hot(labels_b, s.shape[2]).bool()
    diff = (s - target).masked_fill(excluded[:, None, :], float("-inf"))
    per_sample = torch.logsumexp(diff.flatten(1), dim=1)
    keep = torch.isfinite(per_sample)
    if not bool(keep.any()):
        return s.sum() * 0.0
    return per_sample[keep].mean()


def normalized_scores(
    raw_scores: dict[str, torch.Tensor], feats: dict[str, torch.Tensor], temperature: float
) -> dict[str, torch.Tensor]:
    """Ours: ``temperature * s_k^(m) / ||phi^(m)||`` — a cosine, since ``W~^(m)`` rows are orthonormal."""
    return {m: temperature * s / feats[m].norm(dim=1, keepdim=True).clamp_min(1e-6) for m, s in raw_scores.items()}


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class Step2Options(MethodOptions):
    """Step 2: only ``a^(m)`` moves; kept if it improves the validation criterion."""

    step2_epochs: int = 20
    step2_lr: float = 1e-2
    step2_optimizer: str = "adam"  # adam | sgd (the reference: sgd, lr 3e-5, wd 1e-2)
    step2_weight_decay: float = 0.0
    step2_max_acc_drop: float = 0.01  # largest validation-accuracy loss step 2 may cost
    lipschitz_samples: int = 512  # training samples for the empirical tau (0 = all)
    step2_attack_check: bool = True  # ours: also require validation CW-PGD accuracy not to drop
    step2_check_steps: int = 10

    def check(self) -> None:
        super().check()
        require(
            self.step2_optimizer in ("adam", "sgd"),
            f"option step2_optimizer='{self.step2_optimizer}' is unknown; choose from: adam, sgd",
        )
        require(self.step2_epochs >= 0 and self.step2_lr > 0, "options step2_epochs must be >= 0 and step2_lr > 0")
        require(self.step2_weight_decay >= 0, f"option step2_weight_decay must be >= 0, got {self.step2_weight_decay}")
        require(self.step2_max_acc_drop >= 0, f"option step2_max_acc_drop must be >= 0, got {self.step2_max_acc_drop}")
        require(self.lipschitz_samples >= 0, f"option lipschitz_samples must be >= 0, got {self.lipschitz_samples}")
        require(self.step2_check_steps >= 1, f"option step2_check_steps must be >= 1, got {self.step2_check_steps}")


@dataclass
class Step1Options(MethodOptions):
    """Step 1 regulariser: ``CE + rho * L1``."""

    rho: float = 2.0
    margin: str = "faithful"  # faithful (paper) | normalized (ours: scores / ||phi||, see docs/crmt.md)
    margin_temperature: float = 10.0  # only for margin=normalized

    def check(self) -> None:
        super().check()
        require(self.margin in MARGINS, f"option margin='{self.margin}' is unknown; choose from: {', '.join(MARGINS)}")
        require(self.rho >= 0, f"option rho must be >= 0, got {self.rho}")
        require(self.margin_temperature > 0, f"option margin_temperature must be > 0, got {self.margin_temperature}")


@dataclass
class Step1OnlyOptions(Step1Options):
    """CRMT step 1 alone (``lipschitz_samples`` only sizes the bound recorded after training)."""

    lipschitz_samples: int = 512

    def check(self) -> None:
        super().check()
        require(self.lipschitz_samples >= 0, f"option lipschitz_samples must be >= 0, got {self.lipschitz_samples}")


@dataclass
class CRMTOptions(Step2Options, Step1Options):
    """CRMT-JT."""


@dataclass
class CRMTATOptions(CRMTOptions):
    """CRMT-AT: step 1 on joint-l2 PGD examples (model in eval mode while attacking)."""

    at_eps: float = 0.5
    at_steps: int = 5
    at_step_size: float = 0.0  # 0 = 2.5 * eps / steps

    def check(self) -> None:
        super().check()
        require(
            self.at_eps > 0 and self.at_steps >= 1 and self.at_step_size >= 0,
            f"crmt-at needs at_eps > 0, at_steps >= 1 and at_step_size >= 0, got {self.at_eps}, {self.at_steps}, "
            f"{self.at_step_size}",
        )


@dataclass
class CRMTMixOptions(CRMTOptions):
    """CRMT-Mix: step 1 on mixup batches."""

    mix_alpha: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.mix_alpha > 0, f"mix_alpha must be > 0, got {self.mix_alpha}")


@dataclass
class OJTOptions(MethodOptions):
    """OJT has no hyper-parameters of its own (``lipschitz_samples`` only sizes the recorded bound)."""

    lipschitz_samples: int = 512

    def check(self) -> None:
        super().check()
        require(self.lipschitz_samples >= 0, f"option lipschitz_samples must be >= 0, got {self.lipschitz_samples}")


# ---------------------------------------------------------------------------------------------
# strategies


class CRMTBase(Strategy):
    """Shared by every orthogonal-head method; subclasses set ``use_margin`` / ``use_step2``."""

    head = "orthogonal"
    use_margin = True
    use_step2 = True

    # --- step 1 ---------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[Batch, torch.Tensor | None, float]:
        """Training inputs for this step; returns ``(inputs, labels_b, lam)`` (mixup sets the last two)."""
        return inputs, None, 1.0

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels_b, lam = self.prepare(model, inputs, labels, ctx)
        with parametrize.cached():  # each W~^(m) is computed once per step, not once per use
            return self._loss(model, inputs, labels, labels_b, lam)

    def _loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, labels_b: torch.Tensor | None, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs, return_all=True)
        logits = out["logits"]
        ce = F.cross_entropy(logits, labels)
        if labels_b is not None:
            ce = lam * ce + (1.0 - lam) * F.cross_entropy(logits, labels_b)
        if not self.use_margin or self.options.rho == 0:
            return ce, logits
        raw = unwrap(model).head.raw_scores(out["features"])  # type: ignore[operator]
        if self.options.margin == "normalized":
            raw = normalized_scores(raw, out["features"], self.options.margin_temperature)
        return ce + self.options.rho * margin_regulariser(raw, labels, labels_b, lam), logits

    # --- step 2 ---------------------------------------------------------------------------

    def after_training(self, trainer: Trainer) -> dict[str, Any]:
        """Estimate tau, then (if this method has a step 2) optimise ``a^(m)`` alone.

        Selection criterion (validation split only): the mean certified radius, i.e. the mean over
        validation samples of ``max(bound, 0)`` (0 when misclassified), among the states whose
        validation accuracy is at least step 1's minus ``step2_max_acc_drop``. Step 1's state is a
        candidate, so step 2 never lowers the criterion; both are recorded in ``metrics.json``.
        Step 2 itself is :func:`~mmrobust.training.crmt_step2.optimise_modality_weights`, a pure
        function of the cached scores.
        """
        model, o = trainer.model, self.options
        head = model.head
        model.eval()
        bundle = trainer.bundle
        n_tau = min(o.lipschitz_samples or len(bundle.train), len(bundle.train))
        # a seeded random subset, not the first samples: a user's folder dataset may be sorted by class
        pick = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(trainer.cfg.train.seed))
        tau = empirical_lipschitz(
            model, bundle.train.subset(pick[:n_tau]), {m: head.basis(m).detach() for m in model.modalities},  # type: ignore[operator]
            batch_size=None, device=trainer.device, memory_budget=trainer.cfg.train.memory_budget,
        )  # fmt: skip
        tau = {m: t.to(trainer.device) for m, t in tau.items()}
        val_scores, val_labels = raw_scores_of(model, bundle.val, trainer.device)
        a0 = {m: p.detach().clone() for m, p in head.a.items()}  # type: ignore[operator,union-attr]
        step1 = summarize(val_scores, a0, head.bias.detach(), val_labels, tau)
        record: dict[str, Any] = {
            "tau_estimator": f"empirical (max local gradient norm over {n_tau} random training samples)",
            "tau": {m: t.tolist() for m, t in tau.items()},
            "step1": step1,
            "modality_weights_step1": {m: v.tolist() for m, v in a0.items()},
        }
        if not self.use_step2:
            return {"crmt": record}
        # encoders and W~ are frozen and the model is in eval mode: the raw scores are constants, so
        # step 2 optimises over them directly (exactly the head's forward, far cheaper)
        train_scores, train_labels = raw_scores_of(model, trainer.train_split, trainer.device)
        data = Step2Data(train_scores, train_labels, val_scores, val_labels, a0, head.bias.detach(), tau)
        result = optimise_modality_weights(data, o, trainer.cfg.train.batch_size, trainer.cfg.train.seed)
        check = None
        if result.best_epoch and o.step2_attack_check:
            check = self._attack_check(trainer, tau, val_scores, val_labels, a0, result.best_a)
        kept, reason = choose_step2(result, check)
        final = result.best_a if kept == "step2" else a0
        with torch.no_grad():
            for m, p in head.a.items():  # type: ignore[operator,union-attr]
                p.copy_(final[m])
        selected = result.history[result.best_epoch - 1] if kept == "step2" else None
        record["step2"] = {
            "best_epoch": result.best_epoch if kept == "step2" else 0,
            "candidate_epoch": result.best_epoch,
            "selected": selected,
            "attack_check": check,
            "history": result.history,
        }
        record["kept"], record["reason"] = kept, reason
        record["modality_weights"] = {m: p.detach().tolist() for m, p in head.a.items()}  # type: ignore[operator,union-attr]
        return {"crmt": record}

    def _attack_check(
        self,
        trainer: Trainer,
        tau: dict[str, torch.Tensor],
        val_scores: dict[str, torch.Tensor],
        val_labels: torch.Tensor,
        a_step1: dict[str, torch.Tensor],
        a_step2: dict[str, torch.Tensor],
    ) -> dict[str, float] | None:
        """Validation CW-PGD accuracy of both states at eps = step 1's median certified radius.

        The bound uses an *empirical* tau (a max over data points, not an upper bound), so step 2
        can raise the estimated radius while making the model easier to attack; this check catches
        it with a real attack at the scale the certificate talks about.
        """
        from mmrobust.attacks import PGDL2
        from mmrobust.memory import input_gradient_plan

        model, head = trainer.model, trainer.model.head
        val = trainer.bundle.val
        batch_size = input_gradient_plan(model, val, trainer.cfg.train.memory_budget, trainer.device).batch_size
        bound = orthogonal_bound(val_scores, a_step1, head.bias.detach(), val_labels, tau)
        pos = bound[bound > 0]
        if not len(pos):
            return None
        eps = float(pos.median())
        accs = {}
        for name, a in (("step1", a_step1), ("step2", a_step2)):
            with torch.no_grad():
                for m, p in head.a.items():  # type: ignore[operator,union-attr]
                    p.copy_(a[m])
            attack = PGDL2(model, eps, steps=self.options.step2_check_steps, loss="cw", meta=self.meta, seed=0)
            correct = 0
            for inputs, y in iterate_batches(val, batch_size):
                inputs, y = {k: v.to(trainer.device) for k, v in inputs.items()}, y.to(trainer.device)
                # perturb returns the logits of exactly the examples it returns: no second forward
                _, logits = attack.perturb(inputs, y)
                correct += int((logits.argmax(1) == y).sum())
            accs[name] = correct / len(val)
        return {"eps": eps, **accs}


@torch.no_grad()
def raw_scores_of(
    model: nn.Module, split: Split, device: str | torch.device = "cpu", batch_size: int = 256
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Raw uni-modal scores ``s^(m) = W~^(m) phi^(m)`` of a whole split (model in eval mode)."""
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}  # type: ignore[union-attr]
    labels = []
    try:
        for inputs, y in iterate_batches(split, batch_size):
            feats = model.encode({k: v.to(device) for k, v in inputs.items()})  # type: ignore[operator]
            for m, s in model.head.raw_scores(feats).items():  # type: ignore[operator,union-attr]
                parts[m].append(s)
            labels.append(y.to(device))
    finally:
        model.train(was)
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(labels)


@METHODS.register("crmt-jt")
class CRMTJT(CRMTBase):
    """CRMT-JT: orthogonal head, CE + rho*L1 (step 1), then certified-bound step 2 on a^(m)."""

    name = "crmt-jt"
    Options = CRMTOptions


@METHODS.register("crmt-step1")
class CRMTStep1(CRMTBase):
    """Ablation: CRMT step 1 only (CE + rho*L1 on the orthogonal head), no step 2."""

    name = "crmt-step1"
    Options = Step1OnlyOptions
    use_step2 = False


@METHODS.register("crmt-step2")
class CRMTStep2(CRMTBase):
    """Ablation: OJT (orthogonal head, CE only) followed by CRMT step 2."""

    name = "crmt-step2"
    Options = Step2Options
    use_margin = False


@METHODS.register("ojt")
class OJT(CRMTBase):
    """Ablation: orthogonal head trained with CE only; no margin term, no step 2."""

    name = "ojt"
    Options = OJTOptions
    use_margin = False
    use_step2 = False


@METHODS.register("crmt-at")
class CRMTAT(CRMTBase):
    """CRMT-AT: CRMT step 1 on joint-l2 PGD adversarial examples, then step 2."""

    name = "crmt-at"
    Options = CRMTATOptions

    def prepare(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[Batch, torch.Tensor | None, float]:
        o = self.options
        return (
            joint_pgd_examples(model, inputs, labels, o.at_eps, o.at_steps, o.at_step_size, self.meta, ctx),
            None,
            1.0,
        )


@METHODS.register("crmt-mix")
class CRMTMix(CRMTBase):
    """CRMT-Mix: CRMT step 1 on mixup batches (shared lambda and permutation), then step 2."""

    name = "crmt-mix"
    Options = CRMTMixOptions

    def prepare(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[Batch, torch.Tensor | None, float]:
        return mixup_batch(inputs, labels, self.options.mix_alpha, ctx.generator)
