"""Benchmark: reject-inference methods on Taiwan and Give Me Some Credit (the protocol of
finance.reject_inference.protocol, averaged over seeds).

Each method wraps the same LightGBM; the table gives its AUC on the whole through-the-door holdout,
the kickout against accepted-only, and the share of the accepted-only -> upper-bound AUC gap it
closes (target: the best method >= 30% on both datasets).

    python benchmarks/reject_inference.py --data ../shared/data [--seed 0 --seed 1] [--method fuzzy] [--json]
        [--param fuzzy-uplift.bad_odds_factor=1.5]   (a method's parameter other than its default)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from finance.reject_inference.experiment import best_method, results_table, run_experiment, summary_json

# appended, not put first: PYTHONPATH still picks the checkout of `finance` measured (a side-by-side run)
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.common import describe, machine, write_results  # noqa: E402

app = typer.Typer(add_completion=False)


def parse_params(items: list[str]) -> dict[str, dict[str, float]]:
    """["fuzzy-uplift.bad_odds_factor=1.5", ...] -> {"fuzzy-uplift": {"bad_odds_factor": 1.5}}."""
    params: dict[str, dict[str, float]] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected METHOD.NAME=NUMBER", param_hint="--param") from None
        if not (method and name):
            raise typer.BadParameter(f"{item!r}: expected METHOD.NAME=NUMBER", param_hint="--param")
        params.setdefault(method, {})[name] = int(number) if number.is_integer() and "." not in value else number
    return params


@app.command()
def main(data: Path = typer.Option(Path(os.environ.get("MOEWORKS_DATA", "../shared/data")), help="real-data root"),
         datasets: list[str] = typer.Option(["taiwan", "gmsc"], "--dataset", help="datasets (repeatable)"),
         seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="protocol seeds (repeatable)"),
         estimator: str = typer.Option("lightgbm", help="lightgbm or logistic"),
         methods: list[str] = typer.Option(None, "--method", help="methods (repeatable; default all)"),
         unlabelled: bool = typer.Option(True, help="GMSC: add cs-test to the unlabelled pool"),
         params: list[str] = typer.Option(None, "--param", help="METHOD.NAME=NUMBER (repeatable)"),
         out: Path = typer.Option(Path("runs/benchmarks/reject_inference.json"), help="results file"),
         as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON on the last line")) -> None:
    console = Console(stderr=as_json, width=120)  # tables stay whole in logs
    measured_on = {**machine(), "lightgbm_threads": 1}
    method_params = parse_params(params or [])
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
    app()
