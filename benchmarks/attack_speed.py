"""Speed of an l2-PGD-k evaluation over the avdigits test set.

Compares (1) our PGD over all modalities jointly, (2) our PGD on the image alone, (3) torchattacks'
PGDL2 on the image alone (wrapped around the same model, the audio fixed), each against its floor:
k times the measured forward + input-gradient backward time of the same batches. Targets: overhead
ratio <= 1.2 and no slower than torchattacks. Each timing is the best of ``--repeats`` interleaved
runs (the machine may be shared). Prints a table and writes ``benchmarks/results/attack_speed.json``.

    python benchmarks/attack_speed.py [--run RUN] [--steps 10] [--repeats 3] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrobust.attacks import PGDL2
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import iterate_batches
from mmrobust.eval.robust import attack_predictions
from mmrobust.io import write_json
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.report.tables import print_table

OUT = Path(__file__).resolve().parent / "results" / "attack_speed.json"


def floor_time(model: nn.Module, split: Any, modalities: list[str], steps: int, batch_size: int) -> float:
    """k x (forward + backward w.r.t. the attacked inputs) over the split's batches."""
    t0 = time.perf_counter()
    for inputs, labels in iterate_batches(split, batch_size):
        for _ in range(steps):
            x = {k: (v.detach().requires_grad_(True) if k in modalities else v) for k, v in inputs.items()}
            loss = nn.functional.cross_entropy(model(x), labels, reduction="sum")
            torch.autograd.grad(loss, [x[m] for m in modalities])
    return time.perf_counter() - t0


class ImageOnly(nn.Module):
    """torchattacks' view: an image in [0, 1] -> logits, through the model's normalisation."""

    def __init__(self, model: nn.Module, lo: float, hi: float) -> None:
        super().__init__()
        self.model, self.lo, self.hi = model, lo, hi
        self.audio: torch.Tensor | None = None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model({"audio": self.audio, "image": self.lo + (self.hi - self.lo) * u})


def torchattacks_eval(
    model: nn.Module, split: Any, eps: float, steps: int, batch_size: int, lo: float, hi: float
) -> tuple[float, float]:
    import torchattacks

    wrapper = ImageOnly(model, lo, hi).eval()
    scale = hi - lo  # ||dx|| = scale * ||du||
    attack = torchattacks.PGDL2(wrapper, eps=eps / scale, alpha=2.5 * eps / steps / scale, steps=steps)
    correct = 0
    t0 = time.perf_counter()
    for inputs, labels in iterate_batches(split, batch_size):
        wrapper.audio = inputs["audio"]
        u = ((inputs["image"] - lo) / scale).clamp(0, 1)
        adv = attack(u, labels)
        with torch.no_grad():
            correct += int((wrapper(adv).argmax(1) == labels).sum())
    return time.perf_counter() - t0, correct / len(split)


def ours_eval(
    model: nn.Module, meta: Any, split: Any, eps: float, steps: int, batch_size: int, mods: list[str]
) -> tuple[float, float]:
    attack = PGDL2(model, eps, steps=steps, modalities=mods, meta=meta, random_start=True)
    t0 = time.perf_counter()
    preds = attack_predictions(attack, split, batch_size)
    return time.perf_counter() - t0, float((preds == split.labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained avdigits run folder (default: an untrained model; timings only)")
    ap.add_argument("--steps", default="10", help="comma list of k")
    ap.add_argument("--eps", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.run:
        from mmrobust.runs import load_run

        run = load_run(args.run)
        model, meta, split = run.model, run.meta, run.data().test
    else:
        bundle = load_data(DataConfig("avdigits", 0))
        model, meta, split = build_model(bundle.meta, ModelConfig()).eval(), bundle.meta, bundle.test
    for p in model.parameters():  # parameters keep requires_grad: the attack must cope with that
        assert p.requires_grad
    lo, hi = meta.spec("image").valid_range
    all_mods = meta.modality_names
    try:
        import torchattacks  # noqa: F401

        have_ta = True
    except ImportError:
        have_ta = False
    rows, records = [], []
    for k in [int(s) for s in args.steps.split(",")]:
        best: dict[str, float] = {}
        accs: dict[str, float] = {}

        def keep(name: str, seconds: float, acc: float | None = None, best=best, accs=accs) -> None:
            best[name] = min(best.get(name, float("inf")), seconds)
            if acc is not None:
                accs[name] = acc

        with torch.no_grad():
            model(split.take(slice(0, 8))[0])  # warm-up
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts every column alike
            keep("floor_joint", floor_time(model, split, all_mods, k, args.batch_size))
            keep("ours_joint", *ours_eval(model, meta, split, args.eps, k, args.batch_size, all_mods))
            keep("floor_image", floor_time(model, split, ["image"], k, args.batch_size))
            keep("ours_image", *ours_eval(model, meta, split, args.eps, k, args.batch_size, ["image"]))
            if have_ta:
                keep("torchattacks_image", *torchattacks_eval(model, split, args.eps, k, args.batch_size, lo, hi))
        rec = {"steps": k, "eps": args.eps, "samples": len(split), "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "seconds": best, "accuracy": accs,
               "overhead_joint": best["ours_joint"] / best["floor_joint"],
               "overhead_image": best["ours_image"] / best["floor_image"]}  # fmt: skip
        if have_ta:
            rec["overhead_torchattacks"] = best["torchattacks_image"] / best["floor_image"]
            rec["ours_vs_torchattacks"] = best["ours_image"] / best["torchattacks_image"]
        records.append(rec)
        rows.append([f"ours, joint {'+'.join(all_mods)}", k, best["ours_joint"], best["floor_joint"],
                     rec["overhead_joint"], accs["ours_joint"], "–"])  # fmt: skip
        rows.append(["ours, image only", k, best["ours_image"], best["floor_image"], rec["overhead_image"],
                     accs["ours_image"], rec.get("ours_vs_torchattacks", "–")])  # fmt: skip
        if have_ta:
            rows.append(["torchattacks PGDL2, image only", k, best["torchattacks_image"], best["floor_image"],
                         rec["overhead_torchattacks"], accs["torchattacks_image"], 1.0])  # fmt: skip
    print_table(
        f"l2-PGD evaluation over {len(split)} avdigits test samples (eps {args.eps}, best of {args.repeats})",
        ["attack", "k", "time (s)", "floor k*(fwd+bwd) (s)", "overhead", "accuracy", "time / torchattacks"],
        [[r[0], r[1], round(r[2], 3), round(r[3], 3), round(r[4], 3), r[5], r[6] if isinstance(r[6], str) else round(r[6], 3)] for r in rows],
    )  # fmt: skip
    write_json(args.out, {"run": args.run, "results": records})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
