"""Fused kernels against their eager references: grouped experts, and the compiled model."""

import copy

import pytest
import torch

from core import MoEConfig, MoELayer
from core.blocks import TabularMoE, TabularMoEConfig
from core.fused import GroupedExperts, bias_gelu_layernorm, fuse_model, group_experts


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("min_active", [1, 100])  # grouped GEMM, and the loop fallback
def test_grouped_experts_match_the_loop_forward_and_backward(capacity_factor, min_active):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32,
                               capacity_factor=capacity_factor))
    grouped = copy.deepcopy(layer)
    grouped.experts = GroupedExperts.from_experts(grouped.experts, min_active_experts=min_active)
    x = torch.randn(2, 40, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref, out = layer(x), grouped(x2)
    torch.testing.assert_close(out.output, ref.output, atol=1e-5, rtol=1e-5)
    assert out.dropped == ref.dropped
    ref.output.square().sum().backward()
    out.output.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grouped.experts.w_in.grad, layer.experts.w_in.grad, atol=1e-5, rtol=1e-4)


def test_group_experts_keeps_the_state_dict():
    torch.manual_seed(0)
    model = TabularMoE(TabularMoEConfig(num_numeric=4, moe=MoEConfig(num_experts=4, hidden_size=8,
                                                                     intermediate_size=16)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group_experts(model)
    assert isinstance(model.layers[0].experts, GroupedExperts)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compiled_model_matches_eager_across_batch_sizes():
    """The one compiled test (inductor is slow to start): fused dense parts + eager dispatch."""
    torch.manual_seed(0)
    model = TabularMoE(TabularMoEConfig(num_numeric=6, categorical_cardinalities=[3], moe=MoEConfig(
        num_experts=4, top_k=2, hidden_size=16, intermediate_size=32))).eval()
    fused = fuse_model(copy.deepcopy(model))
    with torch.inference_mode():
        for rows in (1, 33):
            x = (torch.randn(rows, 6), torch.randint(0, 3, (rows, 1)))
            torch.testing.assert_close(fused(*x)[0], model(*x)[0], atol=1e-5, rtol=1e-5)
        h = torch.randn(7, 16)
        params = torch.randn(16), torch.rand(16) + 0.5, torch.randn(16)
        compiled = torch.compile(bias_gelu_layernorm, dynamic=True)
        for got, want in zip(compiled(h, *params), bias_gelu_layernorm(h, *params), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_model_on_cuda_matches_eager():
    torch.manual_seed(0)
    model = TabularMoE(TabularMoEConfig(num_numeric=6, moe=MoEConfig(num_experts=4, hidden_size=16,
                                                                     intermediate_size=32))).eval().cuda()
    fused = fuse_model(copy.deepcopy(model))
    x = torch.randn(9, 6, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(fused(x)[0], model(x)[0], atol=1e-4, rtol=1e-4)
