"""core.compress.hashed against a dense reference that materialises the hashed matrix by hand,
forward and backward, for a Linear, an LSTM and MoE experts; what is stored is the pool only."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.compress.hashed import (
    HashedWeight,
    buckets_and_signs,
    hash_weights,
    hashed_parameters,
    materialize,
    tensor_seed,
)
from core.config import MoEConfig
from core.moe import MoELayer


def reference_weight(pool: torch.Tensor, shape, seed: int, pool_size: int) -> torch.Tensor:
    """The virtual matrix as HashedNets defines it: w[n] = pool[h(n)] * xi(n), element by element."""
    bucket, sign = buckets_and_signs(math.prod(shape), pool_size, seed)
    return torch.stack([pool[b] * s for b, s in zip(bucket.tolist(), sign.tolist(), strict=True)]).reshape(shape)


def test_hash_is_spread_and_stable():
    bucket, sign = buckets_and_signs(40_000, 5_000, seed=7)
    counts = torch.bincount(bucket, minlength=5_000).float()
    # a uniform hash fills buckets ~Poisson(8): std/mean 0.35, about 5000 * e^-8 = 1.7 buckets empty
    assert 0.3 < counts.std() / counts.mean() < 0.4 and (counts == 0).sum() < 10
    assert 0.45 < (sign > 0).float().mean() < 0.55
    again, _ = buckets_and_signs(40_000, 5_000, seed=7)
    other, _ = buckets_and_signs(40_000, 5_000, seed=8)
    assert torch.equal(bucket, again) and not torch.equal(bucket, other)


def test_hashed_linear_equals_the_dense_reference_forward_and_backward():
    torch.manual_seed(0)
    layer = nn.Linear(24, 10)
    hash_weights(layer, ["weight"], compression=8)
    parametrization = layer.parametrizations.weight[0]
    assert parametrization.pool_size == 30 and parametrization.compression == 8
    pool = layer.parametrizations.weight.original
    reference_pool = pool.detach().clone().requires_grad_(True)
    x = torch.randn(5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weight = reference_weight(reference_pool, (10, 24), tensor_seed("weight"), 30)
    out, out_ref = layer(x), F.linear(x_ref, weight, layer.bias.detach())
    torch.testing.assert_close(out, out_ref)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    out_ref.backward(upstream)
    torch.testing.assert_close(pool.grad, reference_pool.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert set(layer.state_dict()) == {"bias", "parametrizations.weight.original"}  # buckets are rebuilt, not stored


def test_assigning_a_dense_weight_projects_it_onto_the_pool():
    torch.manual_seed(0)
    hashed = HashedWeight(shape=(12, 9), compression=4, seed=3)
    pool = torch.randn(hashed.pool_size)
    torch.testing.assert_close(hashed.right_inverse(hashed(pool)), pool)  # a hashed weight projects onto itself
    dense = torch.randn(12, 9)
    best = hashed.right_inverse(dense)
    error = (hashed(best) - dense).square().sum()
    for _ in range(5):  # least squares: no other pool comes closer
        assert (hashed(best + 0.01 * torch.randn_like(best)) - dense).square().sum() > error
    with pytest.raises(ValueError, match="compression"):
        HashedWeight(shape=(2, 2), compression=0.5, seed=0)


def test_hashed_lstm_reads_its_virtual_weights_forward_and_backward():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 8, num_layers=2, batch_first=True)
    hash_weights(lstm, [n for n, p in lstm.named_parameters() if p.dim() == 2], compression=4)
    dense = nn.LSTM(5, 8, num_layers=2, batch_first=True)
    with torch.no_grad():
        for name, _ in dense.named_parameters():
            getattr(dense, name).copy_(getattr(lstm, name))
    x = torch.randn(3, 7, 5)
    torch.testing.assert_close(lstm(x)[0], dense(x)[0])
    for _ in range(2):  # twice: the second pass must see the updated pool, not a cached weight
        pool = lstm.parametrizations.weight_hh_l1.original
        lstm.zero_grad()
        lstm(x)[0].sum().backward()
        assert pool.grad.abs().sum() > 0
        with torch.no_grad():
            pool.add_(0.1)
    with torch.no_grad():
        dense.weight_hh_l1.copy_(lstm.weight_hh_l1)
    torch.testing.assert_close(lstm(x)[0], dense(x)[0])


def test_hashed_experts_equal_dense_experts_holding_the_virtual_weights():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32)
    hashed = MoELayer(config).train()
    achieved = hash_weights(hashed, ["experts.w_in", "experts.w_out"], compression=8)
    assert achieved == {"experts.w_in": 8.0, "experts.w_out": 8.0}
    pool, virtual = hashed_parameters(hashed)
    assert virtual == 2 * 8 * 16 * 32 and pool == virtual // 8
    dense = MoELayer(config).train()
    dense.load_state_dict({k: v for k, v in hashed.state_dict().items() if "parametrizations" not in k}, strict=False)
    with torch.no_grad():
        dense.experts.w_in.copy_(hashed.experts.w_in)
        dense.experts.w_out.copy_(hashed.experts.w_out)
    x = torch.randn(40, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = hashed(x), dense(x_ref)
    torch.testing.assert_close(out.output, out_ref.output)
    (out.output.square().sum() + out.aux_loss).backward()
    (out_ref.output.square().sum() + out_ref.aux_loss).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # the pool's gradient is the dense gradient gathered back through the hash: sum over its bucket of sign * grad
    parametrization = hashed.experts.parametrizations.w_in[0]
    expected = torch.zeros(parametrization.pool_size).index_add_(
        0, parametrization.bucket, dense.experts.w_in.grad.reshape(-1) * parametrization.sign)
    torch.testing.assert_close(hashed.experts.parametrizations.w_in.original.grad, expected)


def test_materialize_gives_an_ordinary_model_with_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 2))
    hash_weights(model, ["0.weight", "2.weight"], compression=3)
    x = torch.randn(4, 6)
    expected = model(x).detach()
    assert sum(p.numel() for p in model.parameters()) == 24 + 8 + 12 + 2
    materialize(model)
    assert sum(p.numel() for p in model.parameters()) == 6 * 12 + 12 + 12 * 2 + 2
    assert hashed_parameters(model) == (0, 0)
    torch.testing.assert_close(model(x), expected)
