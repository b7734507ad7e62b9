"""One ONNX graph for a loaded credit model: raw fields -> pd, points, decision, reasons.

Built from the loaded `CreditScorer`'s fitted attributes (the pipeline's catalogue, the scorecard's
WoE tables and logistic coefficients, the booster's trees), never from its files, so the bundle
follows whatever format the model folder is saved in.

Outputs (N rows): `pd` (N, 1) float64, `points` (N, 1) float64 (rounded to 0.1 as `PointsScale`),
`decision` (N, 1) int64 (0 approve, 1 decline: pd <= cut-off approves), `reasons` (N, k) int64
indices into the card's reason table (-1: no further factor raised the risk).
"""

from __future__ import annotations

import numpy as np
import onnx

from deploy.bundle.credit_features import BundleError, feature_matrix, raw_inputs
from deploy.bundle.graph import GraphBuilder, Var
from deploy.bundle.moe_graph import moe_head
from deploy.bundle.sequence_graph import sequence_head

REASON_THRESHOLD = 1e-6  # finance.scorer.CreditScorer.reason_codes names pushes above this


def _numpy_row_sum(g: GraphBuilder, terms: Var, width: int) -> Var:
    """(N, width) -> (N, 1) summed as numpy sums a contiguous row (pairwise, 8 accumulators), so that
    the scorecard's log-odds agree bit for bit with `logistic_proba`."""
    cols = [g.column(terms, j) for j in range(width)]
    if width < 8:
        return g.sequential_sum([g.fill_like(cols[0], 0.0), *cols])
    if width > 128:
        raise BundleError("scorecards of more than 128 features are not supported")
    acc = cols[:8]
    stop = width - width % 8
    for i in range(8, stop, 8):
        acc = [a + cols[i + j] for j, a in enumerate(acc)]
    total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for j in range(stop, width):
        total = total + cols[j]
    return total


def _scorecard(g: GraphBuilder, raw: dict[str, Var], model, pipeline) -> tuple[Var, Var]:
    """(pd (N, 1), contributions (N, F)) of a finance.models.scorecard.ScorecardModel."""
    names = list(model.selected_)
    x = g.op("Cast", feature_matrix(g, raw, pipeline, names), to=11)  # (N, J) float32 -> float64
    tables = [model.woe_tables_[n] for n in names]
    width = max(len(s) for s, _, _ in tables)
    splits = np.full((len(names), max(width, 1)), np.inf)
    woe = np.zeros((len(names), width + 1))
    for j, (s, w, _) in enumerate(tables):
        splits[j, :len(s)] = s
        woe[j, :len(w)] = w
    counts = np.array([len(s) for s, _, _ in tables], dtype=np.float64)
    missing = np.array([m for _, _, m in tables], dtype=np.float64)
    # searchsorted(splits, x, side="right") = how many split points are <= x
    above = g.op("Cast", g.op("Unsqueeze", x, g.const(np.array([2]))) >= g.const(splits[None]), to=11)
    bins = g.op("ReduceSum", above, g.const(np.array([2])), keepdims=0)
    bins = g.where(bins > g.const(counts), g.const(counts), bins)  # +inf counts the +inf padding too
    flat = g.op("Cast", bins + g.const(np.arange(len(names), dtype=np.float64) * (width + 1)), to=7)
    values = g.op("Gather", g.const(woe.reshape(-1)), flat)
    values = g.where(x.isnan(), g.const(missing), values)
    coef = model.logistic_.coef_[0].astype(np.float64)
    logit = _numpy_row_sum(g, values * g.const(coef), len(names)) + float(model.logistic_.intercept_[0])
    pd_ = 1.0 / (1.0 + g.op("Exp", -logit))
    per_feature = values * g.const(coef) - g.const(np.asarray(model.best_contribution_, dtype=np.float64))
    scatter = np.zeros((len(names), len(model.features_)))
    scatter[np.arange(len(names)), model.columns_] = 1.0
    return pd_, g.op("MatMul", per_feature, g.const(scatter))


def _lightgbm(g: GraphBuilder, raw: dict[str, Var], model, pipeline) -> tuple[Var, Var]:
    """(pd, path contributions) of a finance.models.gbdt.LightGBMModel, from the booster's own dump.

    One ai.onnx.ml TreeEnsemble (opset 5, float64 splits as LightGBM compares) returns the leaf each
    tree reaches; leaf values and the per-leaf path attributions (`paths_`) are gathered from it and
    added in the order `contributions` adds them (tree by tree, root to leaf)."""
    if model.config_.attribution != "path":
        raise BundleError("LightGBM bundles carry path attributions; this model ranks reasons by TreeSHAP")
    trees = model.booster_.dump_model(num_iteration=model.best_iteration_)["tree_info"]
    feature_table, delta_table, _ = model.paths_
    num_trees, leaves, depth = feature_table.shape
    ens = _tree_ensemble(trees, leaves)
    x = g.op("Cast", feature_matrix(g, raw, pipeline), to=11)  # float32 features, compared as float64
    leaf = g.op("TreeEnsemble", x, domain="ai.onnx.ml", **ens)  # (N, T) global leaf id per tree
    leaf = g.op("Cast", leaf, to=7)
    leaf_values = np.zeros(num_trees * leaves)
    for t, info in enumerate(trees):
        for index, value in _leaf_values(info["tree_structure"]):
            leaf_values[t * leaves + index] = value
    raw_score = g.op("ReduceSum", g.op("Gather", g.const(leaf_values), leaf), g.const(np.array([1])), keepdims=1)
    pd_ = 1.0 / (1.0 + g.op("Exp", -raw_score))
    # (N, T, D) features and deltas of the splits on each reached leaf's path; padding adds 0.0 to feature 0
    # int32 feature ids: half the bytes of the largest gathered tensor (N x trees x depth)
    features = g.op("Gather", g.const_int32(np.where(feature_table < 0, 0, feature_table).reshape(-1, depth)), leaf)
    deltas = g.op("Gather", g.const(delta_table.reshape(-1, depth)), leaf)
    flat_shape = g.const(np.array([0, num_trees * depth]))
    zeros = g.op("Expand", g.const(np.zeros((1, len(model.features_)))),
                 g.op("Concat", g.op("Shape", x, start=0, end=1), g.const(np.array([len(model.features_)])),
                      axis=0))
    contrib = g.op("ScatterElements", zeros, g.op("Reshape", features, flat_shape),
                   g.op("Reshape", deltas, flat_shape), axis=1, reduction="add")
    return pd_, contrib


def _leaf_values(node: dict):
    stack = [node]
    while stack:
        n = stack.pop()
        if "split_feature" not in n:
            yield n.get("leaf_index", 0), float(n["leaf_value"])
        else:
            stack += [n["left_child"], n["right_child"]]


def _tree_ensemble(trees: list[dict], leaves: int) -> dict:
    """TreeEnsemble attributes whose target t is the global id (t * leaves + leaf) of tree t's leaf."""
    feat, splits, true_ids, true_leaf, false_ids, false_leaf, missing_true, roots = ([] for _ in range(8))
    leaf_targets: list[int] = []
    leaf_weights: list[float] = []

    def add_leaf(t: int, index: int) -> int:
        leaf_targets.append(t)
        leaf_weights.append(float(t * leaves + index))
        return len(leaf_weights) - 1

    for t, info in enumerate(trees):
        root = info["tree_structure"]
        if "split_feature" not in root:  # a one-leaf tree: one split whose both sides reach the leaf
            leaf = add_leaf(t, root.get("leaf_index", 0))
            roots.append(len(feat))
            feat.append(0), splits.append(0.0), missing_true.append(0)
            true_ids.append(leaf), true_leaf.append(1), false_ids.append(leaf), false_leaf.append(1)
            continue
        roots.append(len(feat))
        pending = [root]
        slots: dict[int, int] = {}
        while pending:  # number the splits first so children can point at them
            node = pending.pop()
            slots[id(node)] = len(feat) + len(slots)
            pending += [c for c in (node["left_child"], node["right_child"]) if "split_feature" in c]
        order = sorted(slots, key=slots.get)
        by_id = {}
        stack = [root]
        while stack:
            node = stack.pop()
            by_id[id(node)] = node
            stack += [c for c in (node["left_child"], node["right_child"]) if "split_feature" in c]
        for key in order:
            node = by_id[key]
            if node["decision_type"] != "<=":
                raise BundleError(f"LightGBM split type {node['decision_type']!r} (categorical) is not supported")
            missing = node["missing_type"]
            if missing == "Zero":
                raise BundleError("LightGBM models trained with zero_as_missing are not supported")
            threshold = float(node["threshold"])
            # NaN: "NaN" missing type follows default_left; "None" compares as 0.0
            goes_left = bool(node["default_left"]) if missing == "NaN" else 0.0 <= threshold
            feat.append(int(node["split_feature"]))
            splits.append(threshold)
            missing_true.append(int(goes_left))
            for child, ids, is_leaf in ((node["left_child"], true_ids, true_leaf),
                                        (node["right_child"], false_ids, false_leaf)):
                if "split_feature" in child:
                    ids.append(slots[id(child)]), is_leaf.append(0)
                else:
                    ids.append(add_leaf(t, child.get("leaf_index", 0))), is_leaf.append(1)
    count = len(feat)
    return {"aggregate_function": 1, "post_transform": 0, "n_targets": len(trees), "tree_roots": roots,
            "nodes_featureids": feat, "nodes_splits": onnx.numpy_helper.from_array(np.array(splits)),
            "nodes_modes": onnx.numpy_helper.from_array(np.zeros(count, dtype=np.uint8)),  # BRANCH_LEQ
            "nodes_truenodeids": true_ids, "nodes_trueleafs": true_leaf, "nodes_falsenodeids": false_ids,
            "nodes_falseleafs": false_leaf, "nodes_missing_value_tracks_true": missing_true,
            "leaf_targetids": leaf_targets, "leaf_weights": onnx.numpy_helper.from_array(np.array(leaf_weights))}


def _ensemble(g: GraphBuilder, raw: dict[str, Var], model, pipeline) -> tuple[Var, Var]:
    """finance.models.ensemble.EnsembleModel of members that have heads: their log-odds (PD clipped
    to [1e-7, 1 - 1e-7]) blended by the logistic regression, contributions weighted alike."""
    missing = [m.name for m in model.members_ if m.name not in _HEADS]
    if missing:
        raise BundleError(f"ensemble members {missing} have no bundle graph yet (covered: scorecard, lightgbm, moe)")
    parts = [_HEADS[m.name](g, raw, m, pipeline) for m in model.members_]
    logits = []
    for member_pd, _ in parts:
        p = g.clip(member_pd, 1e-7, 1 - 1e-7)
        logits.append(g.op("Log", p / (1.0 - p)))
    coef = model.blend_.coef_[0].astype(np.float64)
    logit = _numpy_row_sum(g, g.concat(logits, axis=1) * g.const(coef), len(logits)) + float(
        model.blend_.intercept_[0])
    contrib = None
    for w, (_, c) in zip(coef, parts, strict=True):  # sum(w * c): Python's sum, from the first term on
        contrib = float(w) * c if contrib is None else contrib + float(w) * c
    return 1.0 / (1.0 + g.op("Exp", -logit)), contrib


def _moe(g: GraphBuilder, raw: dict[str, Var], model, pipeline) -> tuple[Var, Var]:
    """(pd, integrated-gradient contributions) of a finance.models.moe.MoEModel (deploy/bundle/moe_graph.py)."""
    return moe_head(g, feature_matrix(g, raw, pipeline, list(model.features_)), model)


_HEADS = {"scorecard": _scorecard, "lightgbm": _lightgbm, "moe": _moe, "ensemble": _ensemble,
          "sequence": sequence_head, "sequence-ensemble": _ensemble}


def top_reason_indices(g: GraphBuilder, contrib: Var, families: np.ndarray, k: int) -> Var:
    """finance.scorer.top_reasons + the > 1e-6 rule: (N, k) int64 feature indices, -1 for none.

    The strongest feature of each family (first on ties) stands for it; the k strongest families
    are ranked by push, ties by feature index (TopK's rule: the lower index first)."""
    num_features = len(families)
    groups = [np.flatnonzero(families == f) for f in range(int(families.max()) + 1)]
    width = max(len(m) for m in groups)
    members = np.full((len(groups), width), num_features)  # padding points at a -inf column
    for f, m in enumerate(groups):
        members[f, :len(m)] = m
    padded = g.concat([contrib, g.op("Expand", g.const(np.array([[-np.inf]])),
                                     g.op("Concat", g.op("Shape", contrib, start=0, end=1),
                                          g.const(np.array([1])), axis=0))], axis=1)
    grouped = g.op("Gather", padded, g.const(members), axis=1)  # (N, G, M)
    local = g.op("ArgMax", grouped, axis=2, keepdims=1)
    push = g.op("ReduceMax", grouped, g.const(np.array([2])), keepdims=0)  # (N, G)
    table = g.op("Expand", g.const(members[None]), g.op("Shape", grouped))
    candidate = g.op("Squeeze", g.op("GatherElements", table, local, axis=2), g.const(np.array([2])))  # (N, G)
    board = g.op("Expand", g.const(np.array([[-np.inf]])), g.op("Shape", contrib))
    board = g.op("ScatterElements", board, candidate, push, axis=1)
    values, indices = g.op_multi("TopK", board, g.const(np.array([k])), outputs=2, axis=1, largest=1, sorted=1)
    return g.where(values > REASON_THRESHOLD, indices, g.const(np.array(-1)))


def credit_graph(scorer, *, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The bundle's graph for a loaded finance CreditScorer (see the module docstring)."""
    name = scorer.model_name
    if name not in _HEADS:
        raise BundleError(f"credit model {name!r} has no bundle graph yet (covered: {', '.join(_HEADS)})")
    g = GraphBuilder()
    raw = raw_inputs(g, scorer.dataset)
    pd_, contrib = _HEADS[name](g, raw, scorer.model_, scorer.pipeline_)
    scale = scorer.policy_.scale
    p = g.clip(pd_, 1e-9, 1 - 1e-9)
    points = g.op("Round", (scale.offset + scale.factor * g.op("Log", (1.0 - p) / p)) * 10.0) / 10.0
    # -1: a record moeworks refuses (pd NaN: the sequence model's missing or non-positive credit limit)
    decision = g.where(pd_.isnan(), g.const(np.array(-1)), g.op("Cast", pd_ > float(scorer.cutoff_pd_), to=7))
    k = min(scorer.policy_.reason_count, int(scorer.pipeline_.families_.max()) + 1)
    reasons = top_reason_indices(g, contrib, np.asarray(scorer.pipeline_.families_), k)
    reasons = g.where(pd_.isnan(), g.const(np.array(-1)), reasons)
    for var, out in ((pd_, "pd"), (points, "points"), (decision, "decision"), (reasons, "reasons")):
        g.output(var, out)
    return g.model(doc=f"moeworks credit bundle: {scorer.dataset} {name} {scorer.version_}", metadata=metadata,
                   extra_opsets={"ai.onnx.ml": 5})
