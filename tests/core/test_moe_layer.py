import itertools

import pytest
import torch

from core import DenseFFN, MoEConfig, MoELayer
from core.moe import GATHER_BELOW


def _copy_expert_into_dense(layer: MoELayer, expert: int) -> DenseFFN:
    cfg = layer.config
    dense = DenseFFN(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size)
    with torch.no_grad():
        dense.up.weight.copy_(layer.experts.w_in[expert].t())
        dense.down.weight.copy_(layer.experts.w_out[expert].t())
    return dense


def test_seed_example_config_loads():
    cfg = MoEConfig(**{"num_experts": 64, "top_k": 2, "expert_capacity": 32, "hidden_size": 4096,
                       "intermediate_size": 16384})
    assert cfg.capacity(10_000) == 32 and not cfg.dropless


@pytest.mark.parametrize("shape", [(2, 5, 16), (9, 16)])
def test_one_expert_top1_equals_dense_ffn_forward_and_backward(shape):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=1, top_k=1, hidden_size=16, intermediate_size=32))
    dense = _copy_expert_into_dense(layer, 0)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x).output
    ref = dense(x_ref)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.experts.w_in.grad[0], dense.up.weight.grad.t())
    torch.testing.assert_close(layer.experts.w_out.grad[0], dense.down.weight.grad.t())


def test_dropless_equals_capacity_mode_with_room_for_all():
    torch.manual_seed(1)
    dropless = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=24, intermediate_size=48))
    roomy = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=24, intermediate_size=48,
                               expert_capacity=200))
    roomy.load_state_dict(dropless.state_dict())
    x = torch.randn(4, 50, 24)
    a, b = dropless(x), roomy(x)
    assert b.dropped.item() == 0
    torch.testing.assert_close(a.output, b.output)
    a.output.square().sum().backward()
    b.output.square().sum().backward()
    for (name, p), (_, q) in zip(dropless.named_parameters(), roomy.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("num_experts,top_k", list(itertools.product([16, 32, 64, 128], [2, 3, 4])))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_every_supported_pair_runs_and_weights_sum_to_one(num_experts, top_k, scoring):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=8, intermediate_size=8,
                               router_scoring=scoring))
    x = torch.randn(64, 8)
    routing = layer.router(x)
    assert routing.expert_index.shape == (64, top_k)
    assert (routing.expert_index.sort(-1).values.diff(dim=-1) > 0).all(), "a token picked an expert twice"
    torch.testing.assert_close(routing.weight.sum(-1), torch.ones(64))
    out = layer(x)
    assert out.output.shape == x.shape and torch.isfinite(out.output).all()
    assert out.expert_load.sum().item() == 64 * top_k


def test_unnormalised_softmax_weights_are_the_top_k_probabilities():
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=8, intermediate_size=8,
                               normalize_weights=False))
    routing = layer.router(torch.randn(32, 8))
    torch.testing.assert_close(routing.weight, routing.probs.topk(2, dim=-1).values)
    assert (routing.weight.sum(-1) < 1).all()


def _layer_routing_everything_to_experts_0_and_1(capacity: int) -> MoELayer:
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=4, intermediate_size=8,
                               expert_capacity=capacity))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 5.0  # expert 0 first, expert 1 second for positive x[:, 0]
        layer.router.gate.weight[1, 0] = 4.0
    return layer


def test_tokens_over_capacity_are_counted_and_dropped_in_priority_order():
    layer = _layer_routing_everything_to_experts_0_and_1(capacity=3)
    x = torch.rand(10, 4) + 0.5
    out = layer(x)
    assert out.expert_load[:2].tolist() == [10, 10]
    assert out.dropped.item() == 2 * (10 - 3)
    # The first three tokens (in order) were served by both experts; the rest by neither.
    reference = _layer_routing_everything_to_experts_0_and_1(capacity=100)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out.output[:3], reference(x).output[:3])
    assert out.output[3:].abs().max().item() == 0.0


def test_capacity_factor_sets_capacity_from_the_even_share():
    cfg = MoEConfig(num_experts=16, top_k=2, hidden_size=4, intermediate_size=4, capacity_factor=1.25)
    assert cfg.capacity(64) == 10  # 64 * 2 / 16 = 8, times 1.25


@pytest.mark.parametrize("capacity", [None, 4])
def test_static_export_path_equals_sorted_path(capacity):
    torch.manual_seed(3)
    layer = MoELayer(MoEConfig(num_experts=16, top_k=3, hidden_size=12, intermediate_size=20,
                               expert_capacity=capacity, num_shared_experts=1))
    x = torch.randn(40, 12)
    sorted_out = layer(x)
    layer.static = True
    static_out = layer(x)
    torch.testing.assert_close(sorted_out.output, static_out.output, atol=1e-5, rtol=1e-5)
    assert sorted_out.dropped.item() == static_out.dropped.item()


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=8, intermediate_size=16,
                               num_shared_experts=1))
    out = layer(torch.randn(3, 7, 8))
    (out.output.sum() + out.aux_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_balancing_losses_fall_on_a_short_toy_training_run():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=16, top_k=2, hidden_size=16, intermediate_size=16,
                    aux_loss_weight=1.0, z_loss_weight=0.1)
    layer = MoELayer(cfg)
    with torch.no_grad():  # start badly skewed: a few experts take everything
        layer.router.gate.weight[:3] += 2.0
    x = torch.randn(512, 16).abs()
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    first = layer(x)
    for _ in range(60):
        out = layer(x)
        optimizer.zero_grad()
        out.aux_loss.backward()
        optimizer.step()
    last = layer(x)
    assert last.load_balancing_loss < 0.8 * first.load_balancing_loss
    assert last.z_loss < first.z_loss
    assert last.expert_load.max() < first.expert_load.max()


def test_bias_balancing_evens_out_load_on_a_skewed_input():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=16, top_k=2, hidden_size=8, intermediate_size=8, router_scoring="sigmoid",
                    bias_balancing=True, bias_update_rate=0.01, aux_loss_weight=0.0)
    layer = MoELayer(cfg).train()
    x = torch.randn(1024, 8) + 2.0  # every token looks alike: the router sends them to few experts
    before = layer(x).expert_load.float()
    with torch.no_grad():
        for _ in range(300):
            layer(x)
    after = layer(x).expert_load.float()
    assert (before.std() / before.mean()) > 1.0
    assert (after.std() / after.mean()) < 0.5 * (before.std() / before.mean())
    assert (after > 0).sum() > (before > 0).sum()


@pytest.mark.parametrize("changes,message", [
    ({"top_k": 5, "num_experts": 4}, "exceeds num_experts"),
    ({"num_experts": 0}, "num_experts"),
    ({"expert_capacity": -1}, "expert_capacity"),
    ({"capacity_factor": -0.5}, "capacity_factor"),
    ({"router_scoring": "tanh"}, "router_scoring"),
    ({"expert_capacity": 4, "capacity_factor": 1.0}, "not both"),
])
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**changes)


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match="num_expert"):
        MoEConfig.from_dict({"num_expert": 8})


def test_bf16_input_routes_in_fp32_and_returns_bf16():
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=8, intermediate_size=8)).to(torch.bfloat16)
    out = layer(torch.randn(10, 8, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32


def _per_token_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The MoE maths one token and one slot at a time: sum_k weight_k * expert_k(x)."""
    routing = layer.router(x)
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(routing.weight[t, j] * layer.experts.expert_mlp(int(routing.expert_index[t, j]), x[t:t + 1])[0]
                        for j in range(routing.expert_index.shape[1])))
    return torch.stack(rows)


@pytest.mark.parametrize("num_experts,top_k,tokens,scoring,shared", [
    (16, 2, 1, "softmax", 0), (16, 2, 9, "softmax", 0), (16, 4, 5, "sigmoid", 1), (64, 2, 12, "softmax", 0),
    (128, 3, 3, "sigmoid", 0)])
def test_small_batch_gathered_path_equals_sorted_dispatch_forward_and_backward(num_experts, top_k, tokens, scoring,
                                                                               shared):
    torch.manual_seed(num_experts + top_k + tokens)
    layer = MoELayer(MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=16, intermediate_size=32,
                               router_scoring=scoring, num_shared_experts=shared))
    x = torch.randn(tokens, 16)
    assert layer.eval()._gathers(tokens, None) and not layer.train()._gathers(tokens, None)

    def run(training: bool):
        layer.train(training)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out.output * torch.linspace(-1, 1, 16)).sum().backward()  # a non-uniform upstream gradient
        return out, xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    sorted_out, sorted_dx, sorted_grads = run(training=True)  # training always sorts
    gathered_out, gathered_dx, gathered_grads = run(training=False)
    torch.testing.assert_close(gathered_out.output, sorted_out.output, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        reference = _per_token_reference(layer, x) + sum((s(x) for s in layer.shared_experts), torch.zeros(()))
    torch.testing.assert_close(gathered_out.output, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered_dx, sorted_dx, rtol=1e-5, atol=1e-6)
    for name, grad in sorted_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name} differs")
    for field in ("expert_load", "dropped"):  # the losses are zero in eval mode (next test)
        torch.testing.assert_close(getattr(gathered_out, field), getattr(sorted_out, field), msg=field)


def test_losses_only_in_training_and_load_always():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=16, intermediate_size=32))
    x = torch.randn(40, 16)
    trained, evaluated = layer.train()(x), layer.eval()(x)
    assert trained.load_balancing_loss > 0.5 and trained.z_loss > 0 and trained.aux_loss > 0
    for field in ("aux_loss", "load_balancing_loss", "z_loss"):
        value = getattr(evaluated, field)
        assert value.dim() == 0 and value.dtype == torch.float32 and value.item() == 0.0, field
    torch.testing.assert_close(evaluated.expert_load, trained.expert_load)
    assert int(evaluated.expert_load.sum()) == 40 * 2
    torch.testing.assert_close(evaluated.output, trained.output)  # no dropout in the layer: same maths


def test_gathered_path_only_below_its_size_and_where_nothing_can_drop():
    layer = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=64, intermediate_size=128)).eval()
    below = GATHER_BELOW // (2 * 64 * 128)  # tokens whose gathered weights reach the limit
    assert layer._gathers(below - 1, None) and not layer._gathers(below, None)
    assert layer._gathers(8, 8) and not layer._gathers(8, 7)  # capacity 7 < 8 tokens: an expert could drop one
    big = MoELayer(MoEConfig(num_experts=64, top_k=2, hidden_size=512, intermediate_size=2048)).eval()
    assert not big._gathers(1, None)  # copying 2 x 1M-element matrices costs more than sorting
    capped = MoELayer(MoEConfig(num_experts=16, top_k=2, hidden_size=8, intermediate_size=8, expert_capacity=2))
    x = torch.randn(1, 8).repeat(6, 1)  # six alike tokens pick the same two experts: 4 of each 6 drop
    capped.eval()
    eval_out = capped(x)
    capped.train()
    train_out = capped(x)
    assert eval_out.dropped.item() == train_out.dropped.item() == 8
    torch.testing.assert_close(eval_out.output, train_out.output)  # the sorted path, drops and all, both times
