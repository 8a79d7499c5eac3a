"""torch.distributed helpers: a run under ``torchrun`` is detected from its environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group if launched by torchrun (gloo on CPU, nccl on CUDA).

    On CUDA each process first binds its own GPU (``cuda:LOCAL_RANK``, see :func:`resolve_device`), so
    NCCL's communicators and every default-device allocation land on it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def ddp_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``DistributedDataParallel`` for a module on ``device``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device_ids": [index], "output_device": index}
    return {}


def teardown_distributed(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, param: str = "train.device") -> torch.device:
    """``auto`` -> CUDA if present, else CPU (:func:`mmrobust.config.resolve_device`: a malformed name,
    or CUDA that is not there, is a one-line error); under torchrun on CUDA, one GPU per local rank."""
    from mmrobust.config import resolve_device as resolve

    device = resolve(name, param)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = resolve(f"cuda:{os.environ['LOCAL_RANK']}", param)
    return device
