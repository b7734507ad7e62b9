"""Activation-aware INT8 weight quantization (AWQ-style) for Linear layers and stacked MoE experts.

The recipe (Lin et al., AWQ): collect each layer's inputs on calibration data; for a grid of
exponents alpha, scale the weight's input channels by s = mean|x|^alpha (normalised so that
sqrt(max(s) * min(s)) = 1), quantize W*s to INT8 per output channel, and keep the alpha whose
output Q(W*s) (x/s) is closest to W x. alpha = 0 (s = 1) is in the grid, so the search never does
worse than plain per-channel rounding. The 1/s on the input is folded into a preceding LayerNorm
where one feeds only that layer, and otherwise kept as one multiply that inductor fuses into the
producer's kernel.

Execution goes through maintained kernels, not a hand loop: torchao's `quantize_` with
`Int8DynamicActivationInt8WeightConfig` (int8 activations per token) or `Int8WeightOnlyConfig`
for PyTorch (run it under torch.compile: eager torchao int8 is slow on CPU), and onnxruntime's
`quantize_dynamic` / QDQ `quantize_static` for ONNX files. The stacked expert weights
(`core.experts.Experts`) become `LinearExperts`, one nn.Linear pair per expert, so that the same
configs own them. Routers stay in fp32: int8 gate logits flip top-k choices.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.blocks import MoETransformerBlock
from core.experts import ACTIVATIONS, Experts, grouped_scatter
from core.moe import MoELayer

QMAX = 127  # symmetric int8: [-127, 127]; -128 is left out so that the scale is symmetric


@dataclass
class AWQConfig:
    # Dynamic int8 (activations per token) is what pays on CPU: FIELD-NOTES measured 1.9x under
    # compile for an MLP here, while weight-only int8 was slower than fp32.
    scheme: Literal["int8_dynamic", "int8_weight_only"] = "int8_dynamic"
    grid_size: int = 20  # alphas 0, 0.05, ..., 0.95: AWQ's grid
    max_rows: int = 2048  # calibration rows kept per layer: ample for a per-channel mean and an error estimate
    min_weight_elements: int = 0  # skip smaller Linears (CPU int8 kernels lose to fp32 on tiny GEMMs); 0 = all
    quantize_experts: bool = True  # the stacked expert weights hold most of an MoE's parameters

    def __post_init__(self) -> None:
        if self.scheme not in ("int8_dynamic", "int8_weight_only"):
            raise ValueError(f"AWQConfig: scheme must be 'int8_dynamic' or 'int8_weight_only', got {self.scheme!r}")
        if self.grid_size < 1:
            raise ValueError(f"AWQConfig: grid_size must be >= 1, got {self.grid_size}")
        if self.max_rows < 1:
            raise ValueError(f"AWQConfig: max_rows must be >= 1, got {self.max_rows}")
        if self.min_weight_elements < 0:
            raise ValueError(f"AWQConfig: min_weight_elements must be >= 0, got {self.min_weight_elements}")


# --- the arithmetic ----------------------------------------------------------------------------

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> int8 values (out, in) and fp32 scales (out,), symmetric per output channel."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / QMAX  # (out,)
    q = torch.clamp(torch.round(weight / scale[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scale.float()


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Round-trip through per-output-channel int8: what the int8 kernels compute with."""
    q, scale = quantize_per_channel(weight)
    return q.float() * scale[:, None]


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Round-trip activations (rows, in) through per-row symmetric int8 (dynamic quantization)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / QMAX
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


def quantized_output_error(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, *, dynamic: bool) -> float:
    """Mean squared error of Q(W*s) Q_a(x/s) against W x. weight (out, in), x (rows, in), scale (in,)."""
    reference = x @ weight.t()  # (rows, out)
    x_scaled = x / scale
    if dynamic:
        x_scaled = fake_quantize_per_token(x_scaled)
    approx = x_scaled @ fake_quantize_weight(weight * scale).t()
    return float((approx - reference).square().mean())


@dataclass
class ScaleSearch:
    alpha: float  # the chosen exponent; 0 means plain per-channel quantization won
    scale: torch.Tensor  # (in,) per-input-channel scale s applied as W*s and x/s
    error: float  # output MSE with the chosen scale
    error_plain: float  # output MSE of plain per-channel int8 (alpha = 0), for the report


def search_scale(weight: torch.Tensor, x: torch.Tensor, *, grid_size: int = 20, dynamic: bool = True) -> ScaleSearch:
    """AWQ grid search for one linear map. weight (out, in); x (rows, in) calibration inputs."""
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    weight, x = weight.detach().float(), x.detach().float()
    mean_abs = x.abs().mean(dim=0).clamp_min(1e-8)  # (in,)
    best: ScaleSearch | None = None
    error_plain = math.nan
    for step in range(grid_size):
        alpha = step / grid_size
        scale = mean_abs.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centre the scales around 1
        error = quantized_output_error(weight, x, scale, dynamic=dynamic)
        if step == 0:
            error_plain = error
        if best is None or error < best.error:
            best = ScaleSearch(alpha, scale, error, error_plain)
    best.error_plain = error_plain
    return best


# --- experts as Linear pairs ---------------------------------------------------------------------

def scaled_expert_mlp(x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                      inv_in_scale: torch.Tensor, inv_mid_scale: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert: x (rows, H) -> act((x / s_in) W_up^T) / s_mid W_down^T -> (rows, H).

    Weights are passed in (not modules) so that one compiled graph serves every expert, and
    torchao's int8 weight tensors dispatch F.linear to their kernels.
    """
    inner = ACTIVATIONS[activation](F.linear(x * inv_in_scale, up_weight))  # (rows, I)
    return F.linear(inner * inv_mid_scale, down_weight)


class LinearExperts(nn.Module):
    """`Experts` rebuilt as one nn.Linear pair per expert, with AWQ input scales as buffers.

    An `core.experts.ExpertBank` (forward_grouped, forward_dense), so MoELayer runs it unchanged, and
    torchao's quantize_ (which owns nn.Linear weights) can quantize every expert.
    Buffers: inv_in_scale (E, H) multiplies each expert's input; inv_mid_scale (E, I) its
    activation, before the down projection.
    """

    def __init__(self, *, up: list[nn.Linear], down: list[nn.Linear], inv_in_scale: torch.Tensor,
                 inv_mid_scale: torch.Tensor, activation: str) -> None:
        super().__init__()
        if not len(up) == len(down) == inv_in_scale.shape[0] == inv_mid_scale.shape[0]:
            raise ValueError(f"one up and one down Linear and one scale row per expert, got {len(up)} up, "
                             f"{len(down)} down, {inv_in_scale.shape[0]} and {inv_mid_scale.shape[0]} scale rows")
        self.num_experts = len(up)
        self.activation = activation
        self.up = nn.ModuleList(up)
        self.down = nn.ModuleList(down)
        self.register_buffer("inv_in_scale", inv_in_scale.float())
        self.register_buffer("inv_mid_scale", inv_mid_scale.float())
        self.mlp = scaled_expert_mlp  # core.fused swaps in a compiled copy (one graph for all experts)

    @classmethod
    def from_experts(cls, experts: Experts, in_scale: torch.Tensor | None = None,
                     mid_scale: torch.Tensor | None = None) -> LinearExperts:
        """Fold scales (E, H) and (E, I) (None: ones) into per-expert Linear weights."""
        e, h, i = experts.w_in.shape
        in_scale = torch.ones(e, h) if in_scale is None else in_scale
        mid_scale = torch.ones(e, i) if mid_scale is None else mid_scale
        up, down = [], []
        for k in range(e):
            up_k = nn.Linear(h, i, bias=False)
            up_k.weight.data = (experts.w_in[k].detach().t() * in_scale[k][None, :]).contiguous()  # (I, H)
            down_k = nn.Linear(i, h, bias=False)
            down_k.weight.data = (experts.w_out[k].detach().t() * mid_scale[k][None, :]).contiguous()  # (H, I)
            up.append(up_k)
            down.append(down_k)
        return cls(up=up, down=down, inv_in_scale=1 / in_scale, inv_mid_scale=1 / mid_scale,
                   activation=experts.activation)

    def expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x (rows, H) -> (rows, H) through expert `expert`."""
        return self.mlp(x, self.up[expert].weight, self.down[expert].weight, self.inv_in_scale[expert],
                        self.inv_mid_scale[expert], self.activation)

    forward = Experts.forward  # forward_<path>, as MoELayer calls it

    def forward_grouped(self, tokens: torch.Tensor, token_of: torch.Tensor, weight_of: torch.Tensor,
                        bounds: list[tuple[int, int, int]]) -> torch.Tensor:
        return grouped_scatter(tokens, token_of, weight_of, bounds, self.expert_mlp)

    def forward_dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        for expert in range(self.num_experts):
            out = out + combine[:, expert:expert + 1].to(x.dtype) * self.expert_mlp(expert, x)
        return out


# --- calibration and transformation ------------------------------------------------------------

def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _layernorms_feeding_only(model: nn.Module) -> dict[str, nn.LayerNorm]:
    """Linear name -> the LayerNorm whose output feeds that Linear and nothing else."""
    pairs: dict[str, nn.LayerNorm] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, first), (second_name, second) in zip(children, children[1:], strict=False):
                if isinstance(first, nn.LayerNorm) and first.elementwise_affine and isinstance(second, nn.Linear):
                    pairs[prefix + second_name] = first
        if isinstance(module, MoETransformerBlock) and module.norm_attn.elementwise_affine:
            pairs[prefix + "attn.qkv"] = module.norm_attn
    return pairs


class InputScaled(nn.Module):
    """x -> linear(x * inv_scale): the unfolded half of an AWQ scale. inv_scale (in,)."""

    def __init__(self, *, linear: nn.Linear, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class AWQQuantizer:
    """Fit AWQ scales on calibration batches, then make an INT8 copy of the model.

    fit(model, batches) -> self: `batches` are the model's positional args (tuple), keyword
        args (dict) or a single tensor each. Learned: `searches_` {layer: ScaleSearch}, where
        expert layers are named "<moe>.experts.<e>.up" / ".down".
    apply_scales(model) -> fp32 copy with the scales folded and experts as LinearExperts (what
        ONNX export + onnxruntime quantization take).
    transform(model) -> apply_scales + torchao quantize_ (int8 weights per output channel).
    """

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()

    def _quantizable(self, name: str, module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) and "router" not in name
                and module.weight.numel() >= self.config.min_weight_elements)

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Iterable[Any]) -> AWQQuantizer:
        cfg = self.config
        model.eval()
        seen: dict[str, list[torch.Tensor]] = {}
        handles = []

        def keep(name: str):
            def hook(_module, args):
                rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                have = sum(len(r) for r in seen.setdefault(name, []))
                if have < cfg.max_rows:
                    seen[name].append(rows[: cfg.max_rows - have])
            return hook

        moe_layers = {n: m for n, m in model.named_modules() if isinstance(m, MoELayer)}
        for name, module in model.named_modules():
            if self._quantizable(name, module) or (cfg.quantize_experts and name in moe_layers):
                handles.append(module.register_forward_pre_hook(keep(name)))
        try:
            for batch in batches:
                _run(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            raise ValueError("no calibration inputs reached a quantizable layer: pass at least one batch")

        dynamic = cfg.scheme == "int8_dynamic"
        self.searches_: dict[str, ScaleSearch] = {}
        for name, chunks in seen.items():
            x = torch.cat(chunks)
            if name in moe_layers:
                self._fit_experts(name, moe_layers[name], x, dynamic)
            else:
                weight = model.get_submodule(name).weight
                self.searches_[name] = search_scale(weight, x, grid_size=cfg.grid_size, dynamic=dynamic)
        return self

    def _fit_experts(self, name: str, layer: MoELayer, tokens: torch.Tensor, dynamic: bool) -> None:
        experts = layer.experts
        if not isinstance(experts, Experts):
            raise TypeError(f"{name}: AWQ reads stacked Experts weights, got {type(experts).__name__}")
        act = ACTIVATIONS[experts.activation]
        chosen = layer.router(tokens).expert_index  # (rows, k)
        for e in range(experts.num_experts):
            x = tokens[(chosen == e).any(dim=-1)]  # rows routed to expert e
            if len(x) == 0:
                continue  # never routed in calibration: plain per-channel rounding below
            w_in, w_out = experts.w_in[e].t(), experts.w_out[e].t()  # as Linear weights (I, H), (H, I)
            grid = self.config.grid_size
            self.searches_[f"{name}.experts.{e}.up"] = search_scale(w_in, x, grid_size=grid, dynamic=dynamic)
            inner = act(x @ experts.w_in[e])  # (rows, I)
            self.searches_[f"{name}.experts.{e}.down"] = search_scale(w_out, inner, grid_size=grid, dynamic=dynamic)

    @torch.no_grad()
    def apply_scales(self, model: nn.Module) -> nn.Module:
        if not hasattr(self, "searches_"):
            from sklearn.exceptions import NotFittedError  # here: core.quantization's import stays sklearn-free

            raise NotFittedError("this AWQ has no scales yet: call fit() first")
        model = copy.deepcopy(model).eval()
        folds = _layernorms_feeding_only(model)
        for name, search in self.searches_.items():
            if ".experts." in name:
                continue
            linear = model.get_submodule(name)
            linear.weight.mul_(search.scale[None, :].to(linear.weight.dtype))
            norm = folds.get(name)
            if norm is not None:
                norm.weight.div_(search.scale)
                norm.bias.div_(search.scale)
            else:
                _set_submodule(model, name, InputScaled(linear=linear, inv_scale=1 / search.scale))
        if self.config.quantize_experts:
            for name, layer in list(model.named_modules()):
                if isinstance(layer, MoELayer) and isinstance(layer.experts, Experts):
                    layer.experts = LinearExperts.from_experts(layer.experts, *self._expert_scales(name, layer.experts))
        return model

    def _expert_scales(self, name: str, experts: Experts) -> tuple[torch.Tensor, torch.Tensor]:
        e, h, i = experts.w_in.shape
        in_scale, mid_scale = torch.ones(e, h), torch.ones(e, i)
        for k in range(e):
            if (up := self.searches_.get(f"{name}.experts.{k}.up")) is not None:
                in_scale[k] = up.scale
            if (down := self.searches_.get(f"{name}.experts.{k}.down")) is not None:
                mid_scale[k] = down.scale
        return in_scale, mid_scale

    def transform(self, model: nn.Module) -> nn.Module:
        """An INT8 copy: scales applied, then torchao quantize_ on every quantizable Linear."""
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        scaled = self.apply_scales(model)
        config = (Int8DynamicActivationInt8WeightConfig() if self.config.scheme == "int8_dynamic"
                  else Int8WeightOnlyConfig())
        quantize_(scaled, config, filter_fn=lambda module, fqn: self._quantizable(fqn, module))
        return scaled

    def report(self) -> list[dict[str, float | str]]:
        """Per layer: chosen alpha, output MSE with AWQ and with plain rounding."""
        return [{"layer": name, "alpha": s.alpha, "mse_awq": s.error, "mse_plain": s.error_plain}
                for name, s in self.searches_.items()]


def compile_quantized(model: nn.Module) -> nn.Module:
    """Run every torchao int8 op of `model` under torch.compile, in place; returns the model.

    Eager torchao re-dispatches each int8 call through its tensor subclass (~1 ms per call on this
    CPU); compiled, quantize-matmul-rescale becomes one graph. Each int8 Linear is compiled in
    place (`nn.Module.compile`: names and state_dict unchanged) and one compiled function serves
    all experts (weights are arguments). This compiles the int8 kernels only;
    `core.fused.fuse_model` compiles the whole model instead.
    """
    expert_mlp = compile_expert_mlp()
    for module in model.modules():
        if isinstance(module, LinearExperts):
            module.mlp = expert_mlp
        elif isinstance(module, nn.Linear) and type(module.weight) not in (torch.Tensor, nn.Parameter):
            module.compile(dynamic=True)
    return model


def compile_expert_mlp():
    """`scaled_expert_mlp` under torch.compile, one graph for every expert of a model."""
    return _own_storage(torch.compile(scaled_expert_mlp, dynamic=True))


def _own_storage(fn):
    """Give views (an expert's slice of the sorted rows, its row of the scale buffer) their own
    storage before a compiled call: dynamo guards on storage offsets, so every new slice offset
    would otherwise recompile the graph. The copies are a few hundred floats."""
    def call(*args):
        # Every view, offset 0 included (a view and a fresh tensor differ in dispatch keys, which
        # dynamo also guards on), and any offset tensor (inference-mode slices are not "views").
        return fn(*(a.clone() if isinstance(a, torch.Tensor) and (a._is_view() or a.storage_offset()) else a
                    for a in args))
    return call


# --- ONNX --------------------------------------------------------------------------------------

# The weight-bearing ops only: quantizing LayerNorm, Softmax or the router's TopK inputs costs
# accuracy and saves nothing on CPU.
QUANTIZED_ONNX_OPS = ["MatMul", "Gemm"]


def _calibration_reader(arrays: dict[str, np.ndarray], batch_rows: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds named arrays (rows first) to the calibrator in batches of `batch_rows`."""

        def __init__(self) -> None:
            rows = len(next(iter(arrays.values())))
            self._batches = iter([{k: v[s:s + batch_rows] for k, v in arrays.items()}
                                  for s in range(0, rows, batch_rows)])

        def get_next(self):
            return next(self._batches, None)

    return ArrayReader()


def quantize_onnx(source: str | Path, target: str | Path, *, mode: Literal["dynamic", "static"] = "dynamic",
                  calibration: dict[str, np.ndarray] | None = None, batch_rows: int = 64,
                  op_types: list[str] | None = None) -> Path:
    """INT8 copy of an ONNX model through onnxruntime: dynamic (weights int8, activations per
    batch at run time) or static QDQ (activation ranges from `calibration`, named input arrays).
    `op_types` defaults to QUANTIZED_ONNX_OPS; recurrent models add "LSTM"."""
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    if mode == "static" and not calibration:
        raise ValueError("static quantization needs calibration arrays")
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    source, target = Path(source), Path(target)
    proto = onnx.load(str(source))
    # The exporter's value_info can disagree with ORT's own shape inference: let ORT infer afresh.
    del proto.graph.value_info[:]
    routers = [n.name for n in proto.graph.node if any("router" in name for name in n.input)]  # stay fp32
    # onnxruntime's quantizer first rewrites a Gemm as a MatMul named "<gemm>_MatMul" (onnx_model.
    # replace_gemm_with_matmul), then matches the exclusions: name both, or a Gemm router is quantized.
    routers += [f"{name}_MatMul" for name in routers]
    op_types = op_types or QUANTIZED_ONNX_OPS
    cleaned = target.with_suffix(".prep.onnx")
    onnx.save(proto, str(cleaned))
    try:
        if mode == "dynamic":
            quantize_dynamic(str(cleaned), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=op_types, nodes_to_exclude=routers)
        else:
            quantize_static(str(cleaned), str(target), _calibration_reader(calibration, batch_rows),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=op_types,
                            nodes_to_exclude=routers)
    finally:
        cleaned.unlink(missing_ok=True)
    quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)  # keep version and provenance
    onnx.save(quantized, str(target))
    return target
