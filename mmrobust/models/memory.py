"""A clean-feature memory used at test time (MSEFM): features are replaced by their sparse-coding
reconstruction from stored clean training features.

With memory ``D`` (``S x d``, one clean feature per row) and a feature ``z``, the code is the lasso
solution ``a* = argmin_a 0.5 ||z - a D||^2 + lam ||a||_1`` computed by ``iters`` ISTA steps from
``a = 0``: ``a <- soft(a - (a D - z) D^T / L, lam / L)`` with ``L = ||D||_2^2`` (the largest
eigenvalue of ``D D^T``, so each step is a contraction). The encoder's output becomes ``a* D``.
Every step is (piecewise) differentiable, so attacks back-propagate through the memory: the attacked
model is the deployed model. ``lam`` is stored relative to the median clean feature norm.

The wrapper sits *inside* ``model.encoders[m]`` so every consumer of an encoder sees it; the sound
Lipschitz composer does not know this layer and refuses it (no certificate is claimed for it).
"""

from __future__ import annotations

import torch
from torch import nn


class SparseCodingMemory(nn.Module):
    """``encoder`` followed by sparse-coding reconstruction from a memory of ``size`` clean features.

    Until :meth:`fill` is called the memory is empty and the module is the bare encoder (training).
    The memory, the threshold and the iteration count are buffers: saved with the weights.
    """

    memory: torch.Tensor
    threshold: torch.Tensor
    inv_lipschitz: torch.Tensor
    iters: torch.Tensor
    filled: torch.Tensor

    def __init__(self, encoder: nn.Module, size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_dim: int = int(encoder.out_dim)  # type: ignore[arg-type]
        self.register_buffer("memory", torch.zeros(size, self.out_dim))
        self.register_buffer("threshold", torch.zeros(()))  # lam / L, absolute
        self.register_buffer("inv_lipschitz", torch.zeros(()))  # 1 / L
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fill(self, features: torch.Tensor, lam: float, iters: int) -> None:
        """Store ``features`` (``size x d`` clean training features) and the ISTA constants."""
        if features.shape != self.memory.shape:
            raise ValueError(f"memory expects {tuple(self.memory.shape)} features, got {tuple(features.shape)}")
        self.memory.copy_(features)
        lip = float(torch.linalg.matrix_norm(features, ord=2)) ** 2
        scale = float(features.norm(dim=1).median())
        self.inv_lipschitz.fill_(1.0 / max(lip, 1e-12))
        self.threshold.fill_(lam * scale / max(lip, 1e-12))
        self.iters.fill_(iters)
        self.filled.fill_(True)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """``a* D`` for each row of ``z`` (ISTA, see module docstring)."""
        d = self.memory
        gram = d @ d.T  # (S, S): one product per call instead of two per iteration
        zd = z @ d.T
        a = torch.zeros_like(zd)
        for _ in range(int(self.iters)):
            u = a - (a @ gram - zd) * self.inv_lipschitz
            a = torch.sign(u) * torch.relu(u.abs() - self.threshold)
        return a @ d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return self.reconstruct(z) if bool(self.filled) else z
