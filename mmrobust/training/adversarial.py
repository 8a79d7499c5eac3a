"""Training examples of the adversarial-training methods (CRMT-AT, MMAT, VARMAT-input): one option
set, one threat model, five training attacks, and the catastrophic-overfitting guard.

The budget is ``train_eps`` in every method (``eps`` for MMAT/VARMAT-input and ``at_eps`` for
CRMT-AT are accepted as its old names) with ``train_norm`` (``l2`` | ``linf``) and ``train_budget``
(``joint`` | ``per-modality``), parsed once into a :class:`~mmrobust.attacks.threat.ThreatModel`
(its units: a joint l2 eps is measured on ``x_m / std_m``, an l-inf eps in each modality's stored
units, a per-modality eps is the same eps for every modality). ``train_attack`` picks how the
examples are found inside that ball (``alpha``: the step, a multiple of eps unless ``step_size``):

* ``pgd`` (default): ``steps`` PGD steps of ``2.5 eps / steps`` from a random start, the worst
  iterate kept (Madry et al. 2018);
* ``fgsm-rs``: a uniform random start in the ball, one normalised-gradient (sign for l-inf) step of
  ``1.25 eps``, projected onto the ball (Wong et al. 2020);
* ``n-fgsm``: noise from the ball of ``noise * eps`` (2 eps), one step of ``eps`` from the noisy
  point (de Jorge et al. 2022). The paper does not project, so its examples lie up to ``3 eps``
  (l-inf) from the clean input; ours are projected back onto the requested ``train_eps`` ball, so
  every training example obeys the threat model the run states (for the paper's effective radius,
  ask for it as ``train_eps``);
* ``free``: each minibatch is replayed ``replays`` (m) times; the perturbation is carried over
  from one replay (and minibatch) to the next and moved by ``eps`` along the input gradient of the
  very backward pass that updates the weights (Shafahi et al. 2019), so an example costs one
  forward/backward. The epoch count is divided by m (at least 1) so that the number of minibatch
  passes matches the other attacks; ``metrics.json`` records it;
* ``fgsm``: one step of ``eps`` from the clean input, no random start. It is known to overfit
  catastrophically at large budgets and is here to show the guard at work, not to be used.

Every example is projected onto the ball and clamped to the valid range of each modality. The
attacks (except ``free``, whose perturbation comes from the training pass itself) run the model in
eval mode (BatchNorm statistics untouched); their seeds follow the step, so a run is reproducible.

The guard (:mod:`mmrobust.training.guard`, option ``guard``; on by default for the single-step
attacks) measures multi-step and single-step robust accuracy on a fixed validation subset after each
epoch, reports a collapse, and makes the engine keep the epoch of the best multi-step robust accuracy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmrobust.attacks.base import Attack, Packed
from mmrobust.attacks.threat import BUDGETS, NORMS, ThreatModel
from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.torchutil import eval_mode
from mmrobust.training.base import MethodOptions, StepContext, require
from mmrobust.training.context import TrainContext
from mmrobust.training.guard import ROBUST, CollapseGuard

#: the training attacks, see the module docstring
TRAIN_ATTACKS = ("pgd", "fgsm-rs", "n-fgsm", "free", "fgsm")
#: attacks that take one gradient per example (the guard is on by default for them)
SINGLE_STEP = ("fgsm-rs", "n-fgsm", "free", "fgsm")
#: default step of each single-step attack, in units of eps
DEFAULT_STEP = {"fgsm-rs": 1.25, "n-fgsm": 1.0, "free": 1.0, "fgsm": 1.0}


@dataclass
class AdversarialOptions(MethodOptions):
    """Threat model (``train_eps``, ``train_norm``, ``train_budget``), training attack and guard.

    ``steps``/``step_size``: PGD steps and step (0 = the attack's default, see the module docstring;
    ``step_size`` is in the budget's units). ``replays``: m of ``free``. ``noise``: the noise radius
    of ``n-fgsm`` in units of eps. ``guard``: the catastrophic-overfitting guard (None = on for the
    single-step attacks, off for ``pgd``), measured on ``guard_samples`` validation samples with a
    ``guard_steps``-step PGD (CE and CW); a collapse is a drop of more than ``guard_drop`` below the
    best multi-step robust accuracy while the single-step accuracy rises.
    """

    aliases: ClassVar[dict[str, str]] = {"eps": "train_eps"}

    train_eps: float = 0.5
    train_norm: str = "l2"
    train_budget: str = "joint"
    train_attack: str = "pgd"
    steps: int = 5
    step_size: float = 0.0
    replays: int = 4
    noise: float = 2.0
    guard: bool | None = None
    guard_samples: int = 128
    guard_steps: int = 10
    guard_drop: float = 0.10

    def check(self) -> None:
        super().check()
        require(self.train_eps > 0, f"option train_eps must be > 0, got {self.train_eps}", "train_eps")
        require(self.train_norm in NORMS,
                f"option train_norm='{self.train_norm}' is unknown; choose from: {', '.join(NORMS)}", "train_norm")  # fmt: skip
        require(self.train_budget in BUDGETS,
                f"option train_budget='{self.train_budget}' is unknown; choose from: {', '.join(BUDGETS)}",
                "train_budget")  # fmt: skip
        require(self.train_attack in TRAIN_ATTACKS,
                f"option train_attack='{self.train_attack}' is unknown; choose from: {', '.join(TRAIN_ATTACKS)}",
                "train_attack")  # fmt: skip
        require(self.steps >= 1, f"option steps must be >= 1, got {self.steps}", "steps")
        require(self.step_size >= 0,
                f"option step_size must be >= 0 (0 = the attack's default step), got {self.step_size}", "step_size")  # fmt: skip
        require(self.replays >= 1, f"option replays must be >= 1, got {self.replays}", "replays")
        require(self.noise >= 0, f"option noise must be >= 0, got {self.noise}", "noise")
        require(self.guard_samples >= 1, f"option guard_samples must be >= 1, got {self.guard_samples}",
                "guard_samples")  # fmt: skip
        require(self.guard_steps >= 1, f"option guard_steps must be >= 1, got {self.guard_steps}", "guard_steps")
        require(0 < self.guard_drop < 1, f"option guard_drop must be in (0, 1), got {self.guard_drop}", "guard_drop")

    @property
    def guard_on(self) -> bool:
        """Whether the guard runs (``guard``, or by default: on for the single-step attacks)."""
        return self.train_attack in SINGLE_STEP if self.guard is None else bool(self.guard)

    def threat(self, meta: DatasetMeta) -> ThreatModel:
        """The training threat model on ``meta`` (every modality attacked)."""
        return ThreatModel.parse(meta, eps=self.train_eps, norm=self.train_norm, budget=self.train_budget)


def _alpha(packed: Packed, rel: float) -> torch.Tensor:
    """The step per column: ``rel * eps`` of each column's budget group."""
    return packed.expand(packed.eps * rel)


def single_step_examples(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, threat: ThreatModel, attack: str,
    rel_step: float, noise: float, seed: int,
) -> Batch:  # fmt: skip
    """One-gradient CE-maximising examples of ``attack`` (``fgsm``, ``fgsm-rs``, ``n-fgsm``) inside
    ``threat``, with a step of ``rel_step * eps``; detached, in eval mode (see module docstring)."""
    packer = Attack(model, threat, seed=seed)
    packed = packer.pack(inputs)
    norm = threat.norm
    if attack == "fgsm":
        start = torch.zeros_like(packed.x0)
    elif attack == "fgsm-rs":
        start = packed.random_start(norm, packer.generator)  # l-inf: uniform in the box
    else:  # n-fgsm: noise from the ball of noise * eps, not projected before the step
        start = dataclasses.replace(packed, eps=packed.eps * noise).random_start(norm, packer.generator)
    with eval_mode(model):
        x = packed.clamp(packed.x0 + start)
        _, grad, _ = packer.loss_and_grad(packed, x, labels)
        x = packed.step_to(x - packed.x0 + _alpha(packed, rel_step) * packed.normalize(grad, norm), norm)
    return {k: v.detach() for k, v in packed.unpack(x).items()}


def pgd_examples(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, threat: ThreatModel, steps: int, rel_step: float | None,
    seed: int,
) -> Batch:  # fmt: skip
    """CE-maximising PGD examples (random start, worst iterate) inside ``threat``, detached."""
    from mmrobust.attacks.gradient import PGD

    attack = PGD(model, threat, steps=steps, rel_step_size=rel_step, loss="ce", seed=seed)
    return {k: v.detach() for k, v in attack(inputs, labels).items()}


def joint_pgd_examples(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    meta: DatasetMeta,
    ctx: StepContext,
) -> Batch:
    """CE-maximising joint-l2 PGD examples (random start) of radius ``eps`` on ``meta``, detached
    (kept for callers of earlier versions; the methods use :class:`AdversarialTraining`)."""
    threat = ThreatModel.parse(meta, eps=eps, norm="l2", budget="joint")
    return pgd_examples(getattr(model, "module", model), inputs, labels, threat, steps, (step_size / eps) or None,
                        ctx.epoch * 100_003 + ctx.step)  # fmt: skip


class FreePerturbation:
    """The perturbation of ``free`` adversarial training, carried between replays and minibatches.

    :meth:`inputs` returns ``x0 + delta`` with ``delta`` (in the threat model's scaled, flattened
    coordinates) a leaf that the training backward pass fills with its input gradient;
    :meth:`update` then moves ``delta`` by ``alpha`` along that gradient (normalised per budget
    group, the sign for l-inf) and projects it. A minibatch of another shape starts from zero.
    """

    def __init__(self, threat: ThreatModel, rel_step: float) -> None:
        self.threat, self.rel_step = threat, rel_step
        self.delta: torch.Tensor | None = None
        self._leaf: torch.Tensor | None = None
        self._packed: Packed | None = None

    def inputs(self, model: nn.Module, inputs: Batch) -> Batch:
        packed = Attack(model, self.threat).pack(inputs)
        delta = self.delta
        if delta is None or delta.shape != packed.x0.shape or delta.device != packed.x0.device:
            delta = torch.zeros_like(packed.x0)
        x = packed.step_to(delta.to(packed.x0.dtype), self.threat.norm)  # in the ball and the valid range
        leaf = (x - packed.x0).detach().requires_grad_(True)
        self._leaf, self._packed = leaf, packed
        return packed.unpack(packed.x0 + leaf)

    def update(self) -> None:
        leaf, packed = self._leaf, self._packed
        self._leaf = self._packed = None
        if leaf is None or packed is None or leaf.grad is None or not bool(torch.isfinite(leaf.grad).all()):
            return  # no gradient reached the inputs (or fp16 overflowed): keep the perturbation
        norm = self.threat.norm
        step = _alpha(packed, self.rel_step) * packed.normalize(leaf.grad, norm)
        self.delta = (packed.step_to(leaf.detach() + step, norm) - packed.x0).detach()


class AdversarialTraining:
    """Mixin of the strategies that train on adversarial examples (put it first among the bases).

    It provides :meth:`adversarial_examples` and overrides the :class:`Strategy` hooks the engine honours:
    :meth:`replays` (``free`` replays each minibatch), :meth:`epochs_to_run`, :meth:`selection_metric`
    (the guard's history column the kept epoch is chosen by) and :meth:`training_record` (merged into
    ``metrics.json``); ``after_backward`` updates the ``free`` perturbation and ``on_epoch_end`` runs
    the guard.
    """

    options: Any
    meta: DatasetMeta
    name: ClassVar[str]
    # per-run state, set on first use (class defaults; each instance gets its own)
    _threat_model: ThreatModel | None = None
    _free: FreePerturbation | None = None
    _guard: CollapseGuard | None = None

    @property
    def _adv(self) -> AdversarialOptions:
        o = self.options
        assert isinstance(o, AdversarialOptions)
        return o

    def _threat(self) -> ThreatModel:
        if self._threat_model is None:
            self._threat_model = self._adv.threat(self.meta)
        return self._threat_model

    def _rel_step(self) -> float:
        o = self._adv
        if o.step_size:
            return o.step_size / o.train_eps
        return DEFAULT_STEP.get(o.train_attack, 2.5 / o.steps)

    # --- examples ---------------------------------------------------------------------------
    def adversarial_examples(self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext) -> Batch:
        """The step's training examples (see the module docstring). For ``free`` they carry the
        gradient of the perturbation: the caller's backward pass is the attack's gradient."""
        o, net = self._adv, getattr(model, "module", model)
        seed = ctx.epoch * 100_003 + ctx.step
        if o.train_attack == "free":
            if self._free is None:
                self._free = FreePerturbation(self._threat(), self._rel_step())
            return self._free.inputs(net, inputs)
        if o.train_attack == "pgd":
            rel = (o.step_size / o.train_eps) or None
            return pgd_examples(net, inputs, labels, self._threat(), o.steps, rel, seed)
        return single_step_examples(net, inputs, labels, self._threat(), o.train_attack, self._rel_step(), o.noise,
                                    seed)  # fmt: skip

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        if self._free is not None:
            self._free.update()

    # --- what the engine honours --------------------------------------------------------------
    def replays(self) -> int:
        """How many times the engine runs each minibatch in a row (``free``: m; else 1)."""
        o = self._adv
        return o.replays if o.train_attack == "free" else 1

    def epochs_to_run(self, epochs: int) -> int:
        """The epochs the engine runs for ``epochs`` requested: divided by the replays (at least 1)."""
        return max(1, epochs // self.replays())

    def selection_metric(self) -> str | None:
        """The history column the kept epoch is chosen by (the guard's multi-step robust accuracy), or
        None for the engine's default (validation accuracy)."""
        return ROBUST if self._adv.guard_on else None

    def training_record(self, epochs: int) -> dict[str, Any]:
        """What ``metrics.json["adversarial_training"]`` states about the training attack (``epochs``:
        as requested)."""
        o, threat = self._adv, self._threat()
        run = self.epochs_to_run(epochs)
        record: dict[str, Any] = {
            "train_attack": o.train_attack,
            "threat": threat.to_json(),
            "threat_label": threat.describe(),
            "replays": self.replays(),
            "epochs_requested": epochs,
            "epochs_run": run,
            "minibatch_passes_per_sample": run * self.replays(),
            "step": self._rel_step() if o.train_attack != "pgd" else (o.step_size / o.train_eps or 2.5 / o.steps),
            "step_units": "fraction of train_eps",
        }
        if o.train_attack == "pgd":
            record["steps"] = o.steps
        if o.train_attack == "n-fgsm":
            record["noise"] = o.noise
            record["projected_to"] = "train_eps ball (the paper's unprojected examples reach (1 + noise) eps)"
        record["guard"] = self._guard.summary() if self._guard is not None else {"enabled": False}
        return {"adversarial_training": record}

    # --- the guard ------------------------------------------------------------------------------
    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        if not self._adv.guard_on:
            return {}
        if self._guard is None:
            o = self._adv
            self._guard = CollapseGuard(
                self._threat(), samples=o.guard_samples, steps=o.guard_steps, drop=o.guard_drop, seed=ctx.seed,
            )  # fmt: skip
        columns, message = self._guard.epoch(ctx.model, ctx.val, ctx.device, epoch)
        if message:
            ctx.on_message(f"{self.name}: {message}")
        return columns
