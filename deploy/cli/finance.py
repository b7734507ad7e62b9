"""`moeworks finance ...`: credit scoring commands."""

from __future__ import annotations

from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError
from deploy.cli.lazy import LazyGroup

JSON = typer.Option(False, "--json", help="print the result as one JSON object on stdout (tables and notes on "
                                          "stderr)")


class FinanceGroup(LazyGroup):
    """`reject-inference` lives beside its experiment (finance/reject_cli.py) and loads scikit-learn: only when used."""

    lazy = {"reject-inference": ("finance.reject_cli:reject_inference", "Replay an acceptance policy, hide the "
                                 "rejects' outcomes, compare reject-inference methods.")}


app = typer.Typer(cls=FinanceGroup, help="Credit scoring: train, evaluate, score batches.", no_args_is_help=True)


def _out_folder(path: Path) -> Path:
    """A folder to write into: refused (one line) when it is a file."""
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {path} is a file; give a folder")
    return path


def _records(dataset: str, data: Path, *, require_target: bool = True):
    from finance.data import load_records

    return load_records(dataset, data, require_target=require_target)


@app.command()
def generate(out: Path = typer.Option(..., help="folder for the generated Parquet tables"),
             rows: int = typer.Option(100_000, help="applicants"),
             seed: int = typer.Option(0),
             default_rate: float = typer.Option(0.08),
             as_json: bool = JSON) -> None:
    """Generate a through-the-door population (GENERATED data) as Parquet tables."""
    import time

    if rows < 1:
        raise UserInputError(f"--rows must be >= 1, got {rows}")
    _out_folder(out)
    from finance.generate import GeneratorConfig
    from finance.generate import generate as run

    started = time.perf_counter()
    run(out, GeneratorConfig(n_applicants=rows, seed=seed, default_rate=default_rate))
    seconds = time.perf_counter() - started
    output.say(f"generated {rows:,} applicants (GENERATED data, not real) into {out} in {seconds:.1f} s",
               as_json=as_json)
    if as_json:
        output.emit("finance.generate", {"out": str(out), "rows": rows, "seed": seed, "generated": True,
                                         "seconds": round(seconds, 3)})


@app.command()
def train(dataset: str = typer.Option(..., help="taiwan, gmsc or generated"),
          data: Path = typer.Option(None, help="file or folder in the dataset's original format "
                                               "(generated: omitted = generate --rows applicants)"),
          kind: str = typer.Option("lightgbm", help="what to train: scorecard, lightgbm, moe, ensemble (or a "
                                                     "registered model)"),
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
          as_json: bool = JSON) -> None:
    """Train a model (80/20 seeded split for early stopping and the cut-off) and save it in --out."""
    _out_folder(out)
    if data is None:
        if dataset != "generated":
            raise UserInputError("--data is required for real datasets")
        from finance.generate import GeneratorConfig
        from finance.generate import generate as run

        data = run(out / "generated-data", GeneratorConfig(n_applicants=rows, seed=seed))
        output.note(f"generated {rows:,} applicants (GENERATED data, not real) into {data}")
    import torch

    torch.set_num_threads(1)
    from finance.scorer import ScoringPolicy, train_scorer

    records = _records(dataset, data)
    if reject_inference or unlabelled:
        from finance.reject_inference.methods import train_with_reject_inference

        scorer = train_with_reject_inference(records, None if unlabelled is None else _records(
            dataset, unlabelled, require_target=False), model_name=kind, method=reject_inference, seed=seed,
            policy=ScoringPolicy(approval_rate=approval_rate), exclude_protected=exclude_protected)[0]
    else:
        scorer = train_scorer(records, kind, seed=seed, policy=ScoringPolicy(approval_rate=approval_rate),
                              progress=output.show_progress(as_json), exclude_protected=exclude_protected)
    scorer.save(out)
    metrics = scorer.validation_metrics_
    output.say(f"saved {kind} for {dataset} to {out} (version {scorer.version_}); validation AUC "
               f"{metrics['auc']:.4f}, KS {metrics['ks']:.3f}, recall at {approval_rate:.0%} approval "
               f"{metrics['recall_at_approval']:.3f}", as_json=as_json)
    if as_json:
        output.emit("finance.train", {"model": str(out), "kind": kind, "dataset": dataset, "data": str(data),
                                      "version": scorer.version_, **metrics})


@app.command()
def evaluate(model: Path = typer.Option(..., help="a saved model folder"),
             data: Path = typer.Option(..., help="labelled file or folder in the dataset's original format"),
             report: Path = typer.Option(None, help="write an HTML report here"),
             speed: bool = typer.Option(True, help="measure single-application latency and batch rows/s"),
             as_json: bool = JSON) -> None:
    """Score a labelled file with a saved model and print AUC, KS, Gini, recall, Brier, PSI, latency."""
    from rich.table import Table

    from finance.data import dataset_spec
    from finance.errors import CreditDataError
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
    metrics = result["metrics"]
    table = Table(title=f"{scorer.model_name} on {data} ({scorer.dataset}"
                        f"{', GENERATED data' if scorer.dataset == 'generated' else ''})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    output.console(as_json=as_json).print(table)
    train_share, valid_share = metrics.get("share_in_training"), metrics.get("share_in_validation")
    if train_share or valid_share:
        how = "exact" if metrics["share_exact"] else "estimated from a sample of row hashes"
        output.warn(f"warning: {train_share or 0:.1%} of these rows were used to train the model and "
                    f"{valid_share or 0:.1%} to validate it ({how}); metrics on them overstate how it does on new "
                    "applicants")
    elif train_share is None:
        output.note("note: this model folder records no training rows (saved before row fingerprints); "
                    "cannot tell whether these rows were used in training")
    if report is not None:
        output.say(f"report: {report}", as_json=as_json)
    if as_json:
        output.emit("finance.evaluate", {"model": str(model), "kind": scorer.model_name, "dataset": scorer.dataset,
                                         "data": str(data), "rows": len(records.target),
                                         "report": None if report is None else str(report), **metrics})


@app.command(epilog="Exit codes: 0 complete; 3 complete with quarantine (every readable row scored, some rows or "
                     "files quarantined); 4 incomplete (stopped by --max-chunks: run again to resume); 2 refused or "
                     "failed because of the input (bad arguments, an output bound to another input, model or "
                     "settings, nothing scorable); 1 failed otherwise. OUT/_SUMMARY.json is written with the "
                     "status whenever the job starts.")
def score(model: Path = typer.Option(..., help="a saved model folder"),
          data: Path = typer.Option(..., help="CSV, CSV.gz or Parquet file, or a folder of them (was --input)"),
          out: Path = typer.Option(..., help="folder for scored/, quarantine/ and _SUMMARY.json (was --output)"),
          scheduler: str = typer.Option(None, help="Dask scheduler address, or 'local' for a 2-worker LocalCluster"),
          chunk_rows: int = typer.Option(100_000, help="records per chunk"),
          reasons: str = typer.Option("declined", help="reason codes for: declined, all or none"),
          max_chunks: int = typer.Option(None, help="stop after this many chunks (resume later)"),
          restart: bool = typer.Option(False, "--restart", help="discard the output's job and score everything "
                                                                "again (needed after the input, model or settings "
                                                                "changed)"),
          duplicates: str = typer.Option("quarantine", help="rows repeating an earlier row's id: quarantine, or "
                                                            "keep (scored, flagged in duplicate_of)"),
          as_json: bool = JSON) -> None:
    """Batch-score records in chunks; bad rows and unreadable files go to quarantine; resumes an
    interrupted job only when its inputs, model and settings are unchanged."""
    from finance.batch import run_batch, summary_json

    summary = run_batch(model, data, out, chunk_rows=chunk_rows, scheduler=scheduler, reasons=reasons,
                        max_chunks=max_chunks, restart=restart, duplicates=duplicates,
                        progress=output.show_progress(as_json))
    if summary.status == "failed":
        output.warn(f"error: {summary.message} (summary: {out / '_SUMMARY.json'})")
    else:
        output.say(f"{summary.status}: read {summary.read:,} = scored {summary.scored:,} + quarantined "
                   f"{summary.quarantined:,} ({'reconciled' if summary.reconciled else 'NOT reconciled'}); "
                   f"{summary.chunks_scored_now} of {summary.chunks} chunks scored now in {summary.seconds:.1f} s "
                   f"({summary.rows_per_s:,.0f} rows/s); output in {out}", as_json=as_json)
        if summary.message:
            output.warn(summary.message)
    if as_json:
        output.emit("finance.score", {"model": str(model), "data": str(data), "out": str(out),
                                      **summary_json(summary)})
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
          as_json: bool = JSON) -> None:
    """Adapt a credit MoE to a new segment from its labelled rows (LoRA or full fine-tuning); the cut-off
    and the drift references are set again on the segment."""
    from core.lora import LoRAConfig
    from finance.adapt import CreditAdaptConfig, adapt_scorer, save_adapted
    from finance.scorer import load_model

    _out_folder(out)
    if out.resolve() == model.resolve():
        raise UserInputError("--out is the base model's folder; write the adapted model to a new one")
    try:
        config = CreditAdaptConfig(method=method, learning_rate=learning_rate, grad_accumulation=grad_accumulation,
                                   max_epochs=epochs, seed=seed, progress=output.show_progress(as_json),
                                   lora=LoRAConfig(rank=rank))
    except ValueError as error:  # the config's own checks of the flags' values
        raise UserInputError(str(error)) from None
    import torch

    torch.set_num_threads(1)
    base = load_model(model)
    adaptation = adapt_scorer(base, _records(base.dataset, data), config)
    save_adapted(adaptation, out)
    metrics = adaptation.metrics
    output.say(f"saved the {method}-adapted model to {out}: segment validation AUC {metrics['base_auc']:.4f} "
               f"(base) -> {metrics['auc']:.4f}, {metrics['trained_share']:.1%} of the weights trained",
               as_json=as_json)
    if as_json:
        output.emit("finance.adapt", {"model": str(out), "base_model": str(model), "data": str(data), **metrics})


@app.command()
def export(model: Path = typer.Option(..., help="a saved lightgbm or moe model folder"),
           out: Path = typer.Option(..., help="the .onnx file to write"),
           as_json: bool = JSON) -> None:
    """Export the model at the feature-matrix level to ONNX (input `features` (batch, F) float32)."""
    from finance.scorer import load_model

    scorer = load_model(model)
    if not hasattr(scorer.model_, "export_onnx"):
        raise UserInputError(f"--model {model}: model {scorer.model_name!r} has no ONNX export (lightgbm and "
                             "moe do)")
    scorer.model_.export_onnx(out)
    features = len(scorer.pipeline_.feature_names_)
    output.say(f"wrote {out} ({features} features in, probability of default out)", as_json=as_json)
    if as_json:
        output.emit("finance.export", {"model": str(model), "kind": scorer.model_name, "out": str(out),
                                       "features": features})
