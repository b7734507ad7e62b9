"""Validation mAP50 (and mAP50-95) of a defects training run against wall-clock hours, as a PNG.

Reads the run's yolo/results.csv (ultralytics writes one row per epoch; its `time` column is the
seconds since training started, and restarts on a resume: the parts are joined here) and plots both
metrics against hours, with the best mAP50 marked.

    python -m benchmarks.defects_curve --run /work/runs/neu-det-cpu \
        --out benchmarks/results/defects_neu_det_map50_vs_hours.png [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from benchmarks.common import write_results
from manufacturing.defects.shipped import results_history, wall_seconds


def curve(run_dir: Path) -> dict:
    """{"hours", "epoch", "map50", "map50_95"} lists from the run's results.csv, plus the best point."""
    rows = results_history(run_dir)
    if any("time" not in row for row in rows):
        raise ValueError(f"{run_dir / 'yolo' / 'results.csv'}: no 'time' column (an ultralytics older than 8.3)")
    points = {"hours": [round(t / 3600, 4) for t in wall_seconds(rows)], "epoch": [int(r["epoch"]) for r in rows],
              "map50": [r.get("metrics/mAP50(B)", 0.0) for r in rows],
              "map50_95": [r.get("metrics/mAP50-95(B)", 0.0) for r in rows]}
    best = max(range(len(rows)), key=lambda i: points["map50"][i])
    return {**points, "best": {k: points[k][best] for k in ("hours", "epoch", "map50", "map50_95")}}


def plot(points: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(points["hours"], points["map50"], label="mAP50", color="tab:blue")
    ax.plot(points["hours"], points["map50_95"], label="mAP50-95", color="tab:orange")
    best = points["best"]
    ax.scatter([best["hours"]], [best["map50"]], color="tab:blue", zorder=3)
    ax.annotate(f"best mAP50 {best['map50']:.3f} (epoch {best['epoch']}, {best['hours']:.2f} h)",
                (best["hours"], best["map50"]), textcoords="offset points", xytext=(-10, 8), ha="right", fontsize=8)
    ax.axhline(0.75, color="grey", linestyle=":", linewidth=1, label="issue 22 target mAP50 0.75")
    ax.set_xlabel("wall-clock hours since training started")
    ax.set_ylabel("validation metric (seed-0 split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a `moeworks defects train` run folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/defects_neu_det_map50_vs_hours.png"),
                        help="the PNG to write (its points go beside it as .json)")
    parser.add_argument("--title", default="YOLO11n on NEU-DET from scratch, 192 px, 2 shared CPU cores")
    parser.add_argument("--json", action="store_true", help="print the points as one JSON object on the last line")
    args = parser.parse_args(argv)
    try:
        points = curve(args.run)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    best = points["best"]
    print(f"{len(points['epoch'])} epochs over {points['hours'][-1]:.2f} h; best mAP50 {best['map50']:.3f} at "
          f"epoch {best['epoch']} ({best['hours']:.2f} h), last {points['map50'][-1]:.3f}", file=sys.stderr)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot written (pip install matplotlib); points in the JSON",
              file=sys.stderr)
    else:
        plot(points, args.out, args.title)
        print(f"wrote {args.out}", file=sys.stderr)
    write_results({"run": str(args.run), **points}, args.out.with_suffix(".json"), as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
