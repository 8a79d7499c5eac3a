"""A full-size CRMT-JT run end to end (train with step 2, the paper suite, certification), each command
in its own process, with its wall time and peak RSS.

The data are the paper's full size: 3 video frames of 3x224x224 (stored uint8, ResNet18 per frame)
and a 1x1024x128 spectrogram (stored float16, ResNet18), generated straight into the on-disk format
with a class-dependent pattern (a bright quadrant in the frames, a raised frequency band in the
spectrogram) over noise. The commands are the CLI's, run as children with ``OMP_NUM_THREADS``
(``--threads``) and the default ``--memory-budget auto``:

1. ``mmrobust train --method crmt-jt`` (batch 8, step 2 on, ``lipschitz_samples`` ``--lipschitz-samples``);
2. ``mmrobust evaluate --suite paper`` on the test split (``--eval-steps`` PGD steps);
3. ``mmrobust certify --lipschitz sound,empirical`` (``--lipschitz-samples`` fit samples);
4. ``mmrobust certify --lipschitz crown``, which must be refused with a one-line error (exit 2): CROWN
   does not support the ResNet18 encoders.

Peak RSS is each child's own (``os.wait4``). The data are deleted unless ``--keep``.

    python benchmarks/fullsize_run.py [--train 32 --val 8 --test 8] [--epochs 2] [--out docs/results/fullsize_run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.data.ondisk import DiskWriter, Storage
from mmrobust.io import write_json
from mmrobust.memory import AUTO_FRACTION, available_bytes
from mmrobust.report.tables import print_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import run_measured  # noqa: E402

VIDEO, SPEC = (3, 3, 224, 224), (1, 1024, 128)
FRAME_MEAN, FRAME_STD = 0.45, 0.225


def make_fullsize(root: Path, sizes: dict[str, int], classes: int, seed: int = 0) -> dict:
    """Write a full-size on-disk dataset: uint8 frames + float16 spectrograms, a learnable class pattern."""
    low, high = (0 - FRAME_MEAN) / FRAME_STD, (1 - FRAME_MEAN) / FRAME_STD
    meta = DatasetMeta(
        "fullsize-synthetic",
        [ModalitySpec("video", "video", VIDEO, (low, high)), ModalitySpec("audio", "spectrogram", SPEC)],
        [f"class{k}" for k in range(classes)],
        {"description": "synthetic full-size clips for benchmarks/fullsize_run.py"},
    )
    storage = {"video": Storage("uint8", 1 / 255, FRAME_MEAN, FRAME_STD), "audio": Storage("float16")}
    w = DiskWriter.create(root, meta, sizes, storage)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for split, n in sizes.items():
        for a in range(0, n, 8):
            b = min(n, a + 8)
            y = rng.integers(0, classes, b - a)
            video = rng.integers(0, 160, (b - a, *VIDEO), dtype=np.uint8)
            audio = rng.standard_normal((b - a, *SPEC), dtype=np.float32)
            for i, k in enumerate(y.tolist()):
                r, c = divmod(k % 4, 2)  # a bright quadrant per class in every frame
                video[i, :, :, r * 112 : (r + 1) * 112, c * 112 : (c + 1) * 112] += 90
                band = slice(k * SPEC[1] // classes, (k + 1) * SPEC[1] // classes)
                audio[i, :, band] += 1.5  # a raised frequency band per class
            w.write(split, a, {"video": video, "audio": audio.astype(np.float16)}, y)
    w.finish()
    nbytes = sum(f.stat().st_size for f in root.rglob("*.npy"))
    return {"sizes": sizes, "classes": classes, "disk_mb": nbytes / 2**20, "write_s": time.perf_counter() - t0}


def summarise(run: Path) -> dict:
    """What the run folder records: accuracies, CRMT's step 1/2 record, the paper suite, the certifiers."""
    metrics = json.loads((run / "metrics.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    cert = json.loads((run / "certify.json").read_text())["certifiers"]
    keys = ("guarantee_kind", "theorem", "n", "clean_accuracy", "summary", "timing")
    return {
        "metrics": {k: metrics.get(k) for k in ("val_accuracy", "test_accuracy", "train_time_s", "crmt")},
        "eval": {**{k: ev.get(k) for k in ("clean_accuracy", "worst_case", "protocol")}, "results": len(ev["results"])},
        "certify": {
            name: {
                **{k: e.get(k) for k in keys},
                "encoder_lipschitz": e["lipschitz"].get("info", {}).get("encoder_lipschitz"),
            }
            for name, e in cert.items()
        },
    }


def _one_line_error(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lipschitz-samples", type=int, default=8, help="CRMT's tau and the empirical certifier")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the paper suite (its default is 10)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    p.add_argument("--dir", default=None, help="folder for the data and the run (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the data and the run folder")
    p.add_argument("--out", default="benchmarks/results/fullsize_run.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mmrobust-fullsize-", dir=args.dir))
    data, run = work / "data", work / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cli = [sys.executable, "-m", "mmrobust.cli"]
    out: dict = {"ram_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, "threads": args.threads,
                 "shapes": {"video": VIDEO, "audio": SPEC}, "commands": []}  # fmt: skip
    try:
        out["data"] = made = make_fullsize(data, {"train": args.train, "val": args.val, "test": args.test},
                                           args.classes)  # fmt: skip
        print(f"data: {json.dumps(made)}", file=sys.stderr, flush=True)
        lip = str(args.lipschitz_samples)
        commands = [
            ("train", ["train", "--data", str(data), "--method", "crmt-jt", "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--method-opt", f"lipschitz_samples={lip}",
                       "--no-progress", "--out", str(run)], 0),
            ("evaluate", ["evaluate", str(run), "--suite", "paper", "--split", "test", "--steps",
                          str(args.eval_steps), "--no-progress"], 0),
            ("certify", ["certify", str(run), "--lipschitz", "sound,empirical", "--lipschitz-samples", lip], 0),
            ("certify crown", ["certify", str(run), "--lipschitz", "crown"], 2),
        ]  # fmt: skip
        for name, cmd, want_rc in commands:
            # the budget `auto` resolves to when the command starts (60 % of the memory available then)
            budget = AUTO_FRACTION * available_bytes() / 2**30
            load = os.getloadavg()
            log = work / f"{name.replace(' ', '-')}.log"
            res = run_measured(cli + cmd, env, log)
            text = log.read_text()
            rec = {"name": name, "cmd": ["mmrobust", *cmd], "auto_budget_gb_at_start": budget,
                   "load_at_start": load, **res, "log_tail": text.strip().splitlines()[-12:]}  # fmt: skip
            out["commands"].append(rec)
            print(f"{name}: rc {res['rc']} {res['wall_s']:.0f} s peak RSS {res['peak_rss_mb']:.0f} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
            if res["rc"] != want_rc:
                raise SystemExit(f"{name}: exit {res['rc']}, expected {want_rc}:\n{text[-3000:]}")
            if want_rc == 2:
                rec["one_line_error"] = _one_line_error(text)
                if not rec["one_line_error"]:
                    raise SystemExit(f"{name}: the refusal is not a one-line error:\n{text[-3000:]}")
        out.update(summarise(run))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, out)
    print_table(
        f"Full-size CRMT-JT run ({args.train}/{args.val}/{args.test} samples, {args.classes} classes, video "
        f"{'x'.join(map(str, VIDEO))} uint8 + spectrogram {'x'.join(map(str, SPEC))} float16, ResNet18 encoders, "
        f"{args.threads} thread(s), --memory-budget auto)",
        ["command", "exit", "wall time", "peak RSS", "auto budget at start"],
        [[" ".join(c["cmd"][:2]) + (" " + c["cmd"][4] if c["name"].startswith("certify") else ""), str(c["rc"]),
          f"{c['wall_s']:.0f} s", f"{c['peak_rss_mb'] / 1024:.2f} GiB", f"{c['auto_budget_gb_at_start']:.1f} GiB"]
         for c in out["commands"]],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
