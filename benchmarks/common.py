"""What every benchmark script shares: the machine it ran on, and how it hands its results over.

CONTRIBUTING.md ("Benchmarks"): a benchmark states the machine, writes a results JSON, prints a table, and with
`--json` prints its metrics as one JSON object on the last line of stdout. A script adds its own
settings (runtime threads, device, dtype) as extra keys beside `machine()`'s:

    results = {"machine": {**machine(), "onnxruntime_threads": args.threads}, ...}
    ...                                    # measure, print the tables
    write_results(results, args.out, as_json=args.json)
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import psutil


def machine() -> dict:
    """The machine and its load now (call it when the measured part starts).

    Returns: processor, host, platform, logical_cores (all the machine has), usable_cores (the ones
    this process may run on: a container or taskset gives fewer), memory_gib, python, torch and
    torch_threads (intra-op threads at the call), gpu (CUDA device name, or None), load_average
    (1, 5 and 15 minutes: the other work sharing the cores).
    """
    import torch  # here, not at import: a script that does not use torch pays for it once, at the call

    return {"processor": platform.processor() or platform.machine(), "host": platform.node(),
            "platform": platform.platform(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def describe(machine: dict) -> str:
    """`machine()`'s dict in one line, for a table's title."""
    threads = f"{machine['torch_threads']} thread" + ("" if machine["torch_threads"] == 1 else "s")
    return (f"{machine['processor']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
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
