"""Stacked expert FFN weights, run either over sorted contiguous slices or densely (for export)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@runtime_checkable
class ExpertBank(Protocol):
    """What `core.moe.MoELayer` needs of its experts: E two-layer FFNs over the hidden width H.

    Implemented by `Experts` (stacked weights), `core.fused.GroupedExperts` (the same weights, one
    padded grouped GEMM) and `core.quantization.LinearExperts` (one nn.Linear pair per expert, for
    int8). MoELayer calls the bank only as `experts(tokens, *args, path=...)`, which runs
    `forward_<path>(tokens, *args)`: one entry point, so that a wrapper of the module (peft's LoRA
    ParamWrapper, core.lora) covers every path. The paths, T tokens, k experts per token:

    - "grouped": forward_grouped(tokens (T, H), token_of (assignments,) token ids grouped by expert,
      weight_of (assignments, 1) combine weights in that order, bounds [(expert, start, end)] of
      each active expert's group) -> (T, H), the weighted sum of each token's served experts.
    - "dense": forward_dense(x (T, H), combine (T, E) weights, zero where a token does not use an
      expert) -> (T, H); static shapes only, for export.
    - "gathered" (optional): forward_gathered(tokens (T, H), expert_index (T, k), weight (T, k)) ->
      (T, H). MoELayer takes it only for `Experts` and its subclasses (core.moe.GATHER_BELOW), so a
      bank without stacked weights need not have it.

    `expert_mlp(expert, x (rows, H)) -> (rows, H)` runs one expert; `num_experts` is E and
    `activation` the inner activation's name (a key of ACTIVATIONS).
    """

    num_experts: int
    activation: str

    def __call__(self, tokens: torch.Tensor, *args: torch.Tensor | list, path: str) -> torch.Tensor: ...

    def expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor: ...

    def forward_grouped(self, tokens: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor,
                        bounds: list[tuple[int, int, int]]) -> torch.Tensor: ...

    def forward_dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor: ...


class Experts(nn.Module):
    """`num_experts` two-layer FFNs (hidden -> intermediate -> hidden), weights stacked.

    Args:
        num_experts: E.
        hidden_size: H, the width read and written.
        intermediate_size: I, each expert's inner width.
        activation: "gelu", "relu" or "silu".
    Weights: w_in (E, H, I), w_out (E, I, H); no biases, as in Mixtral/DeepSeek experts.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        # Same scale as nn.Linear's default init, per expert.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(intermediate_size), 1 / math.sqrt(intermediate_size))

    def forward(self, tokens: torch.Tensor, *args: torch.Tensor | list, path: str) -> torch.Tensor:
        """`forward_<path>(tokens, *args)`: MoELayer calls the experts through here, so that a wrapper
        of the module (peft's LoRA ParamWrapper, which adds its delta to w_in / w_out for the
        length of one call: core.lora) covers the grouped, gathered and dense paths alike."""
        return getattr(self, f"forward_{path}")(tokens, *args)

    def expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x (rows, H) -> (rows, H) through expert `expert`."""
        return ACTIVATIONS[self.activation](x @ self.w_in[expert]) @ self.w_out[expert]

    def forward_grouped(self, tokens: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor,
                        bounds: list[tuple[int, int, int]]) -> torch.Tensor:
        """See `grouped_scatter`. Returns (T, H)."""
        return grouped_scatter(tokens, token_of, weight_of, bounds, self.expert_mlp)

    def forward_gathered(self, tokens: torch.Tensor, expert_index: torch.Tensor,
                         weight: torch.Tensor) -> torch.Tensor:
        """Each token through its own top-k experts, with those experts' weights gathered.

        tokens: (T, H); expert_index, weight: (T, k). Returns (T, H). Two `bmm` calls over the
        T*k assignments and no sort, bincount or per-expert loop, at the price of copying T*k
        weight matrices: it pays only for a handful of tokens (core.moe.GATHER_BELOW).
        """
        num_tokens, top_k = expert_index.shape
        flat = expert_index.reshape(-1)  # (T*k,) token-major: token t's slots are rows t*k .. t*k+k-1
        x = tokens.repeat_interleave(top_k, dim=0).unsqueeze(1)  # (T*k, 1, H)
        # index_select, not w_in[flat]: advanced indexing copied the matrices ~7x slower (measured).
        inner = ACTIVATIONS[self.activation](torch.bmm(x, self.w_in.index_select(0, flat)))  # (T*k, 1, I)
        y = torch.bmm(inner, self.w_out.index_select(0, flat)).reshape(num_tokens, top_k, -1)  # (T, k, H)
        return (y * weight.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def forward_dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Every expert over every token, mixed by a dense weight matrix: static shapes only.

        x: (tokens, H); combine: (tokens, E) weights, zero where a token does not use an expert.
        Returns (tokens, H). Costs E/top_k times the sorted path; used for ONNX/torch.export.
        """
        act = ACTIVATIONS[self.activation]
        inner = act(torch.einsum("th,ehi->eti", x, self.w_in))  # (E, tokens, I)
        per_expert = torch.einsum("eti,eih->eth", inner, self.w_out)  # (E, tokens, H)
        return torch.einsum("eth,te->th", per_expert, combine.to(per_expert.dtype))


def grouped_scatter(tokens: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor,
                    bounds: list[tuple[int, int, int]],
                    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run each active expert once over its group of tokens and add the weighted results.

    tokens: (T, H); token_of: (assignments,) token ids grouped by expert; weight_of:
    (assignments, 1) combine weights in the same order; bounds: (expert, start, end) of each
    expert's group in that order; expert_mlp(expert, (rows, H)) -> (rows, H). Returns (T, H).
    Gather, compute, scale and scatter happen per expert so the group stays in cache; the
    measured alternative (one gather of all assignments, then the experts) was ~20% slower.
    """
    out = torch.zeros_like(tokens)
    for expert, start, end in bounds:
        index = token_of[start:end]
        y = expert_mlp(expert, tokens.index_select(0, index))  # (group, H)
        scale = weight_of[start:end].to(y.dtype)
        out.index_add_(0, index, y * scale if torch.is_grad_enabled() else y.mul_(scale))
    return out


class DenseFFN(nn.Module):
    """A plain FFN (hidden -> intermediate -> hidden): shared experts and the dense reference."""

    def __init__(self, *, hidden_size: int, intermediate_size: int, activation: str = "gelu") -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ACTIVATIONS[self.activation](self.up(x)))
