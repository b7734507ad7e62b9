"""Building blocks on the MoE layer: a Transformer encoder block and a tabular MoE network."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MoEConfig
from core.moe import MoELayer


class SelfAttention(nn.Module):
    """Multi-head self-attention via scaled_dot_product_attention, exportable to ONNX."""

    def __init__(self, *, hidden_size: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible into num_heads={num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, tokens, H); padding_mask: (batch, tokens) bool, True where a token is padding."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if padding_mask is not None:
            attn_mask = (~padding_mask)[:, None, None, :]  # (batch, 1, 1, tokens): True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))  # (batch, tokens, H)


class MoETransformerBlock(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MoE(LN(x)) with GELU experts.

    Args:
        moe: the MoELayer used as the feed-forward.
        num_heads: attention heads.
        dropout: residual dropout.
    forward(x (batch, tokens, H), padding_mask (batch, tokens) bool | None) ->
        (x (batch, tokens, H), aux_loss scalar).
    """

    def __init__(self, *, moe: MoELayer, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = moe.config.hidden_size
        self.norm_attn = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden_size=hidden, num_heads=num_heads, dropout=dropout)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.moe = moe
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.dropout(self.attn(self.norm_attn(x), padding_mask))
        routed = self.moe(self.norm_ffn(x))
        return x + self.dropout(routed.output), routed.aux_loss


@dataclass
class TabularMoEConfig:
    """A tabular network: feature embedding -> residual MoE layers -> head."""

    num_numeric: int  # numeric features, standardised by the caller
    categorical_cardinalities: list[int] = field(default_factory=list)  # levels per categorical column
    embedding_dim: int = 8  # per categorical column; small because most credit categoricals are low-cardinality
    num_layers: int = 2  # two residual MoE layers are enough for tabular depth
    num_outputs: int = 1  # 1 logit for binary targets, n for multi-class or multi-task
    dropout: float = 0.1
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(
        num_experts=16, top_k=2, hidden_size=64, intermediate_size=128))  # small experts: tabular sets are small
    # Hashed weight sharing of the experts' w_in / w_out (core.compress.hashed): virtual weights per
    # stored value; None: dense. Set by `moeworks compress hash`; a saved folder rebuilds it from here.
    hashed_compression: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        def fail(message: str) -> None:
            raise ValueError(f"TabularMoEConfig: {message}")

        if self.hashed_compression is not None and not (
                isinstance(self.hashed_compression, int | float) and 1 <= self.hashed_compression <= 1024):
            fail(f"hashed_compression must be in [1, 1024], got {self.hashed_compression!r}")

        if self.num_numeric < 0:
            fail(f"num_numeric must be >= 0, got {self.num_numeric}")
        if self.num_numeric + len(self.categorical_cardinalities) == 0:
            fail("TabularMoE needs at least one feature")
        if not all(c >= 1 for c in self.categorical_cardinalities):
            fail(f"each categorical needs >= 1 level, got {self.categorical_cardinalities}")
        if self.embedding_dim < 1:
            fail(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.num_layers < 1:
            fail(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_outputs < 1:
            fail(f"num_outputs must be >= 1, got {self.num_outputs}")
        if not 0 <= self.dropout < 1:
            fail(f"dropout must be in [0, 1), got {self.dropout}")


class TabularMoE(nn.Module):
    """Numeric and categorical features -> hidden -> `num_layers` x (x + MoE(LN(x))) -> head.

    forward(numeric (batch, num_numeric) float, categorical (batch, n_cat) int64 | None) ->
        (logits (batch, num_outputs), aux_loss scalar).
    Categorical codes must lie in [0, cardinality); reserve code 0 for unknown levels.

    Parts, by name, for code that reads the weights (finance.models.input_gradients):
    `embeddings`, `input_projection` (Linear, features -> H, then GELU), `norms` and `layers`
    (the residual MoE layers), `head_norm` (LayerNorm) and `head_projection` (Linear, H ->
    outputs). The last three are views into the `input` and `head` Sequentials, which stay so
    that the state_dict keys of saved models ("input.0.weight", "head.1.bias") do not change.
    """

    def __init__(self, config: TabularMoEConfig, *, static: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden = config.moe.hidden_size
        self.embeddings = nn.ModuleList(nn.Embedding(c, config.embedding_dim)
                                        for c in config.categorical_cardinalities)
        in_width = config.num_numeric + config.embedding_dim * len(config.categorical_cardinalities)
        self.input = nn.Sequential(nn.Linear(in_width, hidden), nn.GELU())
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(config.num_layers))
        self.layers = nn.ModuleList(MoELayer(config.moe, static=static) for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.num_outputs))
        if config.hashed_compression is not None:
            from core.compress.hashed import hash_weights

            hash_weights(self, self.expert_weight_names(), compression=config.hashed_compression)

    def expert_weight_names(self) -> list[str]:
        """The routed experts' stacked weights ("layers.0.experts.w_in", ...): what `hashed_compression` hashes."""
        return [f"layers.{i}.experts.{w}" for i in range(len(self.layers)) for w in ("w_in", "w_out")]

    def dense_copy(self) -> TabularMoE:
        """This network with dense expert weights (hashed ones materialized; for ONNX export),
        in the same mode; itself when nothing is hashed."""
        if self.config.hashed_compression is None:
            return self
        from core.compress.hashed import dense_state_dict

        dense = TabularMoE(replace(self.config, hashed_compression=None), static=self.layers[0].static)
        dense.load_state_dict(dense_state_dict(self))
        return dense.train(self.training)

    def forward(self, numeric: torch.Tensor,
                categorical: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [numeric] if self.config.num_numeric else []
        if self.embeddings:
            if categorical is None:
                raise ValueError("this model has categorical features: pass `categorical`")
            parts += [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        x = self.input(torch.cat(parts, dim=-1))  # (batch, H)
        aux = x.new_zeros(())
        for norm, layer in zip(self.norms, self.layers, strict=True):
            routed = layer(norm(x))
            x = x + self.dropout(routed.output)
            aux = aux + routed.aux_loss
        return self.head(x), aux

    @property
    def input_projection(self) -> nn.Module:
        """The input Linear (batch, features) -> (batch, H), before the GELU."""
        return self.input[0]

    @property
    def head_norm(self) -> nn.Module:
        """The LayerNorm over H before the output Linear."""
        return self.head[0]

    @property
    def head_projection(self) -> nn.Module:
        """The output Linear (batch, H) -> (batch, num_outputs)."""
        return self.head[1]
