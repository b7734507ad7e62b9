"""Kernel-level benchmark: forward latency of one model per execution path, by batch size.

Paths (the same trained weights): PyTorch eager FP32; grouped experts (core.fused.GroupedExperts);
torch.compile'd dense parts (core.fused.fuse_model); AWQ INT8 via torchao eager, with its kernels
compiled (core.quantization.compile_quantized), and fully fused; onnxruntime FP32 and INT8
(quantize_dynamic). No HTTP: this isolates what each kernel path costs, to read the serving
benchmark against. Ratios are against eager FP32 at the same batch size.

    python -m benchmarks.quantization --json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import REPO, build_tabular
from core.fused import fuse_model
from core.onnx_export import export_onnx
from core.quantization import AWQConfig, AWQQuantizer, compile_quantized, quantize_onnx
from deploy.serving.families.tabular import TorchAdapter


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return 1000 * float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64,128", help="batch sizes (rows)")
    parser.add_argument("--repeats", type=int, default=30)
    add_output_arguments(parser, REPO / "runs" / "bench" / "quantization.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json, width=170)  # the table is wide; logs are not terminals
    work = Path(tempfile.mkdtemp(prefix="moeworks-quant-"))
    with console.status("training the tabular model"):
        path, _ = build_tabular(work)
    model = TorchAdapter.from_path(path).model
    with np.load(path.with_suffix(".calibration.npz")) as data:
        calibration = {k: data[k] for k in data.files}
    batches = [{k: torch.from_numpy(v[s:s + 128]) for k, v in calibration.items()} for s in range(0, 512, 128)]
    quantizer = AWQQuantizer(AWQConfig(scheme="int8_dynamic")).fit(model, batches)

    paths: dict = {"fp32 eager": model}
    with console.status("building variants (compiling)"):
        paths["fp32 grouped experts"] = fuse_model(copy.deepcopy(model), grouped_experts=True, compile=False)
        paths["fp32 fused (compile)"] = fuse_model(copy.deepcopy(model))
        paths["int8 eager"] = quantizer.transform(model)
        paths["int8 compiled kernels"] = compile_quantized(quantizer.transform(model))
        paths["int8 fused (compile)"] = fuse_model(quantizer.transform(model))
        example = {k: torch.from_numpy(v[:16]) for k, v in calibration.items()}
        onnx_path = export_onnx(model, tuple(example.values()), work / "m.onnx", input_names=list(example),
                                output_names=["logits", "aux"])
        int8_path = quantize_onnx(onnx_path, work / "m.int8.onnx")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions = {"onnxruntime fp32": ort.InferenceSession(str(onnx_path), options),
                    "onnxruntime int8": ort.InferenceSession(str(int8_path), options)}

    sizes = [int(b) for b in args.batches.split(",")]
    results: dict = {"machine": machine(), "load_average": os.getloadavg(),
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "ms": {}}
    rng = np.random.default_rng(0)
    for size in sizes:
        rows = rng.integers(0, len(calibration["numeric"]), size)
        inputs = {k: torch.from_numpy(v[rows]) for k, v in calibration.items()}
        numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
        with torch.inference_mode():
            for name, module in paths.items():
                results["ms"].setdefault(name, {})[size] = timed(lambda m=module, x=inputs: m(**x), args.repeats)
        for name, session in sessions.items():
            results["ms"].setdefault(name, {})[size] = timed(
                lambda s=session, x=numpy_inputs: s.run(["logits"], x), args.repeats)

    table = Table(title=f"forward ms (median) by batch size; x = speed-up over fp32 eager "
                        f"({describe(results['machine'])})")
    table.add_column("path")
    for size in sizes:
        table.add_column(f"b={size}", justify="right")
    base = results["ms"]["fp32 eager"]
    for name, by_size in results["ms"].items():
        table.add_row(name, *[f"{by_size[s]:.2f} ({base[s] / by_size[s]:.2f}x)" for s in sizes])
    console.print(table)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
