"""Single-application latency of saved credit scorers, two checkouts side by side.

Each round runs one process per checkout (PYTHONPATH at it), one after the other, each timing
`score(one-row frame, reasons="all")` for every model: the scoring thread's CPU time
(`time.thread_time`, what the code costs without a busy machine's waits) and wall time. Rounds
alternate the checkouts so a change of load touches both. Models come from
`python -m benchmarks.credit --skip-speed --models-dir DIR`.

    flock /tmp/moeworks-bench.lock python -m benchmarks.credit_latency_ab --models-dir DIR \\
        --trees main=/work/main,branch=. --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = "scorecard,lightgbm,moe,ensemble"


def worker(models_dir: Path, datasets: list[str], models: list[str], calls: int) -> dict[str, dict[str, list[float]]]:
    """Per dataset/model: CPU and wall seconds of `calls` single-application scores (after 10 warm-up calls).

    The loop is finance.evaluation.scoring_speed's, written out here on purpose: it runs with
    PYTHONPATH at each checkout, so the measuring code must not come from the checkout being measured.
    """
    import pandas as pd
    import torch

    from finance.scorer import load_model

    torch.set_num_threads(1)
    out = {}
    for dataset in datasets:
        frame = pd.read_parquet(models_dir / dataset / "test.parquet")
        rows = [frame.iloc[[i % len(frame)]] for i in range(calls + 10)]
        for name in models:
            scorer = load_model(models_dir / dataset / name)
            cpu, wall = [], []
            for i, row in enumerate(rows):
                started, started_cpu = time.perf_counter(), time.thread_time()
                scorer.score(row, reasons="all")
                if i >= 10:
                    wall.append(time.perf_counter() - started)
                    cpu.append(time.thread_time() - started_cpu)
            out[f"{dataset}/{name}"] = {"cpu": cpu, "wall": wall}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--trees", default="main=/work/main,branch=.",
                        help="label=checkout,... (the first is the baseline)")
    parser.add_argument("--datasets", default="taiwan,gmsc")
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per model per round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    args = parser.parse_args()
    datasets, models = args.datasets.split(","), args.models.split(",")
    if args.worker:
        print(json.dumps(worker(args.models_dir, datasets, models, args.calls)))
        return
    # Not at the top: the workers run this file with PYTHONPATH at checkouts that may have no benchmarks.common.
    from benchmarks.common import machine, write_results

    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    samples: dict[str, dict[str, dict[str, list[float]]]] = {label: {} for label in trees}
    load_start = os.getloadavg()
    measured_on = {**machine(), "torch_threads": 1}  # the workers' (torch.set_num_threads(1), OMP_NUM_THREADS=1)
    for _ in range(args.rounds):
        for label, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "1"}
            run = subprocess.run([sys.executable, __file__, "--worker", "--models-dir", str(args.models_dir.resolve()),
                                  "--datasets", args.datasets, "--models", args.models, "--calls", str(args.calls)],
                                 env=env, capture_output=True, text=True, check=True)
            for key, values in json.loads(run.stdout.splitlines()[-1]).items():
                for kind, seconds in values.items():
                    samples[label].setdefault(key, {}).setdefault(kind, []).extend(seconds)
    baseline, *others = trees
    results = {"machine": measured_on, "load_average_start": load_start, "load_average_end": os.getloadavg(),
               "rounds": args.rounds, "calls_per_round": args.calls, "trees": trees, "models": {}}
    for key in samples[baseline]:
        row = {}
        for label in trees:
            for kind in ("cpu", "wall"):
                ms = np.asarray(samples[label][key][kind]) * 1000
                row[f"{label}_{kind}_p50_ms"] = float(np.percentile(ms, 50))
                row[f"{label}_{kind}_p99_ms"] = float(np.percentile(ms, 99))
        for label in others:
            row[f"{label}_cpu_p50_ratio"] = row[f"{label}_cpu_p50_ms"] / row[f"{baseline}_cpu_p50_ms"]
        results["models"][key] = row
        print(f"{key:20s}" + "".join(f" | {label} CPU p50/p99 {row[f'{label}_cpu_p50_ms']:5.2f}/"
                                     f"{row[f'{label}_cpu_p99_ms']:5.2f} wall {row[f'{label}_wall_p50_ms']:5.2f}/"
                                     f"{row[f'{label}_wall_p99_ms']:5.2f} ms" for label in trees)
              + "".join(f" | {label}/{baseline} CPU x{row[f'{label}_cpu_p50_ratio']:.2f}" for label in others))
    print(f"load average {load_start[0]:.1f} at start, {results['load_average_end'][0]:.1f} at end")
    write_results(results, None, as_json=args.json)


if __name__ == "__main__":
    main()
