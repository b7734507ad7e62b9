"""RUL networks over a window of normalised cycles: the LSTM baseline and the MoE model.

Both read (batch, window, features) and return (RUL (batch,), aux loss scalar). They regress
RUL / cap and scale back, and in eval mode clip to [0, cap] (a RUL below zero or past the
piecewise-linear cap is never a valid answer; training sees the raw output so no gradient dies).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from core import MoEConfig, MoELayer


@dataclass
class RULNetConfig:
    kind: Literal["lstm", "moe"] = "lstm"
    num_features: int = 14  # the 14 informative sensors (+ 6 regime one-hots on FD002/FD004)
    window: int = 30  # the field's standard window of cycles
    rul_cap: float = 125.0  # piecewise-linear target cap, the field's standard
    hidden_size: int = 64  # Zheng et al. 2017 use 64-unit LSTMs; enough for 14-20 inputs
    num_layers: int = 2  # LSTM layers, in both kinds (Zheng et al. 2017 stack two)
    moe_layers: int = 1  # per-cycle MoE layers before the LSTM (moe kind); each adds ~60% step time on CPU
    dropout: float = 0.1  # light: the training sets hold 100-260 engines
    # Eight small experts, two per cycle: enough for the six operating regimes to take their own
    # experts on FD002/FD004 while training stays affordable on a 2-core CPU. The balancing losses
    # are scaled down from the LM defaults (0.01 / 0.001): the task loss here is an MSE on RUL/cap
    # of about 0.01, which the default weights would match and drown.
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=8, top_k=2, hidden_size=64, intermediate_size=128, aux_loss_weight=1e-3,
        z_loss_weight=1e-4))

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        assert self.kind in ("lstm", "moe"), f"kind must be 'lstm' or 'moe', got {self.kind!r}"
        assert self.num_features >= 1 and self.window >= 1 and self.rul_cap > 0
        assert self.kind == "lstm" or self.moe.hidden_size == self.hidden_size, \
            "moe.hidden_size must equal hidden_size"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _head(width: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


class LSTMRegressor(nn.Module):
    """Stacked LSTM over the window, last hidden state -> MLP -> RUL (the seed's model).

    forward(x (batch, window, features)) -> (rul (batch,), aux 0-dim zero).
    """

    def __init__(self, config: RULNetConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.num_features, config.hidden_size, num_layers=config.num_layers,
                            batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.head = _head(config.hidden_size, config.hidden_size // 2, config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.lstm(x)  # (batch, window, H)
        out = self.head(hidden[:, -1]).squeeze(-1) * self.config.rul_cap  # (batch,)
        if not self.training:
            out = out.clamp(0.0, self.config.rul_cap)
        return out, x.new_zeros(())


class MoERULNet(nn.Module):
    """Per-cycle MoE layers from `core`, then the stacked LSTM over the window, then an MoE head -> RUL.

    Every cycle is a token: it is embedded and passed through residual MoE layers whose router
    sees the cycle's sensors and, on FD002/FD004, its regime one-hot, so experts can specialise
    by operating regime before the LSTM reads the trend. A second MoE layer refines the LSTM's
    last state (tokens = engines), where experts can take different stages of wear.
    forward(x (batch, window, features)) -> (rul (batch,), aux scalar: the MoE balancing losses).
    """

    def __init__(self, config: RULNetConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed = nn.Linear(config.num_features, hidden)
        self.cycle_norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(config.moe_layers))
        self.cycle_moes = nn.ModuleList(MoELayer(config.moe) for _ in range(config.moe_layers))
        self.lstm = nn.LSTM(hidden, hidden, num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.state_norm = nn.LayerNorm(hidden)
        self.state_moe = MoELayer(config.moe)
        self.dropout = nn.Dropout(config.dropout)
        self.head = _head(hidden, hidden // 2, config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)  # (batch, window, H)
        aux = x.new_zeros(())
        for norm, moe in zip(self.cycle_norms, self.cycle_moes, strict=True):
            routed = moe(norm(h))
            h, aux = h + self.dropout(routed.output), aux + routed.aux_loss
        states, _ = self.lstm(h)  # (batch, window, H)
        last = states[:, -1]  # (batch, H)
        routed = self.state_moe(self.state_norm(last))
        last = last + self.dropout(routed.output)
        out = self.head(last).squeeze(-1) * self.config.rul_cap  # (batch,)
        if not self.training:
            out = out.clamp(0.0, self.config.rul_cap)
        return out, aux + routed.aux_loss


def default_net_config(kind: str, **overrides: Any) -> RULNetConfig:
    """The benchmarked configuration of each kind (overrides replace fields)."""
    return RULNetConfig(kind=kind, **overrides)


def build_rul_net(config: RULNetConfig | dict[str, Any]) -> nn.Module:
    config = config if isinstance(config, RULNetConfig) else RULNetConfig(**config)
    return LSTMRegressor(config) if config.kind == "lstm" else MoERULNet(config)


class RULOnly(nn.Module):
    """Wraps a RUL net to return only the RUL, for ONNX export. forward(window) -> (batch,)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net(window)[0]
