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
Element-wise passes are the rest of the cost (a profile at 4,096 rows: MatMul about 30% of the kernel
time, the element-wise ops over the (P, H) and (P*k, I) activations most of the rest), so: layer norms
forward as ONNX's LayerNormalization; GELU's constants on the weights around it; the input layer's
product once per applicant; the backward over the `steps` path points only, the applicant forward-only.
Float32 throughout as the product; the prediction's sigmoid is float64 as `finance.models.moe._proba`.
"""

from __future__ import annotations

import numpy as np

from deploy.bundle.credit_features import BundleError
from deploy.bundle.graph import GraphBuilder, Var

_SQRT_HALF = float(np.sqrt(0.5))


class _Float32:
    """float32 helpers on a GraphBuilder (its Python-number operands are float64)."""

    def __init__(self, g: GraphBuilder) -> None:
        self.g = g

    def c(self, value) -> Var:
        return self.g.const(np.asarray(value, dtype=np.float32))

    def gelu_t(self, t: Var, *, derivative: bool) -> tuple[Var, Var | None]:
        """Exact GELU at x = sqrt(2) t, in units that fold its constants into the weights around it:
        (t (1 + erf t) = sqrt(2) gelu(x), and with `derivative` (1 + erf t) + (2 / sqrt(pi)) t exp(-t^2)
        = 2 gelu'(x)). The caller scales x's weights by sqrt(1/2) to get t, and the results by sqrt(1/2)
        and 1/2: 3 passes over the activations for the value, 5 more for the derivative (11 with x itself)."""
        g, c = self.g, self.c
        one_erf = g.op("Erf", t) + c(1.0)
        if not derivative:
            return t * one_erf, None
        # (2 / sqrt(pi)) exp(-t^2) as exp(log(2 / sqrt(pi)) - t^2): one pass less than the product
        pdf = g.op("Exp", c(np.log(2.0 / np.sqrt(np.pi))) - t * t)
        return t * one_erf, one_erf + t * pdf

    def activation(self, name: str, x: Var, *, derivative: bool) -> tuple[Var, Var | None]:
        """(a, a') of an expert's pre-activation x: see `_SCALES` for how they relate to the activation."""
        g, c = self.g, self.c
        if name == "gelu":
            return self.gelu_t(x, derivative=derivative)
        if name == "relu":
            positive = x > c(0.0)
            return g.where(positive, x, c(0.0)), g.op("Cast", positive, to=1) if derivative else None
        if name == "silu":
            sig = c(1.0) / (c(1.0) + g.op("Exp", -x))
            return x * sig, sig * (c(1.0) + x * (c(1.0) - sig)) if derivative else None
        raise BundleError(f"expert activation {name!r} has no bundle graph")

    def mean_last(self, x: Var, width: int) -> Var:
        """sum over the last axis times 1/width (keepdims), as the kernel's layer norm."""
        return self.g.op("ReduceSum", x, self.g.const(np.array([-1])), keepdims=1) * self.c(1.0 / width)

    def layer_norm(self, x: Var, norm, *, saving: bool) -> tuple[Var, tuple[Var, Var] | None]:
        """(layer norm of x, with `saving` (normed x, 1 / std) for the backward). ONNX's LayerNormalization
        (opset 17) is one pass where the kernel's sum, centre, square, sum, scale are nine."""
        y, mean, inv_std = self.g.op_multi("LayerNormalization", x, self.c(norm.weight), self.c(norm.bias),
                                           outputs=3, axis=-1, epsilon=float(norm.eps))
        return y, ((x - mean) * inv_std, inv_std) if saving else None

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


# Per expert activation, (scale of w_in, of w_out, of w_in in the backward): the graph's a and a'
# (`_Float32.activation`) of x' = x * the first are the activation of x times 1 / the second, and its
# derivative times 1 / the third, so the constants ride on the weights instead of costing passes over
# the (P*k, I) activations, the graph's largest element-wise work. GELU: x = sqrt(2) t, t (1 + erf t)
# = sqrt(2) gelu(x), (1 + erf t) + (2 / sqrt(pi)) t exp(-t^2) = 2 gelu'(x).
_SCALES = {"gelu": (_SQRT_HALF, _SQRT_HALF, 0.5), "relu": (1.0, 1.0, 1.0), "silu": (1.0, 1.0, 1.0)}


def _moe_layer(f: _Float32, h: Var, layer, *, saving: bool) -> tuple[Var, dict | None]:
    """One residual branch, forward: h (P, H) -> (output (P, H), with `saving` what the backward needs).

    Sparse, as the kernel: each expert runs on the rows routed to it only (Gather, its two
    MatMuls), and the weighted outputs go back to their rows (`_combine`)."""
    g, c = f.g, f.c
    experts, hidden, inner = layer.w_in.shape
    if layer.shared:
        raise BundleError("MoE layers with shared experts have no bundle graph yet")
    if layer.activation not in _SCALES:
        raise BundleError(f"expert activation {layer.activation!r} has no bundle graph")
    scale_in, scale_out, _ = _SCALES[layer.activation]
    u, norm_saved = f.layer_norm(h, layer.norm, saving=saving)
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
    ys, act_grads = [], []
    for e in range(experts):
        act, act_grad = f.activation(layer.activation, g.op(
            "MatMul", g.op("Gather", u, dispatch["rows"][e], axis=0), c(scale_in * layer.w_in[e])),
            derivative=saving)  # (n_e, I)
        ys.append(g.op("MatMul", act, c(scale_out * layer.w_out[e])))  # (n_e, H)
        act_grads.append(act_grad)
    out = _combine(f, [y * w for y, w in zip(ys, dispatch["weight"], strict=True)], dispatch)  # (P, H)
    if not saving:
        return out, None
    return out, {"norm": norm_saved, "index": index, "weight": weight, "scores": scores, "dispatch": dispatch,
                 "act_grad": act_grads, "y": ys}


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
        grad_u_parts.append(g.op("MatMul", grad_pre, c(_SCALES[layer.activation][2] * layer.w_in[e].T)))
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


def _network(f: _Float32, t: Var, kernel, *, outputs: int, saving: bool) -> tuple[Var, tuple]:
    """The network from t (P, H) = (input layer's pre-activation) * sqrt(1/2) on: (logits (P, outputs)
    of the head's first `outputs` rows, with `saving` what the backward needs; the input layer's
    `gelu_t` derivative is 2 gelu')."""
    g, c = f.g, f.c
    act, input_grad = f.gelu_t(t, derivative=saving)
    h = act * c(_SQRT_HALF)  # (P, H)
    states = []
    for layer in kernel.layers:
        out, state = _moe_layer(f, h, layer, saving=saving)
        states.append(state)
        h = h + out
    normed, head_saved = f.layer_norm(h, kernel.head_norm, saving=saving)
    logits = g.op("MatMul", normed, c(kernel.head_weight[:outputs].T)) + c(kernel.head_bias[:outputs])
    return logits, (h, input_grad, states, head_saved)


def network_logits(g: GraphBuilder, x: Var, kernel) -> Var:
    """The network's forward alone: x (N, F) float32 -> logits (N, outputs) float32, for a
    `TabularMoEGradient` kernel."""
    f = _Float32(g)
    t = g.op("MatMul", x, f.c(_SQRT_HALF * kernel.input_weight.T)) + f.c(_SQRT_HALF * kernel.input_bias)
    return _network(f, t, kernel, outputs=kernel.head_weight.shape[0], saving=False)[0]


def moe_head(g: GraphBuilder, x: Var, model) -> tuple[Var, Var]:
    """x: (N, F) float32 features (NaN allowed) -> (pd (N, 1) float64, contributions (N, F) float64).

    Two passes through the network: the `steps` path points alpha * z with what the backward needs,
    then the applicant z alone, forward only (its gradient is not used: the kernel's one pass over
    steps + 1 points computes it and drops it). The input layer is linear, so its product is taken
    once per applicant (z W, then alpha * z W per point), and the path's mean gradient is taken in
    the hidden width before the one product with W back to the F inputs: the same sums, to float32
    rounding, with 1/(steps) of the input layer's arithmetic."""
    kernel, module = model.gradient_kernel_, model.module_
    f, c = _Float32(g), _Float32(g).c
    buffers = {name: getattr(module, name).detach().numpy() for name in module.BUFFERS}
    x = g.where(x.isnan(), c(buffers["fill"]), x)
    x = g.op("Min", g.op("Max", x, c(buffers["low"])), c(buffers["high"]))
    z = (x - c(buffers["mean"])) / c(buffers["scale"])  # (N, F) standardised
    steps = model.config_.attribution_steps
    alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps  # midpoint rule
    hidden = kernel.input_weight.shape[0]
    zw = g.op("MatMul", z, c(_SQRT_HALF * kernel.input_weight.T))  # (N, H)
    bias = c(_SQRT_HALF * kernel.input_bias)
    path = g.op("Reshape", g.op("Unsqueeze", zw, g.const(np.array([0]))) * c(alphas.reshape(-1, 1, 1)) + bias,
                g.const(np.array([-1, hidden])))  # (steps * N, H), point-major
    _, (h, input_grad, states, head_saved) = _network(f, path, kernel, outputs=1, saving=True)
    grad = f.layer_norm_backward(g.op("Expand", c(kernel.head_weight[0]), g.op("Shape", h)), kernel.head_norm,
                                 head_saved)
    for layer, state in zip(reversed(kernel.layers), reversed(states), strict=True):
        grad = grad + _moe_layer_backward(f, grad, layer, state)
    grad = g.op("Reshape", grad * input_grad, g.const(np.array([steps, -1, hidden])))  # 2 d logit / d pre-activation
    mean_grad = g.op("MatMul", g.op("ReduceMean", grad, g.const(np.array([0])), keepdims=0),
                     c(0.5 * kernel.input_weight))  # (N, F): mean over the path of d logit / d input
    contributions = g.op("Cast", z * mean_grad, to=11)
    logit, _ = _network(f, zw + bias, kernel, outputs=1, saving=False)  # (N, 1) at the applicant
    return 1.0 / (1.0 + g.op("Exp", -g.op("Cast", logit, to=11))), contributions
