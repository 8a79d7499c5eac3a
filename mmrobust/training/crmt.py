"""CRMT (Yang et al., ICLR 2024) for any number of modalities, its variants and ablations.

Step 1 trains encoders, the orthonormal bases ``W~^(m)``, the modality weights ``a^(m)`` and the bias
with ``CE(h~(x), y) + rho * L1``; ``L1`` is the LogSumExp uni-modal margin regulariser
``mean_i log sum_m sum_{k != y} exp(s_k^(m) - s_y^(m))``. Step 2 freezes everything but ``a^(m)``
(model in eval mode, so BatchNorm statistics cannot drift) and maximises the mean Theorem 3.5 lower
bound, with the Lipschitz constants ``tau~`` estimated once after step 1. Step 2 is kept only if it
improves the validation criterion (see :func:`CRMTBase.after_training`); both results are recorded.

Methods: ``crmt-jt`` (step 1 + 2), ``crmt-at`` (step 1 on adversarial examples, default joint-l2 PGD), ``crmt-mix``
(step 1 on mixup batches), and the ablations ``ojt`` (orthogonal head + CE), ``crmt-step1`` (no
step 2) and ``crmt-step2`` (OJT + step 2). ``margin="normalized"`` is an option of ours, not the
paper's: it divides each uni-modal score by the feature norm, so the regulariser can no longer be
lowered by inflating features (the gradient-masking route described in docs/crmt.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mmrobust.certify.bounds import orthogonal_bound
from mmrobust.certify.lipschitz import empirical_lipschitz
from mmrobust.config import OPTIMIZERS
from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.models.fuse import fuse_for_split
from mmrobust.models.fusion import LateFusionModel, ModelConfig
from mmrobust.models.heads import ModalityWeightedHead
from mmrobust.torchutil import eval_mode, to_device
from mmrobust.training.adversarial import AdversarialOptions, AdversarialTraining
from mmrobust.training.base import METHODS, StepContext, Strategy, require, unwrap
from mmrobust.training.certified import CertifiedOptions
from mmrobust.training.context import TrainContext
from mmrobust.training.crmt_step2 import Step2Data, choose_step2, optimise_modality_weights, summarize
from mmrobust.training.mixup import mixup_batch

MARGINS = ("faithful", "normalized")
#: where step 2 takes its Lipschitz constants: the empirical estimate (the paper's) or the sound certifier's
STEP2_TAUS = ("empirical", "sound")


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
class CRMTBaseOptions(CertifiedOptions):
    """Shared by every orthogonal-head method.

    ``fit_samples``: training samples (a seeded random subset) for the empirical Lipschitz constants
    ``tau`` estimated after training (0 = all); for methods without step 2 they only size the bound
    recorded in the metrics. Renamed from ``lipschitz_samples``, still accepted as an alias for one
    release (giving both is an error).
    """

    aliases: ClassVar[dict[str, str]] = {"lipschitz_samples": "fit_samples"}

    fit_samples: int = 512

    def check(self) -> None:
        super().check()
        require(self.fit_samples >= 0, f"option fit_samples must be >= 0, got {self.fit_samples}", "fit_samples")


@dataclass
class Step2Options(CRMTBaseOptions):
    """Step 2: only ``a^(m)`` moves; kept if it improves the validation criterion."""

    step2_epochs: int = 20
    step2_lr: float = 1e-2
    step2_optimizer: str = "adam"  # adam | sgd (the reference: sgd, lr 3e-5, wd 1e-2)
    step2_weight_decay: float = 0.0
    step2_max_acc_drop: float = 0.01  # largest validation-accuracy loss step 2 may cost
    step2_attack_check: bool = True  # ours: also require validation CW-PGD accuracy not to drop
    step2_check_steps: int = 10
    #: empirical (the paper's estimate) | sound (the ``sound`` certifier's guaranteed constants: the
    #: maximised bound is then a certificate; meant for 1-Lipschitz encoders, far too loose otherwise)
    step2_tau: str = "empirical"

    def check(self) -> None:
        super().check()
        require(
            self.step2_tau in STEP2_TAUS,
            f"option step2_tau='{self.step2_tau}' is unknown; choose from: {', '.join(STEP2_TAUS)}",
            "step2_tau",
        )
        require(
            self.step2_optimizer in OPTIMIZERS,
            f"option step2_optimizer='{self.step2_optimizer}' is unknown; choose from: {', '.join(OPTIMIZERS)}",
            "step2_optimizer",
        )
        require(self.step2_epochs >= 0, f"option step2_epochs must be >= 0, got {self.step2_epochs}", "step2_epochs")
        require(self.step2_lr > 0, f"option step2_lr must be > 0, got {self.step2_lr}", "step2_lr")
        require(
            self.step2_weight_decay >= 0,
            f"option step2_weight_decay must be >= 0, got {self.step2_weight_decay}",
            "step2_weight_decay",
        )
        require(
            self.step2_max_acc_drop >= 0,
            f"option step2_max_acc_drop must be >= 0, got {self.step2_max_acc_drop}",
            "step2_max_acc_drop",
        )
        require(
            self.step2_check_steps >= 1,
            f"option step2_check_steps must be >= 1, got {self.step2_check_steps}",
            "step2_check_steps",
        )


@dataclass
class Step1Options(CRMTBaseOptions):
    """Step 1 regulariser: ``CE + rho * L1``."""

    rho: float = 2.0
    margin: str = "faithful"  # faithful (paper) | normalized (ours: scores / ||phi||, see docs/crmt.md)
    margin_temperature: float = 10.0  # only for margin=normalized

    def check(self) -> None:
        super().check()
        require(
            self.margin in MARGINS,
            f"option margin='{self.margin}' is unknown; choose from: {', '.join(MARGINS)}",
            "margin",
        )
        require(self.rho >= 0, f"option rho must be >= 0, got {self.rho}", "rho")
        require(
            self.margin_temperature > 0,
            f"option margin_temperature must be > 0, got {self.margin_temperature}",
            "margin_temperature",
        )


@dataclass
class Step1OnlyOptions(Step1Options):
    """CRMT step 1 alone (``fit_samples`` only sizes the bound recorded after training)."""


@dataclass
class CRMTOptions(Step2Options, Step1Options):
    """CRMT-JT."""


@dataclass
class CRMTATOptions(AdversarialOptions, CRMTOptions):
    """CRMT-AT: step 1 on adversarial examples of the training threat model and attack
    (:class:`~mmrobust.training.adversarial.AdversarialOptions`, shared with MMAT and VARMAT-input);
    ``at_eps``, ``at_steps`` and ``at_step_size`` are the old names of ``train_eps``, ``steps`` and
    ``step_size``."""

    aliases: ClassVar[dict[str, str]] = {
        **CRMTOptions.aliases, **AdversarialOptions.aliases,
        "at_eps": "train_eps", "at_steps": "steps", "at_step_size": "step_size",
    }  # fmt: skip


@dataclass
class CRMTMixOptions(CRMTOptions):
    """CRMT-Mix: step 1 on mixup batches."""

    mix_alpha: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.mix_alpha > 0, f"option mix_alpha must be > 0, got {self.mix_alpha}", "mix_alpha")


@dataclass
class OJTOptions(CRMTBaseOptions):
    """OJT has no hyper-parameters of its own (``fit_samples`` only sizes the recorded bound)."""


OptionsT = TypeVar("OptionsT", bound=CRMTBaseOptions)


#: heads a CRMT method trains: its own (orthogonal) or, asked for with ``model.head``, the reference code's
CRMT_HEADS = ("orthogonal", "reference-rownorm")


def orthogonal_head(model: LateFusionModel) -> ModalityWeightedHead:
    """The model's head: an :class:`~mmrobust.models.heads.OrthogonalHead` unless the run asked for the
    reference code's :class:`~mmrobust.models.heads.RowNormalizedHead` (``model.head``)."""
    head = model.head
    assert isinstance(head, ModalityWeightedHead), type(head).__name__
    return head


# ---------------------------------------------------------------------------------------------
# strategies


class CRMTBase(Strategy[OptionsT]):
    """Shared by every orthogonal-head method. What a method does follows from its ``Options``: the
    margin regulariser with :class:`Step1Options` (and ``rho > 0``), step 2 with :class:`Step2Options`."""

    head = "orthogonal"

    @classmethod
    def model_config(cls, model: ModelConfig, options: Any) -> ModelConfig:
        """The orthogonal head, or the reference code's row-normalised head when ``model.head`` names it
        (``--set model.head=reference-rownorm``); any other ``model.head`` gives the orthogonal head."""
        return dataclasses.replace(model, head=model.head if model.head in CRMT_HEADS else cls.head)

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
        o = self.options
        if not isinstance(o, Step1Options) or o.rho == 0:
            return ce, logits
        raw = orthogonal_head(unwrap(model)).raw_scores(out["features"])
        if o.margin == "normalized":
            raw = normalized_scores(raw, out["features"], o.margin_temperature)
        return ce + o.rho * margin_regulariser(raw, labels, labels_b, lam), logits

    # --- step 2 ---------------------------------------------------------------------------

    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        if isinstance(o, Step1Options) and o.rho > 0:
            ctx.on_message(
                f"{self.name}: the loss is CE + {o.rho:g} * L1, where L1 (a log-sum-exp of the uni-modal margin gaps) "
                "turns negative once the margins are large: a loss below 0 is expected"
            )

    def after_training(self, ctx: TrainContext) -> dict[str, Any]:
        """Estimate tau, then (if this method has a step 2) optimise ``a^(m)`` alone.

        Selection criterion (validation split only): the mean certified radius, i.e. the mean over
        validation samples of ``max(bound, 0)`` (0 when misclassified), among the states whose
        validation accuracy is at least step 1's minus ``step2_max_acc_drop``. Step 1's state is a
        candidate, so step 2 never lowers the criterion; both are recorded in ``metrics.json``.
        Step 2 itself is :func:`~mmrobust.training.crmt_step2.optimise_modality_weights`, a pure
        function of the cached scores.
        """
        model, o = ctx.model, self.options
        head = orthogonal_head(model)
        model.eval()
        train = ctx.train
        n_tau = min(o.fit_samples or len(train), len(train))
        # a seeded random subset, not the first samples: a user's folder dataset may be sorted by class
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.seed))
        # the gradients on the fused copy (same function, cheaper passes; mmrobust.models.fuse)
        net = fuse_for_split(model, train, ctx.device).module
        tau = empirical_lipschitz(
            net, train.subset(pick[:n_tau]), {m: head.basis(m).detach() for m in model.modalities},
            batch_size=None, device=ctx.device, memory_budget=ctx.memory_budget,
        )  # fmt: skip
        tau = {m: t.to(ctx.device) for m, t in tau.items()}
        val_scores, val_labels = raw_scores_of(model, ctx.val, ctx.device)
        a0 = {m: p.detach().clone() for m, p in head.a.items()}
        step1 = summarize(val_scores, a0, head.bias.detach(), val_labels, tau)
        record: dict[str, Any] = {
            "tau_estimator": f"empirical (max local gradient norm over {n_tau} random training samples)",
            "tau": {m: t.tolist() for m, t in tau.items()},
            "step1": step1,
            "modality_weights_step1": {m: v.tolist() for m, v in a0.items()},
        }
        if isinstance(o, Step2Options):
            if o.step2_tau == "sound":
                tau = self._sound_tau(model)
                record["step2_tau"] = {m: t.tolist() for m, t in tau.items()}
                record["step1_sound"] = summarize(val_scores, a0, head.bias.detach(), val_labels, tau)
            record.update(self._step2(ctx, o, tau, val_scores, val_labels, a0))
        return {"crmt": record}

    def _sound_tau(self, model: LateFusionModel) -> dict[str, torch.Tensor]:
        """Guaranteed per-class constants of ``W~_k^(m) phi^(m)`` (the ``sound`` certifier, Theorem 3.5 form)."""
        from mmrobust.certify.estimators import head_lipschitz

        hl = head_lipschitz(model, self.meta, "sound", theorem="3.5")
        device = next(model.parameters()).device
        return {m: t.to(device=device, dtype=torch.float32) for m, t in hl.tau.items()}

    def _step2(
        self,
        ctx: TrainContext,
        o: Step2Options,
        tau: dict[str, torch.Tensor],
        val_scores: dict[str, torch.Tensor],
        val_labels: torch.Tensor,
        a0: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """Optimise ``a^(m)`` alone, keep the better state in the model; the record's step-2 entries."""
        head = orthogonal_head(ctx.model)
        # encoders and W~ are frozen and the model is in eval mode: the raw scores are constants, so
        # step 2 optimises over them directly (exactly the head's forward, far cheaper)
        train_scores, train_labels = raw_scores_of(ctx.model, ctx.train, ctx.device)
        data = Step2Data(train_scores, train_labels, val_scores, val_labels, a0, head.bias.detach(), tau)
        result = optimise_modality_weights(data, o, ctx.batch_size, ctx.seed)
        check = None
        if result.best_epoch and o.step2_attack_check:
            check = self._attack_check(ctx, tau, val_scores, val_labels, a0, result.best_a)
        kept, reason = choose_step2(result, check)
        ctx.on_message(
            f"{self.name} step 2 (modality weights a^(m)): kept {'step 2' if kept == 'step2' else 'step 1'}: {reason}"
        )
        final = result.best_a if kept == "step2" else a0
        with torch.no_grad():
            for m, p in head.a.items():
                p.copy_(final[m])
        selected = result.history[result.best_epoch - 1] if kept == "step2" else None
        return {
            "step2": {
                "best_epoch": result.best_epoch if kept == "step2" else 0,
                "candidate_epoch": result.best_epoch,
                "selected": selected,
                "attack_check": check,
                "history": result.history,
            },
            "kept": kept,
            "reason": reason,
            "modality_weights": {m: p.detach().tolist() for m, p in head.a.items()},
        }

    def _attack_check(
        self,
        ctx: TrainContext,
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
        from mmrobust.attacks.threat import ThreatModel
        from mmrobust.memory import input_gradient_plan

        o = self.options
        assert isinstance(o, Step2Options)
        model, head, val = ctx.model, orthogonal_head(ctx.model), ctx.val
        batch_size = input_gradient_plan(model, val, ctx.memory_budget, ctx.device).batch_size
        bound = orthogonal_bound(val_scores, a_step1, head.bias.detach(), val_labels, tau)
        pos = bound[bound > 0]
        if not len(pos):
            return None
        eps = float(pos.median())
        accs = {}
        for name, a in (("step1", a_step1), ("step2", a_step2)):
            with torch.no_grad():
                for m, p in head.a.items():
                    p.copy_(a[m])
            # the attack runs on the fused copy of this state; the model judges
            net = fuse_for_split(model, val, ctx.device).module
            attack = PGDL2(net, ThreatModel.parse(self.meta, eps=eps, norm="l2", budget="joint"),
                           steps=o.step2_check_steps, loss="cw", seed=0)  # fmt: skip
            correct = 0
            for inputs, y in iterate_batches(val, batch_size):
                inputs, y = to_device(inputs, ctx.device), y.to(ctx.device)
                adv, logits = attack.perturb(inputs, y)
                if net is not model:
                    with torch.no_grad():
                        logits = model(adv)
                correct += int((logits.argmax(1) == y).sum())
            accs[name] = correct / len(val)
        return {"eps": eps, **accs}


@torch.no_grad()
def raw_scores_of(
    model: LateFusionModel, split: Split, device: str | torch.device = "cpu", batch_size: int = 256
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Raw uni-modal scores ``s^(m) = W~^(m) phi^(m)`` of a whole split (model in eval mode)."""
    head = orthogonal_head(model)
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    labels = []
    with eval_mode(model):
        for inputs, y in iterate_batches(split, batch_size):
            feats = model.encode(to_device(inputs, device))
            for m, s in head.raw_scores(feats).items():
                parts[m].append(s)
            labels.append(y.to(device))
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(labels)


@METHODS.register("crmt-jt")
class CRMTJT(CRMTBase[CRMTOptions]):
    """CRMT-JT: orthogonal head, CE + rho*L1 (step 1), then certified-bound step 2 on a^(m)."""

    Options = CRMTOptions


@METHODS.register("crmt-step1")
class CRMTStep1(CRMTBase[Step1OnlyOptions]):
    """Ablation: CRMT step 1 only (CE + rho*L1 on the orthogonal head), no step 2."""

    Options = Step1OnlyOptions


@METHODS.register("crmt-step2")
class CRMTStep2(CRMTBase[Step2Options]):
    """Ablation: OJT (orthogonal head, CE only) followed by CRMT step 2."""

    Options = Step2Options


@METHODS.register("ojt")
class OJT(CRMTBase[OJTOptions]):
    """Ablation: orthogonal head trained with CE only; no margin term, no step 2."""

    Options = OJTOptions


@METHODS.register("crmt-at")
class CRMTAT(AdversarialTraining, CRMTBase[CRMTATOptions]):
    """CRMT-AT: CRMT step 1 on adversarial examples (default joint-l2 PGD), then step 2."""

    Options = CRMTATOptions

    def prepare(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[Batch, torch.Tensor | None, float]:
        return self.adversarial_examples(model, inputs, labels, ctx), None, 1.0


@METHODS.register("crmt-mix")
class CRMTMix(CRMTBase[CRMTMixOptions]):
    """CRMT-Mix: CRMT step 1 on mixup batches (shared lambda and permutation), then step 2."""

    Options = CRMTMixOptions

    def prepare(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[Batch, torch.Tensor | None, float]:
        return mixup_batch(inputs, labels, self.options.mix_alpha, ctx.generator)
