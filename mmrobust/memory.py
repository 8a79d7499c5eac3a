"""Memory budgets: batch sizes of the heavy passes (Lipschitz estimate, attacks, certification) chosen
so that a pass fits a budget (see docs/scale.md).

A pass is described by ``fn(n)``, which runs it on ``n`` samples. :func:`plan_batch` runs it on 1
and 2 samples, measures the peak memory of each run (CUDA: the allocator's peak; CPU: the process's
peak resident set, reset through ``/proc/self/clear_refs``; elsewhere: the bytes autograd saves for
the backward, doubled), takes the cost of one sample as ``max(peak(2) - peak(1), peak(2) / 2)``
(never below the measured marginal cost; the half of ``peak(2)`` also covers fixed costs) and
returns the largest batch whose predicted peak, with a 25% margin, fits the budget.

The budget is ``auto`` (a fraction of the memory available now: ``MemAvailable`` on CPU, free GPU
memory on CUDA) or a size such as ``8GB`` (``--memory-budget``). An explicit ``--batch-size`` skips
the probe.

Floor: this module imports :mod:`mmrobust.data` (the samples a probe runs on) and the ground floor
only; never evaluation, certification, runs or configs (they import it).
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmrobust.data.base import Split
from mmrobust.errors import ConfigError
from mmrobust.torchutil import eval_mode, to_device

#: share of the currently available memory an ``auto`` budget takes
AUTO_FRACTION = 0.6
#: safety margin on the measured cost of a sample
MARGIN = 1.25
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str | int, what: str = "memory budget", param: str | None = None) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5g"`` or a plain byte count -> bytes (K/M/G/T are powers of 1024).

    ``what`` names the value in messages; ``param`` is the parameter an error is about (default:
    ``what`` where it is an identifier such as ``memory_budget``)."""
    if param is None and what.isidentifier():
        param = what
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
        if m is None:
            raise ConfigError(f"{what}: expected a size such as 8GB, 512MB or a byte count, got '{text}'", param=param)
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"{what}: must be more than 0 bytes, got '{text}'", param=param)
    return size


def check_budget(budget: str, where: str = "memory_budget") -> None:
    """``auto`` or a size (one-line error otherwise)."""
    if budget != "auto":
        parse_bytes(budget, f"option '{where}'")


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory a pass may use now: free GPU memory on CUDA, ``MemAvailable`` (or the cgroup's
    remaining limit, whichever is smaller) on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            left = int(limit) - int(used)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 8 * 2**30  # unknown platform: assume 8 GiB


def resolve_budget(budget: str | int | None, device: str | torch.device = "cpu") -> int:
    """Bytes of a budget: ``None``/``"auto"`` -> :data:`AUTO_FRACTION` of the available memory."""
    if budget is None or budget == "auto":
        return int(AUTO_FRACTION * available_bytes(device))
    return parse_bytes(budget)


@dataclass(frozen=True)
class BatchPlan:
    """A batch size and how it was chosen (bytes are the measured peaks, not the prediction)."""

    batch_size: int
    budget_bytes: int
    per_sample_bytes: int
    fixed_bytes: int
    method: str  # cuda-peak | rss-peak | saved-tensors | given

    def predicted_bytes(self, batch_size: int | None = None) -> int:
        """Predicted peak of a batch of ``batch_size`` samples (default: the plan's)."""
        n = self.batch_size if batch_size is None else batch_size
        return int(self.fixed_bytes + MARGIN * self.per_sample_bytes * n)


def _trim() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS, so the peak below starts from a low baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def measure_peak(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[int, str]:
    """Peak bytes ``fn()`` adds to what is in use when it starts, and the method that measured it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(torch.cuda.max_memory_allocated(dev) - base, 0), "cuda-peak"
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (Linux >= 4.0)
        base = _status("VmRSS")
    except OSError:
        return _saved_bytes(fn), "saved-tensors"
    fn()
    return max(_status("VmHWM") - base, 0), "rss-peak"


def _saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd saves for the backward during ``fn()`` (distinct storages), doubled for the
    backward's own temporaries: a platform-independent fallback."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # functorch wrappers have no storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return 2 * sum(seen.values())


def plan_batch(
    fn: Callable[[int], Any],
    budget: str | int | None = "auto",
    device: str | torch.device = "cpu",
    *,
    cap: int | None = None,
    samples: int | None = None,
    extra_per_sample: int = 0,
) -> BatchPlan:
    """The largest batch size ``n`` (at most ``cap`` and ``samples``) for which ``fn(n)`` fits ``budget``.

    ``fn`` is run on 1 and 2 samples (1 if ``samples`` is 1); ``extra_per_sample`` adds bytes the
    probe does not see (e.g. an attack's copies of the inputs). At least 1 is returned: a single
    sample over the budget shows as ``predicted_bytes(1) > budget_bytes`` (callers that can split one
    sample's work, like the Jacobian, use :func:`jacobian_chunk`).
    """
    total = resolve_budget(budget, device)
    p1, method = measure_peak(lambda: fn(1), device)
    if samples is not None and samples < 2:
        per, fixed = p1, 0
    else:
        p2, _ = measure_peak(lambda: fn(2), device)
        per = max(p2 - p1, p2 // 2, 1)
        fixed = max(p2 - 2 * per, 0)
    per += extra_per_sample
    n = max(int((total - fixed) // (MARGIN * per)), 1)
    for limit in (cap, samples):
        if limit is not None:
            n = min(n, max(int(limit), 1))
    return BatchPlan(n, total, int(per), int(fixed), method)


def given_batch(batch_size: int, what: str = "batch_size") -> BatchPlan:
    """A user-given batch size (no probe)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {batch_size!r}", param="batch_size")
    return BatchPlan(batch_size, 0, 0, 0, "given")


def jacobian_chunk(plan: BatchPlan, rows: int) -> int | None:
    """Rows of a vectorised Jacobian to compute at once so that one sample fits the budget
    (None: all rows fit). The cost of a sample is taken as proportional to the rows computed at once."""
    if plan.method == "given" or plan.per_sample_bytes * MARGIN + plan.fixed_bytes <= plan.budget_bytes:
        return None
    share = (plan.budget_bytes - plan.fixed_bytes) / (MARGIN * plan.per_sample_bytes)
    return max(1, min(rows, math.floor(rows * share)))


def input_gradient_plan(
    model: torch.nn.Module,
    split: Split,
    budget: str | int | None = "auto",
    device: str | torch.device = "cpu",
    cap: int | None = 256,
) -> BatchPlan:
    """Batch size for gradient attacks (and anything lighter: clean or certified forwards): the probe
    is one eval-mode forward and a backward to the inputs, plus 12 copies of each sample's inputs
    for the attack's own state (clean, current and best iterate, gradient, bounds, steps)."""

    def probe(n: int) -> None:
        inputs, labels = split.take(slice(0, n))
        x = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in to_device(inputs, device).items()}
        with eval_mode(model), torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(x), labels.to(device))
            torch.autograd.grad(loss, [v for v in x.values() if v.requires_grad])

    first, _ = split.take(slice(0, 1))
    state = 12 * sum(v.numel() * v.element_size() for v in first.values())
    return plan_batch(probe, budget, device, cap=cap, samples=len(split), extra_per_sample=state)
