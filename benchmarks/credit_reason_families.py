"""Benchmark: reason codes one per family against one per feature, on saved credit scorers.

The scorers saved by `python -m benchmarks.credit --models-dir DIR` before reason families existed carry
a catalogue without them: their reason codes are the top three features. Here each one scores its
test applicants twice, with that catalogue and with the catalogue of the same pipeline re-fitted on
the benchmark's training part (same features and medians, asserted; now with families), and the
codes are compared: how often an applicant's reasons repeat a family, how often the first reason
stays, how many reasons an applicant gets, and whether any probability moved.

    python -m benchmarks.credit_reason_families --models-dir /tmp/cg/bench --json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import CREDIT_FOLDERS, add_data_argument
from finance.data import load_records
from finance.features import FeaturePipeline
from finance.scorer import load_model, split_records


def repeated_family(codes, family: dict[str, str]) -> float:
    named = [c.split("|") for c in codes if c]
    return float(np.mean([len({family[f] for f in n}) < len(n) for n in named]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--datasets", default="taiwan,gmsc")
    parser.add_argument("--rows", type=int, default=2000, help="test applicants scored")
    parser.add_argument("--seed", type=int, default=0, help="the split seed the scorers were trained on")
    add_output_arguments(parser, Path("benchmarks/results/credit_reason_families.json"))
    args = parser.parse_args()
    console = Console(stderr=args.json, width=160)
    results: dict = {"machine": machine(), "rows": args.rows, "results": []}
    for dataset in args.datasets.split(","):
        records = load_records(dataset, args.data / CREDIT_FOLDERS[dataset])
        fit_part, test = split_records(records, valid_share=0.2, seed=args.seed)  # benchmarks/credit.py's split
        train, _ = split_records(fit_part, valid_share=0.2, seed=args.seed)
        families = FeaturePipeline(dataset=dataset).fit(train.frame)
        family = {s.name: s.family for s in families.catalogue_}
        frame = test.frame.iloc[:args.rows]
        for name in ("scorecard", "lightgbm", "moe", "ensemble"):
            scorer = load_model(args.models_dir / dataset / name)
            saved = scorer.pipeline_
            assert families.feature_names_ == saved.feature_names_, f"{dataset}/{name}: other features than saved"
            np.testing.assert_allclose(families.medians_, saved.medians_, err_msg=f"{dataset}/{name}: other medians")
            per_feature = scorer.score(frame, reasons="all")
            scorer.pipeline_ = families
            per_family = scorer.score(frame, reasons="all")
            count = lambda codes: float(np.mean([len(c.split("|")) if c else 0 for c in codes]))  # noqa: E731
            results["results"].append({
                "dataset": dataset, "scorer": name,
                "repeated_family_per_feature": repeated_family(per_feature["reason_codes"], family),
                "repeated_family_per_family": repeated_family(per_family["reason_codes"], family),
                "first_reason_same": float(np.mean([a.split("|")[0] == b.split("|")[0] for a, b in
                                                    zip(per_feature["reason_codes"], per_family["reason_codes"],
                                                        strict=True)])),
                "reasons_per_applicant_per_feature": count(per_feature["reason_codes"]),
                "reasons_per_applicant_per_family": count(per_family["reason_codes"]),
                "pd_identical": bool(np.array_equal(per_feature["pd"], per_family["pd"]))})
    table = Table(title=f"Reason codes, one per feature vs one per family ({args.rows:,} test applicants; "
                        f"{describe(results['machine'])})")
    for column in ("dataset", "scorer", "reasons repeating a family", "first reason same", "reasons / applicant",
                   "PD identical"):
        table.add_column(column, justify="right")
    for r in results["results"]:
        table.add_row(r["dataset"], r["scorer"],
                      f"{r['repeated_family_per_feature']:.1%} -> {r['repeated_family_per_family']:.1%}",
                      f"{r['first_reason_same']:.1%}",
                      f"{r['reasons_per_applicant_per_feature']:.2f} -> {r['reasons_per_applicant_per_family']:.2f}",
                      str(r["pd_identical"]))
    console.print(table)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
