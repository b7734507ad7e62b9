"""INT8 models for small edge devices: dynamic quantisation of an ONNX file, metadata kept."""

from __future__ import annotations

from pathlib import Path

from core.quantization import QUANTIZED_ONNX_OPS, quantize_onnx

# The RUL models on the edge are recurrent: their LSTM weights are most of the file.
EDGE_QUANTIZED_OPS = [*QUANTIZED_ONNX_OPS, "LSTM"]


def quantize_for_edge(source: str | Path, target: str | Path) -> Path:
    """Weights to INT8 (activations quantised at run time); the contract in metadata_props is copied over."""
    return quantize_onnx(source, target, mode="dynamic", op_types=EDGE_QUANTIZED_OPS)
