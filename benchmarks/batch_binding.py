"""What binding the batch job to its inputs costs: `finance score` on this checkout against a
baseline checkout (main), side by side in one run, on the same GENERATED population as CSV,
CSV.gz and the generator's Parquet folder.

This checkout hashes every input (SHA-256, before and after the job), plans CSV chunks by a
quote-aware record scan, reads the id column once to find repeated ids and fsyncs each file before
its rename; the baseline counted newlines. Each run is a fresh `python -m deploy.cli finance score`
process into an empty output, timed end to end (process start and model load included, the same
for both) in wall time and in the process's CPU time; runs alternate between the checkouts and the
median is reported.

    python -m benchmarks.batch_binding --baseline /work/main --rows 100000 --chunk-rows 25000 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import REPO


def prepare(work: Path, rows: int) -> tuple[Path, dict[str, Path]]:
    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate
    from finance.scorer import train_scorer

    train = load_generated(generate(work / "train", GeneratorConfig(n_applicants=20_000, seed=1)))
    model = train_scorer(train, "lightgbm").save(work / "model")
    folder = generate(work / "population", GeneratorConfig(n_applicants=rows, seed=2))
    text = load_generated(folder, require_target=False).frame.to_csv(index=False).encode()
    (work / "population.csv").write_bytes(text)
    (work / "population.csv.gz").write_bytes(gzip.compress(text, compresslevel=6))
    return model, {"csv": work / "population.csv", "csv.gz": work / "population.csv.gz", "parquet folder": folder}


def run(checkout: Path, model: Path, data: Path, out: Path, chunk_rows: int) -> tuple[float, float, dict]:
    """(wall s, CPU s of the process: user + system, its Dask workers' excluded, summary)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "finance", "score", "--model", str(model), "--input",
                           str(data), "--output", str(out), "--chunk-rows", str(chunk_rows), "--json"],
                          cwd=checkout, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, cpu, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with (e.g. main)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser, REPO / "benchmarks" / "results" / "batch_binding.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-binding-") as tmp:
        work = Path(tmp)
        model, inputs = prepare(work, args.rows)
        results = {"machine": machine(), "rows": args.rows, "chunk_rows": args.chunk_rows, "repeats": args.repeats,
                   "baseline": str(args.baseline), "inputs": {}}
        for name, data in inputs.items():
            times: dict[str, list[float]] = {"this": [], "baseline": []}
            cpus: dict[str, list[float]] = {"this": [], "baseline": []}
            for _ in range(args.repeats):
                for label, checkout in (("this", REPO), ("baseline", args.baseline)):
                    seconds, cpu, summary = run(checkout, model, data, work / f"out-{label}", args.chunk_rows)
                    assert summary["read"] == args.rows and summary["scored"] == args.rows, summary
                    times[label].append(seconds)
                    cpus[label].append(cpu)
            this, base = statistics.median(times["this"]), statistics.median(times["baseline"])
            this_cpu, base_cpu = statistics.median(cpus["this"]), statistics.median(cpus["baseline"])
            results["inputs"][name] = {"this_s": this, "baseline_s": base, "ratio": this / base,
                                       "this_cpu_s": this_cpu, "baseline_cpu_s": base_cpu,
                                       "cpu_ratio": this_cpu / base_cpu,
                                       "runs": times, "cpu_runs": cpus}
    print(f"finance score, {args.rows:,} GENERATED applicants, LightGBM, chunks of {args.chunk_rows:,} "
          f"({describe(results['machine'])}); median of {args.repeats} alternating runs, per process: wall time "
          "and CPU time (user + system; less sensitive to other load than wall time)")
    print("| input | this checkout CPU s | baseline CPU s | CPU this / baseline | this wall s | baseline wall s |")
    print("|---|---|---|---|---|---|")
    for name, row in results["inputs"].items():
        print(f"| {name} | {row['this_cpu_s']:.1f} | {row['baseline_cpu_s']:.1f} | {row['cpu_ratio']:.2f}x | "
              f"{row['this_s']:.1f} | {row['baseline_s']:.1f} |")
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
