"""Training-step time of mmrobust vs the official CRMT code on the paper's ResNet18 shapes.

One step = forward + backward + optimiser step on a batch of ``--batch-size`` samples of 3 video
frames and a 1-channel spectrogram, ``--classes`` classes (Kinetics-Sounds: 31), SGD lr 1e-3
momentum 0.9 (the paper's optimiser), 1 thread by default. Sizes: ``reduced`` (3x64x64 frames,
1x256x64 spectrogram) and ``full`` (3x224x224 frames, 1x1024x128 spectrogram). Variants of ours:
``fp32``, ``fp32+cl`` (channels_last), ``bf16`` (autocast), ``bf16+cl``.

The official code (GeWu-Lab/Certifiable-Robust-Multi-modal-Training) is imported at run time from
``--official PATH`` (or ``$CRMT_OFFICIAL``), never copied here: its ``models.backbone.resnet18`` and
``models.multimodal.MultiModalModel`` build the model, and its own ``train.train_CRMT_JT`` /
``train.train_CRMT_AT`` run the step on a one-batch loader (only ``train.obtain_input`` is replaced,
because it moves tensors to CUDA). Its JT is ``train_CRMT_JT`` with ``rho = 0`` on the concat fusion
(the official code has no separate JT step). Without the checkout only our steps are timed.

Runners are timed in interleaved rounds (every runner once per round), so load from other processes
hits all alike; medians and ratios to the official fp32 step of the same size and method are
reported (ratios within this run only).

    python benchmarks/step_vs_official.py --official /path/to/checkout [--sizes reduced,full]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mmrobust.config import options_dataclass
from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.io import write_json
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.precision import model_precision
from mmrobust.report.tables import print_table
from mmrobust.training import METHODS
from mmrobust.training.base import StepContext

SIZES = {"reduced": ((64, 64), (256, 64)), "full": ((224, 224), (1024, 128))}
OFFICIAL_FN = {"jt": "train_CRMT_JT", "crmt-jt": "train_CRMT_JT", "crmt-at": "train_CRMT_AT"}


def make_batch(size: str, n: int, classes: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    (h, w), (f, t) = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    inputs = {"visual": torch.randn(n, 3, 3, h, w, generator=g), "audio": torch.randn(n, 1, f, t, generator=g)}
    return inputs, torch.randint(0, classes, (n,), generator=g)


def ours(method: str, size: str, variant: str, batch: tuple, classes: int) -> Callable[[int], float]:
    (h, w), (f, t) = SIZES[size]
    meta = DatasetMeta(
        f"ks-{size}",
        [ModalitySpec("visual", "video", (3, 3, h, w)), ModalitySpec("audio", "spectrogram", (1, f, t))],
        [str(i) for i in range(classes)],
    )
    cls = METHODS.get(method)
    strategy = cls(options_dataclass(cls.Options, {}, method), meta)
    torch.manual_seed(0)
    model = build_model(meta, strategy.model_config(ModelConfig(encoders={"visual": "resnet18", "audio": "resnet18"})))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    precision = variant.split("+")[0]
    channels_last = variant.endswith("+cl")
    x, y = batch
    model.train()

    def step(i: int) -> float:
        t0 = time.perf_counter()
        with model_precision(model, precision, "cpu", channels_last):
            loss, _ = strategy.loss(model, x, y, StepContext(0, i, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.after_backward(model, StepContext(0, i, gen))
        opt.step()
        return time.perf_counter() - t0

    return step


def official(path: Path, method: str, batch: tuple, classes: int) -> Callable[[int], float]:
    sys.path.insert(0, str(path))
    try:
        import train as official_train  # type: ignore[import-not-found]
        from models.backbone import resnet18  # type: ignore[import-not-found]
        from models.multimodal import MultiModalModel  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(path))
    official_train.obtain_input = lambda b: (b["clip"], b["audio"], b["target"])  # the original calls .cuda()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        fusion = "concat" if method == "jt" else "orth"
        model = MultiModalModel(resnet18("visual"), resnet18("audio"), classes, fusion)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    cfg = SimpleNamespace(methods=SimpleNamespace(rho=0.0 if method == "jt" else 2.0), num_modal=2, device="cpu",
                          n_classes=classes)  # fmt: skip
    x, y = batch
    loader = [{"clip": x["visual"].permute(0, 2, 1, 3, 4).contiguous(), "audio": x["audio"], "target": y}]
    fn = getattr(official_train, OFFICIAL_FN[method])
    criterion = nn.CrossEntropyLoss()

    def step(i: int) -> float:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per epoch
            fn(epoch=1, data_loader=loader, model=model, criterion=criterion, optimizer=opt, epoch_logger=None,
               batch_logger=None, tb_writer=None, opt=cfg)  # fmt: skip
        return time.perf_counter() - t0

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=os.environ.get("CRMT_OFFICIAL"), help="checkout of the official code")
    p.add_argument("--sizes", default="reduced,full")
    p.add_argument("--methods", default="jt,crmt-jt,crmt-at")
    p.add_argument("--variants", default="fp32,fp32+cl,bf16,bf16+cl", help="our variants at the reduced size")
    p.add_argument("--full-variants", default="fp32,fp32+cl", help="our variants at full size")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one step per runner each)")
    p.add_argument("--slow-rounds", type=int, default=1, help="rounds for bf16 variants and crmt-at")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", type=int, default=31)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/step_vs_official.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    have_official = bool(args.official) and (Path(args.official) / "train.py").is_file()
    rows, results = [], []
    for size in args.sizes.split(","):
        batch = make_batch(size, args.batch_size, args.classes)
        variants = (args.variants if size == "reduced" else args.full_variants).split(",")
        for method in args.methods.split(","):
            runners: dict[str, Callable[[int], float]] = {}
            if have_official:
                runners["official fp32"] = official(Path(args.official), method, batch, args.classes)
            for v in variants:
                runners[f"mmrobust {v}"] = ours(method, size, v, batch, args.classes)
            slow = {k for k in runners if "bf16" in k} | (set(runners) if method == "crmt-at" else set())
            times: dict[str, list[float]] = {k: [] for k in runners}
            for run in runners.values():  # warm-up (first-call allocations, oneDNN kernels)
                run(0)
            for r in range(max(args.rounds, args.slow_rounds)):
                for name, run in runners.items():
                    if r < (args.slow_rounds if name in slow else args.rounds):
                        times[name].append(run(r + 1))
            base = statistics.median(times["official fp32"]) if have_official else None
            for name, ts in times.items():
                med = statistics.median(ts)
                ratio = base / med if base else None
                results.append({"size": size, "method": method, "runner": name, "median_s": med, "steps": len(ts),
                                "times_s": ts, "speedup_vs_official_fp32": ratio})  # fmt: skip
                rows.append([size, method, name, f"{med:.3f}", str(len(ts)), "-" if ratio is None else f"{ratio:.2f}x"])
            print(f"done {size} {method}", file=sys.stderr, flush=True)
            _write(args, have_official, results)  # after every method: a long run that is stopped keeps its rows
    note = "" if have_official else " — official code NOT available (--official / $CRMT_OFFICIAL): ours only"
    print_table(
        f"Step time, batch {args.batch_size}, {args.classes} classes, {args.threads} thread(s){note}",
        ["size", "method", "runner", "median s", "steps", "speed-up vs official fp32"],
        rows,
    )
    _write(args, have_official, results)
    return 0


def _write(args: argparse.Namespace, have_official: bool, results: list[dict]) -> None:
    out = {"batch_size": args.batch_size, "classes": args.classes, "threads": args.threads,
           "official": args.official if have_official else None, "cpu": _cpu(), "torch": torch.__version__,
           "results": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
