"""The sparse-dispatch ONNX export of MoE layers equals the eager layer in onnxruntime."""

import numpy as np
import pytest
import torch
from torch import nn

from core import MoEConfig, MoELayer
from core.blocks import MoETransformerBlock
from core.onnx_export import export_onnx, inference_session
from core.sparse_export import SparseDispatchMoE, sparse_for_export


class _Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.block = MoETransformerBlock(moe=MoELayer(config), num_heads=2, dropout=0.0)

    def forward(self, x):
        return self.block(x)[0]


@pytest.mark.parametrize("shared", [0, 1])
def test_sparse_export_matches_eager_layer_at_every_batch_size(tmp_path, shared):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32, num_shared_experts=shared)
    model = _Encoder(config).eval()
    path = export_onnx(model, (torch.randn(2, 5, 16),), tmp_path / "sparse.onnx", input_names=["x"],
                       output_names=["y"], moe_dispatch="sparse")
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"NonZero", "ScatterND"} <= ops and "Einsum" not in ops, "experts run sparsely, not densely"
    session = inference_session(path, threads=1)
    for batch in (1, 3, 17):  # one sequence of 5 tokens leaves most of the 8 experts idle
        x = torch.randn(batch, 5, 16)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, atol=2e-5)


def test_only_dropless_layers_are_rewritten_and_the_original_is_untouched():
    dropless = MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=16))
    capped = MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=16, capacity_factor=1.0))
    model = nn.ModuleList([dropless, capped])
    copy = sparse_for_export(model)
    assert isinstance(copy[0], SparseDispatchMoE) and isinstance(copy[1], MoELayer)
    assert isinstance(model[0], MoELayer)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy[0](x).output, dropless(x).output, atol=1e-6, rtol=1e-5)


def test_int8_of_the_sparse_export_keeps_the_router_fp32(tmp_path):
    import onnx

    from core.quantization import quantize_onnx

    torch.manual_seed(0)
    model = _Encoder(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=32)).eval()
    path = export_onnx(model, (torch.randn(2, 5, 16),), tmp_path / "sparse.onnx", input_names=["x"],
                       output_names=["y"], moe_dispatch="sparse")
    quantized = onnx.load(str(quantize_onnx(path, tmp_path / "sparse.int8.onnx")))
    integer_inputs = {name for node in quantized.graph.node if node.op_type == "MatMulInteger" for name in node.input}
    assert any("up" in name for name in integer_inputs), "the experts' weights are INT8"
    assert not any("router" in name for name in integer_inputs), "a flipped top-k choice costs more than INT8 saves"
