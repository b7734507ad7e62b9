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
    moe_layers: int = 2  # residual MoE layers on the LSTM's last state (moe kind); cheap: one token per engine
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
    out = nn.Linear(hidden, 1)
    nn.init.constant_(out.bias, 0.5)  # start mid-range (RUL/cap = 0.5), not at the clip at 0
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), out)


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
    """The stacked LSTM over the window, then residual MoE layers from `core` on its state -> RUL.

    Each engine's window summary is a token; the router sends it to two of eight experts, which
    can take different operating regimes (FD002/FD004: the state carries the regime one-hot of
    the cycles) and stages of wear, instead of one dense head for every case. (A per-cycle MoE
    before the LSTM was tried first: it fitted single noisy cycles and did worse on FD001.)
    forward(x (batch, window, features)) -> (rul (batch,), aux scalar: the MoE balancing losses).
    """

    def __init__(self, config: RULNetConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.lstm = nn.LSTM(config.num_features, hidden, num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(config.moe_layers))
        self.moes = nn.ModuleList(MoELayer(config.moe) for _ in range(config.moe_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.head = _head(hidden, hidden // 2, config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, _ = self.lstm(x)  # (batch, window, H)
        h = states[:, -1]  # (batch, H)
        aux = x.new_zeros(())
        for norm, moe in zip(self.norms, self.moes, strict=True):
            routed = moe(norm(h))
            h, aux = h + self.dropout(routed.output), aux + routed.aux_loss
        out = self.head(h).squeeze(-1) * self.config.rul_cap  # (batch,)
        if not self.training:
            out = out.clamp(0.0, self.config.rul_cap)
        return out, aux


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
