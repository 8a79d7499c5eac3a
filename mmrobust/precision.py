"""Numeric precision and memory layout of model forwards (see docs/scale.md).

``fp32`` is plain float32. ``bf16`` runs the model's forward under :func:`torch.autocast` with
bfloat16 (CPU or CUDA). ``fp16`` is CUDA automatic mixed precision: float16 autocast plus a
:class:`torch.amp.GradScaler` for training; it is refused on CPU.

Only the model's forward is autocast: :func:`model_precision` installs hooks on the model that enter
autocast when its ``forward`` starts and leave it when it returns, casting floating outputs back to
float32. Everything outside the forward (losses, regularisers, attack steps, projections, step
sizes, certificates) sees float32 tensors and computes in float32. Weights stay float32.

``channels_last`` stores 4-d image inputs (and each frame of a video) in NHWC order before the
forward; convolutions then run in that layout. Whether it is faster depends on the CPU/GPU: measure
(``benchmarks/step_vs_official.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmrobust.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str | torch.device = "cpu", where: str = "precision") -> None:
    """One-line error for an unknown precision, or fp16 where it cannot run (CPU)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"option '{where}': unknown precision '{precision}'; choose from: {', '.join(PRECISIONS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if precision == "fp16" and kind == "cpu":
        raise ConfigError(
            f"option '{where}': fp16 needs a CUDA device (CPU float16 is slow and loses accuracy); use bf16 on CPU"
        )


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def to_float32(out: Any) -> Any:
    """Floating tensors inside ``out`` (tensor, dict, list, tuple) cast to float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, dict):
        return {k: to_float32(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return type(out)(to_float32(v) for v in out)
    return out


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NHWC strides: 4-d ``(N, C, H, W)`` directly; 5-d videos ``(N, T, C, H, W)`` so that
    folding time into the batch (``x.flatten(0, 1)``) gives a channels-last view. Other ranks unchanged."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return x


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def model_precision(
    model: nn.Module, precision: str = "fp32", device: str | torch.device = "cpu", channels_last: bool = False
) -> Iterator[nn.Module]:
    """While active, every ``model(...)`` call runs autocast in ``precision`` (outputs back in
    float32) and, with ``channels_last``, gets its image/video inputs in NHWC order.

    Hooks on ``model`` itself: the object stays the same (attributes, DDP wrapping, state dict).
    Nested use on the same model is not supported (the inner context would enter autocast twice).
    """
    check_precision(precision, device)
    if precision == "fp32" and not channels_last:
        yield model
        return
    device_type = torch.device(device).type
    stack: list[contextlib.AbstractContextManager[Any]] = []

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if channels_last and args and isinstance(args[0], dict):
            args = ({k: channels_last_input(v) for k, v in args[0].items()}, *args[1:])
        if precision != "fp32":
            ctx = torch.autocast(device_type, dtype=DTYPES[precision])
            ctx.__enter__()
            stack.append(ctx)
        return args, kwargs

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        if stack:
            stack.pop().__exit__(None, None, None)
        return to_float32(out)

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        while stack:  # a forward that raised before its post hook (always_call covers it; belt and braces)
            stack.pop().__exit__(None, None, None)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast switched off (CPU and CUDA) for code that must compute in float32 (certificates)."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 on CUDA (float16 gradients underflow without it); None otherwise."""
    check_precision(precision, device)
    if precision == "fp16":
        return torch.amp.GradScaler(torch.device(device).type)
    return None
