"""`moeworks finance reject-inference`: run the reject-inference protocol on a real dataset and print
each method's AUC on the whole population and the share of the accepted-only -> upper-bound gap it closes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from finance.errors import CreditDataError
from finance.reject_inference.methods import METHODS


def reject_inference(
    dataset: str = typer.Option("taiwan", help="taiwan or gmsc"),
    data: Path = typer.Option(None, help="real-data root holding the dataset's folder (default: $MOEWORKS_DATA)"),
    estimator: str = typer.Option("lightgbm", help="the model each method wraps: lightgbm or logistic on the raw "
                                                   "fields, or credit:NAME (a registered credit model, e.g. "
                                                   "credit:scorecard, with its feature pipeline)"),
    method: list[str] = typer.Option(None, help=f"methods to run (repeatable; default all: {', '.join(METHODS)})"),
    seeds: list[int] = typer.Option([0], "--seed", help="protocol seeds (repeatable); results are averaged"),
    acceptance_rate: float = typer.Option(0.6, help="share of applicants the replayed policy accepts"),
    unlabelled: bool = typer.Option(True, help="GMSC: add cs-test's applicants to the unlabelled pool"),
    out: Path = typer.Option(None, help="also write the full results (per seed) as JSON here"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as one JSON object on the last line"),
) -> None:
    """Replay an acceptance policy, hide the rejects' outcomes, compare reject-inference methods."""
    from rich.console import Console

    from finance.reject_inference.experiment import results_table, run_experiment, summary_json

    console = Console(stderr=as_json, width=120)  # tables stay whole in logs
    root = data or (Path(os.environ["MOEWORKS_DATA"]) if os.environ.get("MOEWORKS_DATA") else None)
    try:
        if root is None:
            raise CreditDataError("no data root: pass --data or set MOEWORKS_DATA")
        unknown = [m for m in method or [] if m not in METHODS]
        if unknown:
            raise CreditDataError(f"--method: unknown {unknown}; choose from {list(METHODS)}")
        if not 0 < acceptance_rate < 1:
            raise CreditDataError(f"--acceptance-rate must lie in (0, 1), got {acceptance_rate}")
        with console.status(f"reject inference on {dataset}") as status:
            result = run_experiment(dataset, root, estimator=estimator, methods=method or None, seeds=seeds,
                                    acceptance_rate=acceptance_rate, use_unlabelled=unlabelled,
                                    progress=lambda step: status.update(f"{dataset}: {step} done"))
    except (CreditDataError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    console.print(results_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps({"schema": "moeworks.finance.reject-inference/1", **summary_json(result)}))


def register(app: typer.Typer) -> None:
    """Add the command to a Typer app (the finance group)."""
    app.command("reject-inference")(reject_inference)
