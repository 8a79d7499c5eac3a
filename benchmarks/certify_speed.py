"""Cost of certifying a test set, relative to one forward + backward pass over it.

For each run (default: every run folder given with ``--run``) and each Lipschitz estimator, times
``certify_model`` on the test split (forward, Lipschitz estimation, radii) and divides by the time
of one forward + backward (parameter gradients, as in a training step) over the same test set.
Each timing is the best of ``--repeats`` runs (the machine may be shared). Prints a table and
writes ``benchmarks/results/certify_speed.json``.

    python benchmarks/certify_speed.py --run RUN [--run RUN2] [--repeats 2] [--lipschitz-samples 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrobust.certify.runner import certify_model
from mmrobust.data.base import iterate_batches
from mmrobust.io import write_json
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run

OUT = Path(__file__).resolve().parent / "results" / "certify_speed.json"


def forward_backward_time(model: nn.Module, split: Any, batch_size: int) -> float:
    """One forward + backward (parameter gradients) over the split, in eval mode."""
    model.eval()
    t0 = time.perf_counter()
    for inputs, labels in iterate_batches(split, batch_size):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), labels).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lipschitz-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = [], []
    for path in args.run:
        run = load_run(path)
        bundle = run.data()
        fb = min(forward_backward_time(run.model, bundle.test, args.batch_size) for _ in range(args.repeats))
        for est in ("empirical", "sound"):
            best: dict[str, Any] | None = None
            for _ in range(args.repeats):
                opts = {"fit_samples": args.lipschitz_samples} if est == "empirical" else {}
                res = certify_model(run.model, run.meta, bundle.test, est, bundle.train,
                                    batch_size=args.batch_size, options=opts)  # fmt: skip
                timing = res.certificate.info["timing"]
                if best is None or timing["total_s"] < best["total_s"]:
                    best = timing
            assert best is not None
            entry = {"run": str(path), "head": run.config.model.head, "estimator": est, "n_test": len(bundle.test),
                     "forward_backward_s": fb, **best, "ratio": best["total_s"] / fb}  # fmt: skip
            if est == "empirical":
                entry["lipschitz_samples"] = args.lipschitz_samples
            results.append(entry)
            rows.append([Path(path).name, entry["head"], est, fb, best["lipschitz_s"], best["total_s"], entry["ratio"]])
    print_table(
        "Certifying the test set vs one forward+backward over it (best of repeats)",
        ["run", "head", "estimator", "fwd+bwd s", "Lipschitz s", "certify s", "ratio"],
        rows,
    )
    write_json(OUT, {"threads": args.threads, "repeats": args.repeats, "results": results})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
