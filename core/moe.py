"""The Mixture-of-Experts layer: route, dispatch by sorting, combine, report losses and load."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MoEConfig
from core.experts import DenseFFN, ExpertBank, Experts
from core.router import Router, load_balancing_loss, router_z_loss


class MoEOutput(NamedTuple):
    output: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # scalar: weighted balancing + z-loss, add it to the task loss (0 in eval mode)
    load_balancing_loss: torch.Tensor  # scalar, unweighted (1.0 at perfectly even load; 0 in eval mode)
    z_loss: torch.Tensor  # scalar, unweighted (0 in eval mode)
    expert_load: torch.Tensor  # (experts,) assignments routed to each expert, before any drop
    dropped: torch.Tensor  # scalar int64: assignments over capacity, not computed


def is_exporting() -> bool:
    """True while torch.export, the ONNX exporter or the JIT tracer runs this module."""
    return bool(
        torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
    )


def routing_losses(routing, cfg, *, training: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routing's losses and load: (aux (weighted sum), balance, z_loss, expert_load (E,)).

    training=False (a layer in eval mode): the three losses are zeros, since nothing trains on
    them; their ~15 ops were a quarter of the CPU time of an eval layer over a handful of tokens.
    The load is always counted.
    """
    expert_load = F.one_hot(routing.expert_index, cfg.num_experts).sum(dim=(0, 1))  # (E,)
    if not training:
        zero = routing.logits.new_zeros(())  # fp32, as the losses are
        return zero, zero, zero, expert_load
    balance = load_balancing_loss(routing.probs, routing.expert_index, cfg.num_experts)
    z_loss = router_z_loss(routing.logits)
    return cfg.aux_loss_weight * balance + cfg.z_loss_weight * z_loss, balance, z_loss, expert_load


# An eval-mode pass whose gathered expert weights (assignments x H x I elements) stay below this
# gathers each token's experts (Experts.forward_gathered) instead of sorting the assignments: with
# a handful of tokens the sorted dispatch is all per-expert bookkeeping. Figures: benchmarks/RESULTS.md,
# Credit scoring, "Single-application latency after one MoE pass and small-batch experts".
GATHER_BELOW = 1 << 19


class MoELayer(nn.Module):
    """Top-k routed experts (+ optional shared experts) over (batch, tokens, H) or (tokens, H).

    Dispatch sorts the tokens' (token, slot) assignments by expert and runs each active expert
    once over its group (gather, FFN, weight, scatter-add). No per-token loop and
    no dense compute of idle experts.

    Capacity policy (when the config sets one): assignments are served in priority order, all
    first choices before any second choice and, within a slot, in token order (GShard/Switch);
    an expert past its capacity drops the rest. A dropped assignment contributes nothing and the
    token's other weights are not renormalised, so with every choice dropped a token passes through
    the residual alone. `dropped` counts them.

    In eval mode, for a handful of tokens (see GATHER_BELOW) and where no assignment can be
    dropped, each token's k experts run on their gathered weights instead (the same maths, no
    sort; equal to the sorted dispatch up to float rounding, forward and backward). Training
    always takes the sorted dispatch.

    Under export (`is_exporting()`), or with `static=True`, the same maths runs with static shapes
    (every expert densely, a dense combine matrix, capacity from a cumulative sum) so that ONNX and
    torch.export see no data-dependent shapes.

    Args:
        config: the layer's MoEConfig.
        router: optional Router to use instead of a fresh one.
        experts: optional expert bank (any `core.experts.ExpertBank`) instead of fresh `Experts`.
        static: always take the static path (as under export).
        eager_dispatch: keep the sorted dispatch out of torch.compile graphs (a graph break around
            it): its slices depend on the routing, so a compiled dispatch would recompile for
            every new load pattern. `core.fused.fuse_model` sets it; a public attribute.
    """

    def __init__(self, config: MoEConfig, *, router: Router | None = None,
                 experts: ExpertBank | None = None, static: bool = False,
                 eager_dispatch: bool = False) -> None:
        super().__init__()
        self.config = config
        self.static = static
        self.eager_dispatch = eager_dispatch
        self.router = router if router is not None else Router(config=config)
        self.experts = experts if experts is not None else Experts(
            num_experts=config.num_experts, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, activation=config.activation,
        )
        self.shared_experts = nn.ModuleList(
            DenseFFN(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                     activation=config.activation)
            for _ in range(config.num_shared_experts)
        )

    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.config
        if x.dim() not in (2, 3):
            raise ValueError(f"MoELayer expects (batch, tokens, hidden) or (tokens, hidden), got {tuple(x.shape)}")
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"last dim {x.shape[-1]} != hidden_size {cfg.hidden_size}")
        tokens = x.reshape(-1, cfg.hidden_size)  # (T, H)
        routing = self.router(tokens)
        capacity = cfg.capacity(tokens.shape[0])
        if self.static or is_exporting():
            out, dropped = self._dispatch_static(tokens, routing.expert_index, routing.weight, capacity)
        elif self._gathers(tokens.shape[0], capacity):
            out = self.experts(tokens, routing.expert_index, routing.weight, path="gathered")
            dropped = torch.zeros((), dtype=torch.int64)
        else:
            dispatch = _dispatch_sorted_eagerly if self.eager_dispatch else MoELayer._dispatch_sorted
            out, dropped = dispatch(self, tokens, routing.expert_index, routing.weight, capacity)
        for shared in self.shared_experts:
            out = out + shared(tokens)

        aux, balance, z_loss, expert_load = routing_losses(routing, cfg, training=self.training)
        if self.training and cfg.bias_balancing:
            self.router.update_selection_bias(expert_load)
        return MoEOutput(out.reshape(x.shape), aux, balance, z_loss, expert_load, dropped)

    def _gathers(self, num_tokens: int, capacity: int | None) -> bool:
        """Whether this pass takes the gathered small-batch path (see the class docstring)."""
        cfg = self.config
        return (not self.training and isinstance(self.experts, Experts)
                and num_tokens * cfg.top_k * cfg.hidden_size * cfg.intermediate_size < GATHER_BELOW
                and (capacity is None or capacity >= num_tokens)  # an expert gets <= 1 slot per token
                and not torch.compiler.is_compiling())  # compiled graphs keep one path (core.fused)

    def _dispatch_sorted(self, tokens: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor,
                         capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, top_k = expert_index.shape
        # Slot-major order (all first choices, then all second ones) is the drop priority; a
        # stable sort by expert keeps that order inside each expert's run.
        flat_expert = expert_index.t().reshape(-1)  # (k*T,)
        sorted_expert, order = torch.sort(flat_expert, stable=True)  # (k*T,)
        counts = torch.bincount(flat_expert, minlength=self.config.num_experts)  # (E,)
        dropped = torch.zeros((), dtype=torch.int64)
        if capacity is not None:
            first_of_expert = torch.cumsum(counts, 0) - counts  # (E,)
            rank = torch.arange(order.numel()) - first_of_expert[sorted_expert]  # place in its queue
            served = rank < capacity
            dropped = (~served).sum()
            order = order[served]
            counts = counts.clamp(max=capacity)
        token_of = order % num_tokens  # (assignments,) source token of each served assignment
        slot_of = order // num_tokens
        bounds, start = [], 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                bounds.append((expert, start, start + count))
                start += count
        w_sorted = weight[token_of, slot_of].unsqueeze(-1)  # (assignments, 1)
        out = self.experts(tokens, token_of, w_sorted, bounds, path="grouped")  # (T, H)
        return out, dropped

    def _dispatch_static(self, tokens: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor,
                         capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, top_k = expert_index.shape
        num_experts = self.config.num_experts
        one_hot = F.one_hot(expert_index, num_experts).to(weight.dtype)  # (T, k, E)
        if capacity is None:
            keep = torch.ones_like(weight)
        else:
            # Position of each assignment in its expert's queue, in the same slot-major priority.
            slot_major = one_hot.transpose(0, 1).reshape(top_k * num_tokens, num_experts)
            position = (slot_major.cumsum(dim=0) * slot_major).sum(dim=-1)  # 1-based, (k*T,)
            keep = (position <= capacity).to(weight.dtype).reshape(top_k, num_tokens).t()  # (T, k)
        dropped = (keep.numel() - keep.sum()).to(torch.int64)
        combine = torch.einsum("tk,tke->te", weight * keep, one_hot)  # (T, E)
        return self.experts(tokens, combine, path="dense"), dropped


# The sorted dispatch as a graph break under torch.compile (MoELayer.eager_dispatch).
_dispatch_sorted_eagerly = torch.compiler.disable(MoELayer._dispatch_sorted)
