"""Benchmark: how far the MoE credit model's reason codes depend on its integrated-gradient steps.

For saved scorers (python -m benchmarks.credit --models-dir DIR: DIR/<dataset>/{moe,ensemble}), on the
first `--rows` applicants of each saved test split: the reason codes (ordered top 3) with the
MoE's integrated gradients at `--steps` midpoint steps, against those at `--reference` steps (the
integral, nearly converged). Reported per scorer and step count: how often the ordered codes,
the set of three and the first reason are the same as the reference's; for the MoE itself, the
median completeness gap |sum of attributions - (logit(z) - logit(0))| in log-odds (what the
gradient misses where routing switches experts along the path: it does not shrink with steps);
and the CPU ms of one single-application `predict_with_contributions` of the MoE at each step
count (median of 200 calls, scoring thread's CPU time).

    python -m benchmarks.credit_attribution --models-dir /tmp/cg/bench --json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from finance.models import FitData
from finance.scorer import CreditScorer, load_model


def moe_member(scorer: CreditScorer):
    model = scorer.model_
    return model if model.name == "moe" else next(m for m in model.members_ if m.name == "moe")


def reason_codes(scorer: CreditScorer, data: FitData, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n,) "f|f|f", the MoE's own contributions (n, F)) with the MoE at `steps` steps."""
    moe = moe_member(scorer)
    moe.config_.attribution_steps = steps
    _, contributions = scorer.model_.predict_with_contributions(data)
    own = contributions if scorer.model_ is moe else moe.predict_with_contributions(data)[1]
    return scorer.reason_codes(data, contributions)[1], own


def single_call_ms(scorer: CreditScorer, data: FitData, steps: int, calls: int = 200) -> float:
    moe = moe_member(scorer)
    moe.config_.attribution_steps = steps
    rows = [FitData(data.X[i % len(data):i % len(data) + 1]) for i in range(calls + 10)]
    cpu = []
    for i, row in enumerate(rows):
        started = time.thread_time()
        moe.predict_with_contributions(row)
        if i >= 10:
            cpu.append(time.thread_time() - started)
    return float(np.median(cpu) * 1000)


def completeness_gap(scorer: CreditScorer, data: FitData, contributions: np.ndarray) -> float:
    moe = moe_member(scorer)
    baseline = np.zeros((1, data.X.shape[1]), dtype=np.float32)
    with torch.no_grad():  # logit at the average applicant: standardised 0, i.e. the training means
        z0 = torch.from_numpy(baseline)
        logit0 = float(moe.module_.net(z0)[0][0, 0])
    gap = contributions.sum(axis=1) - (moe.logits(data.X) - logit0)
    return float(np.median(np.abs(gap)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--datasets", default="taiwan,gmsc")
    parser.add_argument("--rows", type=int, default=2000, help="test applicants compared")
    parser.add_argument("--steps", default="4,8,16,32", help="step counts compared with the reference")
    parser.add_argument("--reference", type=int, default=256)
    add_output_arguments(parser, Path("benchmarks/results/credit_attribution.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(stderr=args.json, width=140)
    steps = [int(s) for s in args.steps.split(",")]
    results: dict = {"machine": machine(), "rows": args.rows, "reference_steps": args.reference, "results": []}
    for dataset in args.datasets.split(","):
        frame = pd.read_parquet(args.models_dir / dataset / "test.parquet").iloc[:args.rows]
        for name in ("moe", "ensemble"):
            scorer = load_model(args.models_dir / dataset / name)
            data = scorer.features(frame)
            console.print(f"[{dataset}/{name}] reference: {args.reference} steps over {len(frame):,} applicants ...")
            ref_codes, _ = reason_codes(scorer, data, args.reference)
            ref_first = np.array([c.split("|")[0] for c in ref_codes], dtype=object)
            ref_sets = [frozenset(c.split("|")) for c in ref_codes]
            for n in [*steps, args.reference]:
                codes, own = reason_codes(scorer, data, n)
                results["results"].append({
                    "dataset": dataset, "scorer": name, "steps": n,
                    "codes_same": float(np.mean(codes == ref_codes)),
                    "set_same": float(np.mean([frozenset(c.split("|")) == r for c, r in zip(codes, ref_sets,
                                                                                           strict=True)])),
                    "first_same": float(np.mean(np.array([c.split("|")[0] for c in codes], dtype=object)
                                                == ref_first)),
                    "moe_completeness_gap": completeness_gap(scorer, data, own),
                    "moe_single_call_cpu_ms": single_call_ms(scorer, data, n)})
    table = Table(title=f"Reason codes at n integrated-gradient steps vs {args.reference} steps "
                        f"({args.rows:,} test applicants per dataset; {describe(results['machine'])})")
    for column in ("dataset", "scorer", "steps", "ordered top 3 same", "set of 3 same", "first same",
                   "MoE completeness gap", "MoE CPU ms / call"):
        table.add_column(column, justify="right")
    for r in results["results"]:
        table.add_row(r["dataset"], r["scorer"], str(r["steps"]), f"{r['codes_same']:.1%}", f"{r['set_same']:.1%}",
                      f"{r['first_same']:.1%}", f"{r['moe_completeness_gap']:.3f}",
                      f"{r['moe_single_call_cpu_ms']:.2f}")
    console.print(table)
    console.print(f"results: {args.out}")
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
