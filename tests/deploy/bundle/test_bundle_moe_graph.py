"""The MoE network's forward and backward as ONNX operators (deploy/bundle/moe_graph.py) against the
product's own path (finance.models.moe.MoEModel: torch for blocks, finance.models.input_gradients for a few rows).

Random networks of each routing variant the graph covers (normalised or full-softmax weights, gelu,
relu and silu experts, a bias that changes which experts are chosen, one to three experts per row;
5 rows leave most of the 16 experts with no row, which the sparse dispatch must take); inputs with NaN and far
outside the clipping range. No training: the maths is what is checked here, the trained credit
models in tests/deploy/bundle/test_bundle.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from deploy.bundle.credit_features import BundleError
from deploy.bundle.graph import GraphBuilder
from deploy.bundle.moe_graph import moe_head
from finance.models.input_gradients import TabularMoEGradient
from finance.models.moe import MoEModel, MoEModelConfig, StandardisedMoE

FEATURES = 12


def _model(seed: int, **moe) -> MoEModel:
    torch.manual_seed(seed)
    net = TabularMoE(TabularMoEConfig(num_numeric=FEATURES, num_layers=2, moe=MoEConfig(
        num_experts=16, hidden_size=16, intermediate_size=24, **{"top_k": 2, **moe})))
    module = StandardisedMoE(net, FEATURES)
    rng = np.random.default_rng(seed)
    module.fill.copy_(torch.from_numpy(rng.normal(size=FEATURES).astype(np.float32)))
    module.low.fill_(-3.0), module.high.fill_(3.0)
    module.mean.copy_(torch.from_numpy(rng.normal(size=FEATURES).astype(np.float32)))
    module.scale.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, FEATURES).astype(np.float32)))
    for layer in net.layers:
        if layer.config.bias_balancing:  # large enough to overturn the softmax's own choice
            layer.router.selection_bias.copy_(torch.from_numpy(rng.normal(0, 0.2, 16).astype(np.float32)))
    module.eval()
    model = MoEModel._restored(config=MoEModelConfig(), feature_names=[f"f{j}" for j in range(FEATURES)],
                               dataset="taiwan")
    model.module_, model.gradient_kernel_ = module, TabularMoEGradient.from_module(net)
    return model


def _graph(model: MoEModel) -> bytes:
    g = GraphBuilder()
    x = g.input("features", "float", ["N", FEATURES])
    pd_, contributions = moe_head(g, x, model)
    g.output(pd_, "pd"), g.output(contributions, "contributions")
    return g.model().SerializeToString()


@pytest.mark.parametrize("moe", [{}, {"normalize_weights": False}, {"activation": "relu"},
                                 {"activation": "silu", "bias_balancing": True}, {"top_k": 1},
                                 {"top_k": 3, "normalize_weights": False}])
@pytest.mark.parametrize("rows", [5, 300])  # the product's NumPy kernel (a few rows) and torch autograd paths
def test_graph_reproduces_pd_and_integrated_gradients(moe, rows):
    import onnxruntime as ort

    model = _model(len(moe) + rows, **moe)
    rng = np.random.default_rng(rows)
    x = rng.normal(0, 2, (rows, FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[0] = 1e30  # clipped to the training range inside the graph, as in the module
    proba, expected = model.predict_with_contributions(x)
    session = ort.InferenceSession(_graph(model), providers=["CPUExecutionProvider"])
    pd_, contributions = session.run(None, {"features": x})
    np.testing.assert_allclose(pd_[:, 0], proba[:, 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(contributions, expected, rtol=1e-3, atol=1e-6)
    assert np.abs(expected).max() > 1e-2  # real attributions are compared, not zeros


def test_shared_experts_are_refused_by_name():
    model = _model(0, num_shared_experts=1)
    with pytest.raises(BundleError, match="shared experts"):
        _graph(model)
