"""Parity of mmrobust's AutoAttack components and protocol with torchattacks on the same model,
samples and budget, plus the time ratio ours / torchattacks.

torchattacks attacks one ``(N, C, H, W)`` tensor in [0, 1]. :class:`UnitImage` presents a
multi-modal model that way: the attacked modalities, flattened and concatenated, are mapped to
[0, 1] by one common affine scale ``u = (x - lo_m) / s`` (one scale for all, so every l2 / l-inf
norm is divided by the same ``s``: eps_u = eps / s), laid out as one image (see :class:`UnitImage`).
A modality whose range is narrower than ``s`` is clamped to it inside the wrapper (both libraries
then attack the same box). Modalities that are not attacked are fixed per sample: torchattacks
calls the model on subsets of the batch, so each sample's index is written in binary into extra
pixels (an extra column; 0 or 1, read back by rounding: an l-inf perturbation below 1/2 cannot change it; their
gradient is zero). Only l-inf settings use fixed modalities here.

    python benchmarks/attack_parity.py --run /tmp/h11/jt --samples 100 [--steps 10] [--queries 500]

Prints a table and writes ``benchmarks/results/attack_parity_<run>.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack
from mmrobust.data.base import Batch

RESULTS = Path(__file__).resolve().parent / "results"


class UnitImage(nn.Module):
    """``u (N, 1, H, W) in [0, 1] -> logits`` of a multi-modal ``model`` (see the module doc)."""

    def __init__(self, model: nn.Module, inputs: Batch, attacked: Sequence[str],
                 ranges: Mapping[str, tuple[float, float]]) -> None:  # fmt: skip
        super().__init__()
        self.model, self.inputs, self.attacked = model, inputs, list(attacked)
        self.scale = max(hi - lo for lo, hi in (ranges[m] for m in self.attacked))
        self.lo = {m: ranges[m][0] for m in self.attacked}
        self.top = {m: (ranges[m][1] - ranges[m][0]) / self.scale for m in self.attacked}
        self.shapes = {m: tuple(inputs[m].shape[1:]) for m in self.attacked}
        self.sizes = [math.prod(self.shapes[m]) for m in self.attacked]
        n = len(next(iter(inputs.values())))
        self.fixed = [m for m in inputs if m not in self.attacked]
        self.id_bits = max(1, math.ceil(math.log2(n))) if self.fixed else 0
        first = self.shapes[self.attacked[0]]
        # one image modality keeps its own layout (Square's windows stay squares of that image), with
        # the index bits in an extra column; otherwise a square-ish zero-padded layout (torchattacks'
        # Square needs windows that fit both sides)
        self.column = len(self.attacked) == 1 and len(first) == 3 and first[0] == 1 and self.id_bits <= first[1]
        if self.column:
            self.height, self.width = first[1], first[2] + (1 if self.id_bits else 0)
        else:
            self.width = math.ceil(math.sqrt(sum(self.sizes) + self.id_bits))
            self.height = math.ceil((sum(self.sizes) + self.id_bits) / self.width)

    def encode(self, inputs: Batch) -> torch.Tensor:
        n = len(next(iter(inputs.values())))
        parts = [((inputs[m] - self.lo[m]) / self.scale).reshape(n, -1) for m in self.attacked]
        bits = ((torch.arange(n)[:, None] >> torch.arange(self.id_bits)[None]) & 1).float()
        if self.column:
            image = parts[0].reshape(n, self.height, -1)
            if self.id_bits:
                col = torch.nn.functional.pad(bits, (0, self.height - self.id_bits))
                image = torch.cat([image, col[:, :, None]], 2)
            return image[:, None].clamp(0, 1)
        flat = torch.cat([*parts, bits], 1)
        flat = torch.nn.functional.pad(flat, (0, self.height * self.width - flat.shape[1]))
        return flat.reshape(n, 1, self.height, self.width).clamp(0, 1)

    def decode(self, u: torch.Tensor) -> Batch:
        if self.column:  # back to the flat order: the image, then the index bits
            u = torch.cat([u[:, 0, :, : self.width - (1 if self.id_bits else 0)].reshape(u.shape[0], -1),
                           u[:, 0, : self.id_bits, -1]], 1)  # fmt: skip
        flat = u.reshape(u.shape[0], -1)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for m, size in zip(self.attacked, self.sizes, strict=True):
            part = flat[:, start : start + size].clamp(0, self.top[m])
            out[m] = (self.lo[m] + self.scale * part).reshape(-1, *self.shapes[m])
            start += size
        if self.id_bits:
            bits = flat[:, start : start + self.id_bits].round().long()
            idx = (bits << torch.arange(self.id_bits)[None]).sum(1)
            out.update({m: self.inputs[m][idx] for m in self.fixed})
        return out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.decode(u))


def _ta_component(name: str, wrapper: nn.Module, norm: str, eps_u: float, steps: int, queries: int, k: int) -> Any:
    import torchattacks

    ta_norm = "Linf" if norm == "linf" else "L2"
    if name == "apgd-ce":
        return torchattacks.APGD(wrapper, norm=ta_norm, eps=eps_u, steps=steps, loss="ce", seed=0)
    if name == "apgd-t":
        return torchattacks.APGDT(wrapper, norm=ta_norm, eps=eps_u, steps=steps, n_classes=k, seed=0)
    if name == "fab-t":
        return torchattacks.FAB(wrapper, norm=ta_norm, eps=eps_u, steps=steps, multi_targeted=True, n_classes=k, seed=0)
    if name == "square":
        return torchattacks.Square(wrapper, norm=ta_norm, eps=eps_u, n_queries=queries, seed=0)
    aa = torchattacks.AutoAttack(wrapper, norm=ta_norm, eps=eps_u, version="standard", n_classes=k, seed=0)
    for atk in aa._autoattack.attacks:  # the same iterations and queries as ours
        if hasattr(atk, "n_queries"):
            atk.n_queries = queries
        else:
            atk.steps = steps
    return aa


def compare(model: nn.Module, meta: Any, inputs: Batch, labels: torch.Tensor, *, norm: str, eps: float,
            modalities: Sequence[str], ranges: Mapping[str, tuple[float, float]], attack: str, steps: int,
            queries: int) -> dict[str, Any]:  # fmt: skip
    """Accuracy of ours and torchattacks' ``attack`` ("autoattack" = the standard suite) on one setting."""
    k = meta.num_classes
    wrapper = UnitImage(model, inputs, modalities, ranges).eval()
    u = wrapper.encode(inputs)
    eps_u = eps / wrapper.scale
    ta = _ta_component(attack, wrapper, norm, eps_u, steps, queries, k)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    adv_u = ta(u, labels)
    t_ta = time.perf_counter() - t0
    with torch.no_grad():
        ta_correct = wrapper(adv_u).argmax(1) == labels
    valid = {m: ranges[m] for m in modalities}
    t0 = time.perf_counter()
    if attack == "autoattack":
        opts = AutoAttackOptions(eps=eps, norm=norm, modalities=tuple(modalities), steps=steps, queries=queries)
        res = run_autoattack(model, inputs, labels, opts, meta=meta, valid_range=valid)
        ours_correct = res.robust
        stages = [{"attack": s.attack, "robust_accuracy": s.robust_accuracy, "seconds": s.seconds} for s in res.stages]
    else:
        kw: dict[str, Any] = {"steps": queries if attack == "square" else steps}
        if attack in ("apgd-t", "fab-t"):
            kw["targets"] = k - 1
        atk = build_attack(attack, model, meta, eps=eps, norm=norm, modalities=list(modalities), valid_range=valid,
                           **kw)  # fmt: skip
        _, logits = atk.perturb(inputs, labels)
        ours_correct = logits.argmax(1) == labels
        stages = []
    t_ours = time.perf_counter() - t0
    with torch.no_grad():
        clean = float((model(inputs).argmax(1) == labels).float().mean())
    return {"attack": attack, "norm": norm, "eps": eps, "modalities": list(modalities), "clean": clean,
            "ours": float(ours_correct.float().mean()), "torchattacks": float(ta_correct.float().mean()),
            "both": float((ours_correct & ta_correct).float().mean()),
            "only_ours_broke": int((~ours_correct & ta_correct).sum()),
            "only_ta_broke": int((ours_correct & ~ta_correct).sum()),
            "seconds_ours": t_ours, "seconds_torchattacks": t_ta, "time_ratio": t_ours / max(t_ta, 1e-9),
            "stages": stages}  # fmt: skip


def main() -> None:
    from mmrobust.io import write_json
    from mmrobust.report.tables import print_table
    from mmrobust.runs import load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--steps", type=int, default=10, help="APGD/FAB iterations (torchattacks' AutoAttack uses 10)")
    p.add_argument("--queries", type=int, default=500, help="Square queries (the reference uses 5000)")
    p.add_argument("--linf", default="8/255,16/255,32/255")
    p.add_argument("--l2", default="1,2,4")
    p.add_argument("--components-at", default="16/255,2", help="the eps (linf,l2) where each component runs alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    inputs, labels = run.data().test.take(slice(0, args.samples))
    image_range = dict((s.name, s.valid_range) for s in run.meta.modalities)["image"]
    assert image_range is not None
    audio = inputs["audio"]
    # the audio has no declared range: both libraries get the range of these samples
    ranges = {"image": image_range, "audio": (float(audio.min()), float(audio.max()))}

    def frac(s: str) -> float:
        a, _, b = s.partition("/")
        return float(a) / float(b) if b else float(a)

    lin_single, l2_single = (frac(v) for v in args.components_at.split(","))
    rows = []
    # largest budgets first (they break the most samples, so they are also the cheapest)
    plans = [("l2", frac(e), ["audio", "image"]) for e in reversed(args.l2.split(",")) if e]
    plans += [("linf", frac(e), ["image"]) for e in reversed(args.linf.split(",")) if e]
    out = RESULTS / f"attack_parity_{Path(args.run).name}.json"
    meta = {"run": str(args.run), "samples": args.samples, "steps": args.steps, "queries": args.queries,
            "threads": torch.get_num_threads()}  # fmt: skip
    for norm, eps, mods in plans:
        single = math.isclose(eps, lin_single if norm == "linf" else l2_single)
        for attack in (["apgd-ce", "apgd-t", "fab-t", "square"] if single else []) + ["autoattack"]:
            row = compare(run.model, run.meta, inputs, labels, norm=norm, eps=eps, modalities=mods,
                          ranges=ranges, attack=attack, steps=args.steps, queries=args.queries)  # fmt: skip
            rows.append(row)
            print(f"{attack:10s} {norm} {eps:.4f} ours {row['ours']:.3f} ta {row['torchattacks']:.3f} "
                  f"time {row['seconds_ours']:.1f}s / {row['seconds_torchattacks']:.1f}s", flush=True)  # fmt: skip
            write_json(out, {**meta, "rows": rows})  # after every row: a long run keeps what it measured
    print_table("AutoAttack parity: robust accuracy, ours vs torchattacks", ["attack", "norm", "eps", "modalities", "clean", "ours", "torchattacks", "ours - ta", "time ratio"],
                [[r["attack"], r["norm"], f"{r['eps']:.4f}", "+".join(r["modalities"]), f"{r['clean']:.3f}",
                  f"{r['ours']:.3f}", f"{r['torchattacks']:.3f}", f"{r['ours'] - r['torchattacks']:+.3f}",
                  f"{r['time_ratio']:.2f}"] for r in rows])  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
