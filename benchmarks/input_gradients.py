"""Benchmark: a TabularMoE's forward and input gradient, NumPy (finance.models.input_gradients) vs torch autograd.

The credit MoE's reason codes take the gradient along an integrated-gradient path (9 points per
application). This times both paths on the credit network's shape (16 experts, top-2, H=64,
I=128, 2 layers; 214 inputs as Taiwan, 25 as GMSC) at growing path sizes, in CPU time of one
thread, and checks that they agree. finance.models.moe.NUMPY_PATH_ROWS is set from this crossover.

    python -m benchmarks.input_gradients --json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from finance.models.input_gradients import TabularMoEGradient


def cpu_ms(call, budget_rows: int, rows: int) -> float:
    """Median CPU ms of `call` over 5 repeats of a loop sized to about `budget_rows` rows."""
    loops = max(3, budget_rows // rows)
    call()
    samples = []
    for _ in range(5):
        started = time.thread_time()
        for _ in range(loops):
            call()
        samples.append((time.thread_time() - started) / loops * 1000)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="9,36,90,180,360,900,3600", help="path sizes (rows) to time")
    add_output_arguments(parser, Path("benchmarks/results/input_gradients.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"machine": machine(), "results": []}
    for features in (214, 25):
        torch.manual_seed(0)
        net = TabularMoE(TabularMoEConfig(num_numeric=features, num_layers=2, moe=MoEConfig(
            num_experts=16, top_k=2, hidden_size=64, intermediate_size=128))).eval()
        kernel = TabularMoEGradient.from_module(net)
        for rows in map(int, args.points.split(",")):
            x = np.random.default_rng(rows).standard_normal((rows, features)).astype(np.float32)

            def with_torch(x=x, net=net):
                inputs = torch.from_numpy(x).requires_grad_(True)
                logits, _ = net(inputs)
                return torch.autograd.grad(logits[:, 0].sum(), inputs)[0].numpy()

            def with_numpy(x=x, kernel=kernel):
                return kernel.forward_and_gradient(x)[1]

            torch_ms, numpy_ms = cpu_ms(with_torch, 3000, rows), cpu_ms(with_numpy, 3000, rows)
            results["results"].append({
                "features": features, "rows": rows, "torch_cpu_ms": torch_ms, "numpy_cpu_ms": numpy_ms,
                "numpy_over_torch": numpy_ms / torch_ms,
                "max_abs_gradient_difference": float(np.abs(with_numpy() - with_torch()).max())})
    table = Table(title=f"TabularMoE forward + input gradient, CPU ms ({describe(results['machine'])})")
    for column in ("inputs", "path rows", "torch autograd", "NumPy", "NumPy / torch", "max |diff|"):
        table.add_column(column, justify="right")
    for r in results["results"]:
        table.add_row(str(r["features"]), str(r["rows"]), f"{r['torch_cpu_ms']:.3f}", f"{r['numpy_cpu_ms']:.3f}",
                      f"{r['numpy_over_torch']:.2f}x", f"{r['max_abs_gradient_difference']:.1e}")
    Console(width=120).print(table)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
