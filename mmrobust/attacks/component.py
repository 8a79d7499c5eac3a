"""The base of the AutoAttack components (Croce & Hein 2020): a joint budget, a fixed loss, an
iteration count, restarts and target classes, and the rule deciding where a component applies.

The components live one family per module: :mod:`~mmrobust.attacks.apgd` (APGD-CE, APGD-DLR,
APGD-T), :mod:`~mmrobust.attacks.fab` (FAB, FAB-T) and :mod:`~mmrobust.attacks.square`; the
protocol that runs them in order is :class:`mmrobust.attacks.autoattack.AutoAttack`.

Our own implementations, written for a dict of modalities (no torchattacks, no [0, 1] assumption:
a modality is clamped to its declared valid range, or not at all).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, Attack, BestTracker, Packed
from mmrobust.attacks.threat import ThreatModel
from mmrobust.errors import ConfigError


class AutoAttackComponent(Attack):
    """Shared constructor: joint budget only, a fixed loss, an iteration count.

    ``targeted`` components attack the ``targets`` highest-scoring wrong classes one after the
    other; ``min_classes`` is the fewest classes the component's loss needs (DLR: 3); a
    ``query_based`` component (Square) counts its ``steps`` in queries.

    ``early_stop`` (off by default; :class:`~mmrobust.attacks.autoattack.AutoAttack` turns it on)
    spends no work on a sample once it is broken: a run drops it from its batch at the next
    iteration, the targeted components attack several targets in one batch (a row per sample and
    target, up to ``target_rows`` rows; a sample leaves with all its rows), and FAB stops at the first adversarial point within
    eps instead of shrinking it further. Which samples are broken is what the protocol reports, and
    each row follows the trajectory it follows alone, so the attack is as strong; the example
    returned for a broken sample is the first one found rather than the one of largest margin.
    """

    budgets = ("joint",)
    fixed_loss = "ce"
    targeted: ClassVar[bool] = False
    min_classes: ClassVar[int] = 2
    query_based: ClassVar[bool] = False
    #: with ``early_stop``, the most rows (samples x targets) a targeted pass puts in one batch
    target_rows: int = 64

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.losses = (cls.fixed_loss,)

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel | Any = None,
        *,
        steps: int = 100,
        restarts: int = 1,
        loss: str | None = None,
        targets: int = 9,
        num_classes: int | None = None,
        early_stop: bool = False,
        target_rows: int | None = None,
        **options: Any,
    ) -> None:
        if loss is not None and loss != self.fixed_loss:
            raise ConfigError(f"{self.name}: uses the {self.fixed_loss} loss; loss='{loss}' does not apply",
                              param="loss")  # fmt: skip
        super().__init__(model, threat, loss=self.fixed_loss, **options)
        meta = options.get("meta")
        if steps < 1 or restarts < 1:
            raise ConfigError(f"{self.name}: steps and restarts must be >= 1, got {steps} and {restarts}")
        self.steps, self.restarts, self.targets = steps, restarts, targets
        self.early_stop = bool(early_stop)
        if target_rows is not None:
            if isinstance(target_rows, bool) or not isinstance(target_rows, int) or target_rows < 1:
                raise ConfigError(f"{self.name}: target_rows must be an integer >= 1, got {target_rows!r}",
                                  param="target_rows")  # fmt: skip
            self.target_rows = target_rows
        k = num_classes or (meta.num_classes if meta is not None else getattr(model, "num_classes", None))
        if k is not None:
            self.check_applicable(int(k), targets)

    def _random_point(self, packed: Packed, x0: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """A random point at distance ``radius`` (per column) from ``x0`` in the attack's norm, in the box."""
        if self.norm == "linf":
            t = 2 * torch.rand(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device) - 1
            return packed.clamp(x0 + radius * t / t.abs().amax(1, keepdim=True).clamp_min(1e-12))
        t = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device)
        return packed.clamp(x0 + radius * packed.normalize(t, "l2"))

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "steps": self.steps, "restarts": self.restarts}
        return {**d, "targets": self.targets} if self.targeted else d

    def targeted_runs(
        self, packed: Packed, labels: torch.Tensor
    ) -> tuple[BestTracker, Iterator[tuple[int, torch.Tensor, torch.Tensor]]]:
        """The reference's targeted schedule, shared by APGD-T and FAB-T: the tracker of the best
        points, and ``(restart, idx, target)`` for each of the ``targets`` highest-scoring wrong
        classes and each restart, ``idx`` the samples still robust (it stops once none is).

        With ``early_stop`` a run covers several targets at once: ``idx`` repeats the samples still
        robust once per target (target-major) and ``target`` holds each row's target; as many
        targets as fit in :attr:`target_rows` rows (one pass per target once the samples alone
        fill it: on a CPU, per-row cost stops falling beyond a few dozen rows, and samples broken
        through an early target then skip the later ones)."""
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        self.check_applicable(clean_logits.shape[1], self.targets)
        best = BestTracker(packed.x0, clean_logits, labels)
        order = clean_logits.sort(dim=1).indices

        def batched() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            for restart in range(self.restarts):
                rank = 2
                while rank < self.targets + 2:
                    idx = (~best.broken).nonzero().squeeze(1)
                    if len(idx) == 0:
                        return
                    # as many targets per pass as fit in target_rows rows (at least one)
                    ranks = range(rank, min(rank + max(1, self.target_rows // len(idx)), self.targets + 2))
                    rank = ranks.stop
                    yield restart, idx.repeat(len(ranks)), torch.cat([order[idx, -t] for t in ranks])

        def runs() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            for t in range(2, self.targets + 2):
                for restart in range(self.restarts):
                    idx = (~best.broken).nonzero().squeeze(1)
                    if len(idx) == 0:
                        return
                    yield restart, idx, order[idx, -t]

        return best, batched() if self.early_stop else runs()

    @classmethod
    def check_applicable(cls, num_classes: int, targets: int = 9) -> None:
        """Raise a clear :class:`ConfigError` where this component does not apply to ``num_classes``."""
        if num_classes < cls.min_classes:
            raise ConfigError(f"{cls.name}: the DLR loss needs >= 3 classes, this model has {num_classes}")
        if cls.targeted and targets > num_classes - 1:
            need = targets + 1
            raise ConfigError(
                f"{cls.name}: {targets} target classes need >= {need} classes, this model has {num_classes} "
                f"(lower the number of targets to <= {num_classes - 1})"
            )
        if cls.targeted and targets < 1:
            raise ConfigError(f"{cls.name}: needs at least 1 target class, got {targets}")


def check_applicable(name: str, num_classes: int, targets: int = 9) -> None:
    """Raise a clear :class:`ConfigError` where the AutoAttack component ``name`` does not apply."""
    cls = ATTACKS.get(name)
    if issubclass(cls, AutoAttackComponent):
        cls.check_applicable(num_classes, targets)
