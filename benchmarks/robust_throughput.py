"""Attack and certification throughput at the memory-sized batch vs fixed batch sizes, and the peak
memory of full-size robustness passes.

``throughput`` (default): on ``--data`` (avdigits, in memory), a JT model (concat head) and a
CRMT model (orthogonal head) built from seed 0 are attacked with the paper suite's joint-l2 PGD (CE
and CW, 10 steps) and certified with the empirical certifier (Lipschitz estimate over 512 training
samples), at the batch size chosen by ``mmrobust.memory`` for ``--memory-budget`` and at fixed
sizes. Runs are interleaved over ``--rounds``; samples/s are medians. With ``--workers 0,2`` the
same passes also run at the automatic batch on an on-disk copy of the data (uint8 images, written
to a temporary folder and deleted afterwards) streamed through the DataLoader with that many
workers, to compare with the in-memory rows.

``memory``: the paper's full-size shapes (3 frames of 3x224x224, a 1x1024x128 spectrogram, ResNet18
encoders, 31 classes, orthogonal head). Each pass runs in a child process that reports its peak
resident set (VmHWM): CRMT step 2's empirical Lipschitz estimate and joint-l2 PGD (CE + CW) on a
small batch, at the batch the budget allows. The batch sizes that used to be fixed (64 for the
Lipschitz estimate, 256 for evaluation) are not run: their memory is predicted from the measured
cost per sample.

    python benchmarks/robust_throughput.py [throughput|memory] [--memory-budget 12GB]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmrobust.io import write_json
from mmrobust.report.tables import print_table

GB = 2**30


def _models(meta):
    from mmrobust.models.fusion import ModelConfig, build_model

    torch.manual_seed(0)
    jt = build_model(meta, ModelConfig("concat", 128)).eval()
    torch.manual_seed(0)
    crmt = build_model(meta, ModelConfig("orthogonal", 128)).eval()
    return jt, crmt


def throughput(args: argparse.Namespace) -> dict:
    from mmrobust.attacks import PGDL2
    from mmrobust.certify.lipschitz import lipschitz_batch
    from mmrobust.certify.runner import certify_model
    from mmrobust.data.registry import DataConfig, load_data
    from mmrobust.eval.robust import attack_predictions
    from mmrobust.memory import input_gradient_plan

    bundle = load_data(DataConfig(args.data, 0))
    test = bundle.test.subset(slice(0, args.samples))
    fit = bundle.train.subset(slice(0, 512))
    disk: dict[str, tuple] = {}  # label -> (test, fit) streamed from disk
    scratch = None
    if args.workers:
        import tempfile

        from mmrobust.data.ondisk import convert

        scratch = Path(tempfile.mkdtemp(prefix="mmrobust-throughput-"))
        images = [m.name for m in bundle.meta.modalities if m.kind == "image" and m.valid_range is not None]
        convert(bundle, scratch / "data", uint8=images)
        for w in (int(v) for v in args.workers.split(",")):
            on_disk = load_data(DataConfig(str(scratch / "data"), 0, {"workers": w}))
            disk[f"disk, {w} workers"] = (
                on_disk.test.subset(slice(0, args.samples)),
                on_disk.train.subset(slice(0, 512)),
            )
    jt, crmt = _models(bundle.meta)
    t0 = time.perf_counter()
    attack_plan = input_gradient_plan(jt, test, args.memory_budget)
    probe_attack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lip_plan, _ = lipschitz_batch(crmt, fit, {m: crmt.head.basis(m).detach() for m in crmt.modalities},
                                  args.memory_budget)  # fmt: skip
    probe_lip_s = time.perf_counter() - t0
    fixed = [int(b) for b in args.fixed.split(",")]

    def pgd(bs: int, data=None) -> float:
        split = data[0] if data else test
        t = time.perf_counter()
        for loss in ("ce", "cw"):
            attack_predictions(PGDL2(jt, 0.5, steps=10, loss=loss, meta=bundle.meta), split, bs)
        return 2 * len(split) / (time.perf_counter() - t)  # attacked samples per second

    def cert(bs: int, data=None) -> float:
        split, fit_split = data if data else (test, fit)
        t = time.perf_counter()
        certify_model(crmt, bundle.meta, split, "empirical", fit_split, batch_size=256, options={"batch_size": bs})
        return len(split) / (time.perf_counter() - t)

    sizes = {"attack": [("auto", attack_plan.batch_size), *[(str(b), b) for b in fixed]],
             "certify": [("auto", lip_plan.batch_size), *[(str(b), b) for b in fixed]]}  # fmt: skip
    for label in disk:  # the streamed rows run at the automatic batch
        sizes["attack"].append((label, attack_plan.batch_size))
        sizes["certify"].append((label, lip_plan.batch_size))
    runs: dict[tuple[str, str], list[float]] = {}
    pgd(64), cert(16)  # warm-up: first-call costs (functorch, oneDNN kernels) are not throughput
    try:
        for _ in range(args.rounds):
            for label, bs in sizes["attack"]:
                runs.setdefault(("attack (PGD-l2 CE+CW, 10 steps)", label), []).append(pgd(bs, disk.get(label)))
            for label, bs in sizes["certify"]:
                runs.setdefault(("certify (empirical, 512 fit samples)", label), []).append(cert(bs, disk.get(label)))
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    rows, out = [], []
    for (what, label), v in runs.items():
        bs = dict(sizes["attack" if what.startswith("attack") else "certify"])[label]
        med = statistics.median(v)
        auto = statistics.median(runs[(what, "auto")])
        rows.append([what, f"{label} ({bs})", f"{med:.1f}", f"{med / auto:.2f}"])
        out.append({"pass": what, "batch": label, "batch_size": bs, "samples_per_s": med, "all": v})
    print_table(
        f"Throughput on {args.data} ({len(test)} test samples; in memory unless 'disk'; budget {args.memory_budget})",
        ["pass", "batch (size)", "samples/s", "relative to auto"],
        rows,
    )
    return {"data": args.data, "samples": len(test), "budget": args.memory_budget, "results": out,
            "probe_s": {"attack": probe_attack_s, "lipschitz": probe_lip_s},
            "plans": {"attack": attack_plan.__dict__, "lipschitz": lip_plan.__dict__}}  # fmt: skip


# --- full-size memory -----------------------------------------------------------------------------


def _full_model():
    from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
    from mmrobust.models.fusion import ModelConfig, build_model

    meta = DatasetMeta(
        "ks-full",
        [ModalitySpec("visual", "video", (3, 3, 224, 224)), ModalitySpec("audio", "spectrogram", (1, 1024, 128))],
        [str(i) for i in range(31)],
    )
    torch.manual_seed(0)
    model = build_model(meta, ModelConfig("orthogonal", encoders={"visual": "resnet18", "audio": "resnet18"})).eval()
    return meta, model, Split


def child(args: argparse.Namespace) -> None:
    """One full-size pass in this process; prints a JSON line with its peak RSS."""
    from mmrobust.certify.lipschitz import empirical_lipschitz, lipschitz_batch
    from mmrobust.memory import _status, input_gradient_plan

    meta, model, Split = _full_model()
    n = args.samples
    g = torch.Generator().manual_seed(0)
    split = Split({"visual": torch.randn(n, 3, 3, 224, 224, generator=g), "audio": torch.randn(n, 1, 1024, 128,
                  generator=g)}, torch.randint(0, 31, (n,), generator=g))  # fmt: skip
    t0 = time.perf_counter()
    info: dict = {"pass": args.child, "samples": n, "budget": args.memory_budget}
    if args.child == "lipschitz":
        rows = {m: model.head.basis(m).detach() for m in model.modalities}
        plan, chunk = lipschitz_batch(model, split, rows, args.memory_budget)
        info.update(plan=plan.__dict__, chunk=chunk, probe_s=time.perf_counter() - t0,
                    predicted_fixed_64=plan.predicted_bytes(64))  # fmt: skip
        empirical_lipschitz(model, split, rows, batch_size=plan.batch_size)
    else:
        from mmrobust.attacks import PGDL2
        from mmrobust.eval.robust import attack_predictions

        plan = input_gradient_plan(model, split, args.memory_budget)
        info.update(plan=plan.__dict__, probe_s=time.perf_counter() - t0, predicted_fixed_256=plan.predicted_bytes(256))
        for loss in ("ce", "cw"):
            attack_predictions(PGDL2(model, 0.5, steps=args.steps, loss=loss, meta=meta), split, plan.batch_size)
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss"] = _status("VmHWM")
    print("RESULT " + json.dumps(info), flush=True)


def memory(args: argparse.Namespace) -> dict:
    results = []
    for what, n in (("lipschitz", args.lipschitz_samples), ("pgd", args.pgd_samples)):
        cmd = [sys.executable, __file__, "child", "--child", what, "--samples", str(n),
               "--memory-budget", args.memory_budget, "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            results.append({"pass": what, "failed": proc.returncode})
            continue
        results.append(json.loads(line[len("RESULT ") :]))
        print(f"done {what}", file=sys.stderr, flush=True)
    rows = []
    for r in results:
        if "failed" in r:
            rows.append([r["pass"], "-", "-", "-", "-", f"failed (exit {r['failed']})"])
            continue
        p = r["plan"]
        fixed, pred = ("64", r["predicted_fixed_64"]) if r["pass"] == "lipschitz" else ("256", r["predicted_fixed_256"])
        rows.append([
            r["pass"], f"{r['samples']}", f"{p['batch_size']}" + (f" (rows {r['chunk']})" if r.get("chunk") else ""),
            f"{p['per_sample_bytes'] / GB:.2f}", f"{r['peak_rss'] / GB:.2f} ({r['seconds']:.0f} s)",
            f"{pred / GB:.0f} GB at batch {fixed}",
        ])  # fmt: skip
    print_table(
        f"Full-size passes (3x3x224x224 + 1x1024x128, ResNet18 x2, 31 classes), budget {args.memory_budget}",
        ["pass", "samples", "auto batch", "GB / sample", "peak RSS GB", "predicted at the old fixed batch"],
        rows,
    )
    return {"budget": args.memory_budget, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="throughput", choices=["throughput", "memory", "child"])
    p.add_argument("--data", default="avdigits")
    p.add_argument("--samples", type=int, default=512, help="throughput: test samples; child: samples")
    p.add_argument("--fixed", default="4,64,256", help="fixed batch sizes to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--memory-budget", default="auto")
    p.add_argument("--lipschitz-samples", type=int, default=8)
    p.add_argument("--pgd-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", choices=["lipschitz", "pgd"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", default="", help="throughput: also stream from disk with these worker counts, e.g. 0,2")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "child":
        child(args)
        return 0
    result = throughput(args) if args.mode == "throughput" else memory(args)
    out = args.out or f"benchmarks/results/robust_{args.mode}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
