"""core.compress.tabular and TabularMoE's hashed experts: a compressed network's config rebuilds
it (so a saved folder loads through the usual loader), hashed experts store 8x fewer values and
export dense, expert pruning keeps the most-routed experts, and a distilled student learns."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.blocks import TabularMoE, TabularMoEConfig
from core.compress.hashed import HashedWeight, hashed_parameters
from core.compress.prune import channel_pruner, prune_channels, prune_step
from core.compress.tabular import (
    TabularFineTuneConfig,
    compress_tabular,
    hash_tabular_experts,
    logits_of,
    prune_tabular_experts,
)
from core.config import MoEConfig


def config(**changes) -> TabularMoEConfig:
    return TabularMoEConfig(num_numeric=6, categorical_cardinalities=[4], num_outputs=2,
                            moe=MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=32), **changes)


def data(rows: int, seed: int):
    """Two outputs from a rule on the numeric inputs and the category (both learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g)
    c = torch.randint(0, 4, (rows, 1), generator=g)
    y = torch.stack([(x[:, 0] + x[:, 1] * (c[:, 0] == 2) > 0.5), (x[:, 2] * x[:, 3] > 0)], dim=1).float()
    return (x, c), y


def test_a_hashed_config_rebuilds_the_same_network_from_its_state_dict():
    torch.manual_seed(0)
    net = TabularMoE(config(hashed_compression=8)).eval()
    pool, virtual = hashed_parameters(net)
    assert virtual == 2 * 2 * 8 * 16 * 32 and pool == virtual // 8
    assert isinstance(net.layers[0].experts.parametrizations.w_in[0], HashedWeight)
    rebuilt = TabularMoE(net.config).eval()
    rebuilt.load_state_dict(net.state_dict())
    (x, c), _ = data(64, 1)
    assert torch.equal(rebuilt(x, c)[0], net(x, c)[0])
    dense = net.dense_copy()
    assert hashed_parameters(dense) == (0, 0) and hashed_parameters(net) == (pool, virtual)  # net stays hashed
    torch.testing.assert_close(dense(x, c)[0], net(x, c)[0])
    with pytest.raises(ValueError, match="hashed_compression"):
        config(hashed_compression=0.5)


def test_hashing_a_trained_network_projects_its_weights_and_keeps_the_source_dense():
    torch.manual_seed(0)
    net = TabularMoE(config()).eval()
    hashed = hash_tabular_experts(net, compression=8).eval()
    assert hashed.config.hashed_compression == 8 and net.config.hashed_compression is None
    assert hashed_parameters(net) == (0, 0)
    rebuilt = TabularMoE(hashed.config).eval()
    rebuilt.load_state_dict(hashed.state_dict())
    (x, c), _ = data(32, 2)
    assert torch.equal(rebuilt(x, c)[0], hashed(x, c)[0])
    with pytest.raises(ValueError, match="already hashed"):
        hash_tabular_experts(hashed, compression=4)


def test_expert_pruning_keeps_the_most_routed_experts_and_its_config_rebuilds_it():
    torch.manual_seed(0)
    net = TabularMoE(config()).eval()
    with torch.no_grad():  # expert 5 of layer 0 wins every row: it must be kept
        net.layers[0].router.gate.weight[5] += 100 * net.layers[0].router.gate.weight[5].sign()
    inputs, _ = data(512, 3)
    pruned, routing = prune_tabular_experts(net, inputs, keep=3)
    assert pruned.config.moe.num_experts == 3 and net.config.moe.num_experts == 8
    assert 5 in routing["layers.0"]["kept"] and len(routing["layers.1"]["kept"]) == 3
    load = torch.tensor(routing["layers.1"]["load"])
    assert set(routing["layers.1"]["kept"]) == set(torch.argsort(load, descending=True, stable=True)[:3].tolist())
    rebuilt = TabularMoE(pruned.config).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    assert torch.equal(rebuilt(*inputs)[0], pruned.eval()(*inputs)[0])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="keep-experts"):
        prune_tabular_experts(net, inputs, keep=8)


def test_a_distilled_student_learns_the_teacher_and_is_smaller():
    torch.manual_seed(0)
    (x, c), y = data(4000, 4)
    (vx, vc), vy = data(1000, 5)
    teacher = TabularMoE(config()).eval()
    settings = TabularFineTuneConfig(epochs=12, patience=12, learning_rate=5e-3, monitor="val_auc")
    # the teacher: a network of the full size trained on the labels alone (no soft targets)
    trained_teacher, _, _ = compress_tabular(
        teacher, "distill", (x, c), y, (vx, vc), vy, settings, teacher_logits=None,
        student={"num_experts": 8, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2})
    with torch.no_grad():
        soft = trained_teacher(x, c)[0]
    student, details, result = compress_tabular(
        trained_teacher, "distill", (x, c), y, (vx, vc), vy, settings, teacher_logits=soft,
        student={"num_experts": 2, "hidden_size": 8, "intermediate_size": 16, "num_layers": 1})
    assert details["parameters"] < details["source_parameters"] / 4 and details["alpha"] == 0.5
    with torch.no_grad():
        scores = student(vx, vc)[0][:, 0].numpy()
    assert roc_auc_score(vy[:, 0].numpy(), scores) > 0.85
    assert result.best_metrics["val_auc"] == pytest.approx(roc_auc_score(vy[:, 0].numpy(), scores), abs=1e-6)


def test_logits_of_inverts_the_sigmoid_and_clips():
    p = np.array([0.0, 0.25, 0.5, 1.0])
    logits = logits_of(p)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(torch.sigmoid(logits[1:3]), torch.tensor([0.25, 0.5]))


class LSTMRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 20, batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.GELU(), torch.nn.Linear(10, 1))

    def forward(self, x):
        hidden, _ = self.lstm(x)
        return self.head(hidden[:, -1]).squeeze(-1), x.new_zeros(())


def test_iterative_channel_pruning_ends_at_the_one_step_widths_through_narrower_ones():
    torch.manual_seed(0)
    one, steps = LSTMRegressor(), LSTMRegressor()
    example = torch.zeros(2, 5, 6)
    prune_channels(one, example, ratio=0.4, ignored_layers=[one.head[-1]], output_transform=lambda out: out[0])
    pruner = channel_pruner(steps, example, ratio=0.4, steps=4, ignored_layers=[steps.head[-1]],
                            output_transform=lambda out: out[0])
    widths = []
    for _ in range(4):
        prune_step(steps, pruner)
        widths.append(steps.lstm.hidden_size)
    assert widths == sorted(widths, reverse=True) and widths[0] < 20
    assert (steps.lstm.hidden_size, steps.head[0].out_features) == (one.lstm.hidden_size, one.head[0].out_features)
    assert steps(torch.randn(3, 5, 6))[0].shape == (3,)
    with pytest.raises(ValueError, match="steps"):
        channel_pruner(LSTMRegressor(), example, ratio=0.4, steps=0)
