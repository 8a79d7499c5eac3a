"""CRMT in mmrobust against the CRMT reference code, same data, encoders and attacked samples.

Rows (each trained per seed, every row on the same test samples):

* ``reference JT`` / ``reference CRMT-JT``: the reference code's own training functions
  (``train.train_CRMT_JT`` with ``rho = 0`` on its concat fusion, resp. ``rho = 2`` on its "orth"
  fusion, then its ``get_lip`` and ``the_second_step``), its own epoch loop replayed here (SGD lr 1e-3,
  momentum 0.9, weight decay 1e-4, StepLR(60), best validation accuracy kept across step 1 and step 2,
  as its ``save_best.pth``). The reference is imported at run time from ``--official PATH`` (or
  ``$CRMT_OFFICIAL``), never copied here; only its ``obtain_input`` is replaced (it moves tensors to
  CUDA) and its model is wrapped in an object with a ``.module`` attribute (it expects DataParallel).
* ``mmrobust JT --recipe paper`` / ``mmrobust JT (tuned recipe)``: ``mmrobust.training.train``.
* ``mmrobust CRMT-JT --recipe paper``: step 1 (method ``crmt-step1``) then the default step 2.
* step-2 ablations on that same step-1 model: ``no step 2``; ``reference step 2`` (SGD lr 3e-5,
  momentum 0.9, weight decay 1e-2, batch 64, ``epochs // 3 - 1`` epochs, the last weights kept, as the
  reference; on cached scores in eval mode); mmrobust step 2 ``guarded`` (validation radius selection and
  the validation CW-PGD check, the default) and ``unguarded`` (``step2_attack_check=false``).

The reference model gets the encoders of mmrobust's model (built with the same seed, input
standardisation included) through an adapter that returns ``(B, 512, 1, 1)`` feature maps, so
``--feature-dim`` must be 512 with the reference (its fusion layers are sized for 512 features).

Attacks (joint l2 budget over both modalities, eps in the dataset's attack units, see the JSON
``units``): the paper protocol (CE, 4 steps of eps/3, no random start, as the reference's
``rob_test.py``), CE-PGD and CW-PGD (``--steps`` steps of 2.5 eps/steps, random start) and the
per-sample worst case over all three. Paired-by-seed differences (mean and sample std over seeds)
compare rows trained with the same seed.

    python benchmarks/crmt_vs_reference.py --official /path/to/checkout            # full: 3 seeds x 30 epochs
    python benchmarks/crmt_vs_reference.py --quick                                 # synthetic data, seconds

Without ``--official`` only the mmrobust rows run and the output says which rows were skipped.
``--merge A.json B.json`` rebuilds the table from result files of runs with different seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.threat import ThreatModel
from mmrobust.certify.bounds import orthogonal_bound
from mmrobust.config import OptimConfig, RunConfig, options_dataclass
from mmrobust.data.base import DataBundle, DatasetMeta, Split, iterate_batches
from mmrobust.data.registry import load_data
from mmrobust.eval.metrics import accuracy, predict
from mmrobust.eval.robust import attack_predictions, worst_predictions
from mmrobust.io import read_json, write_json
from mmrobust.models.fusion import LateFusionModel, ModelConfig, build_model
from mmrobust.training import METHODS, train
from mmrobust.training.context import TrainContext
from mmrobust.training.crmt import orthogonal_head, raw_scores_of
from mmrobust.training.crmt_step2 import Step2Data, optimise_modality_weights

REFERENCE_ROWS = ("reference JT", "reference CRMT-JT")
MM_ROWS = ("mmrobust JT --recipe paper", "mmrobust CRMT-JT --recipe paper", "mmrobust JT (tuned recipe)")
STEP2_ROWS = ("step 2: none", "step 2: reference (SGD 3e-5)", "step 2: mmrobust guarded", "step 2: mmrobust unguarded")
ATTACK_COLS = ("clean", "paper", "ce", "cw", "worst")
#: (row, minus row) pairs whose per-seed difference of every attack column is reported
PAIRS = (
    ("reference CRMT-JT", "reference JT"),
    ("mmrobust CRMT-JT --recipe paper", "mmrobust JT --recipe paper"),
    ("mmrobust JT --recipe paper", "reference JT"),
    ("mmrobust CRMT-JT --recipe paper", "reference CRMT-JT"),
    ("mmrobust JT (tuned recipe)", "mmrobust CRMT-JT --recipe paper"),
    ("step 2: reference (SGD 3e-5)", "step 2: none"),
    ("step 2: mmrobust guarded", "step 2: none"),
    ("step 2: mmrobust unguarded", "step 2: none"),
)


# ---------------------------------------------------------------------------------------------
# the reference code, behind an adapter


def import_reference(path: str | Path) -> SimpleNamespace:
    """The reference's ``train`` module and ``MultiModalModel`` class, imported from ``path``."""
    path = str(Path(path).resolve())
    saved = {k: sys.modules.pop(k) for k in ("train", "utils", "models", "models.multimodal",
                                              "models.fusion_model") if k in sys.modules}  # fmt: skip
    sys.path.insert(0, path)
    try:
        import train as ref_train  # type: ignore[import-not-found]
        from models.multimodal import MultiModalModel  # type: ignore[import-not-found]
    finally:
        sys.path.remove(path)
        for k in ("train", "utils", "models", "models.multimodal", "models.fusion_model"):
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    ref_train.obtain_input = lambda b: (b["clip"], b["audio"], b["target"])  # the original calls .cuda()
    return SimpleNamespace(train=ref_train, MultiModalModel=MultiModalModel)


def reference_slots(meta: DatasetMeta) -> tuple[str, str]:
    """``(visual, audio)``: which modality feeds the reference's visual and audio networks."""
    names = meta.modality_names
    if len(names) != 2:
        raise SystemExit(f"the reference code takes exactly 2 modalities; {meta.name} has {names}")
    return (names[1], names[0]) if names[0] == "audio" else (names[0], names[1])


class FeatureMap(nn.Module):
    """An mmrobust input encoder (standardisation + encoder) returning ``(B, d, 1, 1)`` feature maps,
    the shape the reference's model pools and flattens."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[:, :, None, None]


class DataParallelLike(nn.Module):
    """What the reference's step 2 expects of its model: the network under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


class ReferenceAsDict(nn.Module):
    """The reference model as a ``{modality: tensor} -> logits`` module, for mmrobust's attacks."""

    def __init__(self, model: nn.Module, visual: str, audio: str) -> None:
        super().__init__()
        self.model, self.visual, self.audio = model, visual, audio

    @property
    def modalities(self) -> list[str]:
        return [self.visual, self.audio]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(inputs[self.visual], inputs[self.audio])[2]


class ReferenceLoader:
    """Re-iterable loader of the reference's batch dicts (``clip``, ``audio``, ``target``), reshuffled
    each pass with a seeded generator."""

    def __init__(self, split: Split, visual: str, audio: str, batch_size: int, seed: int, shuffle: bool) -> None:
        self.split, self.visual, self.audio = split, visual, audio
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0
        self.dataset = range(len(split))

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.epoch += 1
        for x, y in iterate_batches(
            self.split, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch
        ):
            yield {"clip": x[self.visual], "audio": x[self.audio], "target": y}


def reference_model(
    ref: SimpleNamespace, meta: DatasetMeta, model_cfg: ModelConfig, seed: int, fusion: str
) -> nn.Module:
    """The reference's ``MultiModalModel`` around the encoders mmrobust builds with ``seed``."""
    visual, audio = reference_slots(meta)
    torch.manual_seed(seed)
    ours = build_model(meta, model_cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        return ref.MultiModalModel(FeatureMap(ours.input_encoder(visual)), FeatureMap(ours.input_encoder(audio)),
                                   meta.num_classes, fusion)  # fmt: skip


def train_reference(
    ref: SimpleNamespace, bundle: DataBundle, model_cfg: ModelConfig, method: str, epochs: int, seed: int,
    batch_size: int = 64,
) -> tuple[ReferenceAsDict, dict[str, Any]]:  # fmt: skip
    """Train ``jt`` or ``crmt-jt`` with the reference's functions and its epoch loop; returns the
    model it would save (best validation accuracy over all epochs of both steps) and a record."""
    meta = bundle.meta
    visual, audio = reference_slots(meta)
    crmt = method == "crmt-jt"
    net = reference_model(ref, meta, model_cfg, seed, "orth" if crmt else "concat")
    model = DataParallelLike(net)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.1)
    cfg = SimpleNamespace(methods=SimpleNamespace(rho=2.0 if crmt else 0.0), num_modal=2, device="cpu",
                          n_classes=meta.num_classes, lr=1e-3, val_freq=1)  # fmt: skip
    loader = ReferenceLoader(bundle.train, visual, audio, batch_size, seed, shuffle=True)
    val_loader = ReferenceLoader(bundle.val, visual, audio, 256, seed, shuffle=False)
    criterion = nn.CrossEntropyLoss()
    best_acc, best_state, best_at = 0.0, copy.deepcopy(model.state_dict()), "step1 epoch 0"
    record: dict[str, Any] = {"val_accuracy": []}
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        for epoch in range(1, epochs + 1):
            ref.train.train_CRMT_JT(epoch=epoch, data_loader=loader, model=model, criterion=criterion, optimizer=opt,
                                    epoch_logger=None, batch_logger=None, tb_writer=None, opt=cfg)  # fmt: skip
            sched.step()
            _, acc = ref.train.val_epoch(epoch, val_loader, model, criterion, None)
            record["val_accuracy"].append(acc)
            if best_acc < acc:
                best_acc, best_state, best_at = acc, copy.deepcopy(model.state_dict()), f"step1 epoch {epoch}"
        if crmt:
            layer = net.fusion_module.orth_layer
            record["a_step1"] = [layer.a_0.detach().tolist(), layer.a_1.detach().tolist()]
            with tempfile.TemporaryDirectory() as tmp:
                lip_file = str(Path(tmp) / "lip.pt")
                record["lip"] = ref.train.get_lip(model, loader, cfg, lip_file).tolist()
                for epoch in range(1, epochs // 3):
                    ref.train.the_second_step(epoch, loader, model, cfg, lip_filename=lip_file)
                    _, acc = ref.train.val_epoch(epoch, val_loader, model, criterion, None)
                    record["val_accuracy"].append(acc)
                    if best_acc < acc:
                        best_acc, best_state, best_at = acc, copy.deepcopy(model.state_dict()), f"step2 epoch {epoch}"
            record["a_step2"] = [layer.a_0.detach().tolist(), layer.a_1.detach().tolist()]
            record["a_max_change"] = max(
                abs(x - y)
                for r0, r1 in zip(record["a_step1"], record["a_step2"], strict=True)
                for x, y in zip(r0, r1, strict=True)
            )
    model.load_state_dict(best_state)
    model.eval()
    record.update({"kept": best_at, "best_val_accuracy": best_acc})
    return ReferenceAsDict(net, visual, audio).eval(), record


# ---------------------------------------------------------------------------------------------
# mmrobust side


def run_config(data: str, method: str, recipe: str, epochs: int, seed: int, feature_dim: int,
               options: dict[str, Any] | None = None, lipschitz: bool = False) -> RunConfig:  # fmt: skip
    cfg = RunConfig()
    cfg.data.name = data
    cfg.model.feature_dim = feature_dim
    cfg.model.lipschitz_encoders = lipschitz
    cfg.train.method, cfg.train.epochs, cfg.train.seed, cfg.train.progress = method, epochs, seed, False
    cfg.train.optim = OptimConfig.from_recipe(recipe)
    cfg.train.method_options = dict(options or {})
    cfg.train.device = "cpu"
    return cfg


def step2_context(model: LateFusionModel, bundle: DataBundle, seed: int, batch_size: int = 64) -> TrainContext:
    """What :meth:`CRMTBase.after_training` sees, for re-running step 2 on a trained step-1 model."""

    def evaluate(name: str) -> float:
        split = bundle.split(name)
        return accuracy(predict(model, split), split.labels)

    return TrainContext(model=model, device=torch.device("cpu"), train=bundle.train, val=bundle.val, seed=seed,
                        batch_size=batch_size, memory_budget="auto", evaluate=evaluate,
                        on_message=lambda _: None)  # fmt: skip


def mmrobust_step2(step1: LateFusionModel, bundle: DataBundle, seed: int, options: dict[str, Any]) -> tuple[LateFusionModel, dict[str, Any]]:  # fmt: skip
    """A copy of the step-1 model after ``crmt-jt``'s step 2 with ``options``; its ``crmt`` record."""
    model = copy.deepcopy(step1)
    cls = METHODS.get("crmt-jt")
    strategy = cls(options_dataclass(cls.Options, dict(options), "crmt-jt"), bundle.meta)
    record = strategy.after_training(step2_context(model, bundle, seed))["crmt"]
    return model.eval(), record


def reference_step2(step1: LateFusionModel, bundle: DataBundle, seed: int, tau: dict[str, list[float]],
                    epochs: int) -> tuple[LateFusionModel, dict[str, Any]]:  # fmt: skip
    """The reference's step-2 settings on a copy of an mmrobust step-1 model: SGD lr 3e-5, momentum
    0.9, weight decay 1e-2, batch 64, ``epochs`` passes, last weights kept (no selection)."""
    model = copy.deepcopy(step1).eval()
    head = orthogonal_head(model)
    train_s, train_y = raw_scores_of(model, bundle.train)
    val_s, val_y = raw_scores_of(model, bundle.val)
    a0 = {m: p.detach().clone() for m, p in head.a.items()}
    data = Step2Data(
        train_s, train_y, val_s, val_y, a0, head.bias.detach(), {m: torch.tensor(t) for m, t in tau.items()}
    )
    o = SimpleNamespace(step2_optimizer="sgd", step2_lr=3e-5, step2_weight_decay=1e-2, step2_epochs=epochs,
                        step2_max_acc_drop=math.inf)  # fmt: skip
    result = optimise_modality_weights(data, o, 64, seed)
    with torch.no_grad():
        for m, p in head.a.items():
            p.copy_(result.last_a[m])
    change = max(float((result.last_a[m] - a0[m]).abs().max()) for m in a0)
    return model, {"a_max_change": change, "epochs": epochs,
                   "modality_weights": {m: v.tolist() for m, v in result.last_a.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# evaluation


def attack_all(model: nn.Module, meta: DatasetMeta, split: Split, eps: float, steps: int) -> dict[str, float]:
    """Clean, paper-protocol CE-PGD, CE-PGD, CW-PGD and the per-sample worst case, on ``split``."""
    model.eval()
    threat = ThreatModel.parse(meta, eps=eps, norm="l2", budget="joint")
    y = split.labels
    clean = predict(model, split)
    runs = {
        "paper": build_attack(
            "pgd-l2", model, meta, threat, loss="ce", steps=4, rel_step_size=1 / 3, random_start=False
        ),  # fmt: skip
        "ce": build_attack("pgd-l2", model, meta, threat, loss="ce", steps=steps, seed=0),
        "cw": build_attack("pgd-l2", model, meta, threat, loss="cw", steps=steps, seed=0),
    }
    preds = {name: attack_predictions(a, split) for name, a in runs.items()}
    out = {"clean": accuracy(clean, y), **{k: accuracy(p, y) for k, p in preds.items()}}
    out["worst"] = accuracy(worst_predictions([clean, *preds.values()], y), y)
    return out


def _a_key(model: nn.Module) -> tuple[float, ...] | None:
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "a"):
        return None
    return tuple(float(v) for p in head.a.values() for v in p.detach().flatten())


# ---------------------------------------------------------------------------------------------
# driver


def run_seed(args: argparse.Namespace, ref: SimpleNamespace | None, bundle: DataBundle, seed: int,
             done: set[tuple[int, str]], emit: Any) -> None:  # fmt: skip
    """Train and attack every row of one seed; ``emit(record)`` after each row."""
    meta = bundle.meta
    test = bundle.test.subset(torch.arange(min(args.samples, len(bundle.test))))

    def evaluate(row: str, model: nn.Module, t0: float, extra: dict[str, Any] | None = None,
                 cache: dict[Any, dict[str, float]] | None = None) -> None:  # fmt: skip
        key = _a_key(model)
        if cache is not None and key is not None and key in cache:
            acc = cache[key]  # same weights as a row already attacked: same numbers
        else:
            acc = attack_all(model, meta, test, args.eps, args.steps)
            if cache is not None and key is not None:
                cache[key] = acc
        emit({"seed": seed, "row": row, **acc, "time_s": time.perf_counter() - t0, **(extra or {})})

    model_cfg = ModelConfig(feature_dim=args.feature_dim)
    if ref is not None:
        for row, method in zip(REFERENCE_ROWS, ("jt", "crmt-jt"), strict=True):
            if (seed, row) in done:
                continue
            t0 = time.perf_counter()
            model, record = train_reference(ref, bundle, model_cfg, method, args.epochs, seed)
            evaluate(row, model, t0, {"reference": record})
    for row, method, recipe in ((MM_ROWS[0], "jt", "paper"), (MM_ROWS[2], "jt", "tuned")):
        if (seed, row) in done:
            continue
        t0 = time.perf_counter()
        fit = train(run_config(args.data, method, recipe, args.epochs, seed, args.feature_dim), bundle=bundle)
        evaluate(row, fit.model, t0, {"best_epoch": fit.metrics.get("best_epoch")})
    wanted = [r for r in (MM_ROWS[1], *STEP2_ROWS) if (seed, r) not in done]
    if not wanted:
        return
    t0 = time.perf_counter()
    fit = train(run_config(args.data, "crmt-step1", "paper", args.epochs, seed, args.feature_dim), bundle=bundle)
    step1, crmt = fit.model.eval(), fit.metrics["crmt"]
    train_s = time.perf_counter() - t0
    cache: dict[Any, dict[str, float]] = {}
    base = {"tau": crmt["tau"], "step1": crmt["step1"], "modality_weights_step1": crmt["modality_weights_step1"],
            "step1_train_s": train_s}  # fmt: skip
    if "step 2: none" in wanted:
        evaluate("step 2: none", step1, time.perf_counter(), base, cache)
    if "step 2: reference (SGD 3e-5)" in wanted:
        t0 = time.perf_counter()
        model, record = reference_step2(step1, bundle, seed, crmt["tau"], max(args.epochs // 3 - 1, 1))
        evaluate("step 2: reference (SGD 3e-5)", model, t0, {"step2": record}, cache)
    for row, options in ((MM_ROWS[1], {}), ("step 2: mmrobust guarded", {}),
                         ("step 2: mmrobust unguarded", {"step2_attack_check": False})):  # fmt: skip
        if row in wanted:
            t0 = time.perf_counter()
            model, record = mmrobust_step2(step1, bundle, seed, options)
            evaluate(row, model, t0, {"crmt": {k: record.get(k) for k in ("kept", "reason", "modality_weights")},
                                      "step2_check": (record.get("step2") or {}).get("attack_check")}, cache)  # fmt: skip


def summarize(records: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[str]], dict[str, Any]]:
    """Table rows (mean ± std over seeds), paired-difference rows and the same as JSON."""
    by_row: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    order = [r for r in (*REFERENCE_ROWS, *MM_ROWS, *STEP2_ROWS) if r in by_row]
    table, summary = [], {"rows": {}, "pairs": {}}
    for row in order:
        seeds = sorted(by_row[row])
        stats = {c: _mean_std([by_row[row][s][c] for s in seeds]) for c in ATTACK_COLS}
        summary["rows"][row] = {"seeds": seeds, **stats}
        table.append([row, str(len(seeds)), *(_fmt(*stats[c]) for c in ATTACK_COLS)])
    pairs = []
    for a, b in PAIRS:
        if a not in by_row or b not in by_row:
            continue
        seeds = sorted(set(by_row[a]) & set(by_row[b]))
        if not seeds:
            continue
        diffs = {c: _mean_std([100 * (by_row[a][s][c] - by_row[b][s][c]) for s in seeds]) for c in ATTACK_COLS}
        worse = sum(by_row[a][s]["worst"] < by_row[b][s]["worst"] for s in seeds)
        summary["pairs"][f"{a} - {b}"] = {"seeds": seeds, "points": diffs, "seeds_worst_lower": worse}
        pairs.append([f"{a} - {b}", str(len(seeds)), *(_fmt(*diffs[c], digits=1) for c in ATTACK_COLS), str(worse)])
    return table, pairs, summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def report(args: argparse.Namespace, records: list[dict[str, Any]], skipped: list[str], meta_json: dict[str, Any]) -> str:  # fmt: skip
    table, pairs, summary = summarize(records)
    cols = ["clean", f"paper PGD@{args.eps:g} (CE, 4 steps)", f"PGD@{args.eps:g} CE", f"PGD@{args.eps:g} CW",
            f"worst case @{args.eps:g}"]  # fmt: skip
    text = markdown(f"Accuracy on {args.samples} test samples, mean ± std over seeds ({meta_json['setting']})",
                    ["model", "seeds", *cols], table)  # fmt: skip
    text += "\n" + markdown("Paired by seed: difference in accuracy points (mean ± std)",
                            ["difference", "seeds", *cols, "seeds where worst case is lower"], pairs)  # fmt: skip
    if skipped:
        text += "\nSkipped: " + "; ".join(skipped) + "\n"
    out = {**meta_json, "skipped": skipped, "records": records, **summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    Path(args.out).with_suffix(".md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------
# step 2 studied: sound vs empirical Lipschitz constants

STUDY_VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "empirical tau, guarded": {"step2_tau": "empirical"},
    "empirical tau, unguarded": {"step2_tau": "empirical", "step2_attack_check": False},
    "sound tau, guarded": {"step2_tau": "sound"},
    "sound tau, unguarded": {"step2_tau": "sound", "step2_attack_check": False},
}


def sound_tau(model: LateFusionModel, meta: DatasetMeta) -> dict[str, torch.Tensor]:
    from mmrobust.certify.estimators import head_lipschitz

    return {m: t.float() for m, t in head_lipschitz(model, meta, "sound", theorem="3.5").tau.items()}


def bound_diagnostics(model: LateFusionModel, step1: LateFusionModel, split: Split, taus: dict[str, Any],
                      cert_eps: list[float]) -> dict[str, Any]:  # fmt: skip
    """Theorem 3.5 radii on ``split`` with each tau, certified accuracy at ``cert_eps``, and what moved:
    margin ``h_y - h_j`` vs the denominator, runner-up changes, per-modality weights."""
    from mmrobust.certify.bounds import fused_logits, runner_up

    out: dict[str, Any] = {}
    scores, y = raw_scores_of(model, split)
    head, head1 = orthogonal_head(model), orthogonal_head(step1)
    a = {m: p.detach() for m, p in head.a.items()}
    a1 = {m: p.detach() for m, p in head1.a.items()}
    logits = fused_logits(scores, a, head.bias.detach())
    logits1 = fused_logits(scores, a1, head1.bias.detach())
    correct = logits.argmax(1) == y
    for name, tau in taus.items():
        tau = {m: torch.as_tensor(t, dtype=torch.float32) for m, t in tau.items()}
        bound = orthogonal_bound(scores, a, head.bias.detach(), y, tau)
        radius = torch.where(correct, bound.clamp_min(0), torch.zeros_like(bound))
        j = runner_up(logits, y)
        denom = torch.stack([((a[m].abs() * tau[m])[y] + (a[m].abs() * tau[m])[j]) ** 2 for m in a]).sum(0).sqrt()
        out[name] = {"mean_radius": float(radius.mean()), "mean_denominator": float(denom.mean()),
                     **{f"certified@{e:g}": float((radius >= e).float().mean()) for e in cert_eps}}  # fmt: skip
    j, j1 = runner_up(logits, y), runner_up(logits1, y)
    margin = logits.gather(1, y[:, None]) - logits.gather(1, j[:, None])
    out["mean_margin"] = float(margin.mean())
    out["runner_up_changed"] = float((j != j1).float().mean())
    out["a_mean"] = {m: float(v.mean()) for m, v in a.items()}
    out["a_mean_abs_change"] = {m: float((a[m] - a1[m]).abs().mean()) for m in a}
    return out


def step2_study(args: argparse.Namespace) -> int:
    """Step 2 with sound vs empirical constants on standard and 1-Lipschitz encoders, paired by seed."""
    bundle = load_data(run_config(args.data, "jt", "tuned", 1, 0, args.feature_dim).data)
    meta = bundle.meta
    test = bundle.test.subset(torch.arange(min(args.samples, len(bundle.test))))
    cert_eps = [float(e) for e in args.cert_eps.split(",")]
    threat = ThreatModel.parse(meta, eps=args.eps, norm="l2", budget="joint")
    records: list[dict[str, Any]] = read_json(args.out)["records"] if args.resume and Path(args.out).is_file() else []
    done = {(r["seed"], r["encoders"]) for r in records if r["variant"] == list(STUDY_VARIANTS)[-1]}
    t_start = time.perf_counter()
    setting = {"data": args.data, "epochs": args.epochs, "recipe": args.recipe, "feature_dim": args.feature_dim,
               "samples": len(test), "eps": args.eps, "cert_eps": cert_eps, "budget": "joint l2",
               **threat.units_fields(), "steps": args.steps, "threads": args.threads}  # fmt: skip
    for seed in (int(s) for s in args.seeds.split(",")):
        for enc in ("lipschitz", "standard"):
            if (seed, enc) in done:
                continue
            t0 = time.perf_counter()
            fit = train(run_config(args.data, "crmt-step1", args.recipe, args.epochs, seed, args.feature_dim,
                                   {"fit_samples": args.fit_samples}, lipschitz=enc == "lipschitz"), bundle=bundle)  # fmt: skip
            step1 = fit.model.eval()
            taus = {"empirical": fit.metrics["crmt"]["tau"], "sound": sound_tau(step1, meta)}
            cache: dict[Any, dict[str, float]] = {}
            for variant, options in STUDY_VARIANTS.items():
                t1 = time.perf_counter()
                record: dict[str, Any] = {}
                model = step1
                if options is not None:
                    model, rec = mmrobust_step2(step1, bundle, seed, {**options, "fit_samples": args.fit_samples})
                    s2 = rec.get("step2") or {}
                    cand = s2.get("candidate_epoch") or 0
                    record = {"kept": rec.get("kept"), "reason": rec.get("reason"), "attack_check": s2.get("attack_check"),
                              "val_step1": rec.get("step1_sound") or rec.get("step1"),
                              "val_candidate": s2["history"][cand - 1] if cand else None}  # fmt: skip
                key = _a_key(model)
                if key not in cache:
                    cache[key] = attack_all(model, meta, test, args.eps, args.steps)
                row = {"seed": seed, "encoders": enc, "variant": variant, **cache[key], **record,
                       "test": bound_diagnostics(model, step1, test, taus, cert_eps),
                       "time_s": time.perf_counter() - t1 + (t1 - t0 if options is None else 0.0)}  # fmt: skip
                records.append(row)
                print(f"seed {seed} {enc} {variant}: worst {row['worst']:.3f} sound radius "
                      f"{row['test']['sound']['mean_radius']:.4f} emp radius {row['test']['empirical']['mean_radius']:.4f} "
                      f"kept {row.get('kept')}", file=sys.stderr, flush=True)  # fmt: skip
                _study_report(args, records, {**setting, "wall_s": time.perf_counter() - t_start})
    print(_study_report(args, records, {**setting, "wall_s": time.perf_counter() - t_start}))
    return 0


def _study_report(args: argparse.Namespace, records: list[dict[str, Any]], setting: dict[str, Any]) -> str:
    groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["encoders"], r["variant"]), {})[r["seed"]] = r
    e0 = setting["cert_eps"][0]
    rows, summary = [], {}
    for (enc, variant), by_seed in groups.items():
        base = groups.get((enc, "none"), {})
        seeds = sorted(set(by_seed) & set(base))
        vals = {
            "worst": [by_seed[s]["worst"] for s in seeds],
            "d_worst": [100 * (by_seed[s]["worst"] - base[s]["worst"]) for s in seeds],
            "sound_radius": [by_seed[s]["test"]["sound"]["mean_radius"] for s in seeds],
            "d_sound_radius": [
                by_seed[s]["test"]["sound"]["mean_radius"] - base[s]["test"]["sound"]["mean_radius"] for s in seeds
            ],
            "emp_radius": [by_seed[s]["test"]["empirical"]["mean_radius"] for s in seeds],
            "sound_cert": [by_seed[s]["test"]["sound"][f"certified@{e0:g}"] for s in seeds],
            "d_margin": [by_seed[s]["test"]["mean_margin"] - base[s]["test"]["mean_margin"] for s in seeds],
            "runner_up_changed": [by_seed[s]["test"]["runner_up_changed"] for s in seeds],
        }
        if not seeds:
            continue
        stats = {k: _mean_std(v) for k, v in vals.items()}
        lower = sum(d < 0 for d in vals["d_worst"])
        kept = sum(by_seed[s].get("kept") == "step2" for s in seeds)
        summary[f"{enc} / {variant}"] = {"seeds": seeds, **stats, "seeds_worst_lower": lower, "seeds_step2_kept": kept}
        rows.append([enc, variant, str(len(seeds)), f"{kept}" if variant != "none" else "-",
                     _fmt(*stats["sound_radius"], 4), _fmt(*stats["d_sound_radius"], 4), _fmt(*stats["emp_radius"], 4),
                     _fmt(*stats["sound_cert"]), _fmt(*stats["worst"]), _fmt(*stats["d_worst"], 1), str(lower),
                     _fmt(*stats["d_margin"], 3), _fmt(*stats["runner_up_changed"], 3)])  # fmt: skip
    header = ["encoders", "step 2", "seeds", "step 2 kept", "sound mean radius", "change vs none",
              "empirical mean radius", f"sound certified @{e0:g}", f"worst case @{args.eps:g}", "change (points)",
              "seeds lower", "margin change", "runner-up changed"]  # fmt: skip
    text = markdown(f"Step 2 with sound vs empirical tau ({setting['data']}, {setting['epochs']} epochs, "
                    f"{setting['recipe']} recipe, {setting['samples']} test samples; paired by seed vs no step 2)",
                    header, rows)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {**setting, "records": records, "summary": summary})
    Path(args.out).with_suffix(".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=os.environ.get("CRMT_OFFICIAL"), help="checkout of the reference code")
    p.add_argument("--data", default="avdigits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30, help="the paper recipe's epochs (step 2: epochs // 3 - 1)")
    p.add_argument("--feature-dim", type=int, default=512, help="512: the reference's fusion layer size")
    p.add_argument("--samples", type=int, default=600, help="attacked test samples (the first N)")
    p.add_argument("--eps", type=float, default=2.0, help="joint l2 budget, in the dataset's attack units")
    p.add_argument("--steps", type=int, default=10, help="steps of the CE and CW PGD of the worst case")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="synthetic data, 2 epochs, 1 seed, 100 samples")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run the rest")
    p.add_argument("--merge", nargs="+", help="only rebuild the table from these result files")
    p.add_argument(
        "--step2-study",
        action="store_true",
        help="instead: step 2 with sound vs empirical tau on 1-Lipschitz and standard encoders",
    )
    p.add_argument("--recipe", default="tuned", help="--step2-study: training recipe of the step-1 models")
    p.add_argument("--cert-eps", default="0.25,0.5", help="--step2-study: radii of the certified accuracy")
    p.add_argument("--fit-samples", type=int, default=512, help="--step2-study: training samples of the empirical tau")
    p.add_argument("--out", default="benchmarks/results/crmt_vs_reference.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.data, args.epochs, args.seeds, args.samples, args.steps = "synthetic", 2, "0", 100, 5
    if args.step2_study:
        return step2_study(args)
    if args.merge:
        files = [read_json(f) for f in args.merge]
        records = [r for f in files for r in f["records"]]
        skipped = sorted({s for f in files for s in f.get("skipped", [])})
        print(
            report(
                args,
                records,
                skipped,
                {k: v for k, v in files[0].items() if k not in ("records", "rows", "pairs", "skipped")},
            )
        )
        return 0
    have_ref = bool(args.official) and (Path(args.official) / "train.py").is_file()
    if have_ref and args.feature_dim != 512:
        raise SystemExit("the reference's fusion layers take 512 features per modality: use --feature-dim 512")
    ref = import_reference(args.official) if have_ref else None
    skipped = (
        [] if have_ref else [f"{r} (no reference checkout: --official PATH or $CRMT_OFFICIAL)" for r in REFERENCE_ROWS]
    )
    records: list[dict[str, Any]] = read_json(args.out)["records"] if args.resume and Path(args.out).is_file() else []
    done = {(r["seed"], r["row"]) for r in records}
    bundle = load_data(run_config(args.data, "jt", "paper", 1, 0, args.feature_dim).data)
    threat = ThreatModel.parse(bundle.meta, eps=args.eps, norm="l2", budget="joint")
    meta_json = {
        "setting": f"{args.data}, {args.epochs} epochs, feature dim {args.feature_dim}, joint l2 eps {args.eps:g}",
        "data": args.data, "epochs": args.epochs, "feature_dim": args.feature_dim, "samples": args.samples,
        "eps": args.eps, "budget": "joint l2", **threat.units_fields(), "steps": args.steps, "threads": args.threads,
        "official": args.official if have_ref else None, "torch": torch.__version__,
    }  # fmt: skip
    t_start = time.perf_counter()

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        print(f"seed {record['seed']} {record['row']}: clean {record['clean']:.3f} paper {record['paper']:.3f} "
              f"worst {record['worst']:.3f} ({record['time_s']:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
        meta_json["wall_s"] = time.perf_counter() - t_start
        report(args, records, skipped, meta_json)  # after every row: a stopped run keeps what it has

    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(args, ref, bundle, seed, done, emit)
    meta_json["wall_s"] = time.perf_counter() - t_start
    print(report(args, records, skipped, meta_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
