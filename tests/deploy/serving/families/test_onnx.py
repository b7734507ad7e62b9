"""The ONNX fallback family: any other .onnx (here a TabularMoE export) served by onnxruntime, INT8 at load."""

import numpy as np
import torch

from deploy.serving.base import AdapterOptions
from deploy.serving.families.onnx import OnnxAdapter
from deploy.serving.families.tabular import TorchAdapter
from deploy.serving.registry import REGISTRY


def test_onnx_int8_adapter_serves_the_same_model(checkpoint, tmp_path):
    from core.onnx_export import export_onnx

    torch_adapter = TorchAdapter.from_path(checkpoint)
    rows = torch_adapter.example(16, seed=3)
    path = export_onnx(torch_adapter.model, tuple(torch.from_numpy(rows[f.name]) for f in torch_adapter.fields),
                       tmp_path / "tiny.onnx", input_names=["numeric", "categorical"],
                       output_names=["logits", "aux"],
                       metadata={"version": "tiny-1", "config": {"categorical_cardinalities": [3, 4]}})
    onnx_adapter = REGISTRY.from_path(path, AdapterOptions(quantize="int8_dynamic"))
    assert isinstance(onnx_adapter, OnnxAdapter) and onnx_adapter.runtime == "onnxruntime+int8_dynamic"
    assert (tmp_path / "tiny.int8_dynamic.onnx").is_file()  # the INT8 copy is written beside the file
    assert onnx_adapter.fields[1].high == (3, 4) and onnx_adapter.version == "tiny-1"
    got, want = onnx_adapter.predict(rows)["logits"], torch_adapter.predict(rows)["logits"]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98
    split = onnx_adapter.run_batch([{k: v[:5] for k, v in rows.items()}, {k: v[5:] for k, v in rows.items()}])
    np.testing.assert_allclose(np.concatenate([s["logits"] for s in split]), got, atol=1e-5)
    fp32 = OnnxAdapter.from_path(path, AdapterOptions(fuse=True))
    assert fp32.runtime == "onnxruntime+fp32+fused"
    np.testing.assert_allclose(fp32.predict(rows)["logits"], want, atol=1e-4)
