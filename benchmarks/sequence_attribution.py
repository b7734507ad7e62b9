"""Benchmark: how far the sequence model's integrated-gradient reason codes agree with occlusion's.

For saved Taiwan sequence scorers (python -m benchmarks.credit_sequence --models DIR), on each seed's test
split (the same split as that benchmark): occlusion attributions per raw field (exact: each field
alone at its reference) against integrated gradients with 1 (gradient x input) and `--steps`
steps. Reported: how often the top field is the same, the mean overlap of the top 3, and how much
of occlusion's best single-field drop the IG top field achieves; for all test applicants and for
the declined (those who are sent reason codes). Also the seconds each method took.

    python -m benchmarks.sequence_attribution --data ../shared/data --models runs/seqmodels [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, write_results
from benchmarks.fixtures import add_data_argument
from finance.data import load_taiwan
from finance.scorer import CreditScorer, split_records


def agreement(occlusion: np.ndarray, other: np.ndarray, k: int = 3) -> dict[str, float]:
    """Top-1 match, top-k overlap, and occlusion's drop at other's top field / at its own top field."""
    rows = np.arange(len(occlusion))
    top_occ, top_other = np.argsort(-occlusion, axis=1)[:, :k], np.argsort(-other, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_occ, top_other, strict=True)])
    return {"top1": float(np.mean(top_occ[:, 0] == top_other[:, 0])), f"top{k}_overlap": float(overlap),
            "drop_ratio": float(occlusion[rows, top_other[:, 0]].mean() / occlusion[rows, top_occ[:, 0]].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--models", type=Path, default=Path("runs/seqmodels"),
                        help="scorers saved by benchmarks.credit_sequence --models")
    parser.add_argument("--seed", dest="seeds", type=int, action="append", help="splits (repeatable; default 0)")
    parser.add_argument("--steps", type=int, default=8, help="integrated-gradient steps")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = parser.parse_args()
    data, models, seeds, steps, as_json = args.data, args.models, args.seeds or [0], args.steps, args.json
    torch.set_num_threads(1)
    console = Console(stderr=as_json, width=120)
    records = load_taiwan(data / "taiwan_credit_default")
    measured_on, results = machine(), []
    for seed in seeds:
        _, test = split_records(records, valid_share=0.2, seed=seed)  # the benchmark's test split
        scorer = CreditScorer.load(models / f"taiwan-seed{seed}" / "sequence")
        classifier, frame = scorer.model_.classifier_, test.frame.reset_index(drop=True)
        declined = scorer.predict_pd(frame) > scorer.cutoff_pd_
        started = time.perf_counter()
        occlusion, _ = classifier.attributions(frame, "occlusion")
        seconds = {"occlusion": time.perf_counter() - started}
        for n in (1, steps):
            started = time.perf_counter()
            ig, _ = classifier.attributions(frame, "integrated-gradients", n)
            seconds[f"ig{n}"] = time.perf_counter() - started
            for name, rows in (("all", np.ones(len(frame), bool)), ("declined", declined)):
                results.append({"seed": seed, "steps": n, "rows": name, "n": int(rows.sum()),
                                **agreement(occlusion[rows], ig[rows]), "seconds": seconds[f"ig{n}"],
                                "occlusion_seconds": seconds["occlusion"]})
    table = Table(title=f"Integrated gradients vs occlusion, Taiwan test splits ({models})")
    for column in ("seed", "IG steps", "rows", "n", "top-1 same", "top-3 overlap", "drop ratio", "IG s", "occlusion s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r["seed"]), str(r["steps"]), r["rows"], f"{r['n']:,}", f"{r['top1']:.1%}",
                      f"{r['top3_overlap']:.1%}", f"{r['drop_ratio']:.3f}", f"{r['seconds']:.1f}",
                      f"{r['occlusion_seconds']:.1f}")
    console.print(table)
    write_results({"machine": measured_on, "load_average": os.getloadavg()[0], "results": results}, None,
                  as_json=as_json)


if __name__ == "__main__":
    main()
