"""A Transformer encoder with MoE feed-forwards over monthly behaviour tokens, static fields fused
through a CLS-style token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from core.blocks import MoETransformerBlock
from core.config import MoEConfig
from core.moe import MoELayer
from finance.sequence.tokens import NUM_STATUS_LEVELS, TOKEN_FEATURES


@dataclass
class SequenceTransformerConfig:
    num_months: int = 6  # longest history; Taiwan has six months
    num_token_features: int = len(TOKEN_FEATURES)
    num_status_levels: int = NUM_STATUS_LEVELS
    num_static_numeric: int = 2
    static_cardinalities: list[int] = field(default_factory=list)  # levels (+1 unseen) per static categorical
    status_embedding_dim: int = 8  # 12 repayment statuses: a small embedding is enough
    static_embedding_dim: int = 4  # sex / education / marriage have a handful of levels each
    num_layers: int = 2  # six tokens need little depth; a second layer lets months compare trends
    num_heads: int = 4
    dropout: float = 0.1  # ~20k clients: regularise
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=16, top_k=2, hidden_size=64, intermediate_size=128))  # the product's smallest pool; small experts

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.num_months < 1:
            raise ValueError(f"SequenceTransformerConfig: num_months must be >= 1, got {self.num_months}")
        if self.moe.hidden_size % self.num_heads:
            raise ValueError(f"SequenceTransformerConfig: hidden_size {self.moe.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads}")
        # Dropping tokens would let padding months take capacity from real ones: keep the layer dropless.
        if not self.moe.dropless:
            raise ValueError("SequenceTransformerConfig: the sequence model's MoE layers must be dropless "
                             "(no capacity)")


class SequenceTransformer(nn.Module):
    """[CLS(static fields), month_1 .. month_T] -> MoE Transformer blocks -> default logit.

    forward(tokens (batch, T, F) float, status (batch, T) int64, padding (batch, T) bool,
            static_numeric (batch, S) float, static_categorical (batch, C) int64)
        -> (logits (batch,), aux_loss scalar).
    Months where `padding` is True are ignored by attention and by the pooling, so their content
    cannot change the output. The position embedding indexes the month's calendar slot (oldest
    first), i.e. how long before scoring it was.
    """

    def __init__(self, config: SequenceTransformerConfig, *, static: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden = config.moe.hidden_size
        self.status_embedding = nn.Embedding(config.num_status_levels, config.status_embedding_dim)
        self.month_input = nn.Linear(config.num_token_features + config.status_embedding_dim, hidden)
        self.position = nn.Embedding(config.num_months, hidden)
        self.static_embeddings = nn.ModuleList(nn.Embedding(c, config.static_embedding_dim)
                                               for c in config.static_cardinalities)
        static_width = config.num_static_numeric + config.static_embedding_dim * len(config.static_cardinalities)
        self.cls_input = nn.Sequential(nn.Linear(static_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            MoETransformerBlock(moe=MoELayer(config.moe, static=static), num_heads=config.num_heads,
                                dropout=config.dropout)
            for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(hidden)
        # The CLS state and the mean of the real months: the second keeps a direct path to the history.
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor, status: torch.Tensor, padding: torch.Tensor,
                static_numeric: torch.Tensor, static_categorical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_embedded(tokens, self.status_embedding(status), padding, static_numeric,
                                     self.embed_static(static_categorical))

    def embed_static(self, static_categorical: torch.Tensor) -> torch.Tensor:
        """(batch, C) codes -> (batch, C, static_embedding_dim)."""
        embedded = [emb(static_categorical[:, i]) for i, emb in enumerate(self.static_embeddings)]
        if not embedded:
            return static_categorical.new_zeros((len(static_categorical), 0, self.config.static_embedding_dim),
                                                dtype=self.position.weight.dtype)
        return torch.stack(embedded, dim=1)

    def forward_embedded(self, tokens: torch.Tensor, status_vectors: torch.Tensor, padding: torch.Tensor,
                         static_numeric: torch.Tensor,
                         static_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward with the categorical inputs already embedded: status_vectors (batch, T, status dim),
        static_vectors (batch, C, static dim). Every input is continuous here, so gradient attributions
        can follow a path from a reference client to the applicant (SequenceClassifier.attributions)."""
        t = tokens.shape[1]
        months = self.month_input(torch.cat([tokens, status_vectors], dim=-1))  # (b, T, H)
        months = months + self.position.weight[:t].unsqueeze(0)
        static_parts = torch.cat([static_numeric, static_vectors.flatten(1)], dim=-1)
        cls = self.cls_input(static_parts).unsqueeze(1)  # (b, 1, H)
        x = torch.cat([cls, months], dim=1)  # (b, 1 + T, H)
        mask = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)  # (b, 1 + T), CLS never padding
        aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x, mask)
            aux = aux + block_aux
        x = self.norm(x)
        real = (~padding).unsqueeze(-1).to(x.dtype)  # (b, T, 1)
        pooled = (x[:, 1:] * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)  # (b, H)
        logits = self.head(torch.cat([x[:, 0], pooled], dim=-1)).squeeze(-1)  # (b,)
        return logits, aux
