"""Minimal-norm step onto a hyperplane inside a box: the projection FAB takes at every iteration.

For each row, find ``d`` minimising ``||d||_p`` (p = 2 or inf) subject to

    w . d = r            (reach the linearised decision boundary)
    lower <= d <= upper  (stay in the valid input range; ``lower <= 0 <= upper``, may be infinite)

Flip the sign of ``w`` so that ``r >= 0``. Moving coordinate i along ``sign(w_i)`` has room
``b_i`` (``upper_i`` if ``w_i > 0`` else ``-lower_i``). The optimum is a clipped ray:

* l2: ``d_i = sign(w_i) min(lambda |w_i|, b_i)`` (KKT of the QP); coordinate i saturates at
  ``lambda_i = b_i / |w_i|``.
* l-inf: ``d_i = sign(w_i) min(t, b_i)`` (spend the largest budget ``t`` on every coordinate
  that can still move); coordinate i saturates at ``t_i = b_i``.

The progress ``w . d`` is a piecewise-linear nondecreasing function of the parameter ``s``
(lambda or t): ``g(s) = sum_{s_i <= s} |w_i| b_i + s sum_{s_i > s} slope_i`` with slope ``w_i^2``
(l2) or ``|w_i|`` (l-inf). Sorting the breakpoints gives the exact ``s`` with ``g(s) = r`` in
O(D log D). When even full saturation cannot reach ``r`` (the boundary lies outside the box), the
saturated point is returned: the box point that gets closest to the hyperplane, as FAB does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project_onto_hyperplane_in_box(
    w: torch.Tensor, r: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, norm: str
) -> torch.Tensor:
    """Rows ``d`` of minimal ``norm`` with ``w . d = r`` and ``lower <= d <= upper`` (see module doc).

    Args:
        w: ``(N, D)`` hyperplane normals.
        r: ``(N,)`` required progress ``w . d``.
        lower, upper: ``(N, D)`` bounds on ``d`` with ``lower <= 0 <= upper`` (``-inf``/``inf`` allowed).
        norm: ``"l2"`` or ``"linf"``.
    """
    flip = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    w, r = w * flip[:, None], r * flip
    aw = w.abs()
    moves = aw > 0
    room = torch.where(w > 0, upper, -lower).clamp_min(0)
    room = torch.where(moves, room, torch.zeros_like(room))
    inf = torch.full_like(w, torch.inf)
    if norm == "l2":
        bp = torch.where(moves, room / torch.where(moves, aw, torch.ones_like(aw)), inf)
        slope = aw * aw
    else:
        bp = torch.where(moves, room, inf)
        slope = aw
    finite = torch.isfinite(bp)
    # coordinates that never saturate (no w, or unbounded room) add no saturated progress
    sat = torch.where(finite, aw * torch.where(finite, room, torch.zeros_like(room)), torch.zeros_like(room))
    order = bp.argsort(dim=1)
    bp_s, sat_s, slope_s = bp.gather(1, order), sat.gather(1, order), slope.gather(1, order)
    cum_sat = sat_s.cumsum(1)
    free = slope.sum(1, keepdim=True) - slope_s.cumsum(1)
    progress = torch.where(torch.isfinite(bp_s), cum_sat + bp_s.clamp(max=torch.finfo(w.dtype).max) * free, inf)
    k = (progress < r[:, None]).sum(1, keepdim=True)  # breakpoints passed before reaching r
    done = F.pad(cum_sat, (1, 0)).gather(1, k).squeeze(1)  # saturated progress of the first k
    rest = F.pad(free, (1, 0), value=0.0)
    rest[:, 0] = slope.sum(1)
    rest = rest.gather(1, k).squeeze(1)  # slope of the coordinates still free
    reachable = rest > 0
    s = torch.where(reachable, (r - done) / torch.where(reachable, rest, torch.ones_like(rest)), torch.inf)
    s = s.clamp_min(0)[:, None]
    step = torch.minimum(s * aw, room) if norm == "l2" else torch.minimum(s.expand_as(room), room)
    return torch.where(moves, w.sign() * step, torch.zeros_like(step))
