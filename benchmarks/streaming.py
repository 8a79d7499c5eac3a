"""Training throughput streaming from the on-disk format vs in memory, and peak memory vs dataset size.

Three parts (each measurement runs in a fresh child process so that its peak RSS is its own):

1. **Throughput on avdigits**: a real JT training step (default model, batch 64) over one shuffled
   epoch, with the batches read from memory, from disk (float32), from disk with uint8 images, and
   from disk through 2 DataLoader workers. Epochs are interleaved; the median samples/s is kept
   and reported relative to in-memory (target >= 90 %).
2. **Memory vs dataset size**: synthetic uint8 ``image`` (3x64x64) + float16 ``spectrogram``
   (1x64x64) datasets of 1x and 4x ``--rss-gb`` on disk; each child streams one whole epoch
   (sequential, batch 256, --workers) and trains ``--steps`` shuffled JT steps. Peak RSS of the main process
   and of its workers are reported; memory must not grow with the dataset.
3. **Larger than RAM** (``--big-gb``, e.g. 36 on a 24 GB machine; 0 skips it): the same child on a
   dataset of that size, then the dataset is deleted. Target: completes with peak RSS < 4 GB.
4. **A whole training run on it** (``--big-train``, with ``--big-gb``): a real ``mmrobust train``
   (CLI subprocess) over one full epoch of the larger-than-RAM dataset, with MLP encoders
   (``--big-feature-dim``) so that the epoch is cheap enough to finish, batch ``--big-batch``. The
   child's wall time, samples/s and peak RSS (``os.wait4``: the train process and, when workers are
   used, the largest of its workers) are recorded. ``--skip-stream`` skips part 3's streaming child.

    python benchmarks/streaming.py [--epochs 3] [--rss-gb 1] [--big-gb 36] [--dir /tmp/mmrobust-stream]
    python benchmarks/streaming.py --epochs 0 --rss-gb 0 --big-gb 36 --big-train --skip-stream
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmrobust.data.base import DatasetMeta, ModalitySpec, iterate_batches
from mmrobust.data.ondisk import DiskWriter, Storage, convert
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.io import write_json
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.report.tables import print_table
from mmrobust.training.base import StepContext
from mmrobust.training.jt import JointTraining

IMAGE, SPEC = (3, 64, 64), (1, 64, 64)
ROW_BYTES = int(np.prod(IMAGE)) + 2 * int(np.prod(SPEC))  # uint8 image + float16 spectrogram


def _rss_mb() -> dict[str, float]:
    """Peak RSS (MiB) of this process and of its (joined) children, e.g. DataLoader workers."""
    return {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _train_epoch(
    model, strategy, opt, split, batch_size: int, epoch: int, steps: int | None = None
) -> tuple[int, float]:
    """One shuffled epoch (or ``steps`` steps) of real JT training steps; returns (samples, seconds)."""
    model.train()
    gen = torch.Generator().manual_seed(epoch)
    seen, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(iterate_batches(split, batch_size, shuffle=True, seed=0, epoch=epoch)):
        if steps is not None and step >= steps:
            break
        loss, _ = strategy.loss(model, x, y, StepContext(epoch, step, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen, time.perf_counter() - t0


# -- children -------------------------------------------------------------------------------------


def child_throughput(sources: dict[str, list], epochs: int, batch_size: int) -> dict:
    """Interleaved epochs over each source (name -> [data name, options]); median samples/s each."""
    torch.set_num_threads(1)
    bundles = {k: load_data(DataConfig(name, 0, dict(opts))) for k, (name, opts) in sources.items()}
    splits = {k: b.train for k, b in bundles.items()}
    meta = next(iter(bundles.values())).meta
    rates: dict[str, list[float]] = {k: [] for k in splits}
    models = {}
    for k in splits:
        torch.manual_seed(0)
        model = build_model(meta, ModelConfig())
        models[k] = (model, JointTraining(None, meta), torch.optim.AdamW(model.parameters(), lr=1e-3))
        _train_epoch(*models[k], splits[k], batch_size, 0, steps=3)  # warm-up
    for epoch in range(epochs):
        for k, split in splits.items():
            n, s = _train_epoch(*models[k], split, batch_size, epoch + 1)
            rates[k].append(n / s)
    return {"samples_per_s": {k: statistics.median(v) for k, v in rates.items()}, "all": rates, "rss_mb": _rss_mb()}


def child_stream(root: str, steps: int, batch_size: int, workers: int) -> dict:
    """One sequential streamed epoch (read + decode, batch 256) and ``steps`` shuffled JT steps."""
    torch.set_num_threads(1)
    bundle = load_data(DataConfig(root, 0, {"workers": workers}))
    t0 = time.perf_counter()
    n = 0
    for x, y in iterate_batches(bundle.train, 256):
        n += len(y)
        assert x["image"].dtype == torch.float32
    epoch_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(bundle.meta, ModelConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen, train_s = _train_epoch(model, JointTraining(None, bundle.meta), opt, bundle.train, batch_size, 1, steps)
    return {"samples": n, "bytes": n * ROW_BYTES, "epoch_s": epoch_s, "epoch_mb_per_s": n * ROW_BYTES / 2**20 / epoch_s,
            "train_steps": steps, "train_samples_per_s": seen / train_s, "rss_mb": _rss_mb()}  # fmt: skip


def _run_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"kind": kind, **kw})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` as a child process (stdout + stderr to ``log``): exit code, wall time and the peak RSS
    of that child alone (``os.wait4``; on Linux it includes the descendants it reaped, e.g. workers)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_train_cli(root: Path, run: Path, epochs: int, batch_size: int, feature_dim: int, workers: int) -> dict:
    """``mmrobust train`` (JT, MLP encoders) on the folder ``root`` in a child process: wall time, peak RSS."""
    cfg = run.parent / "big-train-config.json"
    write_json(cfg, {"model": {"encoders": {"image": "mlp", "spec": "mlp"}, "feature_dim": feature_dim}})
    cmd = [sys.executable, "-m", "mmrobust.cli", "train", "--config", str(cfg), "--data", str(root), "--method",
           "jt", "--epochs", str(epochs), "--batch-size", str(batch_size), "--no-progress", "--out", str(run),
           "--data-opt", f"workers={workers}"]  # fmt: skip
    log = run.parent / "big-train.log"
    res = run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, log)
    text = log.read_text()
    if res["rc"] != 0:
        raise SystemExit(f"mmrobust train failed (exit {res['rc']}):\n{text[-3000:]}")
    metrics = json.loads((run / "metrics.json").read_text())
    return {"cmd": ["mmrobust", *cmd[3:]], **res, "last_line": text.strip().splitlines()[-1], "metrics": metrics}


# -- data -----------------------------------------------------------------------------------------


def make_synthetic(root: Path, gb: float, seed: int = 0) -> dict:
    """A synthetic on-disk dataset of about ``gb`` GiB: uint8 image + float16 spectrogram, 10 classes."""
    n_train = max(1024, int(gb * 2**30 / ROW_BYTES))
    sizes = {"train": n_train, "val": 256, "test": 256}
    meta = DatasetMeta(
        "stream-synthetic",
        [ModalitySpec("image", "image", IMAGE, (0.0, 1.0)), ModalitySpec("spec", "spectrogram", SPEC)],
        [str(k) for k in range(10)],
        {"description": "random bytes for the streaming benchmark"},
    )
    w = DiskWriter.create(root, meta, sizes, {"image": Storage("uint8", 1 / 255), "spec": Storage("float16")})
    rng = np.random.default_rng(seed)
    chunk = max(1, (64 << 20) // ROW_BYTES)
    pool_img = rng.integers(0, 256, (chunk + 997, *IMAGE), dtype=np.uint8)  # slices of a random pool: fast
    pool_spec = rng.standard_normal((chunk + 997, *SPEC), dtype=np.float32).astype(np.float16)
    t0 = time.perf_counter()
    for split, n in sizes.items():
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            o = int(rng.integers(0, 997))
            w.write(split, a, {"image": pool_img[o : o + b - a], "spec": pool_spec[o : o + b - a]},
                    rng.integers(0, 10, b - a))  # fmt: skip
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    w.finish()
    finish_s = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in root.rglob("*.npy"))
    return {"train_samples": n_train, "disk_gb": nbytes / 2**30, "write_s": write_s, "finish_s": finish_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="interleaved epochs per source (throughput part)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rss-gb", type=float, default=1.0, help="size of the 1x dataset (GiB); 0 skips part 2")
    p.add_argument("--big-gb", type=float, default=0.0, help="size of the larger-than-RAM dataset; 0 skips it")
    p.add_argument("--steps", type=int, default=50, help="shuffled training steps in parts 2 and 3")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of parts 2 and 3")
    p.add_argument("--big-train", action="store_true", help="part 4: `mmrobust train`, one epoch over --big-gb")
    p.add_argument("--big-batch", type=int, default=512, help="batch size of the part 4 training run")
    p.add_argument("--big-feature-dim", type=int, default=16, help="feature_dim of part 4's MLP encoders")
    p.add_argument("--big-workers", type=int, default=0, help="DataLoader workers of the part 4 training run")
    p.add_argument("--skip-stream", action="store_true", help="no streaming child for --big-gb (part 3)")
    p.add_argument("--dir", default=None, help="scratch folder for the datasets (deleted afterwards)")
    p.add_argument("--out", default="benchmarks/results/streaming.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        res = child_throughput(**spec) if kind == "throughput" else child_stream(**spec)
        print(json.dumps(res))
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="mmrobust-stream-", dir=args.dir))
    out: dict = {"batch_size": args.batch_size, "epochs": args.epochs, "ram_gb": os.sysconf("SC_PHYS_PAGES")
                 * os.sysconf("SC_PAGE_SIZE") / 2**30}  # fmt: skip
    try:
        # 1. throughput on avdigits
        if args.epochs > 0:
            throughput(args, scratch, out)
        # 2. memory vs dataset size, 3. larger than RAM, 4. a training run on it
        streaming(args, scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    return 0


def throughput(args: argparse.Namespace, scratch: Path, out: dict) -> None:
    av = load_data(DataConfig("avdigits", 0))
    convert(av, scratch / "avd-f32")
    convert(av, scratch / "avd-u8", uint8=["image"])
    sources = {
        "memory": ["avdigits", {}],
        "disk float32": [str(scratch / "avd-f32"), {}],
        "disk uint8 image": [str(scratch / "avd-u8"), {}],
        "disk uint8, 2 workers": [str(scratch / "avd-u8"), {"workers": 2}],
    }
    tp = _run_child("throughput", sources=sources, epochs=args.epochs, batch_size=args.batch_size)
    base = tp["samples_per_s"]["memory"]
    out["throughput"] = {**tp, "ratio_to_memory": {k: v / base for k, v in tp["samples_per_s"].items()}}
    print_table(
        f"JT training throughput on avdigits ({len(av.train)} train samples, batch {args.batch_size}, "
        f"median of {args.epochs} interleaved epochs, 1 thread)",
        ["source", "samples/s", "vs memory"],
        [[k, f"{v:.0f}", f"{v / base:.2f}"] for k, v in tp["samples_per_s"].items()],
    )


def streaming(args: argparse.Namespace, scratch: Path, out: dict) -> None:
    rows, out["rss"] = [], {}
    sizes = [("1x", args.rss_gb), ("4x", 4 * args.rss_gb)] if args.rss_gb > 0 else []
    if args.big_gb > 0:
        sizes.append(("larger than RAM", args.big_gb))
    for label, gb in sizes:
        root = scratch / f"syn-{gb:g}"
        made = make_synthetic(root, gb)
        print(f"{label}: wrote {json.dumps(made)}", file=sys.stderr, flush=True)
        big = label == "larger than RAM"
        if big and args.big_train:
            out["big_train"] = train = {"gb": gb, **made, "load_before": os.getloadavg()}
            train.update(run_train_cli(root, scratch / "big-run", 1, args.big_batch, args.big_feature_dim,
                                       args.big_workers))  # fmt: skip
            train["load_after"] = os.getloadavg()
            train["samples_per_s"] = made["train_samples"] / train["wall_s"]
            train["train_samples_per_s"] = made["train_samples"] / train["metrics"]["train_time_s"]
            print(f"big train: {json.dumps(train)}", file=sys.stderr, flush=True)
        if big and args.skip_stream:
            shutil.rmtree(root)
            continue
        res = _run_child("stream", root=str(root), steps=args.steps, batch_size=args.batch_size,
                         workers=args.workers)  # fmt: skip
        shutil.rmtree(root)
        out["rss"][label] = {"gb": gb, **made, **res}
        rows.append([label, f"{made['disk_gb']:.2f} GiB", f"{made['train_samples']:,}", f"{res['epoch_s']:.0f} s",
                     f"{res['epoch_mb_per_s']:.0f}", f"{res['train_samples_per_s']:.0f}",
                     f"{res['rss_mb']['main']:.0f}", f"{res['rss_mb']['workers']:.0f}"])  # fmt: skip
        print(f"{label}: {json.dumps(out['rss'][label])}", file=sys.stderr, flush=True)
    if rows:
        print_table(
            f"Streaming from disk: one sequential epoch ({args.workers} workers, batch 256) + {args.steps} "
            f"shuffled JT steps (batch {args.batch_size}); RAM {out['ram_gb']:.1f} GiB",
            ["dataset", "on disk", "train samples", "epoch", "MiB/s", "train samples/s",
             "peak RSS main MiB", "peak RSS worker MiB"],
            rows,
        )  # fmt: skip
    if "big_train" in out:
        t = out["big_train"]
        print_table(
            f"`mmrobust train` (JT, MLP encoders, feature_dim {args.big_feature_dim}, batch {args.big_batch}, "
            f"{args.big_workers} workers), one whole epoch streamed from disk; RAM {out['ram_gb']:.1f} GiB",
            ["dataset", "train samples", "wall time (whole command)", "training time", "train samples/s",
             "peak RSS MiB"],
            [[f"{t['disk_gb']:.2f} GiB", f"{t['train_samples']:,}", f"{t['wall_s']:.0f} s",
              f"{t['metrics']['train_time_s']:.0f} s", f"{t['train_samples_per_s']:.0f}",
              f"{t['peak_rss_mb']:.0f}"]],
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
