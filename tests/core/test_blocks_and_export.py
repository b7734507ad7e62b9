import numpy as np
import pytest
import torch

from core import MoEConfig
from core.blocks import MoETransformerBlock, TabularMoE, TabularMoEConfig
from core.moe import MoELayer
from core.onnx_export import export_onnx, max_abs_difference


def test_transformer_block_ignores_padding():
    torch.manual_seed(0)
    block = MoETransformerBlock(moe=MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=16,
                                                       intermediate_size=32)), num_heads=4, dropout=0.0).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out, aux = block(x, mask)
    changed = x.clone()
    changed[1, 4:] = 100.0  # padding content must not leak into real tokens
    out2, _ = block(changed, mask)
    torch.testing.assert_close(out[1, :4], out2[1, :4])
    assert aux.ndim == 0 and out.shape == x.shape


def test_tabular_moe_trains_and_reports_aux_loss():
    torch.manual_seed(0)
    model = TabularMoE(TabularMoEConfig(num_numeric=3, categorical_cardinalities=[4, 2]))
    logits, aux = model(torch.randn(5, 3), torch.tensor([[0, 1]] * 5))
    assert logits.shape == (5, 1) and aux.item() > 0


@pytest.mark.parametrize("capacity", [None, 16])
def test_onnx_export_matches_eager_on_inputs_reaching_every_expert(tmp_path, capacity):
    torch.manual_seed(0)
    cfg = TabularMoEConfig(num_numeric=6, categorical_cardinalities=[5],
                           moe=MoEConfig(num_experts=16, top_k=2, hidden_size=32, intermediate_size=32,
                                         expert_capacity=capacity))
    model = TabularMoE(cfg).eval()
    numeric = torch.randn(256, 6) * 3
    categorical = torch.randint(0, 5, (256, 1))
    with torch.no_grad():  # the parity inputs must reach every expert of every layer
        hidden = model.input(torch.cat([numeric, model.embeddings[0](categorical[:, 0])], -1))
        load = model.layers[0](model.norms[0](hidden)).expert_load
    assert (load > 0).all(), f"test input misses experts: {load.tolist()}"
    path = export_onnx(model, (numeric[:4], categorical[:4]), tmp_path / "tab.onnx",
                       input_names=["numeric", "categorical"], output_names=["logits", "aux_loss"],
                       metadata={"model": "tabular-moe", "version": "test"})
    diff = max_abs_difference(model, path, {"numeric": numeric, "categorical": categorical})
    assert diff < 1e-4, f"onnxruntime differs from eager by {diff}"
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["model"] == "tabular-moe"
    assert np.isfinite(diff)
