"""Any other ONNX file, run by onnxruntime; optionally INT8 at load (dynamic or QDQ static) and fused.

The fallback family: an .onnx that no specific family (the RUL or detector export) claims. Its
inputs are the graph's inputs (a dynamic batch axis, every other axis fixed); its outputs are the
graph's per-row outputs, plus `probability` beside a one-column `logits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.serving.base import AdapterOptions, InputField, ModelAdapter, ModelPath, file_version
from deploy.serving.optimise import check_onnx_options, onnx_session

if TYPE_CHECKING:
    import onnxruntime


class OnnxAdapter(ModelAdapter):
    """Named graph inputs in, the graph's per-row outputs out."""

    family = "onnx"
    describes = "any other .onnx"
    fallback = True

    def __init__(self, *, session: onnxruntime.InferenceSession, outputs: list[str], fields: list[InputField],
                 name: str, version: str, runtime: str, options: AdapterOptions) -> None:
        self.session, self.outputs, self.fields = session, outputs, fields
        self.name, self.version, self.runtime, self.options = name, version, runtime, options

    @classmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        return candidate.onnx is not None

    @classmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        check_onnx_options(options)

    @classmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None, *, work_dir: Path | None = None,
                  quantize_ops: list[str] | None = None) -> OnnxAdapter:
        """`work_dir`: where an INT8 copy is written (beside the file by default); `quantize_ops`:
        the op types INT8 covers (core.quantization.QUANTIZED_ONNX_OPS by default)."""
        import onnx

        path, options = cls.start_loading(path, options)
        proto = onnx.load(str(path), load_external_data=False)
        metadata = {p.key: p.value for p in proto.metadata_props}
        highs = _categorical_bounds(metadata)
        # Inputs whose NaN means "missing" (the graph imputes it), as the exporter declared them.
        missing = set(filter(None, metadata.get("nan_means_missing", "").split(",")))
        fields = []
        for value in proto.graph.input:
            tensor = value.type.tensor_type
            elem = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim][1:]
            if any(d is None for d in dims):
                raise ValueError(f"{path}: input {value.name} has a dynamic non-batch axis {dims}; not servable")
            fields.append(InputField(value.name, elem, tuple(dims), high=highs.get(value.name),
                                     allow_nan=value.name in missing and elem.kind == "f"))
        session, runtime = onnx_session(path, options, fields, work_dir=work_dir, quantize_ops=quantize_ops)
        # Per-row outputs only (a scalar auxiliary loss is not an answer).
        outputs = [o.name for o in session.get_outputs() if len(o.shape) >= 1]
        return cls(session=session, outputs=outputs, fields=fields, name=metadata.get("name", path.stem),
                   version=metadata.get("version") or file_version(path), runtime=runtime, options=options)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, inputs)
        out = dict(zip(self.outputs, values, strict=True))
        if "logits" in out and out["logits"].ndim == 2 and out["logits"].shape[-1] == 1:
            out["probability"] = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
        return out


def _categorical_bounds(metadata: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`categorical` code ranges from a TabularMoE config saved in the file's metadata, if any."""
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    cards = config.get("categorical_cardinalities") if isinstance(config, dict) else None
    return {"categorical": tuple(cards)} if cards else {}
