"""Lipschitz-margin training (``lmt``) for orthogonal-head models with 1-Lipschitz encoders.

With CRMT's orthogonal head ``h_k = sum_m a_k^(m) W~_k^(m) phi^(m) + b_k`` (orthonormal rows ``W~``)
and encoders that are 1-Lipschitz in l2 (``lipschitz_encoders``, the ``lip-*`` and ``sll-*``
encoders of :mod:`mmrobust.models.lipschitz`), the margin ``h_y - h_k`` is Lipschitz in the joint
input with constant at most

    ``L_yk = sqrt(sum_m ((a_y^(m))^2 + (a_k^(m))^2))``

(the row ``a_y W~_y - a_k W~_k`` has norm ``sqrt(a_y^2 + a_k^2)`` since ``W~_y . W~_k = 0``; one
modality's change is at most that times ``||d_m||``; Cauchy-Schwarz over modalities). This is the
bound the ``crown`` certifier starts from (its Lipschitz radius), so a sample is certified at joint
radius ``r`` as soon as ``h_y - h_k > r L_yk`` for every ``k != y``.

The loss trains exactly for that (Tsuzuku, Sato & Sugiyama, 2018): the cross-entropy of the
*offset* logits ``h_k + margin_eps * L_yk`` for ``k != y`` (``h_y`` unchanged), so a sample counts as
well classified only once its certificate reaches ``margin_eps``. ``margin_ramp`` epochs raise the
offset linearly from 0; ``rho`` adds CRMT's uni-modal margin regulariser (0 by default); CRMT's
step 2 runs afterwards as in ``crmt-jt`` (kept only if it improves the validation criterion).

With encoders that are not 1-Lipschitz the offset is only a heuristic (the constant above does not
bound the margin's slope); the method then still trains, but its radius means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mmrobust.data.base import Batch
from mmrobust.training.base import METHODS, StepContext, require, unwrap
from mmrobust.training.crmt import CRMTBase, CRMTOptions, margin_regulariser, orthogonal_head


def pair_lipschitz(a: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L[y, k] = sqrt(sum_m (a_y^(m))^2 + (a_k^(m))^2)``, ``(K, K)``: the joint-l2 Lipschitz constant of
    ``h_y - h_k`` for an orthogonal head on 1-Lipschitz encoders (differentiable in ``a``)."""
    sq = torch.stack([v**2 for v in a.values()]).sum(0)  # (K,)
    return (sq[:, None] + sq[None, :]).clamp_min(1e-12).sqrt()


def margin_logits(logits: torch.Tensor, labels: torch.Tensor, pair_lip: torch.Tensor, eps: float) -> torch.Tensor:
    """``logits`` with ``eps * L[y, k]`` added to every class ``k != y`` (the label's logit unchanged)."""
    offset = eps * pair_lip[labels]  # (N, K)
    return logits + offset.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), 0.0)


@dataclass
class LMTOptions(CRMTOptions):
    """``margin_eps``: the joint l2 radius (standardised units) the offset trains for;
    ``margin_ramp``: epochs over which the offset grows linearly from 0 (0 = full from the start);
    ``rho``: CRMT's uni-modal margin regulariser (0 = off)."""

    margin_eps: float = 2.0
    margin_ramp: int = 0
    rho: float = 0.0

    def check(self) -> None:
        super().check()
        require(self.margin_eps >= 0, f"option margin_eps must be >= 0, got {self.margin_eps}", "margin_eps")
        require(self.margin_ramp >= 0, f"option margin_ramp must be >= 0, got {self.margin_ramp}", "margin_ramp")


@METHODS.register("lmt")
class LMT(CRMTBase[LMTOptions]):
    """Lipschitz-margin training on the orthogonal head: CE of offset logits, then CRMT's step 2."""

    Options = LMTOptions

    def eps_at(self, epoch: int) -> float:
        """The offset radius used in ``epoch`` (0-based), after the linear ramp."""
        o = self.options
        if o.margin_ramp <= 0:
            return o.margin_eps
        return o.margin_eps * min(1.0, (epoch + 1) / o.margin_ramp)

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        with parametrize.cached():
            out = model(inputs, return_all=True)
            logits = out["logits"]
            head = orthogonal_head(unwrap(model))
            offset = margin_logits(logits, labels, pair_lipschitz(dict(head.a.items())), self.eps_at(ctx.epoch))
            loss = F.cross_entropy(offset, labels)
            if o.rho > 0:
                loss = loss + o.rho * margin_regulariser(head.raw_scores(out["features"]), labels)
        return loss, logits
