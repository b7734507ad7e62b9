"""One MoE layer in onnxruntime: static export, sparse export (core.sparse_export), contrib MoE/QMoE.

Side by side on the same layer (16 experts, top-2, width 128, inner 256: the MoE Transformer of
benchmarks/serving.py) and the same tokens, one thread, median forward ms over repeated calls:

  torch eager          MoELayer's sorted dispatch (the PyTorch serving path)
  ort static           export_onnx default: every expert over every token (Einsum), dense combine
  ort sparse fp32      export_onnx(moe_dispatch="sparse"): per-expert NonZero/Gather/MatMul/ScatterND
  ort sparse int8      the same after core.quantization.quantize_onnx (dynamic INT8, router FP32)
  ort MoE / QMoE op    onnxruntime's contrib com.microsoft.MoE (FP32) and QMoE (8-bit weights)
                       operators, built by hand around the same router and weights

Relative error is max |x - torch| / max |torch| of the layer's output.

    python -m benchmarks.onnx_moe --json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_output_arguments, machine, write_results
from benchmarks.fixtures import REPO
from core import MoEConfig, MoELayer
from core.onnx_export import export_onnx
from core.quantization import quantize_onnx


class _Output(torch.nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).output


def contrib_moe_model(layer: MoELayer, *, quantized: bool):
    """A graph of router MatMul + com.microsoft.MoE (or QMoE, symmetric 8-bit per output channel)."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = layer.config
    w_in = layer.experts.w_in.detach().numpy().transpose(0, 2, 1)  # (E, I, H): the op's layout
    w_out = layer.experts.w_out.detach().numpy().transpose(0, 2, 1)  # (E, H, I)
    attrs = {"k": cfg.top_k, "activation_type": cfg.activation, "normalize_routing_weights": 1}
    inits = [numpy_helper.from_array(np.ascontiguousarray(layer.router.gate.weight.detach().numpy().T), "gate")]
    if quantized:
        names = []
        for tag, w in (("fc1", w_in), ("fc2", w_out)):
            scale = np.abs(w).max(-1) / 127.0  # (E, out)
            q = (np.clip(np.round(w / scale[..., None]), -127, 127) + 128).astype(np.uint8)  # offset-128 storage
            inits += [numpy_helper.from_array(q, tag), numpy_helper.from_array(scale.astype(np.float32), f"{tag}_s")]
            names += [tag, f"{tag}_s", ""]
        node = helper.make_node("QMoE", ["x", "logits", *names[:-1]], ["y"], domain="com.microsoft",
                                expert_weight_bits=8, **attrs)
    else:
        inits += [numpy_helper.from_array(np.ascontiguousarray(w_in), "fc1"),
                  numpy_helper.from_array(np.ascontiguousarray(w_out), "fc2")]
        node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "gate"], ["logits"]), node], "moe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cfg.hidden_size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cfg.hidden_size])],
                              initializer=inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)  # the IR version onnxruntime 1.31 reads


def _median_ms(call, x, seconds: float) -> float:
    for _ in range(3):
        call(x)
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
        started = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16,128,512,2048", help="comma list of token counts")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per path and size")
    add_output_arguments(parser, REPO / "runs" / "bench" / "onnx_moe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=128, intermediate_size=256)).eval()
    work = Path(tempfile.mkdtemp(prefix="moeworks-onnx-moe-"))
    example = (torch.randn(8, 128),)
    static = export_onnx(_Output(layer), example, work / "static.onnx", input_names=["x"], output_names=["y"])
    sparse = export_onnx(_Output(layer), example, work / "sparse.onnx", input_names=["x"], output_names=["y"],
                         moe_dispatch="sparse")
    sparse_int8 = quantize_onnx(sparse, work / "sparse.int8.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1

    def session(model):
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        s = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {"x": x})[0]

    paths = {"ort static": session(static), "ort sparse fp32": session(sparse), "ort sparse int8": session(sparse_int8),
             "ort MoE op": session(contrib_moe_model(layer, quantized=False)),
             "ort QMoE op (int8)": session(contrib_moe_model(layer, quantized=True))}

    def eager(x):
        with torch.inference_mode():
            return layer(torch.from_numpy(x)).output.numpy()

    rng = np.random.default_rng(0)
    results: dict = {"layer": "16 experts, top-2, 128 -> 256 -> 128, GELU", "threads": 1, "by_tokens": {},
                     "machine": {**machine(), "onnxruntime_threads": 1}}
    for tokens in map(int, args.tokens.split(",")):
        x = rng.standard_normal((tokens, 128)).astype(np.float32)
        want = eager(x)
        row = {"torch eager": {"ms": _median_ms(eager, x, args.seconds), "relative_error": 0.0}}
        for name, call in paths.items():
            error = float(np.abs(call(x) - want).max() / np.abs(want).max())
            row[name] = {"ms": _median_ms(call, x, args.seconds), "relative_error": error}
        results["by_tokens"][tokens] = row
        print(f"{tokens:5d} tokens | " + " | ".join(f"{k} {v['ms']:.2f} ms ({v['relative_error']:.0e})"
                                                    for k, v in row.items()), file=sys.stderr if args.json else None)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
