"""Structured pruning that removes channels and experts, so the model gets smaller and faster.

Channels (MLP, CNN and LSTM layers): train with an L1 penalty on the weights (`l1_penalty`),
which drives whole channels towards zero, then remove the lowest-L1 channels with torch-pruning
(DepGraph, Fang et al. 2023): its dependency graph finds every tensor a channel touches (the
next layer's input columns, a norm's entries, the flatten or the slice in between) and cuts them
together, so the result is an ordinary smaller model that saves, exports to ONNX and quantizes
as before. Fine-tune after removal.

nn.LSTM: torch-pruning 1.6.1's own LSTM handler cuts the wrong axes (`weight_hh` rows by the
hidden index instead of the four gates' rows; `weight_ih` columns by the gate index) and fails
with IndexError on the first LSTM it prunes (checked on an LSTM(6, 16) -> Linear regressor with
MetaPruner at ratio 0.5); it also takes one layer only. `LSTMHiddenPruner` stands in for it
through torch-pruning's `customized_pruners` hook, so DepGraph still carries the cut to the
layers that read the LSTM's output: it removes hidden unit j from every layer of a stacked LSTM
(the four gate rows of weight_ih / weight_hh / biases, column j of weight_hh and of the next
layer's weight_ih), since nn.LSTM has one hidden size for all its layers. Its equivalence test
(a unit whose weights are all zero outputs exactly 0, so removing it changes nothing, forward
and backward) is in tests/core/compress/test_compress_prune.py.

Experts (MoE layers): `expert_load` counts the assignments each expert receives over
representative data; `prune_experts` keeps the most-used experts of each MoELayer and drops the
rest (or merges each into the kept expert nearest to it), removing their Router rows, so that
tokens re-route among the survivors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from core.experts import Experts
from core.moe import MoELayer
from core.router import Router

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM)


def l1_penalty(model: nn.Module, strength: float) -> torch.Tensor:
    """strength * sum |w| over the weight matrices of Linear, Conv and LSTM layers (biases and
    norms left alone): the L1 regulariser added to the task loss before channel pruning."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            for name, parameter in module.named_parameters(recurse=False):
                if name.startswith("weight") and parameter.requires_grad:
                    total = total + parameter.abs().sum()
    return strength * total


def _keep(size: int, idxs: list[int]) -> torch.Tensor:
    removed = set(idxs)
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _gate_rows(keep: torch.Tensor, hidden: int) -> torch.Tensor:
    """Rows of the four stacked gates (i, f, g, o) that belong to the kept hidden units."""
    return torch.cat([keep + gate * hidden for gate in range(4)])


class LSTMHiddenPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler for nn.LSTM (unidirectional, any number of layers, no projection):
    out channels are hidden units (removed from every layer), in channels the input features."""

    TARGET_MODULES = nn.LSTM

    def _check(self, layer: nn.LSTM) -> None:
        if layer.bidirectional or layer.proj_size:
            raise ValueError("LSTMHiddenPruner: bidirectional and projected LSTMs are not supported")

    def prune_out_channels(self, layer: nn.LSTM, idxs: list[int]) -> nn.LSTM:
        self._check(layer)
        hidden = layer.hidden_size
        keep = _keep(hidden, idxs)
        rows = _gate_rows(keep, hidden)
        for k in range(layer.num_layers):
            setattr(layer, f"weight_hh_l{k}", self._prune_parameter_and_grad(
                self._prune_parameter_and_grad(getattr(layer, f"weight_hh_l{k}"), rows.tolist(), 0),
                keep.tolist(), 1))
            weight_ih = self._prune_parameter_and_grad(getattr(layer, f"weight_ih_l{k}"), rows.tolist(), 0)
            if k > 0:  # the layer below's hidden units are this layer's inputs
                weight_ih = self._prune_parameter_and_grad(weight_ih, keep.tolist(), 1)
            setattr(layer, f"weight_ih_l{k}", weight_ih)
            if layer.bias:
                for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                    setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), rows.tolist(), 0))
        layer.hidden_size = len(keep)
        layer._init_flat_weights()
        return layer

    def prune_in_channels(self, layer: nn.LSTM, idxs: list[int]) -> nn.LSTM:
        self._check(layer)
        keep = _keep(layer.input_size, idxs)
        layer.weight_ih_l0 = self._prune_parameter_and_grad(layer.weight_ih_l0, keep.tolist(), 1)
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.LSTM) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.LSTM) -> int:
        return layer.input_size


def channel_importance(group: Any) -> torch.Tensor:
    """L1 norm of everything each channel of a DepGraph group touches (output rows and the next
    layers' input columns); LSTM hidden units include all their gate rows and columns."""
    importance = None
    for dependency, idxs in group:
        layer, handler = dependency.target.module, dependency.handler
        idxs = torch.as_tensor(idxs, dtype=torch.long)
        if isinstance(layer, nn.LSTM) and handler.__name__ == "prune_out_channels":
            hidden = layer.hidden_size
            score = torch.zeros(hidden)
            for k in range(layer.num_layers):
                names = [f"weight_ih_l{k}", f"weight_hh_l{k}"]
                names += [f"bias_ih_l{k}", f"bias_hh_l{k}"] if layer.bias else []
                for name in names:  # the unit's four gate rows
                    score += getattr(layer, name).detach().abs().reshape(4, hidden, -1).sum(dim=(0, 2))
                score += getattr(layer, f"weight_hh_l{k}").detach().abs().sum(dim=0)  # the unit's recurrent columns
            value = score[idxs]
        elif isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
            weight = layer.weight.detach().abs()
            if handler.__name__ == "prune_out_channels":
                value = weight.flatten(1).sum(dim=1)[idxs]
                if layer.bias is not None:
                    value = value + layer.bias.detach().abs()[idxs]
            else:
                value = weight.transpose(0, 1).flatten(1).sum(dim=1)[idxs]
        else:
            continue
        importance = value if importance is None else importance + value
    return importance


class L1ChannelImportance(tp.importance.Importance):
    """torch-pruning Importance: the summed L1 norm (channel_importance) of each group's channels."""

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        return channel_importance(group)


def channel_pruner(model: nn.Module, example_inputs: Any, *, ratio: float, steps: int = 1,
                   ignored_layers: Iterable[nn.Module] = (),
                   output_transform: Callable[[Any], torch.Tensor] | None = None,
                   importance: tp.importance.Importance | None = None) -> tp.pruner.MetaPruner:
    """torch-pruning's MetaPruner for `model`: lowest L1 first (L1ChannelImportance), `ratio` of the
    channels of every prunable group in all, reached in `steps` calls of `.step()` by its linear
    schedule (fine-tune between the calls: iterative pruning; the final widths equal one step's).

    example_inputs: a tensor or tuple the model runs on (DepGraph traces it once). ignored_layers:
    layers whose outputs must keep their width (the output head). output_transform: the output
    tensor of a model that returns a tuple. importance: a torch-pruning Importance in place of
    L1ChannelImportance, e.g. its GroupMagnitudeImportance(p=1), which also maps channels through
    concatenations and grouped convolutions (the YOLO detector's graph, which channel_importance
    does not cover).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"channel_pruner: ratio must be in (0, 1), got {ratio!r}")
    if not isinstance(steps, int) or not 1 <= steps <= 100:
        raise ValueError(f"channel_pruner: steps must be an integer in [1, 100], got {steps!r}")
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=importance or L1ChannelImportance(), pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=list(ignored_layers), customized_pruners={nn.LSTM: LSTMHiddenPruner()},
        root_module_types=list(PRUNABLE), output_transform=output_transform)
    model.train(was_training)
    return pruner


def prune_channels(model: nn.Module, example_inputs: Any, *, ratio: float,
                   ignored_layers: Iterable[nn.Module] = (),
                   output_transform: Callable[[Any], torch.Tensor] | None = None,
                   importance: tp.importance.Importance | None = None) -> dict[str, int]:
    """Remove `ratio` of the channels of every prunable group of `model`, lowest L1 first, in place,
    in one step (channel_pruner). Returns {"parameters_before", "parameters_after"}."""
    before = sum(p.numel() for p in model.parameters())
    pruner = channel_pruner(model, example_inputs, ratio=ratio, ignored_layers=ignored_layers,
                            output_transform=output_transform, importance=importance)
    prune_step(model, pruner)
    return {"parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters())}


def prune_step(model: nn.Module, pruner: tp.pruner.MetaPruner) -> None:
    """One step of `pruner` on `model` (in eval mode, as DepGraph traced it)."""
    was_training = model.training
    model.eval()
    pruner.step()
    model.train(was_training)


# -- experts -------------------------------------------------------------------------------------

@torch.no_grad()
def expert_load(model: nn.Module, batches: Iterable[Any],
                run: Callable[[nn.Module, Any], Any]) -> dict[str, torch.Tensor]:
    """Assignments each expert of each MoELayer received while `run(model, batch)` ran over
    `batches` (eval mode). Returns {layer name: (experts,) int64 counts}."""
    counts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            counts[name] = torch.zeros(module.config.num_experts, dtype=torch.long)

            def hook(_module, _inputs, output, name=name):
                counts[name] += output.expert_load.to(torch.long)

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return counts


@dataclass
class ExpertPruneResult:
    kept: list[int]  # original indices of the experts kept, in their new order
    merged_into: dict[int, int]  # dropped expert -> kept expert it was merged into ("merge" only)


@torch.no_grad()
def shrink_moe_layer(layer: MoELayer, load: torch.Tensor, *, keep: int,
                     mode: Literal["drop", "merge"] = "drop") -> tuple[MoELayer, ExpertPruneResult]:
    """A new MoELayer with the `keep` most-loaded experts of `layer`.

    drop: the other experts and their Router rows go; tokens re-route among the survivors.
    merge: each dropped expert is folded into the kept expert whose input weights are closest
    (cosine), as a load-weighted average, so what it learnt is not thrown away entirely.
    top_k becomes min(top_k, keep). Shared experts and the selection bias carry over.
    """
    cfg = layer.config
    if not 1 <= keep <= cfg.num_experts:
        raise ValueError(f"keep must be in [1, {cfg.num_experts}], got {keep}")
    if mode not in ("drop", "merge"):
        raise ValueError(f"mode must be 'drop' or 'merge', got {mode!r}")
    if not isinstance(layer.experts, Experts):
        raise ValueError(f"expert pruning needs core.experts.Experts, got {type(layer.experts).__name__}")
    order = torch.argsort(load.to(torch.float64), descending=True, stable=True)
    kept = order[:keep].sort().values
    w_in, w_out = layer.experts.w_in.detach().clone(), layer.experts.w_out.detach().clone()
    merged_into: dict[int, int] = {}
    if mode == "merge" and keep < cfg.num_experts:
        weight = load.to(w_in.dtype).clamp_min(1.0)  # an unused expert still counts a little
        flat = torch.nn.functional.normalize(w_in.flatten(1), dim=1)
        total_in, total_out = w_in * weight[:, None, None], w_out * weight[:, None, None]
        mass = weight.clone()
        for dropped in order[keep:].tolist():
            target = kept[torch.argmax(flat[kept] @ flat[dropped])].item()
            total_in[target] += total_in[dropped]
            total_out[target] += total_out[dropped]
            mass[target] += mass[dropped]
            merged_into[dropped] = target
        w_in, w_out = total_in / mass[:, None, None], total_out / mass[:, None, None]
    new_cfg = replace(cfg, num_experts=keep, top_k=min(cfg.top_k, keep))
    router = Router(config=new_cfg)
    router.gate.weight.copy_(layer.router.gate.weight[kept])
    router.selection_bias.copy_(layer.router.selection_bias[kept])
    experts = Experts(num_experts=keep, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                      activation=cfg.activation)
    experts.w_in.copy_(w_in[kept])
    experts.w_out.copy_(w_out[kept])
    shrunk = MoELayer(new_cfg, router=router, experts=experts, static=layer.static)
    shrunk.shared_experts.load_state_dict(layer.shared_experts.state_dict())
    shrunk.train(layer.training)
    return shrunk, ExpertPruneResult(kept.tolist(), merged_into)


def prune_experts(model: nn.Module, loads: dict[str, torch.Tensor], *, keep: int,
                  mode: Literal["drop", "merge"] = "drop") -> dict[str, ExpertPruneResult]:
    """Replace every MoELayer named in `loads` (from `expert_load`) by its shrunk copy, in place."""
    results = {}
    for name, load in loads.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shrunk, results[name] = shrink_moe_layer(model.get_submodule(name), load, keep=keep, mode=mode)
        setattr(parent, attribute, shrunk)
    return results
