"""Cost of one training step of every method relative to JT, on the same batches.

Each method gets the model its strategy asks for (head, auxiliary heads, memory) built from the same
seed, the same batches and AdamW; a step is ``loss`` + backward + ``after_backward`` + optimiser step,
exactly the engine's inner loop. Per-epoch hooks (PMR's prototypes, GB's held-out losses) and
after-training work (CRMT's step 2, MSEFM's memory) are not steps and are not included; the epoch
hooks are run once before timing so the step sees a ready state. Steps are timed in interleaved
blocks (every method once per round) so that load from other processes hits all methods alike;
the median step time and its ratio to JT's are reported.

    python benchmarks/method_step_cost.py [--data avdigits] [--rounds 8] [--block 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.config import RunConfig, options_dataclass
from mmrobust.data.base import iterate_batches
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.io import write_json
from mmrobust.models.fusion import build_model
from mmrobust.report.tables import print_table
from mmrobust.training import METHODS
from mmrobust.training.base import StepContext
from mmrobust.training.context import TrainContext

ORDER = ["jt", "mixup", "gb", "ogm-ge", "pmr", "msefm", "mmat", "varmat", "varmat-input",
         "ojt", "crmt-jt", "crmt-at", "crmt-mix"]  # fmt: skip


def time_steps(
    runners: dict[str, tuple[Any, Any, Any, torch.Generator]], batches: list[Any], rounds: int
) -> dict[str, list[float]]:
    """Seconds of each training step (loss, backward, ``after_backward``, optimiser step) of every
    ``name: (strategy, model, optimiser, generator)``, in interleaved rounds (every runner once per
    round, so load from other processes hits all alike); round 0 warms up and is not timed."""
    times: dict[str, list[float]] = {n: [] for n in runners}
    for r in range(rounds + 1):
        for name, (strategy, model, opt, gen) in runners.items():
            model.train()
            for i, (x, y) in enumerate(batches):
                t0 = time.perf_counter()
                ctx = StepContext(0, r * len(batches) + i, gen)
                loss, _ = strategy.loss(model, x, y, ctx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                strategy.after_backward(model, ctx)
                opt.step()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="avdigits")
    p.add_argument("--methods", default=",".join(ORDER))
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--block", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/method_step_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_data(DataConfig(args.data, 0))
    batches = [
        b for _, b in zip(range(args.block), iterate_batches(bundle.train, args.batch_size, shuffle=True), strict=False)
    ]
    runners = {}
    for name in args.methods.split(","):
        cls = METHODS.get(name)
        strategy = cls(options_dataclass(cls.Options, {}, name), bundle.meta)
        cfg = RunConfig()
        cfg.model = strategy.model_config(cfg.model, strategy.options)
        torch.manual_seed(0)
        model = build_model(bundle.meta, cfg.model)
        trainer = TrainContext(
            model=model, device=torch.device("cpu"), train=strategy.training_split(bundle.train, 0), val=bundle.val,
            seed=0, batch_size=args.batch_size, memory_budget=cfg.train.memory_budget,
            evaluate=lambda split: float("nan"), on_message=lambda text: None,
        )  # fmt: skip
        strategy.on_train_start(trainer)
        strategy.on_epoch_start(trainer, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runners[name] = (strategy, model, opt, torch.Generator().manual_seed(0))
    times = time_steps(runners, batches, args.rounds)
    base = statistics.median(times["jt"]) if "jt" in times else None
    rows, out = [], {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rel = med / base if base else float("nan")
        out[name] = {"median_step_s": med, "relative_to_jt": rel, "steps": len(ts)}
        rows.append([name, f"{med * 1000:.1f}", f"{rel:.2f}x"])
    print_table(
        f"one training step on {args.data}, batch {args.batch_size}, {args.threads} thread(s)",
        ["method", "median ms", "vs JT"], rows,
    )  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(Path(args.out), {"settings": settings, "methods": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
