"""MoE layer speed and memory beside three references, in one run.

Variants, all on the same tokens with the same routing:
  moe        core.MoELayer (sort by expert, one pass per active expert over its contiguous slice)
  floor      a dense FFN whose width equals the active parameters per token (top_k * intermediate)
  naive      HF Mixtral's loop: per expert, torch.where over a boolean mask, gather, index_add
  dense_all  every expert over every token, masked by the combine weights (expert by expert)

Time is the median over interleaved repetitions (so background load hits all variants alike);
peak memory is the resident-set growth of one forward pass in a fresh subprocess.

    python -m benchmarks.moe_layer [--json] [--out benchmarks/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from benchmarks.common import add_output_arguments, machine, write_results
from benchmarks.fixtures import REPO
from core import MoEConfig, MoELayer

VARIANTS = ("moe", "floor", "naive", "dense_all")


def build(hidden: int, intermediate: int, experts: int, top_k: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=experts, top_k=top_k, hidden_size=hidden,
                               intermediate_size=intermediate)).eval()
    floor_in = torch.randn(hidden, top_k * intermediate) / hidden**0.5
    floor_out = torch.randn(top_k * intermediate, hidden) / (top_k * intermediate) ** 0.5
    return layer, floor_in, floor_out


def run_variant(name: str, layer: MoELayer, floor_in, floor_out, x: torch.Tensor) -> torch.Tensor:
    if name == "moe":
        return layer(x).output
    if name == "floor":
        return F.gelu(x @ floor_in) @ floor_out
    routing = layer.router(x)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    out = torch.zeros_like(x)
    if name == "naive":  # transformers' MixtralSparseMoeBlock loop
        expert_mask = F.one_hot(routing.expert_index, layer.config.num_experts).permute(2, 1, 0)
        for e in range(layer.config.num_experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            y = F.gelu(x[token] @ w_in[e]) @ w_out[e]
            out.index_add_(0, token, y * routing.weight[token, slot, None])
        return out
    if name == "dense_all":
        combine = torch.zeros(x.shape[0], layer.config.num_experts).scatter_(
            1, routing.expert_index, routing.weight)  # (tokens, experts)
        for e in range(layer.config.num_experts):
            out += combine[:, e:e + 1] * (F.gelu(x @ w_in[e]) @ w_out[e])
        return out
    raise ValueError(name)


def peak_memory_mib(variant: str, hidden: int, intermediate: int, experts: int, top_k: int, tokens: int) -> float:
    """Run one forward pass in a fresh copy of this script and return its RSS growth in MiB."""
    command = [sys.executable, "-m", "benchmarks.moe_layer", "--measure-memory-of", variant, "--hidden", str(hidden),
               "--tokens", str(tokens), "--experts", str(experts), "--top-k", str(top_k),
               "--intermediate-ratio", str(intermediate / hidden)]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(result.stdout.strip().splitlines()[-1])


def measure_memory_here(variant: str, hidden: int, intermediate: int, experts: int, top_k: int,
                        tokens: int) -> float:
    """RSS growth of one forward pass over the process state after building the layer, in MiB."""
    layer, floor_in, floor_out = build(hidden, intermediate, experts, top_k)
    x = torch.randn(tokens, hidden)
    process = psutil.Process()
    base = process.memory_info().rss
    peak, running = [base], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        run_variant(variant, layer, floor_in, floor_out, x)
    running[0] = False
    sampler.join()
    return (max(peak[0], process.memory_info().rss) - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--intermediate-ratio", type=float, default=2.0,
                        help="expert width / hidden (fine-grained experts are narrower than a dense FFN)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-all-repeats", type=int, default=1, help="dense_all is E/k times the work")
    parser.add_argument("--no-memory", action="store_true")
    add_output_arguments(parser, Path("benchmarks/results/moe_layer.json"))
    parser.add_argument("--measure-memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory_of:  # child process of peak_memory_mib
        print(measure_memory_here(args.measure_memory_of, args.hidden[0], int(args.hidden[0] * args.intermediate_ratio),
                                  args.experts, args.top_k, args.tokens[0]))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json)
    measured_on = {**machine(), "device": "cpu", "dtype": "fp32"}
    rows = []
    for hidden in args.hidden:
        intermediate = int(hidden * args.intermediate_ratio)
        layer, floor_in, floor_out = build(hidden, intermediate, args.experts, args.top_k)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden)
            times = {v: [] for v in VARIANTS}
            with torch.no_grad():
                reference = run_variant("dense_all", layer, floor_in, floor_out, x)
                for v in ("moe", "naive"):  # all three routed variants compute the same function
                    err = (run_variant(v, layer, floor_in, floor_out, x) - reference).abs().max().item()
                    assert err < 1e-3, f"{v} differs from dense_all by {err}"
                for _ in range(1):  # warm-up
                    for v in ("moe", "floor", "naive"):
                        run_variant(v, layer, floor_in, floor_out, x)
                for rep in range(args.repeats):
                    for v in VARIANTS:
                        if v == "dense_all" and rep >= args.dense_all_repeats:
                            continue
                        start = time.perf_counter()
                        run_variant(v, layer, floor_in, floor_out, x)
                        times[v].append(time.perf_counter() - start)
            row = {"hidden": hidden, "intermediate": intermediate, "tokens": tokens, "experts": args.experts,
                   "top_k": args.top_k}
            for v in VARIANTS:
                row[f"{v}_ms"] = 1000 * statistics.median(times[v])
                if not args.no_memory:
                    row[f"{v}_peak_mib"] = peak_memory_mib(v, hidden, intermediate, args.experts, args.top_k, tokens)
            row["moe_vs_floor"] = row["moe_ms"] / row["floor_ms"]
            row["naive_vs_moe"] = row["naive_ms"] / row["moe_ms"]
            row["dense_all_vs_moe"] = row["dense_all_ms"] / row["moe_ms"]
            rows.append(row)
            console.log(f"hidden={hidden} tokens={tokens}: moe {row['moe_ms']:.1f} ms, "
                        f"floor {row['floor_ms']:.1f} ms, naive {row['naive_ms']:.1f} ms, "
                        f"dense_all {row['dense_all_ms']:.1f} ms")

    table = Table(title=f"MoE layer, {args.experts} experts, top-{args.top_k}, fp32 CPU "
                        f"({measured_on['logical_cores']} cores, {measured_on['torch_threads']} threads)")
    for col in ("hidden", "tokens", "moe ms", "floor ms", "naive ms", "dense_all ms", "moe/floor",
                "naive/moe", "dense_all/moe", "peak MiB moe/floor/naive/dense_all"):
        table.add_column(col, justify="right")
    for r in rows:
        mem = "-" if args.no_memory else "/".join(f"{r[f'{v}_peak_mib']:.0f}" for v in VARIANTS)
        table.add_row(str(r["hidden"]), str(r["tokens"]), f"{r['moe_ms']:.1f}", f"{r['floor_ms']:.1f}",
                      f"{r['naive_ms']:.1f}", f"{r['dense_all_ms']:.1f}", f"{r['moe_vs_floor']:.2f}x",
                      f"{r['naive_vs_moe']:.2f}x", f"{r['dense_all_vs_moe']:.2f}x", mem)
    console.print(table)
    result = {"benchmark": "moe_layer", "machine": measured_on, "rows": rows}
    console.print(f"results written to {args.out}")
    write_results(result, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
