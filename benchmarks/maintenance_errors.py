"""Where the RUL errors are: RMSE and bias by true-RUL bucket and by how far into its life each cut is.

Reads the JSON of `python -m benchmarks.maintenance --predictions` (one record per scored cut) and, per
(subset, model), prints the RMSE, the mean error (predicted - true: > 0 is late, the costly side)
and each bucket's share of the squared error, against the true RUL capped as the metric caps it.

    python -m benchmarks.maintenance_errors runs/tune/base1.json --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

RUL_BUCKETS = [0, 25, 50, 75, 100, 124.5, 125.5]  # the last bucket: engines still on the cap
LIFE_BUCKETS = [0, 0.25, 0.5, 0.75, 1.0]  # cycles kept / the engine's life


def breakdown(records: list[dict], *, cap: float = 125.0) -> dict[str, list[dict]]:
    """records: {"cycle", "rul", "true_rul"} per cut (true RUL uncapped) -> rows per bucket of each grouping."""
    cuts = pd.DataFrame(records)
    life_fraction = cuts["cycle"] / (cuts["cycle"] + cuts["true_rul"])
    truth = cuts["true_rul"].clip(upper=cap)
    error = cuts["rul"] - truth
    total = float((error**2).sum())
    out = {}
    for name, key, edges in (("true_rul", truth, RUL_BUCKETS), ("life_fraction", life_fraction, LIFE_BUCKETS)):
        rows = []
        for bucket, part in error.groupby(pd.cut(key, edges), observed=True):
            rows.append({"bucket": str(bucket), "cuts": len(part), "rmse": float(np.sqrt((part**2).mean())),
                         "bias": float(part.mean()), "sse_share": float((part**2).sum()) / total})
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+",
                        help="python -m benchmarks.maintenance --predictions JSON files")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON on the last line")
    args = parser.parse_args()
    report = []
    for path in args.results:
        try:
            rows = json.loads(path.read_text())["rul"]
        except (OSError, ValueError, KeyError, TypeError) as error:  # a user's file: one line, exit code 2
            parser.error(f"{path}: not a results file of python -m benchmarks.maintenance ({error!r})")
        for row in rows:
            if "val_predictions" not in row:
                parser.error(f"{path}: no val_predictions; run python -m benchmarks.maintenance with --predictions")
            entry = {"file": str(path), "subset": row["subset"], "model": row["model"], "rmse": row["val_rmse"],
                     **breakdown(row["val_predictions"])}
            report.append(entry)
            print(f"{path} {row['subset']} {row['model']}: RMSE {row['val_rmse']:.2f}")
            for grouping in ("true_rul", "life_fraction"):
                for b in entry[grouping]:
                    print(f"  {grouping} {b['bucket']:>14}: {b['cuts']:3d} cuts, RMSE {b['rmse']:6.2f}, "
                          f"bias {b['bias']:+6.2f}, {b['sse_share']:5.1%} of the squared error")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
