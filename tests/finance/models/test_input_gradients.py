"""The NumPy forward and input gradient of a TabularMoE equal torch's forward and autograd."""

import numpy as np
import pytest
import torch

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from finance.models.input_gradients import TabularMoEGradient


def _net(seed: int = 0, *, num_numeric: int = 23, num_outputs: int = 1, **moe) -> TabularMoE:
    torch.manual_seed(seed)
    settings = {"num_experts": 16, "top_k": 2, "hidden_size": 32, "intermediate_size": 48, **moe}
    net = TabularMoE(TabularMoEConfig(num_numeric=num_numeric, num_layers=2, num_outputs=num_outputs,
                                      moe=MoEConfig(**settings)))
    with torch.no_grad():  # trained-looking norms and biases, not the ones and zeros of a fresh init
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
        for layer in net.layers:  # a learned selection bias (used only with bias_balancing)
            layer.router.selection_bias.copy_(0.05 * torch.randn(layer.config.num_experts))
    return net.eval()


def _torch_reference(net: TabularMoE, x: np.ndarray, output: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = torch.from_numpy(x).requires_grad_(True)
    logits, _ = net(inputs)
    (grad,) = torch.autograd.grad(logits[:, output].sum(), inputs)
    return logits.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("moe", [
    {},  # the credit network's routing: softmax, top-2 of 16, weights renormalised, GELU
    {"top_k": 1},
    {"top_k": 4, "num_experts": 64},
    {"normalize_weights": False},
    {"num_shared_experts": 1, "activation": "silu"},
    {"activation": "relu"},
    {"bias_balancing": True},
], ids=["top2", "top1", "top4-of-64", "unnormalised", "shared-silu", "relu", "bias-balancing"])
@pytest.mark.parametrize("rows", [1, 9, 300])
def test_forward_and_input_gradient_equal_torch_autograd(moe, rows):
    net = _net(**moe)
    x = np.random.default_rng(rows).standard_normal((rows, 23)).astype(np.float32) * 2
    logits, grad = TabularMoEGradient.from_module(net).forward_and_gradient(x)
    ref_logits, ref_grad = _torch_reference(net, x, 0)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert np.abs(grad).max() > 1e-2  # the comparison is not between two zeros


def test_gradient_of_a_chosen_output_and_of_each_row_alone():
    net = _net(3, num_outputs=3)
    kernel = TabularMoEGradient.from_module(net)
    x = np.random.default_rng(0).standard_normal((40, 23)).astype(np.float32)
    logits, grad = kernel.forward_and_gradient(x, output=2)
    ref_logits, ref_grad = _torch_reference(net, x, 2)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # rows do not interact: a row alone gets its row of the batch's gradient
    for i in (0, 17, 39):
        np.testing.assert_allclose(kernel.forward_and_gradient(x[i:i + 1], output=2)[1], grad[i:i + 1],
                                   rtol=1e-5, atol=1e-7)


def test_the_kernel_sees_weights_loaded_in_place():
    net, other = _net(0), _net(1)
    kernel = TabularMoEGradient.from_module(net)
    net.load_state_dict(other.state_dict())  # copies into the same tensors, as a checkpoint load does
    x = np.random.default_rng(2).standard_normal((9, 23)).astype(np.float32)
    np.testing.assert_allclose(kernel.forward_and_gradient(x)[1], _torch_reference(other, x, 0)[1],
                               rtol=1e-4, atol=1e-6)


def test_networks_it_does_not_cover_are_refused():
    with pytest.raises(ValueError, match="softmax"):
        TabularMoEGradient.from_module(_net(router_scoring="sigmoid"))
    with pytest.raises(ValueError, match="dropless"):
        TabularMoEGradient.from_module(_net(capacity_factor=1.25))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="numeric inputs only"):
        TabularMoEGradient.from_module(TabularMoE(TabularMoEConfig(num_numeric=3, categorical_cardinalities=[4])))
    with pytest.raises(TypeError, match="TabularMoE"):
        TabularMoEGradient.from_module(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="float32 CPU"):
        TabularMoEGradient.from_module(_net().double())
    with pytest.raises(ValueError, match=r"expected \(N, 23\)"):
        TabularMoEGradient.from_module(_net()).forward_and_gradient(np.zeros((2, 5), dtype=np.float32))
