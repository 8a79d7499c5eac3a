"""MSEFM: multi-modal dissimilarity features + an external clean-feature memory (after Tian & Xu,
CVPR 2021, "Can audio-visual integration strengthen robustness under multimodal attacks?").

Training: ``CE(h(x), y) + beta * mean over modality pairs (m < n) of mean_i cos(z_m,i, z_n,i)``:
the modalities are pushed to carry dissimilar features, so one attacked modality cannot drag the
others' evidence along. Test time: every encoder output is replaced by its sparse-coding
reconstruction from a memory of ``memory_size`` clean training features of that modality
(:class:`~mmrobust.models.memory.SparseCodingMemory`, ISTA for the lasso code with weight
``memory_lambda`` times the median clean feature norm, ``memory_iters`` steps). The memory is filled
after training (on the selected model) and is part of the deployed model: saved with the weights,
rebuilt by ``load_run``, and seen by every attack (gradients go through ISTA) and certifier.
Deviations: the dissimilarity is the plain cosine of paired features (the features must have
equal dimensions), and the memory stores a seeded random sample of training features.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig
from mmrobust.models.memory import SparseCodingMemory
from mmrobust.torchutil import to_device
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require
from mmrobust.training.context import TrainContext


def pairwise_cosine(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over modality pairs and samples of ``cos(z_m, z_n)``."""
    pairs = [F.cosine_similarity(feats[a], feats[b], dim=1).mean() for a, b in itertools.combinations(feats, 2)]
    return torch.stack(pairs).mean()


@dataclass
class MSEFMOptions(MethodOptions):
    """Dissimilarity weight ``beta``; memory size, sparsity weight and ISTA steps."""

    beta: float = 0.1
    memory_size: int = 256
    memory_lambda: float = 0.05
    memory_iters: int = 20

    def check(self) -> None:
        super().check()
        require(self.beta >= 0, f"option beta must be >= 0, got {self.beta}", "beta")
        require(self.memory_size >= 1, f"option memory_size must be >= 1, got {self.memory_size}", "memory_size")
        require(
            self.memory_lambda >= 0, f"option memory_lambda must be >= 0, got {self.memory_lambda}", "memory_lambda"
        )
        require(self.memory_iters >= 1, f"option memory_iters must be >= 1, got {self.memory_iters}", "memory_iters")


@METHODS.register("msefm")
class MSEFM(Strategy[MSEFMOptions]):
    """CE + cross-modal feature dissimilarity; sparse-coding feature memory at test time."""

    head = "concat"
    Options = MSEFMOptions

    @classmethod
    def model_config(cls, model: ModelConfig, options: MSEFMOptions) -> ModelConfig:
        return dataclasses.replace(super().model_config(model, options), feature_memory=options.memory_size)

    def on_train_start(self, ctx: TrainContext) -> None:
        dims = {m: enc.out_dim for m, enc in ctx.model.encoders.items()}
        if len(set(dims.values())) > 1:
            raise ConfigError(f"msefm: the dissimilarity term compares features across modalities; dims differ: {dims}")
        if self.options.memory_size > len(ctx.train):
            raise ConfigError(
                f"msefm: memory_size {self.options.memory_size} exceeds the {len(ctx.train)} training samples",
                param="memory_size",
            )

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs, return_all=True)
        loss = F.cross_entropy(out["logits"], labels)
        if self.options.beta > 0:
            loss = loss + self.options.beta * pairwise_cosine(out["features"])
        return loss, out["logits"]

    @torch.no_grad()
    def after_training(self, ctx: TrainContext) -> dict[str, Any]:
        """Fill each modality's memory with clean features of a seeded random training sample."""
        model, o = ctx.model, self.options
        model.eval()
        val_before = ctx.evaluate("val")
        pick = torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(ctx.seed))
        sample = ctx.train.subset(pick[: o.memory_size])
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
        for inputs, _ in iterate_batches(sample, 256):
            inputs = model.transform(to_device(inputs, ctx.device))  # the encoders' inputs (standardised)
            for m, enc in model.encoders.items():
                assert isinstance(enc, SparseCodingMemory)
                feats[m].append(enc.encoder(inputs[m]))
        for m, enc in model.encoders.items():
            assert isinstance(enc, SparseCodingMemory)
            enc.fill(torch.cat(feats[m]), o.memory_lambda, o.memory_iters)
        return {
            "msefm": {
                "val_accuracy_without_memory": val_before,
                "val_accuracy_with_memory": ctx.evaluate("val"),
            }
        }
