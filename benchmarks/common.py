"""What every benchmark script shares: the machine it ran on, one timing loop, its arguments for
results, and how it hands its results over (a JSON file, a markdown table, one JSON line).

CONTRIBUTING.md ("Benchmarks"): a benchmark is run as `python -m benchmarks.NAME`, states the machine,
writes a results JSON, prints a table, and with `--json` prints its metrics as one JSON object on the
last line of stdout. A script adds its own settings (runtime threads, device, dtype) as extra keys
beside `machine()`'s:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser, Path("runs/bench/NAME.json"))
    results = {"machine": {**machine(), "onnxruntime_threads": args.threads}, ...}
    timing = time_calls(lambda i: session.run(None, feeds), repeats=50, warmup=5)  # timing.median_ms
    ...                                    # measure, print the tables
    write_results(results, args.out, as_json=args.json)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name"; `platform.processor()` says only x86_64 on
    Linux), or the architecture where the kernel does not tell."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and its load now (call it when the measured part starts).

    Returns: processor, cpu_model, host, platform, logical_cores (all the machine has), usable_cores (the ones
    this process may run on: a container or taskset gives fewer), memory_gib, python, torch and
    torch_threads (intra-op threads at the call), gpu (CUDA device name, or None), load_average
    (1, 5 and 15 minutes: the other work sharing the cores).
    """
    import torch  # here, not at import: a script that does not use torch pays for it once, at the call

    return {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "host": platform.node(),
            "platform": platform.platform(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def describe(machine: dict) -> str:
    """`machine()`'s dict in one line, for a table's title."""
    threads = f"{machine['torch_threads']} thread" + ("" if machine["torch_threads"] == 1 else "s")
    return (f"{machine.get('cpu_model') or machine['processor']}, "
            f"{machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
            f"{machine['memory_gib']:.0f} GiB, torch {machine['torch']} ({threads}), "
            f"{machine['gpu'] or 'no GPU'}, load average {machine['load_average'][0]:.1f}")


def write_results(results: dict, out: Path | None, *, as_json: bool, last_line: dict | None = None) -> None:
    """Write `results` to the file `out` (its folders created; None: no file) and, when `as_json`, print
    `last_line` (default: `results`) as one JSON object on one line. Call it last: that line must end
    stdout. numpy scalars are written as floats."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))
    if as_json:
        print(json.dumps(results if last_line is None else last_line, default=float), flush=True)


def add_output_arguments(parser: argparse.ArgumentParser, default_out: Path | None) -> None:
    """`--out` (the results JSON; None: no file) and `--json`, the same in every script."""
    parser.add_argument("--out", type=Path, default=default_out, help=f"results JSON (default {default_out})")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


@dataclass(frozen=True)
class Timing:
    """Wall times of the measured calls, in seconds (warm-up calls excluded)."""

    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def mean_s(self) -> float:
        return float(np.mean(self.samples_s))

    @property
    def p99_s(self) -> float:
        return float(np.percentile(self.samples_s, 99))

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def p99_ms(self) -> float:
        return self.p99_s * 1e3


def time_calls(call: Callable[[int], object], *, repeats: int, warmup: int = 0) -> Timing:
    """The one timing loop: `call(i)` for i in 0..warmup-1 untimed (first calls allocate and fill
    caches), then for i in warmup..warmup+repeats-1 each timed with `time.perf_counter`. `i` lets a
    call pick its input (`images[i % len(images)]`); ignore it otherwise."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for i in range(warmup):
        call(i)
    samples = []
    for i in range(warmup, warmup + repeats):
        started = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - started)
    return Timing(tuple(samples))


def _set_priority(nice: int) -> None:
    # Linux keeps a nice value per thread: set every thread's (torch and onnxruntime pools included).
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


@contextlib.contextmanager
def timed_section(lock_path: str) -> Iterator[dict]:
    """Hold the shared bench lock (empty path: none) at normal priority; yields what to record.

    Run a long benchmark under `nice -n 19`: training stays at low priority, and only the timed
    section takes the lock and returns to normal priority while it holds it."""
    record = {"lock": lock_path or None, "nice_before": os.getpriority(os.PRIO_PROCESS, 0)}
    with contextlib.ExitStack() as stack:
        if lock_path:
            handle = stack.enter_context(open(lock_path, "a"))
            waited = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
            record["lock_wait_seconds"] = round(time.perf_counter() - waited, 1)
        if record["nice_before"] > 0:
            try:
                _set_priority(0)
                stack.callback(_set_priority, record["nice_before"])
            except PermissionError:  # not root: measure at the inherited priority, and say so
                pass
        record["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        record["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
        started = time.perf_counter()
        yield record
        record["seconds"] = round(time.perf_counter() - started, 1)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (what RESULTS.md's current tables are); cells as `str()` gives them,
    `|` escaped so that a cell cannot split a row."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells")
    cell = lambda value: str(value).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
