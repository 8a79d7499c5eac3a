"""Shared fixtures: tiny synthetic data and a tiny trained run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from mmrobust.config import RunConfig
from mmrobust.data import DataConfig, load_data

# The test models are tiny: one thread is faster for them, and small batched LAPACK calls (sound
# Lipschitz bounds) run ~100x slower with 2 threads on a busy 2-core machine.
torch.set_num_threads(1)

TINY = {"n_train": "240", "n_val": "80", "n_test": "120", "dim": "12", "classes": "4"}


@pytest.fixture(scope="session")
def tiny_bundle():
    """A 4-class synthetic bundle with a strong and a weak vector modality."""
    return load_data(DataConfig("synthetic", 0, dict(TINY)))


def tiny_config(method: str = "jt", epochs: int = 3, seed: int = 0) -> RunConfig:
    cfg = RunConfig()
    cfg.data = DataConfig("synthetic", seed, dict(TINY))
    cfg.model.feature_dim = 16
    cfg.train.method, cfg.train.epochs, cfg.train.seed = method, epochs, seed
    cfg.train.batch_size = 32
    cfg.train.optim.lr = 3e-3
    cfg.train.progress = False
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A JT run folder trained on tiny synthetic data (shared by several tests; do not modify)."""
    from mmrobust.training import train

    out = tmp_path_factory.mktemp("runs") / "jt"
    train(tiny_config(), out=out)
    return out


@pytest.fixture(scope="session")
def avdigits():
    return load_data(DataConfig("avdigits", 0))


def free_port() -> str:
    """A TCP port free right now, for torchrun's rendezvous (a fixed port collides with any other
    test run on the same machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
