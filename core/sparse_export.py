"""A sparse top-k MoE dispatch that ONNX export keeps sparse: gather, run, scatter per expert.

Under export `MoELayer` takes its static path: every expert runs densely over every token and a
dense combine matrix mixes them (no data-dependent shapes). For 16 experts and top-2 that is 8x
the expert FLOPs of the model, which is why an exported MoE Transformer loses to PyTorch once
requests are batched. This module gives the exporter a dispatch it can keep sparse with plain
ONNX ops: per expert, `NonZero` over the tokens routed to it, `Gather` of those rows, the
expert's two `MatMul`s, and a `ScatterND(reduction="add")` of the weighted result. Each expert's
weights are their own initializers (one `nn.Linear` per expert), so onnxruntime's dynamic INT8
quantization reaches the expert MLPs, which the stacked-weight `Einsum`s of the static path hide
from it.

onnxruntime's contrib `com.microsoft.MoE` / `QMoE` operators (1.31, CPU) were measured as the
alternative and lost from 128 tokens up (figures: benchmarks/RESULTS.md, Serving, "One MoE layer in
onnxruntime"). They also fix the routing to softmax top-k, where this graph exports whatever the
router does.

Only dropless layers are rewritten: a capacity limit drops assignments in a priority order that
the static path already exports exactly. `sparse_for_export` leaves such layers as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.experts import ACTIVATIONS, Experts
from core.moe import MoELayer, MoEOutput, routing_losses


class SparseDispatchMoE(nn.Module):
    """The maths of a dropless `MoELayer`, dispatched per expert with data-dependent row sets.

    Built from an MoELayer with `from_layer` (shares its router and shared experts; the stacked
    expert weights are copied into one `up` and one `down` Linear per expert). forward(x (batch,
    tokens, H) or (tokens, H)) -> MoEOutput, as MoELayer (no capacity, so `dropped` is 0).
    """

    def __init__(self, *, config, router: nn.Module, up: list[nn.Linear], down: list[nn.Linear],
                 shared_experts: nn.ModuleList) -> None:
        super().__init__()
        if not config.dropless:
            raise ValueError("SparseDispatchMoE serves dropless layers only (capacity exports statically)")
        if not len(up) == len(down) == config.num_experts:
            raise ValueError(f"one up and one down Linear per expert: {config.num_experts} experts, "
                             f"got {len(up)} up and {len(down)} down")
        self.config = config
        self.router = router  # the attribute name keeps "router" in ONNX names: quantize_onnx leaves it FP32
        self.up = nn.ModuleList(up)
        self.down = nn.ModuleList(down)
        self.shared_experts = shared_experts

    @classmethod
    def from_layer(cls, layer: MoELayer) -> SparseDispatchMoE:
        experts = layer.experts
        if type(experts) is not Experts:
            raise TypeError(f"sparse export needs core Experts weights, got {type(experts).__name__}")
        num_experts, hidden, inner = experts.w_in.shape
        up, down = [], []
        for e in range(num_experts):
            up_e = nn.Linear(hidden, inner, bias=False)
            up_e.weight.data = experts.w_in[e].detach().t().contiguous()  # (I, H)
            down_e = nn.Linear(inner, hidden, bias=False)
            down_e.weight.data = experts.w_out[e].detach().t().contiguous()  # (H, I)
            up.append(up_e)
            down.append(down_e)
        return cls(config=layer.config, router=layer.router, up=up, down=down, shared_experts=layer.shared_experts)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        cfg = self.config
        tokens = x.reshape(-1, cfg.hidden_size)  # (T, H)
        routing = self.router(tokens)
        activation = ACTIVATIONS[cfg.activation]
        out = torch.zeros_like(tokens)
        for e in range(cfg.num_experts):
            chosen = routing.expert_index == e  # (T, k): a token picks an expert at most once
            weight = (routing.weight * chosen).sum(dim=-1)  # (T,) its combine weight, 0 where not chosen
            rows = chosen.any(dim=-1).nonzero().squeeze(-1)  # (n_e,) tokens routed to expert e
            y = self.down[e](activation(self.up[e](tokens.index_select(0, rows))))  # (n_e, H)
            out = out.index_add(0, rows, y * weight.index_select(0, rows).unsqueeze(-1))
        for shared in self.shared_experts:
            out = out + shared(tokens)
        aux, balance, z_loss, expert_load = routing_losses(routing, cfg, training=self.training)
        return MoEOutput(out.reshape(x.shape), aux, balance, z_loss, expert_load, torch.zeros((), dtype=torch.int64))


def sparse_for_export(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) whose dropless MoELayers dispatch sparsely under export.

    The original is untouched. Returns the copy; with no dropless MoELayer in it, a plain copy.
    """
    model = copy.deepcopy(model).eval()
    if _rewritable(model):
        return SparseDispatchMoE.from_layer(model)
    for name in [name for name, module in model.named_modules() if _rewritable(module)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # setattr also replaces an item of a ModuleList or Sequential: their children are named "0", "1", ...
        setattr(parent, child, SparseDispatchMoE.from_layer(parent.get_submodule(child)))
    return model


def _rewritable(module: nn.Module) -> bool:
    return isinstance(module, MoELayer) and module.config.dropless and type(module.experts) is Experts
