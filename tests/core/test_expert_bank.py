"""The three expert banks against the written interface, and against each other through MoELayer.

MegaBlocks-style: one set of weights, three implementations (`Experts`, `GroupedExperts`,
`LinearExperts`), the same layer outputs and gradients on every dispatch path MoELayer takes.
"""

import copy

import pytest
import torch
from torch import nn

from core import MoEConfig, MoELayer
from core.experts import ExpertBank, Experts
from core.fused import GroupedExperts
from core.quantization import LinearExperts


def banks(experts: Experts) -> dict[str, nn.Module]:
    return {"stacked": experts,
            "grouped": GroupedExperts.from_experts(experts, min_active_experts=1),  # always the grouped GEMM
            "linear": LinearExperts.from_experts(experts)}


def expert_weight_grads(bank: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """d/d(w_in) (E, H, I) and d/d(w_out) (E, I, H) in the stacked layout, whichever bank holds them."""
    if isinstance(bank, LinearExperts):  # an expert no token reached has no gradient: zeros, as stacked
        def grad(linear: nn.Linear) -> torch.Tensor:
            return torch.zeros_like(linear.weight.t()) if linear.weight.grad is None else linear.weight.grad.t()
        return torch.stack([grad(up) for up in bank.up]), torch.stack([grad(down) for down in bank.down])
    return bank.w_in.grad, bank.w_out.grad


def test_every_bank_satisfies_the_protocol():
    experts = Experts(num_experts=4, hidden_size=8, intermediate_size=16)
    for bank in banks(experts).values():
        assert isinstance(bank, ExpertBank)
        assert bank.num_experts == 4 and bank.activation == "gelu"
    assert not isinstance(nn.Linear(8, 8), ExpertBank)


# training: the sorted dispatch; eval with 3 tokens: the gathered path for stacked weights (the
# others keep the sorted one); static: the dense path that export takes.
@pytest.mark.parametrize("mode", ["train", "eval_small", "static"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_banks_agree_through_the_layer_forward_and_backward(mode, capacity_factor):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32,
                       capacity_factor=capacity_factor, num_shared_experts=1)
    reference = MoELayer(config, static=mode == "static")
    tokens = 3 if mode == "eval_small" else 40
    x = torch.randn(2, tokens, 16)
    results = {}
    for name, bank in banks(copy.deepcopy(reference.experts)).items():
        layer = copy.deepcopy(reference)
        layer.experts = bank
        layer.train(mode != "eval_small")
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        out.output.square().sum().backward()
        results[name] = (out.output, out.dropped, x_in.grad, layer.router.gate.weight.grad,
                         *expert_weight_grads(bank))
    want = results.pop("stacked")
    for name, got in results.items():
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4, msg=f"{name}: output")
        assert int(got[1]) == int(want[1]), f"{name}: dropped"
        for label, g, w in zip(("input", "router", "w_in", "w_out"), got[2:], want[2:], strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"{name}: {label} gradient")
