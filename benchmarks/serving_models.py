"""The MoE Transformer sequence classifier the serving benchmark serves, and its serving family.

Only benchmarks/serving.py uses this model (an untrained stand-in for a sequence workload), so it
lives here rather than in deploy/serving. `python -m benchmarks.serving_models serve --model
PATH ...` is `moeworks serve` (the same flags) with this family registered beside the built-in ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import MoEConfig, MoELayer
from core.blocks import MoETransformerBlock
from deploy.serving.base import InputField
from deploy.serving.families.tabular import TorchAdapter
from deploy.serving.registry import REGISTRY

MODEL_KIND = "sequence_moe"


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
        if self.num_features < 1 or self.num_tokens < 1:
            raise ValueError(f"SequenceMoEConfig: need >= 1 feature and >= 1 token, got {self.num_features} "
                             f"and {self.num_tokens}")
        if self.num_layers < 1 or self.num_outputs < 1:
            raise ValueError("SequenceMoEConfig: num_layers and num_outputs must be >= 1")


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


class SequenceAdapter(TorchAdapter):
    """A saved SequenceMoEClassifier (model_kind "sequence_moe"): input `features` (tokens, F) float32."""

    family = "sequence"
    describes = "a benchmark sequence MoE checkpoint .pt"
    kinds = (MODEL_KIND,)

    @classmethod
    def build(cls, path: Path) -> tuple[nn.Module, list[InputField], dict[str, Any]]:
        from core.trainer import load_checkpoint

        model, metadata = load_checkpoint(path, lambda c: SequenceMoEClassifier(SequenceMoEConfig(**c)))
        config = model.config
        fields = [InputField("features", np.dtype(np.float32), (config.num_tokens, config.num_features))]
        return model, fields, metadata


def register() -> None:
    """Serve sequence checkpoints from this process (and the server workers it forks)."""
    REGISTRY.register(SequenceAdapter)


def main(argv: list[str]) -> None:
    """`serve ...`: the `moeworks serve` command, with the sequence family registered."""
    if argv[:1] != ["serve"]:
        sys.exit("usage: python -m benchmarks.serving_models serve --model PATH [moeworks serve options]")
    register()
    from deploy.cli.main import app

    app(argv, prog_name="python -m benchmarks.serving_models")


if __name__ == "__main__":
    main(sys.argv[1:])
