"""core.compress.prune: removing channels / experts that were exactly zero / never routed changes
nothing (forward and backward), and the removal really shrinks the model, which still exports."""

import pytest
import torch
from torch import nn

from core.compress.prune import expert_load, l1_penalty, prune_channels, prune_experts, shrink_moe_layer
from core.config import MoEConfig
from core.moe import MoELayer


class LSTMRegressor(nn.Module):
    """The shape of the RUL student: stacked LSTM -> last state -> MLP head -> (rul, aux)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 1))

    def forward(self, x):
        hidden, _ = self.lstm(x)
        return self.head(hidden[:, -1]).squeeze(-1), x.new_zeros(())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 12, kernel_size=3, padding=1)
        self.head = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 1))

    def forward(self, x):  # (batch, window, 6)
        return self.head(torch.relu(self.conv(x.transpose(1, 2))).mean(dim=-1)).squeeze(-1)


def zero_lstm_units(lstm: nn.LSTM, units: torch.Tensor) -> None:
    """Every weight of these hidden units zero: each then outputs exactly 0 at every step."""
    hidden = lstm.hidden_size
    for k in range(lstm.num_layers):
        for name in (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"):
            getattr(lstm, name).view(4, hidden, -1)[:, units] = 0
        getattr(lstm, f"weight_hh_l{k}")[:, units] = 0
        if k:
            getattr(lstm, f"weight_ih_l{k}")[:, units] = 0


def grads(model, x):
    model.zero_grad()
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()
    return x.grad.clone() if x.grad is not None else None


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_and_mlp_channels_that_were_zero_are_removed_exactly(layers):
    torch.manual_seed(layers)
    model = LSTMRegressor(layers)
    dead = torch.arange(0, 16, 2)  # half the hidden units
    with torch.no_grad():
        zero_lstm_units(model.lstm, dead)
        model.head[0].weight[:, dead] = 0
        model.head[0].weight[:4] = 0  # and half the head's channels
        model.head[0].bias[:4] = 0
        model.head[2].weight[:, :4] = 0
    model.eval()
    x = torch.randn(3, 30, 6, requires_grad=True)
    before, grad_before = model(x)[0].detach(), grads(model, x)
    x.grad = None
    counts = prune_channels(model, x.detach(), ratio=0.5, ignored_layers=[model.head[2]],
                            output_transform=lambda out: out[0])
    assert model.lstm.hidden_size == 8 and model.head[0].out_features == 4 and model.lstm.weight_hh_l0.shape == (32, 8)
    assert counts["parameters_after"] < 0.4 * counts["parameters_before"]
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads(model, x), grad_before, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() >= 2)


def test_conv_channels_that_were_zero_are_removed_exactly():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        model.conv.weight[6:] = 0
        model.conv.bias[6:] = 0
        model.head[0].weight[:, 6:] = 0
        model.head[0].weight[5:] = 0
        model.head[0].bias[5:] = 0
    x = torch.randn(4, 20, 6)
    before = model(x).detach()
    prune_channels(model, x, ratio=0.5, ignored_layers=[model.head[2]])
    assert model.conv.out_channels == 6 and model.head[0].out_features == 5
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_lowest_l1_channels_go_first_and_l1_penalty_counts_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1, 0.01, 1, 0.02, 1, 0.03])[:, None])
        model[0].bias.zero_()
    expected = sum(m.weight.abs().sum() for m in (model[0], model[2])) * 0.1
    assert l1_penalty(model, 0.1).item() == pytest.approx(expected.item())
    keep = model[0].weight[[0, 2, 4]].detach().clone()
    prune_channels(model, torch.randn(2, 4), ratio=0.5, ignored_layers=[model[2]])
    torch.testing.assert_close(model[0].weight, keep)


def test_ratio_out_of_range_is_refused():
    with pytest.raises(ValueError, match="ratio"):
        prune_channels(nn.Linear(2, 2), torch.zeros(1, 2), ratio=1.0)


def moe_layer(**overrides):
    config = MoEConfig(**{"num_experts": 8, "top_k": 2, "hidden_size": 16, "intermediate_size": 24, **overrides})
    return MoELayer(config)


def test_experts_never_routed_are_dropped_without_changing_outputs():
    torch.manual_seed(0)
    layer = moe_layer().eval()
    with torch.no_grad():
        layer.router.gate.weight[[1, 4, 6]] = 0
        layer.router.gate.weight[[1, 4, 6], 0] = -50.0  # feature 0 is kept >= 1 below: never chosen
    x = torch.randn(64, 16)
    x[:, 0] = x[:, 0].abs() + 1
    x.requires_grad_(True)
    loads = expert_load(layer, [x[:32].detach(), x[32:].detach()], run=lambda m, batch: m(batch))
    assert loads[""][[1, 4, 6]].sum() == 0 and loads[""].sum() == 64 * 2
    out = layer(x).output
    out.square().sum().backward()
    grad = x.grad.clone()
    shrunk, result = shrink_moe_layer(layer, loads[""], keep=5)
    assert result.kept == [0, 2, 3, 5, 7] and shrunk.config.num_experts == 5
    assert shrunk.router.gate.weight.shape == (5, 16) and shrunk.experts.w_in.shape == (5, 16, 24)
    x.grad = None
    out_shrunk = shrunk(x).output
    torch.testing.assert_close(out_shrunk, out, rtol=1e-5, atol=1e-6)
    out_shrunk.square().sum().backward()
    torch.testing.assert_close(x.grad, grad, rtol=1e-5, atol=1e-6)
    assert shrunk.experts.w_in.grad is not None and shrunk.router.gate.weight.grad is not None


def test_prune_experts_replaces_layers_in_a_model_and_merge_keeps_the_mass():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), moe_layer(top_k=2))
    load = torch.tensor([100, 0, 5, 50, 80, 1, 60, 70])
    results = prune_experts(model, {"1": load}, keep=4, mode="merge")
    assert results["1"].kept == [0, 4, 6, 7] and set(results["1"].merged_into) == {1, 2, 3, 5}
    assert isinstance(model[1], MoELayer) and model[1].config.num_experts == 4
    assert model[1](torch.randn(3, 16)).output.shape == (3, 16)
    with pytest.raises(ValueError, match="keep"):
        shrink_moe_layer(moe_layer(), load, keep=9)
