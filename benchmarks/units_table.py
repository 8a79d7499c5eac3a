"""The numbers of docs/units.md: what budgets mean in stored units.

``avdigits RUN [RUN ...]``: image-only l-inf PGD on AV-digits runs, the worst case over the CE and
CW losses per sample, on the first ``--samples`` test samples, at each ``--eps`` in pixel units
(l-inf on the stored [0, 1] image) and in the old standardised units (the same number times the
image std, i.e. what ``--eps image=8/255`` meant before datasets stored raw values).

``waveform RUN FEATURE_DATA``: a model trained on an import with ``--waveform`` attacked on its
audio (a) in waveform amplitude (PGD l2 and l-inf on the stored waveform, through the log-mel front
end) and (b) in feature space: the same weights with the front end replaced by the precomputed
log-mel features of FEATURE_DATA (the same clips imported without ``--waveform``), PGD l2 on the
stored log-mel values at the median feature displacement that each waveform attack caused.

    python benchmarks/units_table.py avdigits runs/jt runs/crmt-at --samples 200
    python benchmarks/units_table.py waveform runs/wave-jt /tmp/clips-feat
"""

from __future__ import annotations

import argparse
import json

import torch

from mmrobust.attacks import build_attack
from mmrobust.data import DataConfig, iterate_batches, load_data
from mmrobust.models import build_model
from mmrobust.models.transform import LogMelFrontEnd
from mmrobust.runs import load_run


def worst_case_accuracy(model, meta, inputs, labels, modality, norm, eps, steps, restarts=1) -> float:
    """Accuracy under PGD, a sample counted robust only if it survives both CE and CW."""
    robust = torch.ones(len(labels), dtype=torch.bool)
    for loss in ("ce", "cw"):
        attack = build_attack(f"pgd-{norm}", model, meta, eps=eps, loss=loss, modalities=[modality], steps=steps,
                              restarts=restarts, seed=0)  # fmt: skip
        _, logits = attack.perturb(inputs, labels)
        robust &= logits.argmax(1) == labels
    return float(robust.float().mean())


def first(split, n):
    inputs, labels = next(iter(iterate_batches(split, n)))
    return inputs, labels


def avdigits(args: argparse.Namespace) -> None:
    rows = []
    for path in args.runs:
        run = load_run(path)
        bundle = run.data()
        std = run.meta.spec("image").normalization.std[0]
        inputs, labels = first(bundle.test, args.samples)
        with torch.no_grad():
            clean = float((run.model(inputs).argmax(1) == labels).float().mean())
        for text in args.eps.split(","):
            num, den = (float(v) for v in text.split("/")) if "/" in text else (float(text), 1.0)
            eps = num / den
            pixel = worst_case_accuracy(run.model, run.meta, inputs, labels, "image", "linf", eps, args.steps)
            old = worst_case_accuracy(run.model, run.meta, inputs, labels, "image", "linf", eps * std, args.steps)
            rows.append({"run": path, "method": run.config.train.method, "eps": text, "clean": clean,
                         "pixel_units": pixel, "old_standardised_units": old, "image_std": std,
                         "old_eps_in_pixels_x255": eps * std * 255})  # fmt: skip
            print(json.dumps(rows[-1]))


def waveform(args: argparse.Namespace) -> None:
    run = load_run(args.run)
    wmodel, wmeta = run.model, run.meta
    fdata = load_data(DataConfig(args.features))
    fmodel = build_model(fdata.meta, run.config.model).eval()
    state = {k: v for k, v in wmodel.state_dict().items() if not k.startswith("transforms.audio.")}
    missing, unexpected = fmodel.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"transforms.audio.mean", "transforms.audio.std"}, (missing, unexpected)
    fe = wmodel.transforms["audio"]
    assert isinstance(fe, LogMelFrontEnd)
    winputs, labels = first(run.data().test, args.samples)
    finputs, flabels = first(fdata.test, args.samples)
    assert torch.equal(labels, flabels)
    with torch.no_grad():
        wl, fl = wmodel(winputs), fmodel(finputs)
        print(json.dumps({"clean_acc": float((wl.argmax(1) == labels).float().mean()),
                          "max_logit_diff_wave_vs_feature": float((wl - fl).abs().max())}))  # fmt: skip
        clip_norm = winputs["audio"].flatten(1).norm(dim=1).median()
    fstd = fdata.meta.spec("audio").normalization.std[0]
    settings = [("l2", 10 ** (-snr / 20) * float(clip_norm), f"SNR {snr} dB") for snr in (40, 30, 20)]
    settings += [("linf", a, f"{a:g} amplitude") for a in (0.001, 0.003, 0.01)]
    for norm, eps, label in settings:
        racc = worst_case_accuracy(wmodel, wmeta, winputs, labels, "audio", norm, eps, args.steps)
        attack = build_attack(f"pgd-{norm}", wmodel, wmeta, eps=eps, loss="ce", modalities=["audio"],
                              steps=args.steps, seed=0)  # fmt: skip
        adv, _ = attack.perturb(winputs, labels)
        assert float(adv["audio"].abs().max()) <= 1.0
        with torch.no_grad():
            shift = (fe.features(adv["audio"]) - fe.features(winputs["audio"])).flatten(1).norm(dim=1)
        r = float(shift.median())  # stored log-mel units
        facc = worst_case_accuracy(fmodel, fdata.meta, finputs, labels, "audio", "l2", r, args.steps)
        row = {"waveform_attack": f"pgd-{norm} {label}", "eps_stored": eps, "waveform_robust_acc": racc,
               "median_logmel_l2_shift": r, "median_shift_standardised": r / fstd,
               "feature_l2_robust_acc_at_that_radius": facc}  # fmt: skip
        print(json.dumps(row))
    for r_std in (1.0, 3.0, 10.0):
        facc = worst_case_accuracy(fmodel, fdata.meta, finputs, labels, "audio", "l2", r_std * fstd, args.steps)
        print(json.dumps({"feature_l2_standardised_radius": r_std, "feature_robust_acc": facc}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("avdigits")
    a.add_argument("runs", nargs="+")
    a.add_argument("--samples", type=int, default=200)
    a.add_argument("--eps", default="2/255,8/255")
    a.add_argument("--steps", type=int, default=20)
    a.set_defaults(func=avdigits)
    w = sub.add_parser("waveform")
    w.add_argument("run")
    w.add_argument("features")
    w.add_argument("--samples", type=int, default=200)
    w.add_argument("--steps", type=int, default=20)
    w.set_defaults(func=waveform)
    args = ap.parse_args()
    torch.manual_seed(0)
    args.func(args)


if __name__ == "__main__":
    main()
