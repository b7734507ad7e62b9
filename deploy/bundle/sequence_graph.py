"""The credit sequence model (finance.sequence: a MoE Transformer over six monthly tokens) as ONNX
operators: raw fields -> tokens -> the network -> pd and occlusion reasons.

The front end mirrors `finance.sequence.tokens.raw_month_features` and `SequenceTokenizer.transform`
line by line in float64 (one token per month, oldest first; a month whose status, bill and payment
are all missing is padding), then casts to float32 as `transform` does. The network is
`SequenceClassifier.export_onnx`'s torch.onnx (dynamo) export with the sparse MoE dispatch (per
expert: the tokens routed to it, its MLP, a scatter back; core.sparse_export), inlined with
`GraphBuilder.embed`. The static path (every expert on every token of the 1 + fields copies below)
made the bundle 0.25x moeworks at 512 rows and ran out of 24 GiB at 4,096.

Reasons are the model's own occlusion attributions (`SequenceClassifier.attributions`): the batch is
stacked 1 + fields times, copy k holding field k at its reference (a standardised 0, the commonest
status or level), and one pass of the network gives every push as logit(rows) - logit(copy k),
copy-major as moeworks stacks them. Each field's push lands on the pipeline feature
`finance.sequence.credit_model.SequenceModel.contributions` puts it on (for SEX, EDUCATION and
MARRIAGE the feature of the applicant's level), so the reason table is the pipeline's, as for the
other credit models.

moeworks refuses a record whose credit limit is missing or not positive (the tokens divide by it):
the graph gives pd NaN for it (and the credit graph decision -1).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from deploy.bundle.credit_features import BundleError
from deploy.bundle.graph import GraphBuilder, Var


def _signed_log(g: GraphBuilder, x: Var) -> Var:
    """tokens._signed_log: sign(x) * log1p(|x|) (log(1 + |x|): ONNX has no Log1p)."""
    return g.op("Sign", x) * g.op("Log", 1.0 + g.op("Abs", x))


def _months(g: GraphBuilder, raw: dict[str, Var], columns: tuple[str, ...]) -> Var:
    """(N, months) float64, oldest month first, from the (N, 1) raw inputs."""
    return g.concat([raw[c] for c in columns], axis=1)


def _nan_to_zero(g: GraphBuilder, x: Var) -> Var:
    return g.where(x.isnan(), 0.0, x)


def _tokens(g: GraphBuilder, raw: dict[str, Var], tokenizer) -> tuple[Var, Var, Var, Var, Var, Var]:
    """(tokens (N, T, F) float32, status (N, T) int64, padding (N, T) bool, static_numeric (N, S) float32,
    static_categorical (N, C) int64, refused (N, 1) bool): SequenceTokenizer.transform of the raw fields."""
    layout = tokenizer.layout
    if layout.channels or layout.status_in_days:
        raise BundleError("sequence bundles cover the Taiwan layout (no further monthly channels)")
    status, bill, payment = (_months(g, raw, c) for c in (layout.status, layout.bill, layout.payment))
    padding = status.isnan() & bill.isnan() & payment.isnan()
    limit = raw[layout.limit]
    refused = limit.isnan() | (limit <= 0.0)
    limit = g.where(refused, 1.0, limit)  # keeps NaN out of the network; the row's pd is NaN anyway
    bill0, pay0 = _nan_to_zero(g, bill), _nan_to_zero(g, payment)
    months = len(layout.status)
    previous = g.concat([g.fill_like(g.column(bill, 0), np.nan), g.columns(bill, 0, months - 1)], axis=1)
    known = ~previous.isnan() & ~padding
    previous0 = _nan_to_zero(g, previous)
    ratio = g.where(known, pay0 / g.clip(previous0, 1.0, None), 0.0)
    change = g.where(known, (bill0 - previous0) / limit, 0.0)
    features = [_signed_log(g, bill0), g.op("Log", 1.0 + g.clip(pay0, 0.0, None)),
                g.clip(bill0 / limit, -1.0, 3.0), g.clip(ratio, 0.0, 2.0), g.clip(change, -2.0, 2.0),
                known.as_double()]
    axis = g.const(np.array([2]))
    stacked = g.concat([g.op("Unsqueeze", f, axis) for f in features], axis=2)  # (N, T, F)
    pad3 = g.op("Unsqueeze", padding, axis)
    stacked = g.where(pad3, 0.0, stacked)
    tokens = (stacked - g.const(np.asarray(tokenizer.token_mean_))) / g.const(np.asarray(tokenizer.token_std_))
    tokens = g.op("Cast", g.where(pad3, 0.0, tokens), to=1)
    from finance.sequence.tokens import STATUS_MAX, STATUS_MIN, STATUS_PAD  # (finance.sequence imports torch)

    codes = g.clip(g.where(status.isnan(), float(STATUS_MIN), status), STATUS_MIN, STATUS_MAX) - float(STATUS_MIN - 1)
    codes = g.where(status.isnan() | padding, float(STATUS_PAD), codes)
    codes = g.op("Cast", codes, to=7)  # truncation toward zero, as numpy's astype (codes are >= 0)
    static = []
    for name in layout.static_numeric:
        value = raw[name]
        if name == layout.limit or name in layout.static_log:
            value = g.op("Log", 1.0 + g.clip(value, 0.0, None))  # np.maximum: NaN stays NaN
        static.append(value)
    static = (g.concat(static, axis=1) - g.const(np.asarray(tokenizer.static_mean_))) / g.const(
        np.asarray(tokenizer.static_std_))
    static = g.op("Cast", _nan_to_zero(g, static), to=1)
    categorical = []
    for name, levels in zip(layout.static_categorical, tokenizer.levels_, strict=True):
        code = g.const(np.array([[0]]))
        for rank, level in enumerate(levels, start=1):  # levels are number strings ("2.0"): unseen ones code 0
            code = g.where(raw[name].eq(float(level)), g.const(np.array([[rank]])), code)
        categorical.append(g.op("Expand", code, g.op("Shape", raw[name])))
    return tokens, codes, padding, static, g.concat(categorical, axis=1), refused


def _field_features(g: GraphBuilder, raw: dict[str, Var], classifier, feature_names: list[str]) -> Var:
    """(N, fields) int64: the pipeline feature each field's push lands on (len(feature_names): none),
    as SequenceModel.contributions places it (categoricals by the applicant's level)."""
    from finance.sequence.credit_model import feature_index

    nowhere = len(feature_names)
    categorical = set(classifier.layout.static_categorical)
    columns = []
    for f in classifier._fields():  # the fields, in the order `attributions` returns them
        if f.column not in categorical:
            index = feature_index(feature_names, f.column)
            columns.append(g.op("Expand", g.const(np.array([[nowhere if index is None else index]])),
                                g.op("Shape", raw[f.column])))
            continue
        # level_strings: a whole number reads as its integer ("2"), NaN as "nan", anything else as str(float)
        fallback = feature_index(feature_names, f.column, "\0")  # the feature of a level without its own
        index = g.const(np.array([[nowhere if fallback is None else fallback]]))
        for name in feature_names:
            own = _level_of(name, feature_names, f.column)
            if own is None:
                continue
            level, position = own
            match = raw[f.column].isnan() if level == "nan" else raw[f.column].eq(float(level))
            index = g.where(match, g.const(np.array([[position]])), index)
        columns.append(g.op("Expand", index, g.op("Shape", raw[f.column])))
    return g.concat(columns, axis=1)


def _level_of(name: str, feature_names: list[str], column: str) -> tuple[str, int] | None:
    """(level, index) when `name` is the one-hot feature feature_index picks for some level of `column`."""
    from finance.sequence.credit_model import TAIWAN_FIELD_FEATURES, feature_index

    stem = TAIWAN_FIELD_FEATURES.get(column, column) + "="
    if not name.startswith(stem):
        return None
    level = name[len(stem):]
    try:
        number = float(level)
    except ValueError:
        return None
    if level != "nan" and (not np.isfinite(number) or (number == round(number) and level != str(int(number)))):
        return None  # "2.0" is never how a whole number is spelled
    position = feature_index(feature_names, column, level)
    return (level, position) if position == feature_names.index(name) else None


def sequence_head(g: GraphBuilder, raw: dict[str, Var], model, pipeline) -> tuple[Var, Var]:
    """(pd (N, 1) float64, contributions (N, F) float64) of a finance.sequence SequenceModel."""
    classifier = model.classifier_
    if classifier.attribution != "occlusion":
        raise BundleError(f"sequence bundles carry occlusion reasons; this model ranks reasons by "
                          f"{classifier.attribution}")
    tokenizer = classifier.tokenizer_
    tokens, status, padding, static, categorical, refused = _tokens(g, raw, tokenizer)
    fields = classifier._fields()
    copies = len(fields) + 1
    months, width = classifier.config_.num_months, classifier.config_.num_token_features
    # masks (copies, 1, ...): copy k (k >= 1) holds field k - 1 at its reference
    clear_tokens = np.zeros((copies, 1, months, width), bool)
    set_status = np.zeros((copies, 1, months), bool)
    clear_static = np.zeros((copies, 1, len(tokenizer.static_mean_)), bool)
    set_level = np.zeros((copies, 1, len(tokenizer.levels_)), bool)
    for k, f in enumerate(fields, start=1):
        if f.kind == "status":
            set_status[k, 0, f.month] = True
        elif f.kind == "tokens":
            clear_tokens[k, 0, f.month, list(f.index)] = True
        elif f.kind == "static_numeric":
            clear_static[k, 0, f.index[0]] = True
        else:
            set_level[k, 0, f.index[0]] = True

    def stack(x: Var, tail: list[int]) -> Var:  # (copies, N, ...) -> (copies * N, ...)
        return g.op("Reshape", x, g.const(np.array([-1, *tail])))

    first = g.const(np.array([0]))
    zero32 = g.const(np.float32(0.0))
    stacked = {
        "tokens": stack(g.where(g.const(clear_tokens), zero32, g.op("Unsqueeze", tokens, first)), [months, width]),
        # a padded month keeps its status (moeworks sets only real months to the reference)
        "status": stack(g.where(g.const(set_status) & ~g.op("Unsqueeze", padding, first),
                                g.const(np.array(tokenizer.status_mode_)), g.op("Unsqueeze", status, first)),
                        [months]),
        "padding": stack(g.op("Expand", g.op("Unsqueeze", padding, first), g.const(np.array([copies, 1, 1]))),
                         [months]),
        "static_numeric": stack(g.where(g.const(clear_static), zero32, g.op("Unsqueeze", static, first)),
                                [clear_static.shape[2]]),
        "static_categorical": stack(g.where(g.const(set_level), g.const(np.asarray(tokenizer.static_mode_)),
                                            g.op("Unsqueeze", categorical, first)), [set_level.shape[2]]),
    }
    with tempfile.TemporaryDirectory() as folder:
        net = onnx.load(str(classifier.export_onnx(Path(folder) / "net.onnx", moe_dispatch="sparse")))
    logits = g.embed(net, stacked, prefix="sequence/")["logits"]  # (copies * N,) float32
    logits = g.op("Reshape", logits, g.const(np.array([copies, -1])))
    own = g.op("Slice", logits, g.const(np.array([0])), g.const(np.array([1])), g.const(np.array([0])))  # (1, N)
    rest = g.op("Slice", logits, g.const(np.array([1])), g.const(np.array([copies])), g.const(np.array([0])))
    pushes = g.op("Cast", g.op("Transpose", own - rest, perm=[1, 0]), to=11)  # float32 differences, as numpy
    logit = g.op("Cast", g.op("Transpose", own, perm=[1, 0]), to=11)  # (N, 1)
    pd_ = g.where(refused, np.nan, 1.0 / (1.0 + g.op("Exp", -logit)))
    feature_names = list(model.features_)
    index = _field_features(g, raw, classifier, feature_names)
    zeros = g.op("Expand", g.const(np.zeros((1, len(feature_names) + 1))),
                 g.op("Concat", g.op("Shape", logit, start=0, end=1), g.const(np.array([len(feature_names) + 1])),
                      axis=0))
    contributions = g.op("ScatterElements", zeros, index, pushes, axis=1, reduction="add")
    return pd_, g.columns(contributions, 0, len(feature_names))
