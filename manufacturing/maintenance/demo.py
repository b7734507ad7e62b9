"""The predictive-maintenance part of `moeworks demo`, on GENERATED data (no files needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from manufacturing.maintenance.ai4i import AI4IFailureModel, LightGBMParams, generate_ai4i, split_rows
from manufacturing.maintenance.cmapss import read_cmapss, read_rul
from manufacturing.maintenance.generator import write_generated_dataset
from manufacturing.maintenance.protocol import score_test
from manufacturing.maintenance.quick import train_quick_rul_model
from manufacturing.maintenance.streaming import StreamingRULPredictor


def run_maintenance_demo(out_dir: Path, *, quick: bool = False, seed: int = 0,
                         console: Console | None = None) -> dict[str, Any]:
    """Train a small RUL LSTM and the AI4I failure models on generated data; stream one engine.

    Writes `maintenance/` under `out_dir`: the generated C-MAPSS-format files, the RUL model
    folder and the AI4I model folder. Returns the headline figures.
    """
    console = console or Console()
    console.rule("[bold]maintenance: RUL and failure prediction on GENERATED data")
    root = Path(out_dir) / "maintenance"
    files = write_generated_dataset(root / "data", train_units=20, test_units=20 if quick else 40, seed=seed + 7)
    estimator, validation = train_quick_rul_model(root / "rul_model", num_units=24 if quick else 40,
                                                  max_epochs=2 if quick else 6, seed=seed)
    test_metrics, predictions = score_test(estimator, read_cmapss(files["test"]), read_rul(files["rul"]))

    streaming = StreamingRULPredictor.from_dir(root / "rul_model")
    test = read_cmapss(files["test"])
    engine = test[test["unit"] == test["unit"].iloc[0]]
    estimate = None
    for record in engine.to_dict("records"):
        estimate = streaming.update("engine-1", record)
    batch = float(predictions["rul"].iloc[0])

    rows = generate_ai4i(2000 if quick else 5000, seed=seed)
    train, val = split_rows(rows, seed=seed)
    failure_model = AI4IFailureModel(seed=seed, progress=False, max_epochs=4 if quick else 15,
                                     lightgbm=LightGBMParams(n_estimators=100 if quick else 300))
    failure_model.fit(train, val_frame=val)
    failure_model.save(root / "ai4i_model")
    ai4i = failure_model.evaluate(val, alert_rate=0.05)

    table = Table(title="Predictive maintenance on generated data (not NASA's or UCI's)")
    table.add_column("task")
    table.add_column("result", justify="right")
    table.add_row(f"RUL LSTM, {test_metrics['engines']} generated test engines (last cycle)",
                  f"RMSE {test_metrics['rmse']:.1f}, score {test_metrics['score']:.0f}")
    table.add_row(f"streamed engine-1 ({len(engine)} cycles) vs batch", f"{estimate:.1f} vs {batch:.1f} cycles")
    for backend in ("lightgbm", "moe"):
        m = ai4i[backend]
        table.add_row(f"failure, {backend} ({ai4i['failures']} failures in {ai4i['rows']} rows)",
                      f"PR-AUC {m['failure_pr_auc']:.3f}, recall@5% {m['failure_recall_at_alert']:.2f}")
    console.print(table)
    console.print(f"RUL model: {root / 'rul_model'}; AI4I model: {root / 'ai4i_model'}; "
                  f"generated C-MAPSS files: {files['train'].parent}")
    return {"rul_rmse": test_metrics["rmse"], "validation_rmse": validation["val_rmse"],
            "streamed_rul": estimate, "batch_rul": batch,
            "ai4i_pr_auc": {b: ai4i[b]["failure_pr_auc"] for b in ("lightgbm", "moe")}}
