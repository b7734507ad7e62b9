"""Level 3 against planted label noise, and the time of `moeworks data check` on GMSC.

For each dataset: the labelled file is split 80/20 (seeded, stratified: the projects' own
protocol); 10% of the training rows, drawn at random, get the other label; level 3 (cleanlab on
5-fold LightGBM probabilities, exactly as `data check` runs it) marks label issues on the noisy
training rows. Reported: its precision and recall at finding the flipped rows, and the task metric
on the untouched validation split of LightGBM trained on the clean, the noisy and the filtered
(noisy minus flagged) training rows; recovered = (filtered - noisy) / (clean - noisy).

    nice python -m benchmarks.data_quality --data /work/shared/data --seeds 3 --json \
        --out benchmarks/results/data_quality.json
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import REPO, add_data_argument
from core.data_quality.labels import LabelConfig, label_issues, lightgbm, out_of_fold_probabilities

NOISE = 0.10
FILTERS = ("prune_by_noise_rate", "both", "confident_learning")  # the first is the product's
# (dataset name, path under the data folder, task metric): AI4I failures are rare (3.4%), so PR-AUC
DATASETS = (("taiwan", "taiwan_credit_default", "roc_auc"), ("gmsc", "give_me_some_credit", "roc_auc"),
            ("ai4i", "ai4i2020", "pr_auc"))


def table(name: str, path: Path):
    if name == "ai4i":
        from manufacturing.maintenance.data_quality import ai4i_table

        return ai4i_table(path)
    from finance.data_quality import credit_table

    return credit_table(name, path)


def inputs(checked):
    """Level 3's model inputs for every row (as core.data_quality.check builds them)."""
    if checked.label_inputs is not None:
        return checked.label_inputs
    x = checked.typed[[name for name, _ in checked.fields]]
    return x.assign(**{name: x[name].astype("category") for name, is_category in checked.fields if is_category})


def score(metric: str, y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p) if metric == "roc_auc" else average_precision_score(y, p))


def one_run(x, y, metric: str, seed: int, config: LabelConfig) -> dict:
    from cleanlab.filter import find_label_issues

    train, valid = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), round(NOISE * len(train)), replace=False)] = True
    noisy = np.where(flipped, 1 - y[train], y[train])
    started = time.perf_counter()
    issues, _ = label_issues(x.iloc[train].reset_index(drop=True), noisy, config)  # as `data check` runs it
    level3_s = time.perf_counter() - started

    def fitted_metric(rows: np.ndarray, labels: np.ndarray) -> float:
        # the task's model, fixed whatever level 3 uses: LightGBM's defaults, as in every run here
        model = lightgbm(LabelConfig(leaves=31)).fit(x.iloc[train[rows]], labels)
        return score(metric, y[valid], model.predict_proba(x.iloc[valid])[:, 1])

    everything = np.arange(len(train))
    clean, noisy_metric = fitted_metric(everything, y[train]), fitted_metric(everything, noisy)
    lost = clean - noisy_metric
    run = {"seed": seed, "train_rows": int(len(train)), "flipped": int(flipped.sum()), "metric": metric,
           "clean": clean, "noisy": noisy_metric, "level3_seconds": level3_s, "filters": {}}
    # cleanlab's other rules on the same out-of-fold probabilities, side by side (the product uses the default)
    probabilities = out_of_fold_probabilities(x.iloc[train].reset_index(drop=True), noisy, config)
    # The ceiling at recall 0.70: the flip posterior is monotone in P_true(given label | x), so no checker
    # on these features ranks better than the same model fitted on the CLEAN labels (out of fold). Beside
    # it, the ranking level 3 has (noisy labels' probabilities).
    clean_p = out_of_fold_probabilities(x.iloc[train].reset_index(drop=True), y[train], config)
    run["precision_at_recall_0.70"] = {name: precision_at_recall(p[np.arange(len(noisy)), noisy], flipped, 0.70)
                                       for name, p in (("ranking", probabilities), ("ceiling", clean_p))}
    for rule in FILTERS:
        flagged = issues if rule == config.filter_by else find_label_issues(noisy, probabilities, filter_by=rule)
        kept = np.flatnonzero(~flagged)
        filtered = fitted_metric(kept, noisy[kept])
        true_found = int((flagged & flipped).sum())
        run["filters"][rule] = {"flagged": int(flagged.sum()), "precision": true_found / max(int(flagged.sum()), 1),
                                "recall": true_found / int(flipped.sum()), "filtered": filtered,
                                "recovered": (filtered - noisy_metric) / lost if lost > 0 else None}
    return run


def precision_at_recall(given_probability: np.ndarray, flipped: np.ndarray, recall: float) -> float:
    """Precision when rows are flagged from the least likely given label up until `recall` of the flips."""
    hits = np.cumsum(flipped[np.argsort(given_probability, kind="stable")])
    needed = recall * flipped.sum()
    return float(needed / (np.searchsorted(hits, needed) + 1))


def time_check(data: Path, repeats: int) -> dict:
    """`moeworks data check` on GMSC's training file as a user runs it (a fresh process each time,
    imports included); the median of `repeats` runs by wall time, with its CPU time (what the
    run itself used, whatever else shares the cores) and the load average at its end."""
    import json

    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run([sys.executable, "-m", "deploy.cli", "data", "check", "--data", str(data),
                                   "--dataset", "gmsc", "--out", out, "--json"], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime  # the run's CPU time
        if done.returncode != 0:
            raise SystemExit(f"data check failed: {done.stderr.strip()[-300:]}")
        summary = json.loads(done.stdout)
        runs.append({"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu_seconds, 2),
                     "check_seconds": summary["seconds"],
                     "by_level": summary["seconds_by_level"], "load_average_1min": round(os.getloadavg()[0], 2)})
    median = sorted(runs, key=lambda r: r["wall_seconds"])[len(runs) // 2]
    return {"file": str(data), "rows": summary["rows"], "label_issues": summary["labels"]["issues"],
            "median": median, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(parser)
    parser.add_argument("--seeds", type=int, default=3, help="0: only the timing of data check on GMSC")
    parser.add_argument("--datasets", default="taiwan,gmsc,ai4i")
    parser.add_argument("--check-repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, default=LabelConfig.folds, help="level 3's out-of-fold folds")
    parser.add_argument("--leaves", type=int, default=LabelConfig.leaves, help="level 3's LightGBM leaves")
    add_output_arguments(parser, None)
    args = parser.parse_args()
    config = LabelConfig(folds=args.folds, leaves=args.leaves)
    results = {"machine": {**machine(), "lightgbm_threads": config.threads}, "noise": NOISE, "datasets": {}}
    print(f"# {describe(results['machine'])}", file=sys.stderr)
    chosen = args.datasets.split(",")
    for name, folder, metric in DATASETS:
        if name not in chosen or args.seeds == 0:
            continue
        checked = table(name, args.data / folder)
        good = checked.good & (checked.labels >= 0)
        x, y = inputs(checked)[good].reset_index(drop=True), checked.labels[good]
        runs = [one_run(x, y, metric, seed, config) for seed in range(args.seeds)]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in ("clean", "noisy", "level3_seconds")}
        mean["precision_at_recall_0.70"] = {k: float(np.mean([r["precision_at_recall_0.70"][k] for r in runs]))
                                            for k in ("ranking", "ceiling")}
        mean["filters"] = {rule: {k: float(np.mean([r["filters"][rule][k] for r in runs
                                                    if r["filters"][rule][k] is not None]))
                                  for k in ("flagged", "precision", "recall", "filtered", "recovered")}
                           for rule in FILTERS}
        results["datasets"][name] = {"rows": int(len(y)), "runs": runs, "mean": mean}
        print(f"{name} {metric}, {args.seeds} seeds: clean {mean['clean']:.4f}, noisy {mean['noisy']:.4f}, "
              f"level 3 {mean['level3_seconds']:.1f} s; precision at recall 0.70: level 3's ranking "
              f"{mean['precision_at_recall_0.70']['ranking']:.3f}, "
              f"ceiling {mean['precision_at_recall_0.70']['ceiling']:.3f}", file=sys.stderr)
        for rule, m in mean["filters"].items():
            print(f"  {rule:20s} P {m['precision']:.3f} R {m['recall']:.3f} filtered {m['filtered']:.4f} "
                  f"recovered {m['recovered']:.2f}", file=sys.stderr)
    if "gmsc" in chosen:
        results["gmsc_check"] = time_check(args.data / "give_me_some_credit" / "cs-training.csv.gz", args.check_repeats)
        print(f"data check on GMSC: {results['gmsc_check']}", file=sys.stderr)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
