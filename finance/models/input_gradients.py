"""A TabularMoE's forward and input gradient in NumPy, without autograd: attributions at serving speed.

Reason codes need the gradient of a tabular network's logit with respect to its inputs along an
integrated-gradient path: for one credit application, 9 points. At that size torch's eager
dispatch and autograd bookkeeping are the cost (about 80 ops forward and backward, and copies of
the chosen experts' weights), while the arithmetic is microseconds. This module runs the maths of
`TabularMoE.forward` in eval mode and its hand-written backward pass on NumPy float32 arrays,
where an op costs about a microsecond of overhead instead of several.

`TabularMoEGradient.from_module(net)` takes views of the weights of a `core.blocks.TabularMoE`
(numeric inputs only; softmax routing, dropless; routed and shared experts; gelu, relu or silu;
bias balancing) and `forward_and_gradient(x)` returns the logits and d(sum of logit `output`)/dx,
with eval-mode semantics (no dropout). Each active expert runs once over the rows routed to it.
It pays for small batches only: against torch autograd on the credit network's shape it takes
0.4-0.7x the CPU time at 9 rows and 1.2-1.4x at 3,600 (benchmarks/input_gradients.py;
finance.models.moe.NUMPY_PATH_ROWS picks the path).
Equality with torch's forward and autograd is tested in tests/finance/models/test_input_gradients.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import erf
from torch import nn

_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def _activation(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activation(x), its derivative at x) for the experts' and input layer's activations."""
    if name == "gelu":  # exact (erf) GELU, as torch's default
        cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))
        return x * cdf, cdf + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)
    if name == "relu":
        positive = x > 0
        return np.where(positive, x, 0).astype(x.dtype), positive.astype(x.dtype)
    if name == "silu":
        sig = 1.0 / (1.0 + np.exp(-x))
        return x * sig, sig * (1.0 + x * (1.0 - sig))
    raise ValueError(f"activation {name!r} has no NumPy gradient here")


@dataclass
class _LayerNorm:
    weight: np.ndarray  # (H,)
    bias: np.ndarray  # (H,)
    eps: float

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        inv_width = np.float32(1.0 / x.shape[-1])  # sum * (1/H): np.mean's Python wrapper cost more than the sum
        centred = x - x.sum(axis=-1, keepdims=True) * inv_width
        inv_std = 1.0 / np.sqrt((centred * centred).sum(axis=-1, keepdims=True) * inv_width + self.eps)
        normed = centred * inv_std
        return normed * self.weight + self.bias, (normed, inv_std)

    def backward(self, grad: np.ndarray, saved: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        normed, inv_std = saved
        g = grad * self.weight
        inv_width = np.float32(1.0 / g.shape[-1])
        return inv_std * (g - g.sum(axis=-1, keepdims=True) * inv_width
                          - normed * ((g * normed).sum(axis=-1, keepdims=True) * inv_width))


@dataclass
class _MoELayer:
    norm: _LayerNorm
    gate: np.ndarray  # (E, H) router weight
    selection_bias: np.ndarray | None  # (E,) added to the scores only to choose experts (bias balancing)
    w_in: np.ndarray  # (E, H, I)
    w_out: np.ndarray  # (E, I, H)
    shared: list[tuple[np.ndarray, np.ndarray]]  # per shared expert: up (I, H), down (H, I), as nn.Linear stores them
    top_k: int
    normalize_weights: bool
    activation: str

    def forward(self, h: np.ndarray) -> tuple[np.ndarray, dict]:
        """h (N, H) -> (routed + shared output (N, H), what the backward pass needs).

        Each active expert runs once over its rows. A dense pass over all experts was slower even
        at 9 rows in an ad-hoc profile (1.26 vs 0.63 ms per call over 2,000 calls): its E/k times
        larger products cost more than the loop saves.
        """
        u, norm_saved = self.norm.forward(h)
        logits = u @ self.gate.T  # (N, E)
        scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)  # softmax, as the router
        choice = scores if self.selection_bias is None else scores + self.selection_bias
        index = np.argsort(-choice, axis=-1, kind="stable")[:, :self.top_k]  # (N, k), largest first as topk
        weight = np.take_along_axis(scores, index, axis=-1)  # (N, k)
        if self.normalize_weights and self.top_k > 1:
            weight = weight / np.maximum(weight.sum(axis=-1, keepdims=True), 1e-9)
        out = np.zeros_like(h)
        experts, y_of = [], np.empty((*index.shape, h.shape[1]), dtype=h.dtype)  # y_of: (N, k, H)
        flat = index.reshape(-1)  # row-major: assignment a is row a // k, slot a % k
        order = np.argsort(flat, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(flat[order])) + 1):  # one group per active expert
            expert = flat[group[0]]
            rows, slots = np.divmod(group, self.top_k)
            act, act_grad = _activation(self.activation, u[rows] @ self.w_in[expert])  # (group, I)
            y = act @ self.w_out[expert]  # (group, H)
            y_of[rows, slots] = y
            out[rows] += y * weight[rows, slots, None]  # a row picks an expert once: rows are distinct
            experts.append((expert, rows, slots, act_grad))
        shared_saved = []
        for up, down in self.shared:
            shared_act, shared_grad = _activation(self.activation, u @ up.T)
            out += shared_act @ down.T
            shared_saved.append(shared_grad)
        return out, {"norm": norm_saved, "index": index, "weight": weight, "scores": scores,
                     "experts": experts, "y": y_of, "shared": shared_saved}

    def backward(self, grad_out: np.ndarray, saved: dict) -> np.ndarray:
        """d(loss)/d(output) (N, H) -> d(loss)/d(input h) through this branch (not the residual)."""
        weight, index = saved["weight"], saved["index"]
        grad_u = np.zeros_like(grad_out)
        for expert, rows, slots, act_grad in saved["experts"]:
            grad_pre = ((grad_out[rows] * weight[rows, slots, None]) @ self.w_out[expert].T) * act_grad  # (group, I)
            grad_u[rows] += grad_pre @ self.w_in[expert].T
        grad_weight = np.einsum("nh,nkh->nk", grad_out, saved["y"])  # (N, k)
        grad_logits = np.zeros_like(saved["scores"])  # (N, E)
        if self.normalize_weights and self.top_k > 1:
            # the normalised weights are a softmax over the chosen logits: the rest get no gradient
            np.put_along_axis(grad_logits, index, weight * (grad_weight - (weight * grad_weight).sum(
                axis=-1, keepdims=True)), axis=-1)
        else:  # the weights are the full softmax's chosen entries
            scores = saved["scores"]
            np.put_along_axis(grad_logits, index, grad_weight, axis=-1)
            grad_logits = scores * (grad_logits - (scores * grad_logits).sum(axis=-1, keepdims=True))
        grad_u += grad_logits @ self.gate
        for (up, down), shared_grad in zip(self.shared, saved["shared"], strict=True):
            grad_u += ((grad_out @ down) * shared_grad) @ up
        return self.norm.backward(grad_u, saved["norm"])


class TabularMoEGradient:
    """An eval-mode TabularMoE (numeric inputs) as NumPy float32: logits and their input gradient.

    Build with `from_module`. It holds views of the module's weight tensors, so in-place updates
    (`load_state_dict`, an optimiser step) show through; a module rebuilt or moved needs a new one.
    """

    def __init__(self, *, input_weight: np.ndarray, input_bias: np.ndarray, layers: list[_MoELayer],
                 head_norm: _LayerNorm, head_weight: np.ndarray, head_bias: np.ndarray) -> None:
        self.input_weight, self.input_bias = input_weight, input_bias  # (H, F), (H,)
        self.layers = layers
        self.head_norm, self.head_weight, self.head_bias = head_norm, head_weight, head_bias  # (outputs, H)

    @classmethod
    def from_module(cls, net: nn.Module, *, embedded_inputs: bool = False) -> TabularMoEGradient:
        """net: a `core.blocks.TabularMoE` without categorical embeddings, whose layers route by
        softmax with no expert capacity (dropless, as in eval on a handful of rows), with float32
        CPU weights and stacked `core.experts.Experts`. Anything else raises TypeError (not such a
        network) or ValueError (a network this kernel does not cover), naming what differs.

        With `embedded_inputs`, a network with embeddings is taken too: x is then the input layer's
        whole input, the numeric features followed by each categorical feature's embedding vector
        (the embeddings themselves stay with the caller: deploy/bundle/ai4i_graph.py)."""
        from core.blocks import TabularMoE
        from core.experts import Experts

        if not isinstance(net, TabularMoE):
            raise TypeError(f"TabularMoEGradient reads a core.blocks.TabularMoE, got {type(net).__name__}")
        if len(net.embeddings) and not embedded_inputs:
            raise ValueError("TabularMoEGradient covers numeric inputs only; this network has categorical embeddings")
        parts = {"input_projection": net.input_projection, "head_projection": net.head_projection}
        for name, part in parts.items():
            if type(part) is not nn.Linear:  # e.g. a quantized wrapper
                raise TypeError(f"TabularMoEGradient needs a float nn.Linear as {name}, got {type(part).__name__}")

        def array(t) -> np.ndarray:  # a view: in-place changes to the module's weights show through
            if t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError(f"TabularMoEGradient runs float32 CPU weights, got {t.dtype} on {t.device.type}")
            return t.detach().numpy()

        def norm(module: nn.LayerNorm) -> _LayerNorm:
            return _LayerNorm(array(module.weight), array(module.bias), float(module.eps))

        layers = []
        for i, (layer_norm, layer) in enumerate(zip(net.norms, net.layers, strict=True)):
            cfg = layer.config
            if cfg.router_scoring != "softmax":
                raise ValueError(f"TabularMoEGradient covers softmax routing; layer {i} routes by {cfg.router_scoring}")
            if not cfg.dropless:
                raise ValueError(f"TabularMoEGradient is dropless; layer {i} has an expert capacity")
            if type(layer.experts) is not Experts:
                raise TypeError(f"TabularMoEGradient needs the stacked float experts (core.experts.Experts); "
                                f"layer {i} has {type(layer.experts).__name__}")
            layers.append(_MoELayer(
                norm=norm(layer_norm), gate=array(layer.router.gate.weight),
                selection_bias=array(layer.router.selection_bias) if cfg.bias_balancing else None,
                w_in=array(layer.experts.w_in), w_out=array(layer.experts.w_out), top_k=cfg.top_k,
                normalize_weights=cfg.normalize_weights, activation=cfg.activation,
                shared=[(array(s.up.weight), array(s.down.weight)) for s in layer.shared_experts]))
        linear, head = net.input_projection, net.head_projection
        return cls(input_weight=array(linear.weight), input_bias=array(linear.bias), layers=layers,
                   head_norm=norm(net.head_norm), head_weight=array(head.weight), head_bias=array(head.bias))

    def forward_and_gradient(self, x: np.ndarray, *, output: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """x (N, F) float32 -> (logits (N, outputs), d(sum over rows of logits[:, output]) / dx (N, F))."""
        if x.ndim != 2 or x.shape[1] != self.input_weight.shape[1]:
            raise ValueError(f"expected (N, {self.input_weight.shape[1]}) inputs, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        h, input_grad = _activation("gelu", x @ self.input_weight.T + self.input_bias)  # (N, H); nn.GELU
        states = []
        for layer in self.layers:
            out, state = layer.forward(h)
            states.append(state)
            h = h + out
        normed, head_saved = self.head_norm.forward(h)
        logits = normed @ self.head_weight.T + self.head_bias  # (N, outputs)
        grad = self.head_norm.backward(np.broadcast_to(self.head_weight[output], h.shape), head_saved)
        for layer, state in zip(reversed(self.layers), reversed(states), strict=True):
            grad = grad + layer.backward(grad, state)
        return logits, (grad * input_grad) @ self.input_weight
