"""INT8 models for small edge devices: dynamic quantisation of an ONNX file, metadata kept."""

from __future__ import annotations

from pathlib import Path


def quantize_for_edge(source: str | Path, target: str | Path) -> Path:
    """Weights to INT8 (activations quantised at run time); the contract in metadata_props is copied over."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    original = onnx.load(str(source))
    plain = onnx.ModelProto()
    plain.CopyFrom(original)
    del plain.graph.value_info[:]  # the exporter's intermediate shapes can disagree with re-inference: drop them
    staged = target.with_suffix(".staged.onnx")
    onnx.save(plain, str(staged))
    try:
        quantize_dynamic(str(staged), str(target), weight_type=QuantType.QInt8)
    finally:
        staged.unlink(missing_ok=True)
    quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)
    onnx.save(quantized, str(target))
    return target
