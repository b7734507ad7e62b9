"""The credit part of `moeworks demo`, on GENERATED data: generate applicants, build features,
train the scorecard and LightGBM side by side, score a batch with the batch job (with planted bad
rows), write the HTML report, and say where everything is."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def run_finance_demo(out_dir: Path, *, quick: bool = False, console: Console | None = None) -> dict[str, float]:
    from finance.batch import run_batch
    from finance.data import load_generated
    from finance.evaluation import evaluate_scorer
    from finance.generate import GeneratorConfig, generate
    from finance.report import write_report
    from finance.scorer import train_scorer

    console = console or Console()
    console.rule("[bold]finance: credit scoring on GENERATED applicants (not real data)")
    started = time.perf_counter()
    out_dir = Path(out_dir) / "finance"
    n = 6_000 if quick else 20_000  # ~30 s on an idle 2-core machine
    data = generate(out_dir / "applicants", GeneratorConfig(n_applicants=n, seed=7, part_rows=n))
    new_batch = generate(out_dir / "new_applicants", GeneratorConfig(n_applicants=n // 3, seed=8, part_rows=n))
    records = load_generated(data)
    console.print(f"generated {n:,} applicants with 6 months of transactions, social links and device "
                  f"fingerprints ({records.target.mean():.1%} defaults) in {data}")

    scorers = {name: train_scorer(records, name, seed=0) for name in ("scorecard", "lightgbm")}
    table = Table(title=f"{len(scorers['lightgbm'].pipeline_.feature_names_)} features; validation split (20%)")
    for column in ("model", "AUC", "KS", "recall at 80% approval", "train s"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, scorer in scorers.items():
        m = scorer.validation_metrics_
        table.add_row(name, f"{m['auc']:.4f}", f"{m['ks']:.3f}", f"{m['recall_at_approval']:.3f}",
                      f"{scorer.train_seconds_:.1f}")
    console.print(table)
    best_name = max(scorers, key=lambda k: scorers[k].validation_metrics_["auc"])
    best = scorers[best_name]
    model_dirs = {name: scorer.save(out_dir / f"model_{name}") for name, scorer in scorers.items()}

    # A batch file of new applicants as records, with three planted bad rows.
    batch = load_generated(new_batch, require_target=False).frame.astype({"age": object, "monthly_income": object})
    batch.loc[3, "age"] = "unknown"
    batch.loc[5, "monthly_income"] = None
    batch.loc[8, "bureau_score"] = 1200.0
    batch_file = out_dir / "batch_input.parquet"
    batch.astype({"age": str, "monthly_income": str}).to_parquet(batch_file, index=False)
    summary = run_batch(model_dirs[best_name], batch_file, out_dir / "batch_output", chunk_rows=max(1000, n // 12),
                        reasons="declined", progress=False)
    console.print(f"batch job ({best_name}): read {summary.read:,} = scored {summary.scored:,} + quarantined "
                  f"{summary.quarantined} ({'reconciled' if summary.reconciled else 'NOT reconciled'}), "
                  f"{summary.rows_per_s:,.0f} rows/s")

    holdout = load_generated(generate(out_dir / "holdout", GeneratorConfig(n_applicants=n // 3, seed=9, part_rows=n)))
    evaluation = evaluate_scorer(best, holdout, speed=False)
    report = write_report(out_dir / "credit_report.html", best, holdout, evaluation, sample_rows=1000)
    lift = best.validation_metrics_["auc"] / scorers["scorecard"].validation_metrics_["auc"] - 1
    held_out = evaluation["metrics"]
    console.print(f"best model: {best_name} (AUC {best.validation_metrics_['auc']:.4f}, {lift:+.1%} over the "
                  f"scorecard); hold-out AUC {held_out['auc']:.4f}, PSI {held_out['psi']:.3f}, largest CSI "
                  f"{held_out['csi_max']:.3f} ({held_out['csi_max_feature']})")
    console.print(f"models: {', '.join(str(p) for p in model_dirs.values())}\nscored batch: {out_dir / 'batch_output'}"
                  f"\nreport: {report}\nfinance demo took {time.perf_counter() - started:.0f} s")
    return {"best_auc": float(best.validation_metrics_["auc"]),
            "scorecard_auc": float(scorers["scorecard"].validation_metrics_["auc"]),
            "holdout_auc": float(evaluation["metrics"]["auc"]), "quarantined": float(summary.quarantined),
            "reconciled": float(np.bool_(summary.reconciled))}
