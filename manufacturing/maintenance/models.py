"""RUL networks over a window of normalised cycles: the LSTM baseline and the MoE model.

Both read (batch, window, features) and return (RUL (batch,), aux loss scalar). They regress
RUL / cap and scale back, and in eval mode clip to [0, cap] (a RUL below zero or past the
piecewise-linear cap is never a valid answer; training sees the raw output so no gradient dies).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from core import MoEConfig, MoELayer
from core.blocks import MoETransformerBlock
from core.experts import Experts


@dataclass
class RULNetConfig:
    kind: Literal["lstm", "moe"] = "lstm"
    num_features: int = 14  # the 14 informative sensors (+ 6 regime one-hots on FD002/FD004)
    window: int = 30  # the field's standard window of cycles
    rul_cap: float = 125.0  # piecewise-linear target cap, the field's standard
    hidden_size: int = 64  # Zheng et al. 2017 use 64-unit LSTMs; enough for 14-20 inputs
    num_layers: int = 2  # LSTM layers (lstm kind; Zheng et al. 2017 stack two)
    moe_blocks: int = 1  # Transformer encoder blocks with MoE feed-forwards (moe kind)
    patch: int = 3  # cycles per token in the moe kind: 30 cycles -> 10 tokens
    # moe kind: tokens from conv then LSTM, or from the conv alone ("conv": a pure Transformer,
    # which overfitted the 80 FD001 training engines by epoch 5-10 in tuning runs on split seed 1)
    encoder: Literal["lstm", "conv"] = "lstm"
    num_heads: int = 4  # attention heads (moe kind): 16 dimensions each at hidden_size 64
    dropout: float = 0.1  # light: the training sets hold 100-260 engines
    # Independently seeded copies whose RULs are averaged (a seed ensemble): each member trains
    # on its own with early stopping; inference and the ONNX graph run them all.
    members: int = 1
    # Set by `moeworks compress` (core.compress); their defaults leave the nets as they were.
    head_hidden: int | None = None  # lstm kind: the head's width (None: hidden_size // 2); channel pruning narrows it
    # Hashed weight sharing (core.compress.hashed): virtual weights per stored value. The lstm
    # kind hashes every weight matrix, the moe kind its experts' w_in / w_out. None: dense.
    hashed_compression: float | None = None
    # Eight small experts, two per token: enough for the six operating regimes to take their own
    # experts on FD002/FD004 while training stays affordable on a 2-core CPU. The balancing losses
    # are scaled down from the LM defaults (0.01 / 0.001): the task loss here is an MSE on RUL/cap
    # of about 0.01, which the default weights would match and drown.
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=8, top_k=2, hidden_size=64, intermediate_size=128, aux_loss_weight=1e-3,
        z_loss_weight=1e-4))

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        def fail(message: str) -> None:
            raise ValueError(f"RULNetConfig: {message}")

        if self.kind not in ("lstm", "moe"):
            fail(f"kind must be 'lstm' or 'moe', got {self.kind!r}")
        for name in ("num_features", "window", "hidden_size", "num_layers", "moe_blocks", "patch", "num_heads",
                     "members"):
            if not isinstance(getattr(self, name), numbers.Integral) or getattr(self, name) < 1:
                fail(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.rul_cap > 0:
            fail(f"rul_cap must be > 0, got {self.rul_cap!r}")
        if not 0 <= self.dropout < 1:
            fail(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.kind == "moe" and self.moe.hidden_size != self.hidden_size:
            fail(f"moe.hidden_size ({self.moe.hidden_size}) must equal hidden_size ({self.hidden_size})")
        if self.encoder not in ("lstm", "conv"):
            fail(f"encoder must be 'lstm' or 'conv', got {self.encoder!r}")
        if self.head_hidden is not None and not (isinstance(self.head_hidden, int) and 1 <= self.head_hidden <= 4096):
            raise ValueError(f"RULNetConfig: head_hidden must be an integer in [1, 4096], got {self.head_hidden!r}")
        if self.hashed_compression is not None and not (isinstance(self.hashed_compression, int | float)
                                                        and 1 <= self.hashed_compression <= 1024):
            raise ValueError(f"RULNetConfig: hashed_compression must be in [1, 1024], got {self.hashed_compression!r}")
        if self.kind == "moe" and self.window % self.patch:
            fail(f"window {self.window} must be a multiple of patch {self.patch}")

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
        self.head = _head(config.hidden_size, config.head_hidden or config.hidden_size // 2, config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.lstm(x)  # (batch, window, H)
        out = self.head(hidden[:, -1]).squeeze(-1) * self.config.rul_cap  # (batch,)
        if not self.training:
            out = out.clamp(0.0, self.config.rul_cap)
        return out, x.new_zeros(())


class MoERULNet(nn.Module):
    """Conv front-end -> stacked LSTM -> a Transformer block with an MoE feed-forward -> RUL.

    A 1-D convolution (kernel 5) reads the local trend of each cycle's sensors (the CNN front-end
    of the CNN+LSTM hybrids); the LSTM (as in the lstm kind) carries the wear history along the
    window; a strided convolution folds every `patch` states into one token (30 cycles -> 10
    tokens, a third of the attention and expert work on this CPU). Each token then goes through
    `moe_blocks` pre-norm encoder blocks from `core`: self-attention over the window, then an MoE
    layer whose router sends each token to two of eight experts, so experts can take regimes
    (FD002/FD004 tokens carry the regime one-hot), fault modes and wear stages. The last token
    (the newest cycles) and the mean over the window feed the MLP head. With `encoder="conv"`
    the LSTM is left out (a pure Transformer; it overfitted in tuning, see RULNetConfig).
    forward(x (batch, window, features)) -> (rul (batch,), aux scalar: the MoE balancing losses).
    """

    def __init__(self, config: RULNetConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.local = nn.Conv1d(config.num_features, hidden, kernel_size=5, padding=2)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0) \
            if config.encoder == "lstm" else None
        self.patch = nn.Conv1d(hidden, hidden, kernel_size=config.patch, stride=config.patch)
        self.position = nn.Parameter(torch.zeros(config.window // config.patch, hidden))  # (tokens, H)
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(MoETransformerBlock(moe=MoELayer(config.moe), num_heads=config.num_heads,
                                                        dropout=config.dropout)
                                    for _ in range(config.moe_blocks))
        self.norm = nn.LayerNorm(hidden)
        self.head = _head(2 * hidden, hidden, config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.local(x.transpose(1, 2)))  # (batch, H, window)
        if self.lstm is not None:
            h = self.lstm(h.transpose(1, 2))[0].transpose(1, 2)  # (batch, H, window)
        h = self.patch(h).transpose(1, 2) + self.position  # (batch, tokens, H)
        aux = x.new_zeros(())
        for block in self.blocks:
            h, block_aux = block(h)
            aux = aux + block_aux
        h = self.norm(h)
        out = self.head(torch.cat([h[:, -1], h.mean(dim=1)], dim=-1)).squeeze(-1) * self.config.rul_cap  # (batch,)
        if not self.training:
            out = out.clamp(0.0, self.config.rul_cap)
        return out, aux


class RULEnsemble(nn.Module):
    """The mean of `members` nets of one config. forward(x) -> (mean RUL (batch,), mean aux)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(x) for member in self.members]
        count = len(outputs)
        return sum(rul for rul, _ in outputs) / count, sum(aux for _, aux in outputs) / count


# Each kind's net where it differs from the RULNetConfig defaults. The MoE model is a seed
# ensemble of three: on split seed 1 it cut validation RMSE from the members' mean of 16.13 to
# 15.77 on FD002 and 13.57 to 12.95 on FD004 (benchmarks/RESULTS.md), for three times the training.
KIND_NETS: dict[str, dict[str, Any]] = {"lstm": {}, "moe": {"members": 3}}


def default_net_config(kind: str, **overrides: Any) -> RULNetConfig:
    """The benchmarked configuration of each kind (overrides replace fields)."""
    return RULNetConfig(kind=kind, **{**KIND_NETS[kind], **overrides})


def build_member(config: RULNetConfig) -> nn.Module:
    """One net of `config` (its `members` aside), its weights hashed where the config says so."""
    net = LSTMRegressor(config) if config.kind == "lstm" else MoERULNet(config)
    if config.hashed_compression is not None:
        from core.compress.hashed import hash_weights

        hash_weights(net, hashable_weights(net), compression=config.hashed_compression)
    return net


def hashable_weights(net: nn.Module) -> list[str]:
    """The weights `hashed_compression` applies to: an MoE net's expert weights, else every weight
    matrix (LSTM, Linear; biases and norms stay dense)."""
    if isinstance(net, MoERULNet):
        return [f"{name}.{w}" for name, module in net.named_modules() if isinstance(module, Experts)
                for w in ("w_in", "w_out")]
    return [name for name, parameter in net.named_parameters() if parameter.dim() >= 2]


def build_rul_net(config: RULNetConfig | dict[str, Any]) -> nn.Module:
    """The net of `config`: one member, or a RULEnsemble of `config.members` of them."""
    config = config if isinstance(config, RULNetConfig) else RULNetConfig(**config)
    if config.members == 1:
        return build_member(config)
    return RULEnsemble([build_member(config) for _ in range(config.members)])


class RULOnly(nn.Module):
    """Wraps a RUL net to return only the RUL, for ONNX export. forward(window) -> (batch,)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net(window)[0]
