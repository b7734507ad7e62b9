"""The saved models the server knows how to rebuild, and the input fields each one reads.

A checkpoint written by `core.trainer.save_checkpoint` carries its config; `metadata["model_kind"]`
(or, for older core checkpoints, the shape of the config) says which builder rebuilds it. Each
kind also names its input fields, so the server can validate requests without the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import MoEConfig, MoELayer
from core.blocks import MoETransformerBlock, TabularMoE, TabularMoEConfig
from core.trainer import load_checkpoint, read_checkpoint


@dataclass(frozen=True)
class InputField:
    """One named input: dtype and the shape of a single row (the batch axis is implicit)."""

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    high: tuple[int, ...] | None = None  # integer codes: column j must lie in [0, high[j])
    allow_nan: bool = False  # True where NaN means "missing" and the model imputes it (credit features)
    # True where fewer steps than row_shape[0] are accepted and padded in front with copies of the
    # first step (RUL windows: an engine younger than the window, "no change before the record began").
    pad_first_axis: bool = False


@dataclass
class SequenceMoEConfig:
    """A sequence classifier: per-step features -> hidden -> MoE Transformer blocks -> mean pool -> head."""

    num_features: int  # features per time step
    num_tokens: int = 16  # fixed sequence length served (requests are padded/cut by the caller)
    num_layers: int = 2  # two blocks: enough depth for six months of monthly behaviour
    num_heads: int = 4
    num_outputs: int = 1
    dropout: float = 0.1
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=16, top_k=2, hidden_size=128, intermediate_size=256))  # 128 wide: CPU-servable

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        assert self.num_features >= 1 and self.num_tokens >= 1, "need >= 1 feature and >= 1 token"


class SequenceMoEClassifier(nn.Module):
    """forward(features (batch, tokens, F)) -> (logits (batch, num_outputs), aux_loss scalar)."""

    def __init__(self, config: SequenceMoEConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.moe.hidden_size
        self.input = nn.Linear(config.num_features, hidden)
        self.blocks = nn.ModuleList(
            MoETransformerBlock(moe=MoELayer(config.moe), num_heads=config.num_heads, dropout=config.dropout)
            for _ in range(config.num_layers))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.num_outputs))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input(features)  # (batch, tokens, H)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        return self.head(x.mean(dim=1)), aux


@dataclass
class LoadedModel:
    model: nn.Module
    fields: list[InputField]
    metadata: dict[str, Any]
    kind: str


def _tabular(path: Path) -> LoadedModel:
    model, metadata = load_checkpoint(path, lambda c: TabularMoE(TabularMoEConfig(**c)))
    config = model.config
    fields = []
    if config.num_numeric:
        fields.append(InputField("numeric", np.dtype(np.float32), (config.num_numeric,)))
    if config.categorical_cardinalities:
        fields.append(InputField("categorical", np.dtype(np.int64), (len(config.categorical_cardinalities),),
                                 high=tuple(config.categorical_cardinalities)))
    return LoadedModel(model, fields, metadata, "tabular_moe")


def _sequence(path: Path) -> LoadedModel:
    model, metadata = load_checkpoint(path, lambda c: SequenceMoEClassifier(SequenceMoEConfig(**c)))
    config = model.config
    return LoadedModel(model, [InputField("features", np.dtype(np.float32), (config.num_tokens, config.num_features))],
                       metadata, "sequence_moe")


LOADERS: dict[str, Callable[[Path], LoadedModel]] = {"tabular_moe": _tabular, "sequence_moe": _sequence}


def checkpoint_kind(metadata: dict[str, Any]) -> str:
    kind = metadata.get("model_kind")
    if kind:
        return kind
    return "tabular_moe" if "num_numeric" in metadata.get("config", {}) else "unknown"


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild a saved model by its kind; raises ValueError naming the kinds known."""
    path = Path(path)
    metadata = read_checkpoint(path)["metadata"]  # weights-only; CheckpointError (a ValueError) otherwise
    kind = checkpoint_kind(metadata)
    if kind not in LOADERS:
        raise ValueError(f"{path}: model kind {kind!r} is not servable; known kinds: {sorted(LOADERS)}")
    return LOADERS[kind](path)
