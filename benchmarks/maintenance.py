"""Predictive maintenance benchmark: LSTM vs MoE RUL on C-MAPSS FD001-FD004, LightGBM vs MoE on AI4I.

RUL: each subset's training engines are split by unit (80/20); both models train on the same
80% (early stopping on the windows of the other 20%), and are scored on the held-back engines
cut at random cycles (several cuts each), at the last cycle, as the official test set is scored.
The official test files are held out; score them with `moeworks maintenance evaluate`.
AI4I: stratified 80/20 split of the rows here; PR-AUC and recall at a fixed alert rate.

    nice -n 10 python -m benchmarks.maintenance --json
    python -m benchmarks.maintenance --quick        # generated data, a minute, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import add_data_argument
from manufacturing.maintenance.ai4i import AI4IFailureModel, generate_ai4i, read_ai4i, split_rows
from manufacturing.maintenance.cmapss import SUBSET_REGIMES, find_file, read_cmapss
from manufacturing.maintenance.generator import generate_cmapss
from manufacturing.maintenance.models import default_net_config
from manufacturing.maintenance.protocol import ProtocolConfig, train_and_validate
from manufacturing.maintenance.rul import RULEstimator, default_feature_config, default_train_config

# Published RMSE on the official test sets (not the validation split here): for context only.
ANCHORS = {"deep LSTM (Zheng 2017)": [16.14, 24.49, 16.18, 28.17], "CNN (Li 2018)": [12.61, 22.36, 12.64, 23.31],
           "FFVE": [12.31, 12.55, 12.43, 14.08]}
SUBSET_ORDER = ["FD001", "FD002", "FD003", "FD004"]


def load_subset(args, subset: str):
    if args.quick:
        return generate_cmapss(30, num_regimes=SUBSET_REGIMES[subset], seed=1, max_life=220)
    return read_cmapss(find_file(args.data / "cmapss" if (args.data / "cmapss").is_dir() else args.data,
                                 "train", subset))


def recipe_overrides(args) -> dict:
    """The training-recipe options given on the command line (the rest stay the kind's defaults)."""
    overrides = {"batch_size": args.batch_size, "learning_rate": args.lr, "weight_decay": args.weight_decay}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.windows_per_epoch is not None:
        overrides["windows_per_epoch"] = args.windows_per_epoch or None  # 0: every window
    return overrides


def run_one(args, subset: str, kind: str) -> dict:
    """Train and validate one (subset, model) pair; runs in a worker process with --jobs > 1."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    estimator = RULEstimator(
        net=default_net_config(kind, **args.net.get(kind, {})),
        features=default_feature_config(kind, SUBSET_REGIMES[subset], **args.features),
        train=default_train_config(kind, max_epochs=args.epochs, patience=args.patience, seed=args.seed,
                                   progress=False, **recipe_overrides(args)))
    _, metrics = train_and_validate(estimator, load_subset(args, subset),
                                    ProtocolConfig(cuts_per_unit=args.cuts, seed=args.seed),
                                    keep_predictions=args.predictions)
    return {"subset": subset, "model": kind, **metrics, "wall_seconds": time.perf_counter() - started}


def run_rul(args, console: Console) -> list[dict]:
    tasks = [(subset, kind) for subset in args.subsets for kind in args.models]
    if args.jobs > 1:  # the pairs are independent; one process each keeps one torch thread per core
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_one, [args] * len(tasks), *zip(*tasks, strict=True)))
    else:
        rows = [run_one(args, subset, kind) for subset, kind in tasks]
    for row in rows:
        members = (f", members alone {', '.join(f'{v:.2f}' for v in row['val_member_rmse'])}"
                   if "val_member_rmse" in row else "")
        console.print(f"{row['subset']} {row['model']}: val RMSE {row['val_rmse']:.2f}{members}, score "
                      f"{row['val_score']:.0f}, {row['train_seconds']:.0f} s training ({row['epochs_run']} epochs, "
                      f"best {row['best_epoch']})")
    return rows


def run_ai4i(args, console: Console) -> dict:
    frame = generate_ai4i(4000, seed=args.seed) if args.quick else read_ai4i(args.data / "ai4i2020"
                                                                              if (args.data / "ai4i2020").is_dir()
                                                                              else args.data)
    train, val = split_rows(frame, seed=args.seed)
    started = time.perf_counter()
    model = AI4IFailureModel(seed=args.seed, progress=False, max_epochs=10 if args.quick else 60)
    model.fit(train, val_frame=val)
    result = model.evaluate(val, alert_rate=args.alert_rate)
    result["fit_seconds"] = time.perf_counter() - started
    result["moe_seconds"] = model.moe_seconds_
    console.print(f"AI4I: LightGBM PR-AUC {result['lightgbm']['failure_pr_auc']:.3f}, "
                  f"MoE {result['moe']['failure_pr_auc']:.3f}")
    return result


def rul_table(rows: list[dict]) -> Table:
    table = Table(title="C-MAPSS RUL, validation engines cut at random cycles (last cycle; RUL capped at 125)")
    for column in ("subset", "LSTM RMSE", "MoE RMSE", "MoE/LSTM", "LSTM score", "MoE score", "LSTM s", "MoE s",
                   "MoE/LSTM time", *[f"{k} (test)" for k in ANCHORS]):
        table.add_column(column, justify="right")
    by_key = {(r["subset"], r["model"]): r for r in rows}
    for subset in dict.fromkeys(r["subset"] for r in rows):
        lstm, moe = by_key.get((subset, "lstm")), by_key.get((subset, "moe"))

        def cell(r, key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r else "-"

        ratio = f"{moe['val_rmse'] / lstm['val_rmse']:.2f}" if lstm and moe else "-"
        time_ratio = f"{moe['train_seconds'] / lstm['train_seconds']:.2f}" if lstm and moe else "-"
        index = SUBSET_ORDER.index(subset)
        table.add_row(subset, cell(lstm, "val_rmse"), cell(moe, "val_rmse"), ratio, cell(lstm, "val_score", "{:.0f}"),
                      cell(moe, "val_score", "{:.0f}"), cell(lstm, "train_seconds", "{:.0f}"),
                      cell(moe, "train_seconds", "{:.0f}"), time_ratio,
                      *[f"{values[index]:.2f}" for values in ANCHORS.values()])
    return table


def ai4i_table(result: dict) -> Table:
    table = Table(title=f"AI4I 2020 failure, {result['rows']} validation rows ({result['failures']} failures), "
                        f"alert rate {result['alert_rate']:.0%}")
    for column in ("metric", "LightGBM", "MoE", "MoE/LightGBM"):
        table.add_column(column, justify="right")
    for key, value in result["lightgbm"].items():
        other = result["moe"][key]
        if value is None or key.endswith("positives"):
            continue
        table.add_row(key, f"{value:.3f}", f"{other:.3f}", f"{other / value:.2f}" if value else "-")
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = list(dict.fromkeys(r["subset"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.35
    for offset, kind in ((-width / 2, "lstm"), (width / 2, "moe")):
        values = [next((r["val_rmse"] for r in rows if r["subset"] == s and r["model"] == kind), 0) for s in subsets]
        ax.bar([i + offset for i in range(len(subsets))], values, width, label=f"{kind} (validation)")
    for name, values in ANCHORS.items():
        ax.plot(range(len(subsets)), [values[SUBSET_ORDER.index(s)] for s in subsets], marker="o", linestyle=":",
                label=f"{name} (official test)", zorder=3)
    ax.set_xticks(range(len(subsets)), subsets)
    ax.set_ylabel("RMSE (cycles)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no bar hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--subsets", type=lambda s: s.split(","), default=SUBSET_ORDER)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["lstm", "moe"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--windows-per-epoch", type=int, default=None,
                        help="windows drawn per epoch (0: all; default: the model kind's recipe)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model kind's recipe")
    parser.add_argument("--lr", type=float, default=None, help="default: the model kind's recipe")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the model kind's recipe")
    parser.add_argument("--jobs", type=int, default=1, help="(subset, model) runs trained in parallel processes")
    parser.add_argument("--net", type=json.loads, default={},
                        help='net config overrides per kind, e.g. \'{"moe": {"patch": 5}}\' (for tuning runs)')
    parser.add_argument("--features", type=json.loads, default={},
                        help='feature config overrides, e.g. \'{"history": true}\' (for tuning runs)')
    parser.add_argument("--predictions", action="store_true",
                        help="keep each scored cut's prediction in the JSON (for error analysis)")
    parser.add_argument("--cuts", type=int, default=5, help="random cuts per validation engine")
    parser.add_argument("--alert-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ai4i", action="store_true")
    parser.add_argument("--no-rul", action="store_true")
    parser.add_argument("--quick", action="store_true", help="generated data, few epochs: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    add_output_arguments(parser, Path("runs/bench/maintenance.json"))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.windows_per_epoch, args.cuts = 3, 1024, 2
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json, width=200)  # the side-by-side table is wide; logs are files
    results = {"machine": machine(), "command": " ".join(sys.argv), "quick": args.quick, "rul": [], "ai4i": None}
    console.print(f"machine: {describe(results['machine'])}")
    if not args.no_rul:
        results["rul"] = run_rul(args, console)
        console.print(rul_table(results["rul"]))
    if not args.no_ai4i:
        results["ai4i"] = run_ai4i(args, console)
        console.print(ai4i_table(results["ai4i"]))
    if results["rul"]:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(results["rul"], args.out.with_suffix(".png"))
    console.print(f"results: {args.out}")
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
