"""The training engine shared by every method: data, optimiser, schedule, DDP, model selection."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmrobust.config import OptimConfig, RunConfig, options_dataclass
from mmrobust.data.base import DataBundle, iterate_batches
from mmrobust.data.registry import load_data
from mmrobust.errors import ConfigError
from mmrobust.eval.metrics import accuracy, predict
from mmrobust.models.fusion import LateFusionModel, build_model
from mmrobust.report.console import console, progress
from mmrobust.training.base import METHODS, StepContext, Strategy
from mmrobust.training.distributed import DistInfo, resolve_device, setup_distributed, teardown_distributed


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {cfg.lr}")
    if cfg.name == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimiser '{cfg.name}'; choose from: adam, sgd")


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    raise ConfigError(f"unknown schedule '{cfg.schedule}'; choose from: cosine, step, none")


def make_strategy(cfg: RunConfig, bundle: DataBundle) -> Strategy:
    cls = METHODS.get(cfg.train.method)
    options = options_dataclass(cls.Options, cfg.train.method_options, cfg.train.method)
    return cls(options, bundle.meta)


@dataclass
class FitResult:
    model: LateFusionModel
    metrics: dict[str, Any]
    config: RunConfig
    bundle: DataBundle
    out: Path | None


class Trainer:
    """Trains one model with one strategy; select on validation accuracy, never on test.

    Under ``torchrun`` the global batch ``batch_size`` is split evenly over the processes, gradients
    are averaged by DDP, and only rank 0 writes files.
    """

    def __init__(self, cfg: RunConfig, bundle: DataBundle | None = None) -> None:
        t = cfg.train
        if t.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {t.epochs}")
        if t.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {t.batch_size}")
        self.cfg = cfg
        self.device = resolve_device(t.device)
        self.dist: DistInfo = setup_distributed(self.device)
        if t.batch_size % self.dist.world_size:
            raise ConfigError(f"batch size {t.batch_size} is not divisible by {self.dist.world_size} processes")
        self.bundle = bundle if bundle is not None else load_data(cfg.data)
        self.strategy = make_strategy(cfg, self.bundle)
        if cfg.model.head != self.strategy.head:
            # the method decides the head; keep the rest of the user's model config
            cfg.model = dataclasses.replace(cfg.model, head=self.strategy.head, encoders=dict(cfg.model.encoders))
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(self.bundle.meta, cfg.model).to(self.device)
        self.history: list[dict[str, Any]] = []

    def evaluate_split(self, split_name: str) -> float:
        split = self.bundle.split(split_name)
        return accuracy(predict(self.model, split, device=self.device), split.labels)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Validation accuracy and mean cross-entropy in one eval-mode pass (the loss breaks ties)."""
        self.model.eval()
        correct, total = 0, 0.0
        for inputs, labels in iterate_batches(self.bundle.val, 256):
            labels = labels.to(self.device)
            logits = self.model({k: v.to(self.device) for k, v in inputs.items()})
            correct += int((logits.argmax(1) == labels).sum())
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return correct / len(self.bundle.val), total / len(self.bundle.val)

    def _train_epoch(
        self, epoch: int, opt: torch.optim.Optimizer, bar: Any, task: Any, gen: torch.Generator
    ) -> dict[str, float]:
        t = self.cfg.train
        self._wrapped.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = iterate_batches(
            self.bundle.train, t.batch_size // self.dist.world_size, shuffle=True, seed=t.seed, epoch=epoch,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip
        for step, (inputs, labels) in enumerate(batches):
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            labels = labels.to(self.device)
            loss, logits = self.strategy.loss(self._wrapped, inputs, labels, StepContext(epoch, step, gen))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
            bar.advance(task)
        totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
        if self.dist.active:  # report the global epoch statistics, not rank 0's shard
            torch.distributed.all_reduce(totals)
        total_loss, correct, seen = totals.tolist()
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    def fit(self, out: str | Path | None = None) -> FitResult:
        t = self.cfg.train
        self._wrapped: nn.Module = DistributedDataParallel(self.model) if self.dist.active else self.model
        opt = build_optimizer(self.strategy.parameters(self.model), t.optim)
        sched = build_scheduler(opt, t.optim, t.epochs)
        gen = torch.Generator().manual_seed(t.seed * 1000 + self.dist.rank)
        best_key, best_epoch, best_state = (-1.0, 0.0), -1, None
        per_rank = t.batch_size // self.dist.world_size
        steps = math.ceil(math.ceil(len(self.bundle.train) / self.dist.world_size) / per_rank)
        start = time.perf_counter()
        show = t.progress and self.dist.is_main
        with progress(show) as bar:
            task = bar.add_task(f"{t.method} train", total=t.epochs * steps)
            for epoch in range(t.epochs):
                e0 = time.perf_counter()
                stats = self._train_epoch(epoch, opt, bar, task, gen)
                lr = opt.param_groups[0]["lr"]
                if sched is not None:
                    sched.step()
                val_acc, val_loss = self.validate()
                row = {
                    "epoch": epoch + 1,
                    **stats,
                    "val_accuracy": val_acc,
                    "val_loss": val_loss,
                    "lr": lr,
                    "time_s": time.perf_counter() - e0,
                }
                self.history.append(row)
                # highest validation accuracy; among equal accuracies (a saturated val split) the lowest loss
                if (val_acc, -val_loss) > best_key:
                    best_key, best_epoch = (val_acc, -val_loss), epoch + 1
                    best_state = copy.deepcopy(self.model.state_dict())
                if self.dist.is_main:
                    console.print(
                        f"[{t.method}] epoch {epoch + 1}/{t.epochs}  loss {stats['train_loss']:.4f}  "
                        f"train acc {stats['train_accuracy']:.4f}  val acc {val_acc:.4f}  ({row['time_s']:.1f}s)",
                        markup=False,
                    )
        if best_state is not None:
            self.model.load_state_dict(best_state)
        extra = self.strategy.after_training(self)
        self.model.eval()
        metrics: dict[str, Any] = {
            "method": t.method,
            "val_accuracy": self.evaluate_split("val"),
            "test_accuracy": self.evaluate_split("test"),
            "best_epoch": best_epoch,
            "epochs": t.epochs,
            "world_size": self.dist.world_size,
            "train_time_s": time.perf_counter() - start,
            "history": self.history,
            **extra,
        }
        path = None
        if out is not None and self.dist.is_main:
            from mmrobust.runs import save_run

            path = save_run(out, self.model, self.cfg, self.bundle, metrics)
        teardown_distributed(self.dist)
        return FitResult(self.model, metrics, self.cfg, self.bundle, path)


def train(cfg: RunConfig, out: str | Path | None = None, bundle: DataBundle | None = None) -> FitResult:
    """Train a model from a :class:`RunConfig`; write the run folder to ``out`` if given."""
    return Trainer(cfg, bundle).fit(out)
