"""AWQ INT8: the arithmetic, the scale search, exact scale folding, torchao and onnxruntime paths."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.fixtures import fit_tabular
from core import MoEConfig, MoELayer
from core.blocks import TabularMoE, TabularMoEConfig
from core.quantization import (
    AWQConfig,
    AWQQuantizer,
    LinearExperts,
    fake_quantize_weight,
    quantize_onnx,
    quantize_per_channel,
    search_scale,
)
from deploy.synthetic import segmented_classification


def tabular(seed=0, **moe):
    torch.manual_seed(seed)
    config = TabularMoEConfig(num_numeric=8, categorical_cardinalities=[4], embedding_dim=4, moe=MoEConfig(
        **{"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 64, **moe}))
    return TabularMoE(config).eval()


def batches(n=4, rows=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows, 1), generator=g)) for _ in range(n)]


def test_per_channel_int8_round_trip_is_within_half_a_step():
    w = torch.randn(16, 32) * torch.logspace(-2, 1, 16)[:, None]  # channels of very different range
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert q.abs().max() <= 127
    assert ((fake_quantize_weight(w) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_awq_search_beats_plain_rounding_when_activations_have_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30  # salient input channels, as in real activations
    w = torch.randn(32, 64, generator=g)
    result = search_scale(w, x, grid_size=20, dynamic=False)
    assert result.alpha > 0
    assert result.error < 0.7 * result.error_plain


def test_folded_scales_leave_the_fp32_model_unchanged():
    model = tabular()
    quantizer = AWQQuantizer(AWQConfig(grid_size=5)).fit(model, batches())
    assert any(".experts." in name for name in quantizer.searches_), "expert weights were searched"
    assert not any("router" in name for name in quantizer.searches_), "routers stay fp32"
    scaled = quantizer.apply_scales(model)
    assert isinstance(scaled.layers[0].experts, LinearExperts)
    x = batches(1, seed=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(scaled(*x)[0], model(*x)[0], atol=2e-5, rtol=1e-4)


def test_linear_experts_static_path_matches_sorted_path():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32)
    sorted_layer = MoELayer(config).eval()
    static_layer = MoELayer(config, static=True).eval()
    static_layer.load_state_dict(sorted_layer.state_dict())
    scales = torch.rand(8, 16) + 0.5, torch.rand(8, 32) + 0.5
    for layer in (sorted_layer, static_layer):
        layer.experts = LinearExperts.from_experts(layer.experts, *scales)
    x = torch.randn(64, 16)
    with torch.no_grad():
        torch.testing.assert_close(static_layer(x).output, sorted_layer(x).output, atol=1e-5, rtol=1e-5)


def _trained_tabular():
    numeric, segment, label = segmented_classification(4000, seed=3)
    x, c, y = torch.from_numpy(numeric), torch.from_numpy(segment)[:, None], torch.from_numpy(label)
    model = tabular(seed=3).train()
    fit_tabular(model, x, c, y, rows=3000, epochs=3, batch=128)
    return model.eval(), (x[:3000], c[:3000]), (x[3000:], c[3000:]), y[3000:].numpy()


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_weight_only"])
def test_torchao_int8_keeps_auc_within_one_percent(scheme):
    from torchao.quantization import Int8Tensor

    model, (train_x, train_c), (val_x, val_c), val_y = _trained_tabular()
    calibration = [(train_x[s:s + 256], train_c[s:s + 256]) for s in range(0, 1024, 256)]
    quantized = AWQQuantizer(AWQConfig(scheme=scheme)).fit(model, calibration).transform(model)
    assert isinstance(quantized.layers[0].experts.up[0].weight, Int8Tensor)
    assert isinstance(quantized.input[0].linear.weight, Int8Tensor)  # no LayerNorm before it: scale kept
    assert isinstance(quantized.head[1].weight, Int8Tensor)  # after a LayerNorm: scale folded into it
    assert not isinstance(quantized.layers[0].router.gate.weight, Int8Tensor)
    with torch.no_grad():
        auc_fp32 = roc_auc_score(val_y, model(val_x, val_c)[0].squeeze(-1).numpy())
        auc_int8 = roc_auc_score(val_y, quantized(val_x, val_c)[0].squeeze(-1).numpy())
    assert auc_fp32 > 0.75, "the model learned the task"
    assert abs(auc_int8 - auc_fp32) / auc_fp32 < 0.01


def test_onnxruntime_dynamic_and_static_int8(tmp_path):
    import onnx

    from core.onnx_export import export_onnx, inference_session

    model = tabular()
    numeric, categorical = batches(1, rows=64)[0]
    path = export_onnx(model, (numeric, categorical), tmp_path / "m.onnx", input_names=["numeric", "categorical"],
                       output_names=["logits", "aux"], metadata={"version": "test-1"})
    reference = inference_session(path).run(["logits"], {"numeric": numeric.numpy(),
                                                         "categorical": categorical.numpy()})[0]
    calibration = {"numeric": np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32),
                   "categorical": np.random.default_rng(1).integers(0, 4, (256, 1))}
    # Static QDQ fixes activation ranges from calibration, so it errs more; near-tied routing choices
    # of this untrained model flip under either, which is what the correlation bound allows for.
    for mode, marker, min_corr in (("dynamic", "DynamicQuantizeLinear", 0.99), ("static", "QuantizeLinear", 0.95)):
        target = quantize_onnx(path, tmp_path / f"m.{mode}.onnx", mode=mode, calibration=calibration)
        proto = onnx.load(str(target))
        assert marker in {node.op_type for node in proto.graph.node}
        assert {p.key: p.value for p in proto.metadata_props}["version"] == "test-1"
        got = inference_session(target).run(["logits"], {"numeric": numeric.numpy(),
                                                         "categorical": categorical.numpy()})[0]
        assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > min_corr, mode


def test_int8_experts_under_torch_compile_match_eager_int8():
    """compile_quantized on one MoE layer: one compiled graph for all int8 experts (kept small: compiling is slow)."""
    from core.quantization import compile_quantized

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=32)).eval()
    tokens = torch.randn(64, 16)
    quantized = AWQQuantizer(AWQConfig(grid_size=4)).fit(layer, [tokens]).transform(layer)
    inputs = [torch.randn(9, 16), torch.randn(23, 16)]  # expert slices of several sizes and offsets
    with torch.inference_mode():
        eager = [quantized(x).output for x in inputs]
        compiled = compile_quantized(quantized)  # in place
        for x, want in zip(inputs, eager, strict=True):
            torch.testing.assert_close(compiled(x).output, want, atol=1e-4, rtol=1e-4)
