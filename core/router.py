"""Top-k router: scores experts per token, picks k, and computes the balancing losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MoEConfig


class Routing(NamedTuple):
    expert_index: torch.Tensor  # (tokens, top_k) int64, slot 0 is each token's first choice
    weight: torch.Tensor  # (tokens, top_k) fp32 combine weights
    probs: torch.Tensor  # (tokens, experts) fp32 normalised scores (for the balancing loss)
    logits: torch.Tensor  # (tokens, experts) fp32 raw router logits (for the z-loss)


class Router(nn.Module):
    """Linear gate over experts with softmax or sigmoid scoring, computed in fp32.

    Softmax (Mixtral/Switch): probabilities over all experts, top-k picked, the k weights
    renormalised to sum to 1 when `normalize_weights`. Sigmoid (DeepSeek-V3): independent scores,
    top-k picked, weights normalised over the k. With `bias_balancing`, a per-expert bias (a
    buffer, not a parameter) is added to the scores only when choosing experts.
    """

    def __init__(self, *, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=config.hidden_size**-0.5)
        self.register_buffer("selection_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (tokens, hidden) -> Routing with (tokens, top_k) choices."""
        cfg = self.config
        # Routing maths in fp32 whatever the activations' dtype: bf16 logits flip top-k choices.
        logits = F.linear(x.float(), self.gate.weight.float())  # (tokens, experts)
        if cfg.router_scoring == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        choice_scores = scores + self.selection_bias if cfg.bias_balancing else scores
        _, expert_index = choice_scores.topk(cfg.top_k, dim=-1)  # (tokens, top_k)
        weight = scores.gather(-1, expert_index)  # weights from unbiased scores
        if cfg.normalize_weights and (cfg.top_k > 1 or cfg.router_scoring == "sigmoid"):
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return Routing(expert_index, weight, probs, logits)

    @torch.no_grad()
    def update_selection_bias(self, expert_load: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones (sign rule)."""
        load = expert_load.float()
        self.selection_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss: E * sum_e f_e * P_e, equal to 1 at perfectly even load.

    probs: (tokens, experts); expert_index: (tokens, top_k). f_e is the share of the k*tokens
    assignments that went to expert e, P_e the mean router probability of expert e.
    """
    assignments = F.one_hot(expert_index, num_experts).float().sum(dim=1)  # (tokens, experts)
    fraction = assignments.mean(dim=0) / expert_index.shape[1]  # (experts,)
    mean_prob = probs.mean(dim=0)  # (experts,)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the logits. logits: (tokens, experts)."""
    return torch.logsumexp(logits, dim=-1).square().mean()
