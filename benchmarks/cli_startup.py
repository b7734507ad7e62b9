"""Start-up of the `moeworks` command line: wall time and peak memory of `--help`.

Runs `moeworks --help` and `moeworks GROUP --help` for every group, each as a fresh Python process
(median of --runs), and reports wall seconds and the process's peak resident set size (VmHWM, read by
the process itself as it exits: a forked child's rusage would count its parent's pages). With
--baseline DIR the same commands run against another checkout (e.g. an older commit unpacked with
`git archive`), alternating with this one, and the table shows both.

    nice python -m benchmarks.cli_startup --runs 7 [--baseline /tmp/moeworks-839a1ea] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("finance", "defects", "maintenance", "twin", "edge", "bundle", "data", "compress", "serve", "auth")


# `python -m deploy.cli ARGS`, then the process's own peak RSS on stderr's last line as it exits.
PROBE = """
import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as status:
        print(next(line for line in status if line.startswith("VmHWM")), file=sys.stderr, end="")
atexit.register(peak)
sys.argv = ["moeworks", *sys.argv[1:]]
runpy.run_module("deploy.cli", run_name="__main__")
"""


def measure(tree: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `moeworks ARGS` run with `tree` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} in {tree} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1].split()[1]) / 1024  # VmHWM:  N kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    options = parser.parse_args()
    trees = {"this tree": ROOT, **({"baseline": options.baseline.resolve()} if options.baseline else {})}
    commands = [["--help"], *[[group, "--help"] for group in GROUPS]]
    rows = []
    for args in commands:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for _ in range(options.runs):  # alternate the trees so that load on the machine hits both alike
            for name, tree in trees.items():
                samples[name].append(measure(tree, args))
        row = {"command": "moeworks " + " ".join(args)}
        for name, values in samples.items():
            row[name] = {"seconds": statistics.median(v[0] for v in values),
                         "max_rss_mb": statistics.median(v[1] for v in values)}
        rows.append(row)
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
               f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"moeworks start-up, median of {options.runs} runs; {machine}")
    header = " | ".join(f"{name} s | {name} MB" for name in trees)
    print(f"| command | {header} |")
    print("|---|" + "---|" * (2 * len(trees)))
    for row in rows:
        cells = " | ".join(f"{row[name]['seconds']:.2f} | {row[name]['max_rss_mb']:.0f}" for name in trees)
        print(f"| `{row['command']}` | {cells} |")
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps({"machine": machine, "runs": options.runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
