"""The one optimise step of serving: quantize to INT8 and fuse, for PyTorch modules and ONNX files.

Every family that quantizes or fuses calls these (the core checkpoints and any other .onnx; the
RUL export through the ONNX path), and the benchmarks measure the same recipe in process:

- PyTorch: AWQ INT8 (torchao int8_dynamic or int8_weight_only, core.quantization), its int8
  kernels compiled (compile_quantized) or, with `fuse`, the dense parts compiled (fuse_model);
- ONNX: onnxruntime INT8 (dynamic, or static QDQ calibrated on named arrays) written beside the
  file, then a session with ORT's extended fusions when `fuse`.

Each returns the optimised model with its runtime label ("torch+int8_dynamic+fused", ...), which
the server reports with every answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploy.serving.base import AdapterOptions, InputField, example_rows

if TYPE_CHECKING:
    import onnxruntime
    import torch
    from torch import nn

TORCH_SCHEMES = ("int8_dynamic", "int8_weight_only")
ONNX_SCHEMES = ("int8_dynamic", "int8_static")
CALIBRATION_BATCH_ROWS = 128  # rows per AWQ calibration batch


def check_torch_options(options: AdapterOptions) -> None:
    if options.quantize not in ("none", *TORCH_SCHEMES):
        raise ValueError(f"quantize={options.quantize!r} is not a PyTorch scheme (int8_dynamic, int8_weight_only)")


def check_onnx_options(options: AdapterOptions) -> None:
    if options.quantize not in ("none", *ONNX_SCHEMES):
        raise ValueError(f"quantize={options.quantize!r} is not an ONNX scheme (int8_dynamic, int8_static)")


def calibration_arrays(options: AdapterOptions, fields: list[InputField]) -> dict[str, np.ndarray]:
    """Named arrays to calibrate on: the `options.calibration` .npz (every field needed), or
    `options.calibration_rows` generated rows that fit the fields."""
    if options.calibration is None:
        return example_rows(fields, options.calibration_rows, seed=1)
    with np.load(options.calibration) as data:  # allow_pickle is False: an object array is refused
        missing = [f.name for f in fields if f.name not in data]
        if missing:
            raise ValueError(f"{options.calibration}: calibration arrays missing {missing}")
        return {f.name: data[f.name].astype(f.dtype) for f in fields}


def torch_batches(arrays: dict[str, np.ndarray], rows: int = CALIBRATION_BATCH_ROWS) -> list[dict[str, torch.Tensor]]:
    """Named arrays (rows first) -> batches of `rows` rows as tensors, in order."""
    import torch

    total = len(next(iter(arrays.values())))
    return [{k: torch.from_numpy(v[s:s + rows]) for k, v in arrays.items()} for s in range(0, total, rows)]


def awq_int8(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *,
             scheme: str = "int8_dynamic") -> nn.Module:
    """AWQ INT8 copy of `model`, calibrated on `batches` (keyword inputs of its forward)."""
    import torch

    from core.quantization import AWQConfig, AWQQuantizer

    with torch.no_grad():
        return AWQQuantizer(AWQConfig(scheme=scheme)).fit(model, list(batches)).transform(model)


def optimise_torch(model: nn.Module, options: AdapterOptions, fields: list[InputField]) -> tuple[nn.Module, str]:
    """`model` (eval mode) quantized and/or fused as `options` ask -> (model, runtime label)."""
    from core.fused import fuse_model
    from core.quantization import compile_quantized

    check_torch_options(options)
    variant = ["torch", "fp32"]
    if options.quantize != "none":
        model = awq_int8(model, torch_batches(calibration_arrays(options, fields)), scheme=options.quantize)
        if not options.fuse:  # torchao's int8 kernels want torch.compile; fuse_model compiles them anyway
            model = compile_quantized(model)
        variant[1] = options.quantize
    if options.fuse:
        model = fuse_model(model)
        variant.append("fused")
    return model, "+".join(variant)


def onnx_session(path: Path, options: AdapterOptions, fields: list[InputField], *, work_dir: Path | None = None,
                 quantize_ops: list[str] | None = None) -> tuple[onnxruntime.InferenceSession, str]:
    """An onnxruntime session of `path`, INT8 (a copy written to `work_dir`, default beside the
    file) and/or with the extended fusions as `options` ask -> (session, runtime label)."""
    import onnxruntime as ort

    from core.onnx_export import available_providers
    from core.quantization import quantize_onnx

    check_onnx_options(options)
    run_path, variant = path, "fp32"
    if options.quantize != "none":
        run_path = (work_dir or path.parent) / f"{path.stem}.{options.quantize}.onnx"
        mode = "dynamic" if options.quantize == "int8_dynamic" else "static"
        calibration = calibration_arrays(options, fields) if mode == "static" else None
        quantize_onnx(path, run_path, mode=mode, calibration=calibration, op_types=quantize_ops)
        variant = options.quantize
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.threads
    session_options.inter_op_num_threads = 1
    # ORT's fused kernels (GELU, bias+GELU, LayerNorm, MatMul+Add, attention) are its "extended"
    # and layout levels: `fuse` turns them on; without it only basic graph clean-ups run.
    level = ort.GraphOptimizationLevel
    session_options.graph_optimization_level = level.ORT_ENABLE_ALL if options.fuse else level.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(run_path), sess_options=session_options, providers=available_providers())
    return session, f"onnxruntime+{variant}" + ("+fused" if options.fuse else "")
