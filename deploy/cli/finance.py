"""`moeworks finance ...`: credit scoring commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Credit scoring: train, evaluate, score batches.", no_args_is_help=True)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


def _out_folder(path: Path, option: str = "out") -> Path:
    """A folder to write into: refused (one line) when it is a file."""
    from finance.errors import CreditDataError

    if path.exists() and not path.is_dir():
        raise CreditDataError(f"--{option} {path} is a file; give a folder", field=option)
    return path


def _records(dataset: str, data: Path, *, require_target: bool = True):
    from finance.data import load_records

    return load_records(dataset, data, require_target=require_target)


@app.command()
def generate(out: Path = typer.Option(..., help="folder for the generated Parquet tables"),
             rows: int = typer.Option(100_000, help="applicants"),
             seed: int = typer.Option(0),
             default_rate: float = typer.Option(0.08)) -> None:
    """Generate a through-the-door population (GENERATED data) as Parquet tables."""
    import time

    from finance.errors import CreditDataError
    from finance.generate import GeneratorConfig
    from finance.generate import generate as run

    started = time.perf_counter()
    try:
        if rows < 1:
            raise CreditDataError(f"--rows must be >= 1, got {rows}", field="rows")
        run(_out_folder(out), GeneratorConfig(n_applicants=rows, seed=seed, default_rate=default_rate))
    except CreditDataError as error:
        _fail(error)
    typer.echo(f"generated {rows:,} applicants (GENERATED data, not real) into {out} "
               f"in {time.perf_counter() - started:.1f} s")


@app.command()
def train(dataset: str = typer.Option(..., help="taiwan, gmsc or generated"),
          data: Path = typer.Option(None, help="file or folder in the dataset's original format "
                                               "(generated: omitted = generate --rows applicants)"),
          model: str = typer.Option("lightgbm", help="scorecard, lightgbm, moe, ensemble (or a registered model)"),
          out: Path = typer.Option(..., help="folder to save the model with its feature pipeline"),
          seed: int = typer.Option(0),
          rows: int = typer.Option(50_000, help="applicants to generate when --dataset generated has no --data"),
          approval_rate: float = typer.Option(0.8, help="share approved; sets the PD cut-off"),
          reject_inference: str = typer.Option(None, help="train with this reject-inference method (see "
                                                          "`finance reject-inference`); needs --unlabelled"),
          unlabelled: Path = typer.Option(None, help="applicants without outcome (rejects; GMSC: cs-test)"),
          exclude_protected: bool = typer.Option(False, "--exclude-protected",
                                                 help="leave out features computed from age, sex, marital or "
                                                      "family status (the catalogue's `protected` column)"),
          json_out: bool = typer.Option(False, "--json", help="print the validation metrics as JSON last")) -> None:
    """Train a model (80/20 seeded split for early stopping and the cut-off) and save it."""
    from finance.errors import CreditDataError

    try:
        _out_folder(out)
        if data is None:
            if dataset != "generated":
                raise CreditDataError("--data is required for real datasets", field="data")
            from finance.generate import GeneratorConfig
            from finance.generate import generate as run

            data = run(out / "generated-data", GeneratorConfig(n_applicants=rows, seed=seed))
            typer.echo(f"generated {rows:,} applicants (GENERATED data, not real) into {data}")
        import torch

        torch.set_num_threads(1)
        from finance.scorer import ScoringPolicy, train_scorer

        records = _records(dataset, data)
        if reject_inference or unlabelled:
            from finance.reject_inference.credit_estimator import train_with_reject_inference

            scorer = train_with_reject_inference(records, None if unlabelled is None else _records(
                dataset, unlabelled, require_target=False), model_name=model, method=reject_inference, seed=seed,
                policy=ScoringPolicy(approval_rate=approval_rate), exclude_protected=exclude_protected)[0]
        else:
            scorer = train_scorer(records, model, seed=seed, policy=ScoringPolicy(approval_rate=approval_rate),
                                  progress=True, exclude_protected=exclude_protected)
        scorer.save(out)
    except (CreditDataError, FileNotFoundError) as error:
        _fail(error)
    metrics = scorer.validation_metrics_
    typer.echo(f"saved {model} for {dataset} to {out} (version {scorer.version_}); validation AUC "
               f"{metrics['auc']:.4f}, KS {metrics['ks']:.3f}, recall at {approval_rate:.0%} approval "
               f"{metrics['recall_at_approval']:.3f}")
    if json_out:
        typer.echo(json.dumps({"model": model, "dataset": dataset, "out": str(out), **metrics}))


@app.command()
def evaluate(model: Path = typer.Option(..., help="a saved model folder"),
             data: Path = typer.Option(..., help="labelled file or folder in the dataset's original format"),
             report: Path = typer.Option(None, help="write an HTML report here"),
             speed: bool = typer.Option(True, help="measure single-application latency and batch rows/s"),
             json_out: bool = typer.Option(False, "--json", help="print the metrics as one JSON object last")) -> None:
    """Score a labelled file with a saved model and print AUC, KS, Gini, recall, Brier, PSI, latency."""
    from rich.console import Console
    from rich.table import Table

    from finance.data import dataset_spec
    from finance.errors import CreditDataError

    try:
        from finance.evaluation import evaluate_scorer
        from finance.scorer import load_model

        scorer = load_model(model)
        records = _records(scorer.dataset, data)
        if len(set(records.target.tolist())) < 2:
            raise CreditDataError(f"the labels in {data} hold one class only; AUC and KS need defaulters and "
                                  "non-defaulters", field=dataset_spec(scorer.dataset).target)
        result = evaluate_scorer(scorer, records, speed=speed)
        if report is not None:
            from finance.report import write_report

            write_report(report, scorer, records, result)
    except (CreditDataError, FileNotFoundError) as error:
        _fail(error)
    metrics = result["metrics"]
    table = Table(title=f"{scorer.model_name} on {data} ({scorer.dataset}"
                        f"{', GENERATED data' if scorer.dataset == 'generated' else ''})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(stderr=json_out).print(table)
    train_share, valid_share = metrics.get("share_in_training"), metrics.get("share_in_validation")
    if train_share or valid_share:
        how = "exact" if metrics["share_exact"] else "estimated from a sample of row hashes"
        typer.echo(f"warning: {train_share or 0:.1%} of these rows were used to train the model and "
                   f"{valid_share or 0:.1%} to validate it ({how}); metrics on them overstate how it does on new "
                   "applicants", err=True)
    elif train_share is None:
        typer.echo("note: this model folder records no training rows (saved before row fingerprints); "
                   "cannot tell whether these rows were used in training", err=True)
    if report is not None:
        typer.echo(f"report: {report}", err=json_out)
    if json_out:
        typer.echo(json.dumps({"model": str(model), "data": str(data), **metrics}))


@app.command(epilog="Exit codes: 0 complete; 3 complete with quarantine (every readable row scored, some rows or "
                     "files quarantined); 4 incomplete (stopped by --max-chunks: run again to resume); 2 refused or "
                     "failed because of the input (bad arguments, an output bound to another input, model or "
                     "settings, nothing scorable); 1 failed otherwise. OUTPUT/_SUMMARY.json is written with the "
                     "status whenever the job starts.")
def score(model: Path = typer.Option(..., help="a saved model folder"),
          input: Path = typer.Option(..., help="CSV, CSV.gz or Parquet file, or a folder of them"),
          output: Path = typer.Option(..., help="folder for scored/, quarantine/ and _SUMMARY.json"),
          scheduler: str = typer.Option(None, help="Dask scheduler address, or 'local' for a 2-worker LocalCluster"),
          chunk_rows: int = typer.Option(100_000, help="records per chunk"),
          reasons: str = typer.Option("declined", help="reason codes for: declined, all or none"),
          max_chunks: int = typer.Option(None, help="stop after this many chunks (resume later)"),
          restart: bool = typer.Option(False, "--restart", help="discard the output's job and score everything "
                                                                "again (needed after the input, model or settings "
                                                                "changed)"),
          duplicates: str = typer.Option("quarantine", help="rows repeating an earlier row's id: quarantine, or "
                                                            "keep (scored, flagged in duplicate_of)"),
          json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON object last")) -> None:
    """Batch-score records in chunks; bad rows and unreadable files go to quarantine; resumes an
    interrupted job only when its inputs, model and settings are unchanged."""
    from finance.batch import run_batch, summary_json
    from finance.errors import CreditDataError

    try:
        summary = run_batch(model, input, output, chunk_rows=chunk_rows, scheduler=scheduler, reasons=reasons,
                            max_chunks=max_chunks, restart=restart, duplicates=duplicates)
    except (CreditDataError, FileNotFoundError) as error:
        _fail(error)
    if summary.status == "failed":
        typer.echo(f"error: {summary.message} (summary: {output / '_SUMMARY.json'})", err=True)
    else:
        typer.echo(f"{summary.status}: read {summary.read:,} = scored {summary.scored:,} + quarantined "
                   f"{summary.quarantined:,} ({'reconciled' if summary.reconciled else 'NOT reconciled'}); "
                   f"{summary.chunks_scored_now} of {summary.chunks} chunks scored now in {summary.seconds:.1f} s "
                   f"({summary.rows_per_s:,.0f} rows/s); output in {output}", err=json_out)
        if summary.message:
            typer.echo(summary.message, err=True)
    if json_out:
        typer.echo(json.dumps(summary_json(summary), default=str))
    if summary.exit_code:
        raise typer.Exit(code=summary.exit_code)


@app.command()
def adapt(model: Path = typer.Option(..., help="a saved `moe` model folder (the base)"),
          data: Path = typer.Option(..., help="the new segment's labelled records (file or folder in the "
                                              "dataset's original format)"),
          out: Path = typer.Option(..., help="folder for the adapted model (a normal model folder)"),
          method: str = typer.Option("lora", help="lora (adapter of a few % of the weights) or full (every weight)"),
          rank: int = typer.Option(16, help="LoRA rank (the design guide's 16; capped at an eighth of each "
                                            "layer's width)"),
          learning_rate: float = typer.Option(1e-4, help="the guide's range is 3e-5 to 1e-4"),
          grad_accumulation: int = typer.Option(4, help="micro-batches per optimizer step (the guide's 4-8)"),
          epochs: int = typer.Option(40, help="most epochs (early stopping on 20% of the segment's rows)"),
          seed: int = typer.Option(0),
          json_out: bool = typer.Option(False, "--json", help="print the metrics as one JSON object last")) -> None:
    """Adapt a credit MoE to a new segment from its labelled rows (LoRA or full fine-tuning); the cut-off
    and the drift references are set again on the segment."""
    from finance.errors import CreditDataError

    try:
        from core.lora import LoRAConfig
        from finance.adapt import CreditAdaptConfig, adapt_scorer, save_adapted
        from finance.scorer import load_model

        _out_folder(out)
        if out.resolve() == model.resolve():
            raise CreditDataError("--out is the base model's folder; write the adapted model to a new one",
                                  field="out")
        try:
            config = CreditAdaptConfig(method=method, learning_rate=learning_rate, grad_accumulation=grad_accumulation,
                                       max_epochs=epochs, seed=seed, progress=not json_out,
                                       lora=LoRAConfig(rank=rank))
        except ValueError as error:
            raise CreditDataError(str(error)) from None
        import torch

        torch.set_num_threads(1)
        base = load_model(model)
        adaptation = adapt_scorer(base, _records(base.dataset, data), config)
        save_adapted(adaptation, out)
    except (CreditDataError, FileNotFoundError) as error:
        _fail(error)
    metrics = adaptation.metrics
    typer.echo(f"saved the {method}-adapted model to {out}: segment validation AUC {metrics['base_auc']:.4f} "
               f"(base) -> {metrics['auc']:.4f}, {metrics['trained_share']:.1%} of the weights trained",
               err=json_out)
    if json_out:
        typer.echo(json.dumps({"model": str(out), "base_model": str(model), "data": str(data), **metrics},
                              default=float))


@app.command()
def export(model: Path = typer.Option(..., help="a saved lightgbm or moe model folder"),
           out: Path = typer.Option(..., help="the .onnx file to write")) -> None:
    """Export the model at the feature-matrix level to ONNX (input `features` (batch, F) float32)."""
    from finance.errors import CreditDataError
    from finance.scorer import load_model

    try:
        scorer = load_model(model)
        if not hasattr(scorer.model_, "export_onnx"):
            raise CreditDataError(f"model {scorer.model_name!r} has no ONNX export (lightgbm and moe do)",
                                  field="model")
        scorer.model_.export_onnx(out)
    except (CreditDataError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(f"wrote {out} ({len(scorer.pipeline_.feature_names_)} features in, probability of default out)")


from finance.reject_cli import register as _register_reject_inference  # noqa: E402 - after the group exists

_register_reject_inference(app)
