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

The experts run sparsely, as the kernel dispatches them: per expert, the (row, slot) assignments
routed to it (Equal + NonZero on the top-k indices; TopK breaks ties to the lower index, as the
kernel's stable argsort), a Gather of those rows, the expert's two MatMuls, and a Gather per slot
that puts the outputs back in row order. The dense form (every expert on every path point, weighted
by a routing matrix that is zero outside the top-k) did 8x the expert arithmetic at 16 experts,
top-2, and ran at 0.17-0.31x moeworks' batch scoring at 4,096 rows (benchmarks/RESULTS.md, bundles).
Float32 throughout as the product; the prediction's sigmoid is float64 as `finance.models.moe._proba`.
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

    def activation(self, name: str, x: Var) -> tuple[Var, Var, float]:
        """(a, a', scale): scale * a is the activation of x and scale * a' its derivative.

        GELU's 0.5 goes into the expert weights (scale 0.5: exact in float32), saving passes over
        the experts' (P*k, I) activations, the graph's largest element-wise work: x (1 + erf(t))
        and (1 + erf(t)) + x sqrt(2/pi) exp(-x^2 / 2), 9 passes instead of 11."""
        g, c = self.g, self.c
        if name == "gelu":
            t = x * c(_SQRT_HALF)
            one_erf = g.op("Erf", t) + c(1.0)
            # sqrt(2/pi) exp(-t^2) as exp(log(sqrt(2/pi)) - t^2): one pass less than the product
            pdf = g.op("Exp", c(np.log(2.0 * _INV_SQRT_2PI)) - t * t)
            return x * one_erf, one_erf + x * pdf, 0.5
        if name == "relu":
            positive = x > c(0.0)
            return g.where(positive, x, c(0.0)), g.op("Cast", positive, to=1), 1.0
        if name == "silu":
            sig = c(1.0) / (c(1.0) + g.op("Exp", -x))
            return x * sig, sig * (c(1.0) + x * (c(1.0) - sig)), 1.0
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


def _dispatch(f: _Float32, index: Var, weight: Var, experts: int, top_k: int) -> dict:
    """Which (row, slot) assignments of index (P, k) each expert serves, as the kernel groups them.

    Assignment a is row a // k, slot a % k (row-major). Per expert e: `rows[e]` (n_e,) the rows
    routed to it, `weight[e]` (n_e, 1) their gate weights. `slots[j]` (P,): where row p's slot-j
    output lies among the experts' outputs concatenated in expert order (a Gather by it puts them
    back: every row has exactly k, so no scatter-add over (P, H) is needed). One Equal and NonZero
    per expert over the P*k assignments: cheaper than sorting them (TopK), and no Split."""
    g = f.g
    flat = g.op("Reshape", index, g.const(np.array([-1])))  # (P*k,)
    flat_weight = g.op("Reshape", weight, g.const(np.array([-1])))
    positions = [g.op("Reshape", g.op("NonZero", g.op("Equal", flat, g.const(np.array(e)))), g.const(np.array([-1])))
                 for e in range(experts)]  # (n_e,) assignments of expert e, ascending
    order = g.concat(positions, axis=0)  # (P*k,): assignments expert by expert
    count = g.op("Range", g.const(np.array(0)), g.op("Squeeze", g.op("Shape", flat), g.const(np.array([0]))),
                 g.const(np.array(1)))
    inverse = g.op("Reshape", g.op("ScatterElements", count, order, count, axis=0),
                   g.const(np.array([-1, top_k])))  # (P, k): where each assignment landed in `order`
    return {"rows": [g.op("Div", p, g.const(np.array(top_k))) for p in positions],
            "weight": [g.op("Unsqueeze", g.op("Gather", flat_weight, p, axis=0), g.const(np.array([1])))
                       for p in positions],
            "slots": [g.op("Squeeze", g.columns(inverse, j, j + 1), g.const(np.array([1]))) for j in range(top_k)]}


def _combine(f: _Float32, parts: list[Var], dispatch: dict) -> Var:
    """Per-expert (n_e, W) results -> (P, W): each row's k of them summed, slot by slot."""
    stacked = f.g.concat(parts, axis=0)  # (P*k, W), expert by expert
    return f.g.sequential_sum([f.g.op("Gather", stacked, slot, axis=0) for slot in dispatch["slots"]])


def _moe_layer(f: _Float32, h: Var, layer) -> tuple[Var, dict]:
    """One residual branch, forward: h (P, H) -> (output (P, H), what the backward needs).

    Sparse, as the kernel: each expert runs on the rows routed to it only (Gather, its two
    MatMuls), and the weighted outputs go back to their rows (`_combine`)."""
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
    dispatch = _dispatch(f, index, weight, experts, layer.top_k)
    ys, act_grads, scale = [], [], 1.0
    for e in range(experts):
        act, act_grad, scale = f.activation(layer.activation, g.op(
            "MatMul", g.op("Gather", u, dispatch["rows"][e], axis=0), c(layer.w_in[e])))  # (n_e, I)
        ys.append(g.op("MatMul", act, c(scale * layer.w_out[e])))  # (n_e, H)
        act_grads.append(act_grad)
    out = _combine(f, [y * w for y, w in zip(ys, dispatch["weight"], strict=True)], dispatch)  # (P, H)
    return out, {"norm": norm_saved, "index": index, "weight": weight, "scores": scores, "dispatch": dispatch,
                 "act_grad": act_grads, "scale": scale, "y": ys}


def _moe_layer_backward(f: _Float32, grad_out: Var, layer, saved: dict) -> Var:
    """d logit / d output (P, H) -> d logit / d input through the branch, as _MoELayer.backward."""
    g, c = f.g, f.c
    experts, hidden, inner = layer.w_in.shape
    dispatch, index, weight = saved["dispatch"], saved["index"], saved["weight"]
    grad_u_parts, grad_weight_parts = [], []
    for e in range(experts):
        grad_y = g.op("Gather", grad_out, dispatch["rows"][e], axis=0)  # (n_e, H)
        # d logit / d gate weight of the assignment: <grad_out, y>
        grad_weight_parts.append(g.op("ReduceSum", saved["y"][e] * grad_y, g.const(np.array([-1])), keepdims=1))
        grad_pre = g.op("MatMul", grad_y * dispatch["weight"][e], c(layer.w_out[e].T)) * saved["act_grad"][e]
        grad_u_parts.append(g.op("MatMul", grad_pre, c(saved["scale"] * layer.w_in[e].T)))
    grad_u = _combine(f, grad_u_parts, dispatch)  # (P, H)
    grad_weight = g.concat([g.op("Gather", g.concat(grad_weight_parts, axis=0), slot, axis=0)
                            for slot in dispatch["slots"]], axis=1)  # (P, k)
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


def _forward(f: _Float32, x: Var, kernel, *, outputs: int) -> tuple[Var, tuple]:
    """x (P, F) float32 -> (logits (P, outputs) of the head's first `outputs` rows, what the backward needs)."""
    g, c = f.g, f.c
    h, input_grad = f.gelu(g.op("MatMul", x, c(kernel.input_weight.T)) + c(kernel.input_bias))
    states = []
    for layer in kernel.layers:
        out, state = _moe_layer(f, h, layer)
        states.append(state)
        h = h + out
    normed, head_saved = f.layer_norm(h, kernel.head_norm)
    logits = g.op("MatMul", normed, c(kernel.head_weight[:outputs].T)) + c(kernel.head_bias[:outputs])
    return logits, (h, input_grad, states, head_saved)


def network_logits(g: GraphBuilder, x: Var, kernel) -> Var:
    """The network's forward alone: x (N, F) float32 -> logits (N, outputs) float32, for a
    `TabularMoEGradient` kernel (the backward's extra values are pruned from the graph unused)."""
    return _forward(_Float32(g), x, kernel, outputs=kernel.head_weight.shape[0])[0]


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
    logits, (h, input_grad, states, head_saved) = _forward(f, path, kernel, outputs=1)  # (P, 1)
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
