"""The credit MoE network with its integrated-gradient reason codes, as ONNX operators.

`finance.models.moe.MoEModel` scores with `predict_with_contributions`: the standardised applicant z,
`attribution_steps` midpoint-rule points alpha * z plus z itself through the network, the logit at z
as the prediction and z * mean(d logit / d input) over the path points as contributions. ONNX has
no autograd, so the graph carries the network's forward and its backward pass, written operator by
operator after `finance.models.input_gradients.TabularMoEGradient` (the product's own NumPy forward and
gradient, itself tested against torch autograd in tests/finance/models/test_input_gradients.py). The weights are
read from that kernel, so the graph follows whatever the loaded module holds.

torch.onnx (core.onnx_export) exports the forward only: a graph from it would give the PD but not
the reasons, and a second forward for the backward's saved values would run the network twice.

The experts run densely in the graph: every expert on every path point, weighted by a routing
matrix that is zero outside each point's top-k (TopK: ties to the lower index, as the kernel's
stable argsort). With 16 experts of 64 x 128 this is 2 x 262k multiply-adds per point and layer,
one MatMul each instead of a gather per expert. Float32 throughout as the product; the prediction's
sigmoid is float64 as `finance.models.moe._proba`.
"""

from __future__ import annotations

import numpy as np

from deploy.bundle.credit_features import BundleError
from deploy.bundle.graph import GraphBuilder, Var

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


class _Float32:
    """float32 helpers on a GraphBuilder (its Python-number operands are float64)."""

    def __init__(self, g: GraphBuilder) -> None:
        self.g = g

    def c(self, value) -> Var:
        return self.g.const(np.asarray(value, dtype=np.float32))

    def gelu(self, x: Var) -> tuple[Var, Var]:
        """(exact erf GELU of x, its derivative), as finance.models.input_gradients._activation."""
        g, c = self.g, self.c
        cdf = c(0.5) * (c(1.0) + g.op("Erf", x * c(_SQRT_HALF)))
        return x * cdf, cdf + x * c(_INV_SQRT_2PI) * g.op("Exp", c(-0.5) * x * x)

    def activation(self, name: str, x: Var) -> tuple[Var, Var]:
        g, c = self.g, self.c
        if name == "gelu":
            return self.gelu(x)
        if name == "relu":
            positive = x > c(0.0)
            return g.where(positive, x, c(0.0)), g.op("Cast", positive, to=1)
        if name == "silu":
            sig = c(1.0) / (c(1.0) + g.op("Exp", -x))
            return x * sig, sig * (c(1.0) + x * (c(1.0) - sig))
        raise BundleError(f"expert activation {name!r} has no bundle graph")

    def mean_last(self, x: Var, width: int) -> Var:
        """sum over the last axis times 1/width (keepdims), as the kernel's layer norm."""
        return self.g.op("ReduceSum", x, self.g.const(np.array([-1])), keepdims=1) * self.c(1.0 / width)

    def layer_norm(self, x: Var, norm) -> tuple[Var, tuple[Var, Var]]:
        width = norm.weight.shape[0]
        centred = x - self.mean_last(x, width)
        inv_std = self.c(1.0) / self.g.op("Sqrt", self.mean_last(centred * centred, width) + self.c(norm.eps))
        normed = centred * inv_std
        return normed * self.c(norm.weight) + self.c(norm.bias), (normed, inv_std)

    def layer_norm_backward(self, grad: Var, norm, saved: tuple[Var, Var]) -> Var:
        normed, inv_std = saved
        width = norm.weight.shape[0]
        gw = grad * self.c(norm.weight)
        return inv_std * (gw - self.mean_last(gw, width) - normed * self.mean_last(gw * normed, width))


def _moe_layer(f: _Float32, h: Var, layer) -> tuple[Var, dict]:
    """One residual branch, forward: h (P, H) -> (output (P, H), what the backward needs)."""
    g, c = f.g, f.c
    experts, hidden, inner = layer.w_in.shape
    if layer.shared:
        raise BundleError("MoE layers with shared experts have no bundle graph yet")
    u, norm_saved = f.layer_norm(h, layer.norm)
    logits = g.op("MatMul", u, c(layer.gate.T))  # (P, E)
    scores = g.op("Softmax", logits, axis=-1)
    choice = scores if layer.selection_bias is None else scores + c(layer.selection_bias)
    _, index = g.op_multi("TopK", choice, g.const(np.array([layer.top_k])), outputs=2, axis=-1, largest=1,
                          sorted=1)  # (P, k)
    weight = g.op("GatherElements", scores, index, axis=-1)
    if layer.normalize_weights and layer.top_k > 1:
        total = g.op("ReduceSum", weight, g.const(np.array([-1])), keepdims=1)
        weight = weight / g.op("Max", total, c(1e-9))
    routing = g.op("ScatterElements", g.op("Mul", scores, c(0.0)), index, weight, axis=-1)  # (P, E), 0 off top-k
    w_in = np.ascontiguousarray(layer.w_in.transpose(1, 0, 2).reshape(hidden, experts * inner))  # (H, E*I)
    pre = g.op("Reshape", g.op("MatMul", u, c(w_in)), g.const(np.array([0, experts, inner])))  # (P, E, I)
    act, act_grad = f.activation(layer.activation, pre)
    y = g.op("MatMul", g.op("Transpose", act, perm=[1, 0, 2]), c(layer.w_out))  # (E, P, H)
    y = g.op("Transpose", y, perm=[1, 0, 2])  # (P, E, H)
    out = g.op("Squeeze", g.op("MatMul", g.op("Unsqueeze", routing, g.const(np.array([1]))), y),
               g.const(np.array([1])))  # (P, H)
    return out, {"norm": norm_saved, "index": index, "weight": weight, "scores": scores, "routing": routing,
                 "act_grad": act_grad, "y": y}


def _moe_layer_backward(f: _Float32, grad_out: Var, layer, saved: dict) -> Var:
    """d logit / d output (P, H) -> d logit / d input through the branch, as _MoELayer.backward."""
    g, c = f.g, f.c
    experts, hidden, inner = layer.w_in.shape
    w_out_t = np.ascontiguousarray(layer.w_out.transpose(2, 0, 1).reshape(hidden, experts * inner))  # (H, E*I)
    grad_act = g.op("Reshape", g.op("MatMul", grad_out, c(w_out_t)), g.const(np.array([0, experts, inner])))
    grad_pre = grad_act * g.op("Unsqueeze", saved["routing"], g.const(np.array([2]))) * saved["act_grad"]
    w_in_t = np.ascontiguousarray(layer.w_in.transpose(0, 2, 1).reshape(experts * inner, hidden))  # (E*I, H)
    grad_u = g.op("MatMul", g.op("Reshape", grad_pre, g.const(np.array([0, experts * inner]))), c(w_in_t))
    grad_all = g.op("Squeeze", g.op("MatMul", saved["y"], g.op("Unsqueeze", grad_out, g.const(np.array([2])))),
                    g.const(np.array([2])))  # (P, E): d logit / d weight of each expert
    index, weight = saved["index"], saved["weight"]
    grad_weight = g.op("GatherElements", grad_all, index, axis=-1)  # (P, k)
    zeros = g.op("Mul", saved["scores"], c(0.0))
    if layer.normalize_weights and layer.top_k > 1:
        chosen = weight * (grad_weight - g.op("ReduceSum", weight * grad_weight, g.const(np.array([-1])),
                                              keepdims=1))
        grad_logits = g.op("ScatterElements", zeros, index, chosen, axis=-1)
    else:
        scores = saved["scores"]
        grad_logits = g.op("ScatterElements", zeros, index, grad_weight, axis=-1)
        grad_logits = scores * (grad_logits - g.op("ReduceSum", scores * grad_logits, g.const(np.array([-1])),
                                                   keepdims=1))
    grad_u = grad_u + g.op("MatMul", grad_logits, c(layer.gate))
    return f.layer_norm_backward(grad_u, layer.norm, saved["norm"])


def moe_head(g: GraphBuilder, x: Var, model) -> tuple[Var, Var]:
    """x: (N, F) float32 features (NaN allowed) -> (pd (N, 1) float64, contributions (N, F) float64)."""
    kernel, module = model.gradient_kernel_, model.module_
    f, c = _Float32(g), _Float32(g).c
    buffers = {name: getattr(module, name).detach().numpy() for name in ("fill", "low", "high", "mean", "scale")}
    x = g.where(x.isnan(), c(buffers["fill"]), x)
    x = g.op("Min", g.op("Max", x, c(buffers["low"])), c(buffers["high"]))
    z = (x - c(buffers["mean"])) / c(buffers["scale"])  # (N, F) standardised
    steps = model.config_.attribution_steps
    alphas = np.append((np.arange(steps, dtype=np.float32) + 0.5) / steps, np.float32(1.0))
    width = kernel.input_weight.shape[1]
    path = g.op("Reshape", g.op("Unsqueeze", z, g.const(np.array([0]))) * c(alphas.reshape(-1, 1, 1)),
                g.const(np.array([-1, width])))  # (points * N, F), point-major
    h, input_grad = f.gelu(g.op("MatMul", path, c(kernel.input_weight.T)) + c(kernel.input_bias))
    states = []
    for layer in kernel.layers:
        out, state = _moe_layer(f, h, layer)
        states.append(state)
        h = h + out
    normed, head_saved = f.layer_norm(h, kernel.head_norm)
    logits = g.op("MatMul", normed, c(kernel.head_weight[:1].T)) + c(kernel.head_bias[:1])  # (P, 1)
    grad = f.layer_norm_backward(g.op("Expand", c(kernel.head_weight[0]), g.op("Shape", h)), kernel.head_norm,
                                 head_saved)
    for layer, state in zip(reversed(kernel.layers), reversed(states), strict=True):
        grad = grad + _moe_layer_backward(f, grad, layer, state)
    grad = g.op("MatMul", grad * input_grad, c(kernel.input_weight))  # (P, F)
    grad = g.op("Reshape", grad, g.const(np.array([steps + 1, -1, width])))
    mean_grad = g.op("ReduceMean", g.op("Slice", grad, g.const(np.array([0])), g.const(np.array([steps])),
                                        g.const(np.array([0]))), g.const(np.array([0])), keepdims=0)  # (N, F)
    contributions = g.op("Cast", z * mean_grad, to=11)
    logit = g.op("Cast", g.op("Squeeze", g.op("Slice", g.op("Reshape", logits, g.const(np.array([steps + 1, -1, 1]))),
                                               g.const(np.array([steps])), g.const(np.array([steps + 1])),
                                               g.const(np.array([0]))), g.const(np.array([0]))), to=11)  # (N, 1)
    return 1.0 / (1.0 + g.op("Exp", -logit)), contributions
