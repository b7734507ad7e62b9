"""Fused inference kernels for MoE models: a grouped expert MLP and inductor-fused dense parts.

Two fusions, each measured against its eager reference (benchmarks/serving.py, quantization.py):

- `GroupedExperts`: the expert MLP as one padded grouped GEMM. Instead of a Python loop that
  runs each active expert's two matmuls and activation over its slice (6 ops per expert), the
  active experts' slices are gathered into one (active, longest slice, H) block and run through
  two `bmm` calls and one activation, then scattered back (MegaBlocks/vLLM-style padding to the
  longest bin). It pays only when many small experts are active: it falls back to the loop below
  `min_active_experts`, and `fuse_model` leaves it off unless asked (measured: see `fuse_model`).
- `fuse_model`: torch.compile (inductor) over the dense parts of the model - bias + GELU +
  LayerNorm, residual adds, attention projections, the router - while the MoE dispatch, whose
  shapes depend on the data, runs eagerly between the compiled graphs (`torch.compiler.disable`).

The eager fallback is the model itself: `fuse_model` leaves the original module untouched
(compile wraps it), and under ONNX/torch.export every MoE layer takes its static path, so the
module you export is the one you fused. `bias_gelu_layernorm` is the reference of the
elementwise chain inductor fuses, used by the tests to check the compiled kernel.

Triton kernels (CUDA only) are not part of this module: no kernel here was measured to beat
inductor on a GPU yet, and a kernel that is not measured faster is not shipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.experts import ACTIVATIONS, Experts
from core.moe import MoELayer
from core.quantization import LinearExperts, compile_expert_mlp


def bias_gelu_layernorm(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                        eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: h = GELU(x + bias); returns (h, LayerNorm(h)). x (..., H); bias, weight, ln_bias (H,).

    This is the chain after a Linear feeding a pre-norm residual stream (TabularMoE's input layer,
    the first MoE layer's norm): eagerly three kernels and two round trips through memory;
    inductor emits one.
    """
    h = F.gelu(x + bias)
    return h, F.layer_norm(h, (h.shape[-1],), weight, ln_bias, eps)


class GroupedExperts(Experts):
    """Experts whose sorted path runs as a padded grouped GEMM; same weights as `Experts` (an ExpertBank).

    Args: as Experts, plus
        min_active_experts: below this many active experts the per-expert loop is used (its
            6 ops per expert are cheaper than the ~10 fixed ops of the grouped path).
    """

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str = "gelu", min_active_experts: int = 4) -> None:
        super().__init__(num_experts=num_experts, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, activation=activation)
        self.min_active_experts = min_active_experts

    @classmethod
    def from_experts(cls, experts: Experts, *, min_active_experts: int = 4) -> GroupedExperts:
        e, h, i = experts.w_in.shape
        grouped = cls(num_experts=e, hidden_size=h, intermediate_size=i, activation=experts.activation,
                      min_active_experts=min_active_experts)
        grouped.load_state_dict(experts.state_dict())
        return grouped

    def forward_grouped(self, tokens: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor,
                        bounds: list[tuple[int, int, int]]) -> torch.Tensor:
        """As Experts.forward_grouped, with all groups in one padded batched GEMM. Returns (T, H)."""
        if len(bounds) < self.min_active_experts:
            return super().forward_grouped(tokens, token_of, weight_of, bounds)
        rows = self._padded_rows(tokens.index_select(0, token_of), bounds)  # (assignments, H)
        return torch.zeros_like(tokens).index_add_(0, token_of, rows * weight_of.to(rows.dtype))

    def _padded_rows(self, x_sorted: torch.Tensor, bounds: list[tuple[int, int, int]]) -> torch.Tensor:
        """x_sorted (assignments, H) grouped by expert -> each row through its expert, (assignments, H)."""
        rows, hidden = x_sorted.shape
        experts = torch.tensor([b[0] for b in bounds])  # (A,)
        starts = torch.tensor([b[1] for b in bounds])  # (A,)
        lengths = torch.tensor([b[2] - b[1] for b in bounds])  # (A,)
        longest = int(lengths.max())
        position = torch.arange(longest)  # (C,)
        # Row of each (expert, position) cell; padding cells point at an extra zero row `rows`.
        index = torch.where(position[None, :] < lengths[:, None], starts[:, None] + position[None, :], rows)  # (A, C)
        padded = torch.cat([x_sorted, x_sorted.new_zeros(1, hidden)])[index]  # (A, C, H)
        inner = ACTIVATIONS[self.activation](torch.bmm(padded, self.w_in[experts]))  # (A, C, I)
        result = torch.bmm(inner, self.w_out[experts])  # (A, C, H)
        out = x_sorted.new_zeros(rows + 1, hidden)
        out[index.reshape(-1)] = result.reshape(-1, hidden)  # padding cells all land on row `rows`
        return out[:rows]


def group_experts(model: nn.Module, *, min_active_experts: int = 4) -> nn.Module:
    """Swap every stacked `Experts` (in place) for a `GroupedExperts` holding the same weights."""
    for layer in model.modules():
        if isinstance(layer, MoELayer) and type(layer.experts) is Experts:
            layer.experts = GroupedExperts.from_experts(layer.experts, min_active_experts=min_active_experts)
    return model


def fuse_model(model: nn.Module, *, grouped_experts: bool = False, compile: bool = True,
               min_active_experts: int = 4) -> nn.Module:
    """Fused inference form of `model` (eval mode, in place for the expert swap).

    Returns the torch.compile'd module (dynamic batch axis) when `compile`, else the model (with
    grouped experts if asked). Grouped experts are off by default: measured slower for the MoE
    Transformer and at 128 rows (benchmarks/RESULTS.md, Serving, "Kernel paths without HTTP").
    The MoE dispatch of each layer is kept out of the compiled graphs (`MoELayer.eager_dispatch`):
    its slices depend on the routing, which would recompile the graph for every new load pattern.
    """
    model.eval()
    if grouped_experts:
        group_experts(model, min_active_experts=min_active_experts)
    if not compile:
        return model
    compiled_expert_mlp = compile_expert_mlp()
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            if isinstance(layer.experts, LinearExperts):
                # int8 experts: eager torchao re-dispatches every call; one compiled graph serves all.
                layer.experts.mlp = compiled_expert_mlp
            layer.eager_dispatch = True
    return torch.compile(model, dynamic=True)
