"""Randomized smoothing (Cohen, Rosenfeld & Kolter, 2019): a probabilistic l2 certificate.

The smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)`` with Gaussian noise ``e``. If the
top class has probability ``p_A >= p_lower > 1/2`` then ``g`` is constant on the l2 ball of radius
``sigma * Phi^-1(p_lower)`` around ``x``. ``p_A`` is unknown: it is estimated by Monte Carlo
(CERTIFY in the paper):

1. draw ``n0`` noisy copies and pick the most frequent class ``c_A`` (selection);
2. draw ``n`` fresh copies, count ``k`` hits of ``c_A`` and take the one-sided Clopper-Pearson
   lower bound ``p_lower`` at level ``alpha`` (estimation);
3. if ``p_lower > 1/2`` certify ``c_A`` with radius ``sigma * Phi^-1(p_lower)``, else **abstain**.

The statement holds except with probability ``alpha`` per sample (over the Monte Carlo draws): a
*probabilistic* certificate, reported as such with its ``alpha``. It certifies the smoothed
classifier ``g``, not the base model ``f``; accuracy is that of ``g`` (an abstention counts as wrong).

Threat models. **Joint**: noise on every modality, ``N(0, sigma^2 I)`` over the concatenated
input, certifying the joint l2 ball. **Modality m alone**: noise on ``m`` only (the others fixed),
which defines another smoothed classifier ``g_m`` and certifies it against perturbations of ``m``.

The Clopper-Pearson bound is computed exactly with torch (bisection on the binomial tail, in log
space), so the core package does not need scipy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mmrobust.certify.base import CERTIFIERS, Certificate, Certifier, CertifyContext, Guarantee, Radii
from mmrobust.data.base import Batch, DatasetMeta, Split, chunk_rows, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.progress import ProgressFn


def binomial_tail(k: torch.Tensor, n: int, p: torch.Tensor) -> torch.Tensor:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, elementwise over ``k`` and ``p`` (float64, log-space sum)."""
    j = torch.arange(n + 1, dtype=torch.float64)
    logc = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    p = p.double().clamp(1e-300, 1 - 1e-16).unsqueeze(-1)
    logpmf = logc + j * torch.log(p) + (n - j) * torch.log1p(-p)
    mask = j >= k.double().unsqueeze(-1)
    return torch.logsumexp(logpmf.masked_fill(~mask, -math.inf), dim=-1).exp()


def clopper_pearson_lower(k: torch.Tensor, n: int, alpha: float, iters: int = 60) -> torch.Tensor:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion from ``k`` of ``n``.

    The largest ``p`` with ``P(X >= k | p) <= alpha`` (equivalently the ``alpha`` quantile of
    ``Beta(k, n - k + 1)``); 0 when ``k = 0``. Bisection: the tail is increasing in ``p``.
    """
    k = k.double()
    lo = torch.zeros_like(k)
    hi = torch.ones_like(k)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = binomial_tail(k, n, mid) > alpha  # mid is too large to be the lower bound
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return torch.where(k > 0, lo, torch.zeros_like(lo))


@dataclass
class SmoothingOptions:
    """Options of the ``smoothing`` certifier.

    ``sigma``: noise standard deviation (input space); ``n0`` selection and ``n`` estimation draws
    per sample; ``alpha``: failure probability per sample; ``batch``: noisy copies per forward pass;
    ``unimodal``: also certify each modality alone (noise on it only); ``seed``: Monte Carlo seed.
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch: int = 500
    unimodal: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n0", "n", "batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"smoothing: {key} must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"smoothing: seed must be an integer, got {self.seed!r}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, int | float) or not 0 < self.sigma < math.inf:
            raise ConfigError(f"smoothing: sigma must be a finite number > 0, got {self.sigma!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha < 0.5:
            raise ConfigError(f"smoothing: alpha must be a number in (0, 0.5), got {self.alpha!r}")
        if not isinstance(self.unimodal, bool):
            raise ConfigError(f"smoothing: unimodal must be true or false, got {self.unimodal!r}")


@torch.no_grad()
def noise_counts(
    model: nn.Module, x: Batch, noisy: list[str], sigma: float, draws: int, batch: int, gen: torch.Generator
) -> torch.Tensor:
    """Class counts ``(N, K)`` of ``model`` on ``draws`` Gaussian copies of every sample (noise on ``noisy``).

    At most ``batch`` noisy inputs per forward pass: ``min(draws, batch)`` copies of as many samples as fit.
    """
    n = next(iter(x.values())).shape[0]
    per_sample = min(draws, batch)
    rows = max(1, batch // per_sample)
    counts: torch.Tensor | None = None
    for s in range(0, n, rows):
        sub = {m: v[s : s + rows] for m, v in x.items()}
        b = next(iter(sub.values())).shape[0]
        done = 0
        while done < draws:
            c = min(per_sample, draws - done)
            rep = {m: v.repeat_interleave(c, 0) for m, v in sub.items()}
            for m in noisy:
                rep[m] = rep[m] + sigma * torch.randn(rep[m].shape, generator=gen, dtype=rep[m].dtype)
            logits = model(rep)
            if counts is None:
                counts = torch.zeros(n, logits.shape[1], dtype=torch.long)
            counts[s : s + b] += torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).view(b, c, -1).sum(1)
            done += c
    assert counts is not None
    return counts


def smoothed_certify(
    model: nn.Module, x: Batch, noisy: list[str], options: SmoothingOptions, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CERTIFY per sample: ``(prediction, radius)``; prediction -1 (radius 0) means abstain."""
    o = options
    c_a = noise_counts(model, x, noisy, o.sigma, o.n0, o.batch, gen).argmax(1)
    k = noise_counts(model, x, noisy, o.sigma, o.n, o.batch, gen).gather(1, c_a[:, None]).squeeze(1)
    p_lower = clopper_pearson_lower(k, o.n, o.alpha)
    certified = p_lower > 0.5
    radius = torch.where(certified, o.sigma * torch.special.ndtri(p_lower.clamp(0.5, 1 - 1e-16)), 0.0)
    return torch.where(certified, c_a, -1), radius.double()


def smoothing_radii(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    options: SmoothingOptions | None = None,
    progress: ProgressFn | None = None,
) -> Radii:
    """Smoothed-classifier radii for every sample: joint (noise on all modalities) and per modality;
    ``progress`` hears the samples done."""
    options = options or SmoothingOptions()
    done, total = 0, len(split)
    model.eval()
    gen = torch.Generator().manual_seed(options.seed)
    names = meta.modality_names
    joints, corrects, unimodal_parts = [], [], []
    # in chunks of bounded memory (one chunk, hence the same draws, whenever the split fits)
    for inputs, labels in iterate_batches(split, chunk_rows(meta)):
        pred, joint = smoothed_certify(model, inputs, names, options, gen)
        correct = pred == labels
        joints.append(torch.where(correct, joint, torch.zeros_like(joint)))
        corrects.append(correct)
        part = {}
        if options.unimodal:
            for m in names:
                pm, rm = smoothed_certify(model, inputs, [m], options, gen)
                part[m] = torch.where(pm == labels, rm, torch.zeros_like(rm))
        unimodal_parts.append(part)
        done += len(labels)
        if progress is not None:
            progress("smoothing", done, total)
    unimodal = {m: torch.cat([p[m] for p in unimodal_parts]) for m in unimodal_parts[0]} if unimodal_parts else {}
    return Radii(torch.cat(joints), unimodal, torch.cat(corrects))


@CERTIFIERS.register("smoothing")
class SmoothingCertifier(Certifier):
    """Randomized smoothing; a probabilistic certificate of the smoothed classifier (see module doc)."""

    guarantee = Guarantee.PROBABILISTIC
    Options = SmoothingOptions

    def certify(self, model: nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        t0 = time.perf_counter()
        o = self.options
        radii = smoothing_radii(model, meta, split, o, ctx.progress)
        info = {
            "sigma": o.sigma,
            "n0": o.n0,
            "n": o.n,
            "seed": o.seed,
            "certifies": "the Gaussian-smoothed classifier g, not the base model",
        }
        return Certificate(
            self.name, self.guarantee, "l2", radii, split.labels, alpha=o.alpha, seconds=time.perf_counter() - t0,
            info=info,
        )  # fmt: skip
