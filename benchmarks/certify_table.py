"""Render the JSON files of ``certify_tightness.py`` as the markdown table of docs/certify.md.

python benchmarks/certify_table.py benchmarks/results/certify_tightness.json [MORE.json ...]
"""

from __future__ import annotations

import argparse
from typing import Any

from mmrobust.io import read_json
from mmrobust.report.markdown import md_table

KIND = {"sound": "sound", "crown": "sound", "smoothing": "probabilistic", "empirical": "estimate"}


def rows_of(doc: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    args = doc["args"]
    grid = [float(r) for r in str(args["radii"]).split(",")]
    for e in doc["results"]:
        model = f"{e['method']}{' + Lipschitz encoders' if e['lipschitz_encoders'] else ''}"
        head = (f"{model} (clean {e['clean_accuracy']:.3f}, PGD@{e['pgd_eps']:g} {e['pgd_accuracy']:.3f}; "
                f"{e['samples']} / {e['tightness_samples']} samples)")  # fmt: skip
        for i, (name, c) in enumerate(e["certifiers"].items()):
            label = name if KIND[name] == "sound" else f"{name} ({KIND[name]})"
            if name == "smoothing":
                label += f", sigma {args['sigma']:g}, n {args['smoothing_n']}, alpha 0.001"
            ratio = c["median_ratio"]
            rows.append([head if i == 0 else "", label, *[c["certified_accuracy"][str(r)] for r in grid],
                         ratio, c["violations"], f"{c['seconds']:.0f}"])  # fmt: skip
        att = e["attack_accuracy"]
        rows.append(
            [
                "",
                f"attack (upper bound, first {e['tightness_samples']})",
                *[att[str(r)] for r in grid],
                "1",
                "-",
                f"{e['attack_seconds']:.0f}",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    args = ap.parse_args()
    docs = [read_json(p) for p in args.json]
    grid = [float(r) for r in str(docs[0]["args"]["radii"]).split(",")]
    headers = ["model", "certifier", *[f"r={r:g}" for r in grid], "median cert/attack", "violations", "seconds"]
    print(md_table(headers, [row for d in docs for row in rows_of(d)]))


if __name__ == "__main__":
    main()
