"""Benchmark: reject-inference methods on Taiwan and Give Me Some Credit (the protocol of
finance.reject_inference.protocol, averaged over seeds).

Each method wraps the same LightGBM; the table gives its AUC on the whole through-the-door holdout,
the kickout against accepted-only, and the share of the accepted-only -> upper-bound AUC gap it
closes (target: the best method >= 30% on both datasets).

    python -m benchmarks.reject_inference --data ../shared/data [--seed 0 --seed 1] [--method fuzzy] [--json]
        [--param fuzzy-uplift.bad_odds_factor=1.5]   (a method's parameter other than its default)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import add_data_argument
from finance.reject_inference.experiment import best_method, results_table, run_experiment, summary_json


def parse_params(items: list[str]) -> dict[str, dict[str, float]]:
    """["fuzzy-uplift.bad_odds_factor=1.5", ...] -> {"fuzzy-uplift": {"bad_odds_factor": 1.5}};
    ValueError (argparse's usage error, exit code 2) for an item of another form."""
    params: dict[str, dict[str, float]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--param {item!r}: expected METHOD.NAME=NUMBER") from None
        if not (method and name):
            raise ValueError(f"--param {item!r}: expected METHOD.NAME=NUMBER")
        params.setdefault(method, {})[name] = int(number) if number.is_integer() and "." not in value else number
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--dataset", dest="datasets", action="append",
                        help="datasets (repeatable; default taiwan, gmsc)")
    parser.add_argument("--seed", dest="seeds", type=int, action="append",
                        help="protocol seeds (repeatable; default 0 1 2)")
    parser.add_argument("--estimator", default="lightgbm", choices=("lightgbm", "logistic"))
    parser.add_argument("--method", dest="methods", action="append", help="methods (repeatable; default all)")
    parser.add_argument("--unlabelled", action=argparse.BooleanOptionalAction, default=True,
                        help="GMSC: add cs-test to the unlabelled pool")
    parser.add_argument("--param", dest="params", action="append", default=[], help="METHOD.NAME=NUMBER (repeatable)")
    add_output_arguments(parser, Path("runs/benchmarks/reject_inference.json"))
    args = parser.parse_args()
    try:
        method_params = parse_params(args.params)
    except ValueError as error:
        parser.error(str(error))
    data, out, as_json = args.data, args.out, args.json
    datasets, seeds, methods = args.datasets or ["taiwan", "gmsc"], args.seeds or [0, 1, 2], args.methods
    estimator, unlabelled = args.estimator, args.unlabelled
    console = Console(stderr=as_json, width=120)  # tables stay whole in logs
    measured_on = {**machine(), "lightgbm_threads": 1}
    results, started = {}, time.perf_counter()
    for dataset in datasets:
        with console.status(f"{dataset}") as status:
            results[dataset] = run_experiment(
                dataset, data, estimator=estimator, methods=methods or None, seeds=seeds, use_unlabelled=unlabelled,
                method_params=method_params,
                progress=lambda step, d=dataset: status.update(f"{d}: {step} done"))
        console.print(results_table(results[dataset]))
        best = best_method(results[dataset])
        if best is not None:
            console.print(f"{dataset}: best method {best['method']} closes {best['gap_closed']:.0%} of the gap "
                          f"(target >= 30%)")
    seconds = time.perf_counter() - started
    console.print(f"{describe(measured_on)}, LightGBM 1 thread; {seconds:.0f} s; results written to {out}")
    write_results({"machine": measured_on, "seconds": seconds, "results": results}, out, as_json=as_json,
                  last_line={"machine": measured_on, **{d: summary_json(r) for d, r in results.items()}})


if __name__ == "__main__":
    main()
