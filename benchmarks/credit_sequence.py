"""Benchmark: the sequence Transformer, LightGBM and their blend on Taiwan's six-month histories.

Protocol: a stratified, seeded 80/20 split of the Taiwan file per seed; within the 80%, a 15%
validation share is used by both models for early stopping and by the blend for its weight. The
LightGBM column is the blend's own LightGBM member, trained exactly as the standalone peer. The
test AUC/KS are on the 20% no model saw.

    python benchmarks/credit_sequence.py --data ../shared/data [--seeds 0 1 2] [--json]
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from finance.data import load_taiwan
from finance.sequence import SequenceEnsemble

app = typer.Typer(add_completion=False)


def ks_statistic(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    return float(np.max(tpr - fpr))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"


@app.command()
def main(data: Path = typer.Option(Path(os.environ.get("MOEWORKS_DATA", "../shared/data")), help="real-data root"),
         seeds: list[int] = typer.Option([0], help="one split and training per seed"),
         threads: int = typer.Option(2, help="torch threads"),
         out: Path = typer.Option(Path("runs/benchmarks/credit_sequence.json"), help="results file"),
         as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON on the last line")) -> None:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(threads)
    console = Console(stderr=as_json, width=120)  # tables stay whole in logs
    records = load_taiwan(data / "taiwan_credit_default")
    X, y = records.frame, records.target
    runs = []
    for seed in seeds:
        train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
        started = time.perf_counter()
        model = SequenceEnsemble(seed=seed)
        with console.status(f"seed {seed}: training the sequence Transformer and LightGBM"):
            model.fit(X.iloc[train_idx], y[train_idx])
        seconds = time.perf_counter() - started
        X_test, y_test = X.iloc[test_idx], y[test_idx]
        parts = model.component_logits(X_test)
        scores = {"lightgbm": parts["lightgbm"], "sequence": parts["sequence"],
                  "sequence-ensemble": model.predict_proba(X_test)[:, 1]}
        run = {"seed": seed, "blend_weight": model.weight_, "train_seconds": seconds,
               "sequence_best_epoch": model.sequence_.best_epoch_,
               "lightgbm_trees": int(model.lightgbm_.best_iteration_ or model.lightgbm_.n_estimators),
               "validation_auc": model.validation_auc_}
        for name, score in scores.items():
            run[name] = {"auc": float(roc_auc_score(y_test, score)), "ks": ks_statistic(y_test, score)}
        runs.append(run)
        console.print(f"seed {seed}: " + ", ".join(f"{n} AUC {run[n]['auc']:.4f}" for n in scores)
                      + f" (w={model.weight_:.2f}, {seconds:.0f} s)")
    summary = {"dataset": "taiwan", "rows": int(len(y)), "test_share": 0.2, "seeds": seeds, "machine": machine(),
               "models": {}}
    for name in ("lightgbm", "sequence", "sequence-ensemble"):
        aucs = np.array([r[name]["auc"] for r in runs])
        kss = np.array([r[name]["ks"] for r in runs])
        lightgbm_auc = np.mean([r["lightgbm"]["auc"] for r in runs])
        summary["models"][name] = {"auc": float(aucs.mean()), "auc_std": float(aucs.std()), "ks": float(kss.mean()),
                                   "auc_vs_lightgbm": float(aucs.mean() / lightgbm_auc)}
    summary["runs"] = runs
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = Table(title=f"Taiwan, test AUC over {len(seeds)} split(s) - {summary['machine']}")
    for column in ("model", "AUC", "+/-", "KS", "AUC / LightGBM"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, m in summary["models"].items():
        table.add_row(name, f"{m['auc']:.4f}", f"{m['auc_std']:.4f}", f"{m['ks']:.4f}", f"{m['auc_vs_lightgbm']:.4f}")
    console.print(table)
    console.print(f"results written to {out}")
    if as_json:
        print(json.dumps({"dataset": "taiwan", "seeds": seeds,
                          **{f"{n}_auc": m["auc"] for n, m in summary["models"].items()},
                          **{f"{n}_ks": m["ks"] for n, m in summary["models"].items()},
                          "blend_weight_mean": float(np.mean([r["blend_weight"] for r in runs]))}))


if __name__ == "__main__":
    app()
