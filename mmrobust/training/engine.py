"""The training engine shared by every method: data, optimiser, schedule, DDP, model selection."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmrobust.config import RunConfig, optimizer_for, scheduler_for
from mmrobust.data.base import DataBundle, iterate_batches
from mmrobust.data.registry import load_data
from mmrobust.errors import ConfigError, DataError
from mmrobust.eval.metrics import accuracy, predict
from mmrobust.io import atomic_write_bytes
from mmrobust.models.fusion import LateFusionModel, ModelConfig, build_model
from mmrobust.precision import grad_scaler, model_precision
from mmrobust.progress import MessageFn, ProgressFn
from mmrobust.torchutil import to_device
from mmrobust.training.base import StepContext, make_strategy, method_model_config
from mmrobust.training.context import TrainContext
from mmrobust.training.distributed import (
    DistInfo,
    ddp_options,
    resolve_device,
    setup_distributed,
    teardown_distributed,
)
from mmrobust.training.guard import ROBUST
from mmrobust.training.logs import EpochLogs, check_loggers

if TYPE_CHECKING:
    from mmrobust.runs import RunFolder

_log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A finished training: the selected model, its metrics and the run's effective ``config`` (the
    caller's, with the method's model config), the data, and the run folder if one was written."""

    model: LateFusionModel
    metrics: dict[str, Any]
    config: RunConfig
    bundle: DataBundle
    out: Path | None

    @property
    def model_config(self) -> ModelConfig:
        """The model config the method derived (see :func:`~mmrobust.training.base.method_model_config`)."""
        return self.config.model


@dataclass
class _FitState:
    """What the epoch loop carries from one epoch to the next (and a checkpoint saves)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    gen: torch.Generator
    config: dict[str, Any]  # the run's settings, recorded in each checkpoint
    first_epoch: int = 0
    best_key: tuple[float, float] = (-1.0, 0.0)
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    data_fingerprint: str | None = None  # of the data when the run first started (kept across resumes)
    data_fingerprints: list[str] | None = None  # set when a resume accepted changed data
    resumed_from: int | None = None  # the epoch a resumed run continued from


def _ignore(message: str) -> None:
    """A :data:`MessageFn` that drops the message."""


class Trainer:
    """Trains one model with one strategy; select on validation accuracy, never on test.

    The caller's :class:`RunConfig` is never changed: the trainer works on a copy whose model section
    is the method's (:func:`~mmrobust.training.base.method_model_config`), returned as
    ``FitResult.config`` and saved beside the run. The engine prints nothing: ``fit(on_epoch=...,
    progress=...)`` hands each epoch's log line and the step count to the caller (the CLI and the
    demo print them). Strategies' hooks see a :class:`TrainContext` (:meth:`context`).

    Under ``torchrun`` the global batch ``batch_size`` is split evenly over the processes, gradients
    are averaged by DDP, and only rank 0 writes files.
    """

    def __init__(self, cfg: RunConfig, bundle: DataBundle | None = None) -> None:
        cfg = copy.deepcopy(cfg)  # validation normalises fields (data paths): on the trainer's copy only
        cfg.validate()  # fields may have been set after construction (CLI flags, Python API)
        if cfg.model.factory:
            raise ConfigError(
                f"model.factory ({cfg.model.factory}): a model built by your own factory is trained by your own code; "
                "mmrobust wraps its weights (wrap_model / mmrobust wrap) to attack, evaluate and certify it",
                param="factory",
            )
        t = cfg.train
        self.device = resolve_device(t.device)
        self.dist: DistInfo = setup_distributed(self.device)
        if t.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {t.batch_size} is not divisible by {self.dist.world_size} processes", param="batch_size"
            )
        self.bundle = bundle if bundle is not None else load_data(cfg.data)
        self.strategy = make_strategy(cfg, self.bundle.meta)
        if self.dist.active and not self.strategy.distributed:
            raise ConfigError(
                f"method '{t.method}' cannot run under torchrun: {self.strategy.distributed_reason}", param="method"
            )
        # the method decides the head (and any deployed extras); the rest is the user's model config
        self.cfg = dataclasses.replace(cfg, model=method_model_config(cfg))
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(self.bundle.meta, self.cfg.model).to(self.device)
        # the samples that train the model (a method may hold some out, never from val/test)
        self.train_split = self.strategy.training_split(self.bundle.train, t.seed)
        self.history: list[dict[str, Any]] = []
        # the strategy's hooks: "free" adversarial training replays each minibatch (and runs epochs /
        # replays epochs); the catastrophic-overfitting guard chooses the kept epoch by its robust accuracy
        self.replays = self.strategy.replays()
        self.epochs = self.strategy.epochs_to_run(t.epochs)
        self.selection_metric = self.strategy.selection_metric()

    def evaluate_split(self, split_name: str) -> float:
        split = self.bundle.split(split_name)
        return accuracy(predict(self.model, split, device=self.device), split.labels)

    def context(self, on_message: MessageFn | None = None) -> TrainContext:
        """What the strategy's hooks see of this run (``on_message``: where their messages go)."""
        t = self.cfg.train
        sink = on_message or _ignore

        def message(text: str) -> None:  # to the caller and to Python logging
            _log.info(text)
            sink(text)

        return TrainContext(
            model=self.model, device=self.device, train=self.train_split, val=self.bundle.val, seed=t.seed,
            batch_size=t.batch_size, memory_budget=t.memory_budget, evaluate=self.evaluate_split,
            on_message=message,
        )  # fmt: skip

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Validation accuracy and mean cross-entropy in one eval-mode pass (the loss breaks ties)."""
        self.model.eval()
        correct, total = 0, 0.0
        for inputs, labels in iterate_batches(self.bundle.val, 256):
            labels = labels.to(self.device)
            logits = self.model(to_device(inputs, self.device))
            correct += int((logits.argmax(1) == labels).sum())
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return correct / len(self.bundle.val), total / len(self.bundle.val)

    def _train_epoch(
        self,
        epoch: int,
        opt: torch.optim.Optimizer,
        tick: Callable[[], None],
        gen: torch.Generator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, float]:
        t = self.cfg.train
        self._wrapped.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = _replayed(iterate_batches(
            self.train_split, t.batch_size // self.dist.world_size, shuffle=True, seed=t.seed, epoch=epoch,
            rank=self.dist.rank, world_size=self.dist.world_size,
        ), self.replays)  # fmt: skip
        for step, (inputs, labels) in enumerate(batches):
            inputs = to_device(inputs, self.device)
            labels = labels.to(self.device, non_blocking=True)
            per_rank = math.ceil(len(self.train_split) / self.dist.world_size)
            per_epoch = math.ceil(per_rank / (t.batch_size // self.dist.world_size)) * self.replays
            ctx = StepContext(epoch, step, gen, per_epoch, self.epochs)
            loss, logits = self.strategy.step_loss(self._wrapped, inputs, labels, ctx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                self.strategy.after_backward(self._wrapped, ctx)
                opt.step()
            else:  # fp16: scaled backward; the method sees (and the optimiser steps on) unscaled gradients
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                self.strategy.after_backward(self._wrapped, ctx)
                scaler.step(opt)
                scaler.update()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
            tick()
        # on the training device: NCCL reduces CUDA tensors only
        totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=self.device)
        if self.dist.active:  # report the global epoch statistics, not rank 0's shard
            torch.distributed.all_reduce(totals)
        total_loss, correct, seen = totals.tolist()
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    def fit(
        self,
        out: str | Path | None = None,
        *,
        force: bool = False,
        resume: bool = False,
        allow_data_change: bool = False,
        on_epoch: MessageFn | None = None,
        progress: ProgressFn | None = None,
        log: Sequence[str] = (),
    ) -> FitResult:
        """Train; with ``out``, write the run folder transactionally (see :class:`~mmrobust.runs.RunFolder`).

        A checkpoint is kept after every epoch while the run is in progress; ``resume`` continues
        from it and gives the same model as an uninterrupted run. Rank 0 reports each epoch's log
        line (and the strategy's messages) to ``on_epoch`` and the training steps done to ``progress``.
        A resume verifies the checkpoint (its digests) and the data (the fingerprint taken when the run
        first started; an on-disk train split is re-hashed): changed data are refused unless
        ``allow_data_change`` (the run's metrics then record both fingerprints and ``reproducible: false``).
        ``log``: experiment loggers writing into the run folder's ``logs/`` (:mod:`mmrobust.training.logs`).
        """
        self._allow_data_change = allow_data_change
        loggers = check_loggers(log)  # before the run folder is touched
        from mmrobust.runs import RunFolder

        if not self.dist.is_main:
            on_epoch = progress = None
        if out is None or not self.dist.is_main:
            if resume and out is not None:  # non-main ranks read the checkpoint rank 0 keeps
                return self._fit(RunFolder(out, resume=True).partial, None, on_epoch, progress)
            return self._fit(None, None, on_epoch, progress)
        with RunFolder(out, force=force, resume=resume) as folder, _terminate_as_interrupt():
            return self._fit(folder.partial, folder, on_epoch, progress, loggers)

    def _fit(
        self,
        resume_from: Path | None,
        folder: RunFolder | None,
        on_epoch: MessageFn | None,
        progress: ProgressFn | None,
        loggers: tuple[str, ...] = (),
    ) -> FitResult:
        """Train, continuing from the checkpoint in ``resume_from`` if there is one; ``folder``: the run
        folder this process writes (checkpoints, log, experiment ``loggers``, the run), or None."""
        state = self._setup()
        if resume_from is not None:
            self._resume(state, resume_from)
        start = time.perf_counter()
        tick = self._ticker(state.first_epoch, progress)
        ctx = self.context(on_epoch)
        self.strategy.on_train_start(ctx)
        # a resumed run's earlier epochs were logged by the interrupted attempt
        logs = EpochLogs(loggers, folder.partial, state.first_epoch) if folder is not None else None
        try:
            self._run_epochs(state, ctx, tick, folder, on_epoch, logs)
        finally:
            if logs is not None:
                logs.close()
        return self._finish(state, ctx, folder, start)

    def _setup(self) -> _FitState:
        """Wrap the model for DDP and build the optimiser, schedule, gradient scaler and step generator."""
        t = self.cfg.train
        self._wrapped: nn.Module = (
            DistributedDataParallel(self.model, **ddp_options(self.device)) if self.dist.active else self.model
        )
        scaler = grad_scaler(t.precision, self.device)
        opt = optimizer_for(self.strategy.parameters(self.model), t.optim)
        sched = scheduler_for(opt, t.optim, self.epochs)
        gen = torch.Generator().manual_seed(t.seed * 1000 + self.dist.rank)
        state = _FitState(opt, sched, scaler, gen, self.cfg.to_dict())
        state.data_fingerprint = self.bundle.source.get("fingerprint")  # taken at the start of the first attempt
        return state

    def _resume(self, state: _FitState, resume_from: Path) -> None:
        """Continue from the checkpoint in ``resume_from``, if there is one (a fresh run folder has none)."""
        from mmrobust.training.checkpoint import CHECKPOINT_JSON, config_difference, load_checkpoint

        if not (resume_from / CHECKPOINT_JSON).is_file():
            return
        ck = load_checkpoint(resume_from)  # verified against its digests first
        changed = config_difference(ck.config, state.config)
        if changed:
            raise ConfigError(
                f"cannot resume: setting '{changed}' differs from the interrupted run; "
                "use the same settings, or pass force=True to start over",
                param="force",
            )
        self._check_resume_data(state, ck.data_fingerprint, ck.data_fingerprints)
        state.resumed_from = ck.epoch
        self.model.load_state_dict(ck.model)
        state.opt.load_state_dict(ck.optimizer)
        if state.sched is not None and ck.scheduler is not None:
            state.sched.load_state_dict(ck.scheduler)
        if state.scaler is not None and ck.scaler:
            state.scaler.load_state_dict(ck.scaler)  # fp16 resumes at its loss scale, not the initial one
        torch.set_rng_state(ck.rng)
        state.gen.set_state(ck.generator)
        self.strategy.load_state_dict(ck.strategy)
        self.history = ck.history
        state.best_key, state.best_epoch, state.best_state = ck.best_key, ck.best_epoch, ck.best_model
        state.first_epoch = ck.epoch

    def _check_resume_data(self, state: _FitState, first: str | None, accepted: list[str] | None) -> None:
        """The data at resume must be those the run started on (fingerprint; an on-disk train split
        re-hashed against its meta.json), unless ``allow_data_change``."""
        from mmrobust.data.ondisk import check_splits

        now = state.data_fingerprint
        try:
            check_splits(self.bundle, ("train",))  # values edited inside an on-disk array file
            same = first is None or now == first
        except DataError:
            if not self._allow_data_change:
                raise
            same = False
        known = list(accepted or ([first] if first else []))
        if not same:
            if not self._allow_data_change:
                raise ConfigError(
                    f"cannot resume: the data changed since the interrupted run started (fingerprint {str(now)[:12]} "
                    f"!= {str(first)[:12]}); restore them, pass allow_data_change=True to continue on the new data "
                    "(the run is then marked not reproducible), or force=True to start over",
                    param=("allow_data_change", "force"),
                )
            known.append(str(now))
        state.data_fingerprint = first or now
        if len(known) > 1:
            state.data_fingerprints = known

    def _ticker(self, first_epoch: int, progress: ProgressFn | None) -> Callable[[], None]:
        """A function to call after every training step: reports the steps done to ``progress``."""
        t = self.cfg.train
        per_rank = t.batch_size // self.dist.world_size
        steps = math.ceil(math.ceil(len(self.train_split) / self.dist.world_size) / per_rank) * self.replays
        done, total, label = first_epoch * steps, self.epochs * steps, f"{t.method} train"

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(label, min(done, total), total)

        return tick

    def _run_epochs(
        self,
        state: _FitState,
        ctx: TrainContext,
        tick: Callable[[], None],
        folder: RunFolder | None,
        on_epoch: MessageFn | None,
        logs: EpochLogs | None = None,
    ) -> None:
        """The epoch loop: train, validate, keep the best model, report, log and checkpoint each epoch."""
        t = self.cfg.train
        # only the model's forwards are autocast (hooks on the model; DDP calls it); the selected
        # weights are float32 and everything after training (test accuracy, CRMT step 2) runs in fp32
        with model_precision(self.model, t.precision, self.device, t.channels_last):
            for epoch in range(state.first_epoch, self.epochs):
                row = self._epoch(state, ctx, epoch, tick)
                self.history.append(row)
                self._select(state, epoch, row)
                line = _epoch_line(t.method, self.epochs, row)
                _log.info(line)
                if on_epoch is not None:
                    on_epoch(line)
                if folder is not None:
                    self._save_epoch(state, epoch, folder.partial)
                if logs is not None:
                    logs.update(self.history)

    def _epoch(self, state: _FitState, ctx: TrainContext, epoch: int, tick: Callable[[], None]) -> dict[str, Any]:
        """Train one epoch (with the strategy's epoch hooks), step the schedule and validate: the history row."""
        e0 = time.perf_counter()
        self.strategy.on_epoch_start(ctx, epoch)
        stats = self._train_epoch(epoch, state.opt, tick, state.gen, state.scaler)
        stats.update(self.strategy.on_epoch_end(ctx, epoch))
        lr = state.opt.param_groups[0]["lr"]
        if state.sched is not None:
            state.sched.step()
        val_acc, val_loss = self.validate()
        return {
            "epoch": epoch + 1,
            **stats,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "lr": lr,
            "time_s": time.perf_counter() - e0,
        }

    def _select(self, state: _FitState, epoch: int, row: dict[str, Any]) -> None:
        """Keep the model of the highest validation accuracy; among equal accuracies (a saturated val
        split) the lowest validation loss. With the strategy's ``selection_metric`` (the adversarial
        methods' guard): the highest value of that column, ties broken by validation accuracy. Epochs
        the strategy marks not ``selectable`` never compete (if none does, the last model is kept)."""
        if not self.strategy.selectable(epoch):  # e.g. certified training before the end of its ramp
            return
        if self.selection_metric is not None:
            key = (float(row[self.selection_metric]), row["val_accuracy"])
        else:
            key = (row["val_accuracy"], -row["val_loss"])
        if key > state.best_key:
            state.best_key, state.best_epoch = key, epoch + 1
            state.best_state = copy.deepcopy(self.model.state_dict())

    def _save_epoch(self, state: _FitState, epoch: int, partial: Path) -> None:
        """Write the training log and the checkpoint after ``epoch`` into the run's partial folder."""
        from mmrobust.training.checkpoint import TrainingState, save_checkpoint

        t = self.cfg.train
        # the log is derived from the history, so after a resume it lists each epoch once
        log = "".join(_epoch_line(t.method, self.epochs, r) + "\n" for r in self.history)
        atomic_write_bytes(partial / "train.log", log.encode())
        save_checkpoint(
            partial,
            TrainingState(
                epoch + 1, self.model.state_dict(), state.best_state, state.best_key, state.best_epoch,
                state.opt.state_dict(), state.sched.state_dict() if state.sched is not None else None,
                torch.get_rng_state(), state.gen.get_state(), self.strategy.state_dict(), self.history,
                state.config, state.scaler.state_dict() if state.scaler is not None else None,
                state.data_fingerprint, state.data_fingerprints,
            ),
        )  # fmt: skip

    def _finish(self, state: _FitState, ctx: TrainContext, folder: RunFolder | None, start: float) -> FitResult:
        """Restore the selected model, run the strategy's last step, measure it and commit the run folder."""
        from mmrobust.runs import save_run

        t = self.cfg.train
        if state.best_state is not None:
            self.model.load_state_dict(state.best_state)
        extra = self.strategy.after_training(ctx)
        extra.update(self.strategy.training_record(t.epochs))
        self.model.eval()
        metrics: dict[str, Any] = {
            "method": t.method,
            "val_accuracy": self.evaluate_split("val"),
            "test_accuracy": self.evaluate_split("test"),
            "best_epoch": state.best_epoch,
            "epochs": self.epochs,
            "world_size": self.dist.world_size,
            "train_time_s": time.perf_counter() - start,
            "history": self.history,
            **extra,
            "resumed": state.resumed_from is not None,
            "resumed_from_epoch": state.resumed_from,
            "reproducible": state.data_fingerprints is None,
        }
        if state.data_fingerprints is not None:
            metrics["data_fingerprints"] = state.data_fingerprints  # the first, then each accepted change
        path = None
        if folder is not None:
            save_run(folder.partial, self.model, self.cfg, self.bundle, metrics)
            path = folder.commit()
        teardown_distributed(self.dist)
        return FitResult(self.model, metrics, self.cfg, self.bundle, path)


def _replayed(batches: Iterator[Any], replays: int) -> Iterator[Any]:
    """Each item of ``batches`` ``replays`` times in a row ("free" adversarial training)."""
    for batch in batches:
        for _ in range(replays):
            yield batch


def _epoch_line(method: str, epochs: int, row: dict[str, Any]) -> str:
    guard = f"  guard robust acc {row[ROBUST]:.4f}" if ROBUST in row else ""
    return (
        f"[{method}] epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train acc {row['train_accuracy']:.4f}  val acc {row['val_accuracy']:.4f}{guard}  ({row['time_s']:.1f}s)"
    )


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send) or SIGINT during training."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an interrupt while training, so the run folder's lock is released and the
    last epoch's checkpoint stays for ``resume=True`` (SIGINT already raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise TrainingInterrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    cfg: RunConfig,
    out: str | Path | None = None,
    bundle: DataBundle | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    allow_data_change: bool = False,
    on_epoch: MessageFn | None = None,
    progress: ProgressFn | None = None,
    log: Sequence[str] = (),
) -> FitResult:
    """Train a model from a :class:`RunConfig`; write the run folder to ``out`` if given.

    An existing ``out`` is refused unless ``force`` (replace it) or ``resume`` (continue an
    interrupted run from its last epoch checkpoint; ``allow_data_change``: see :meth:`Trainer.fit`).
    ``on_epoch``/``progress``/``log``: see :meth:`Trainer.fit`.
    """
    if out is not None and int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 owns the folder
        from mmrobust.runs import RunFolder

        RunFolder(out, force=force, resume=resume)._check_target()  # refuse before loading data
    return Trainer(cfg, bundle).fit(
        out,
        force=force,
        resume=resume,
        allow_data_change=allow_data_change,
        on_epoch=on_epoch,
        progress=progress,
        log=log,
    )
