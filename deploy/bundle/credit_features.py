"""finance.features' pipelines as ONNX operators: raw application fields in, the fitted feature matrix out.

Each builder mirrors its numpy twin in finance/features.py line by line (same order of operations,
float64), and returns blocks: (N, k) float64 tensors with the names of their k features. `feature_matrix`
gathers the fitted pipeline's columns from them, in its order, and casts to float32 as
`FeaturePipeline.transform` does. A change of the numpy pipeline that this file does not follow shows
as a parity failure in tests/deploy/bundle/test_bundle.py, and `build` refuses a feature it cannot name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deploy.bundle.graph import GraphBuilder, Var
from finance.data import TAIWAN_PAY, dataset_spec
from finance.features import _EWM, _STATS, _TIME, FeaturePipeline

Blocks = list[tuple[Var, list[str]]]


class BundleError(ValueError):
    """A model the bundle cannot express (yet); the message says what and why."""


def raw_inputs(g: GraphBuilder, dataset: str) -> dict[str, Var]:
    """One (N, 1) float64 input per raw field of the dataset's file, named as the field; NaN = missing."""
    spec = dataset_spec(dataset)
    categorical = [f.name for f in spec.fields if f.kind == "category"]
    if categorical:
        raise BundleError(f"dataset {dataset!r} has categorical fields ({', '.join(categorical[:3])}, ...): "
                          "bundles cover taiwan and gmsc so far")
    return {f.name: g.input(f.name, "double", ["N", 1]) for f in spec.fields}


def _window(g: GraphBuilder, months: list[Var], complete: Var) -> dict[str, Var]:
    """finance.features._window_stats over months (each (N, S)), latest first."""
    w = len(months)
    t = _TIME[-w:]
    ok = [~m.isnan() for m in months]
    count = g.sequential_sum([o.as_double() for o in ok])
    mean = g.sequential_sum([g.where(o, m, 0.0) for o, m in zip(ok, months, strict=True)]) / count
    centred = [g.where(o, m - mean, 0.0) for o, m in zip(ok, months, strict=True)]
    var = g.sequential_sum([c * c for c in centred]) / count
    t_mean = g.sequential_sum([g.where(o, float(tj), 0.0) for o, tj in zip(ok, t, strict=True)]) / count
    dt = [g.where(o, float(tj) - t_mean, 0.0) for o, tj in zip(ok, t, strict=True)]
    slope = g.sequential_sum([d * c for d, c in zip(dt, centred, strict=True)]) / g.sequential_sum(
        [d * d for d in dt])
    t_centred = t - t.mean()
    denominator = float((t_centred * t_centred).sum())
    complete_slope = g.sequential_sum([float(tc) * m for tc, m in zip(t_centred, months, strict=True)]) / denominator
    slope = g.where(complete, complete_slope, slope)
    finite = ~(g.op("IsInf", slope) | slope.isnan())
    empty = count.eq(0.0)
    top = g.where(ok[0], months[0], -np.inf)
    low = g.where(ok[0], months[0], np.inf)
    for o, m in zip(ok[1:], months[1:], strict=True):
        top = g.maximum(top, g.where(o, m, -np.inf))
        low = g.where(low < g.where(o, m, np.inf), low, g.where(o, m, np.inf))
    return {"mean": mean, "std": g.op("Sqrt", var), "slope": g.where(finite, slope, np.nan),
            "max": g.where(empty, np.nan, top), "min": g.where(empty, np.nan, low)}


def _series(g: GraphBuilder, series: dict[str, Var]) -> Blocks:
    """finance.features._series_features: 15 statistics of each (N, 6) monthly series (latest first)."""
    names = list(series)
    stacked = g.concat([g.op("Unsqueeze", m, g.const(np.array([1]))) for m in series.values()], axis=1)  # (N, S, 6)
    months = [g.take(stacked, j, axis=2) for j in range(6)]  # each (N, S)
    ok = [~m.isnan() for m in months]
    every = ok[0]
    for o in ok[1:]:
        every = every & o
    complete = g.op("Unsqueeze", g.op("Cast", g.op("ReduceMin", every.as_double(), g.const(np.array([1])),
                                                 keepdims=0), to=9), g.const(np.array([1])))  # (N, 1) bool
    w3, w6 = _window(g, months[:3], complete), _window(g, months, complete)
    weights = [float(v) for v in _EWM]
    ewm = g.sequential_sum([g.where(o, m, 0.0) * w for o, m, w in zip(ok, months, weights, strict=True)]) / \
        g.sequential_sum([o.as_double() * w for o, w in zip(ok, weights, strict=True)])
    values = {"last": months[0], "mean3": w3["mean"], "mean6": w6["mean"], "max3": w3["max"], "max6": w6["max"],
              "min3": w3["min"], "min6": w6["min"], "std3": w3["std"], "std6": w6["std"],
              "slope3": w3["slope"], "slope6": w6["slope"], "change": months[0] - w6["mean"],
              "ratio3_6": g.divide(w3["mean"], w6["mean"]), "ewm": ewm,
              "npos6": g.sequential_sum([(m > 0.0).as_double() for m in months])}
    return [(values[suffix], [f"{prefix}_{suffix}" for prefix in names]) for suffix, _ in _STATS]


def _months_since(g: GraphBuilder, mask: Var) -> Var:
    """(N, 6) bool -> (N, 1): index of the first True month (latest first), 6 when none."""
    as_double = mask.as_double()
    first = g.op("Cast", g.op("ArgMax", as_double, axis=1, keepdims=1), to=11)
    return g.where(g.op("ReduceMax", as_double, g.const(np.array([1])), keepdims=1) > 0.0, first, 6.0)


def _row_sum(g: GraphBuilder, x: Var, stop: int = 6) -> Var:
    """Sum of columns 0..stop-1 of (N, C), in column order."""
    return g.sequential_sum([g.column(x, j) for j in range(stop)])


def _taiwan(g: GraphBuilder, raw: dict[str, Var]) -> Blocks:
    limit = raw["LIMIT_BAL"]
    status = g.concat([raw[p] for p in TAIWAN_PAY], axis=1)  # (N, 6) latest first
    bill = g.concat([raw[f"BILL_AMT{i}"] for i in range(1, 7)], axis=1)
    paid = g.concat([raw[f"PAY_AMT{i}"] for i in range(1, 7)], axis=1)
    prev_bill = g.concat([g.columns(bill, 1, 6), g.fill_like(limit, np.nan)], axis=1)
    delay = g.clip(status, 0.0, None)
    util = g.divide(bill, limit)
    series = {
        "status": status, "delay": delay, "bill": bill, "paid": paid, "util": util,
        "paid_to_limit": g.divide(paid, limit),
        "pay_ratio": g.clip(g.divide(paid, prev_bill), 0.0, 10.0),
        "paid_full": g.where(prev_bill.isnan(), np.nan, ((paid >= prev_bill) | (prev_bill <= 0.0)).as_double()),
        "bill_change": g.divide(bill - prev_bill, limit),
        "spend": g.divide(bill - prev_bill + paid, limit),
        "unpaid": g.divide(prev_bill - paid, limit),
    }
    blocks = _series(g, series)
    months = ("sep", "aug", "jul", "jun", "may", "apr")
    blocks += [(status, [f"status_{m}" for m in months]), (bill, [f"bill_{m}" for m in months]),
               (paid, [f"paid_{m}" for m in months])]
    for k in (1, 2, 3):
        late_k = (status >= float(k)).as_double()
        for w in (1, 3, 6):
            blocks.append((_row_sum(g, late_k, w), [f"n_late{k}_{w}m"]))
    late = status >= 1.0
    blocks.append((_months_since(g, late), ["months_since_late"]))
    run = best = g.fill_like(limit, 0.0)
    for j in range(6):
        run = g.where(g.column(late, j), run + 1.0, 0.0)
        best = g.maximum(best, run)
    blocks.append((best, ["longest_late_run"]))
    any_late = g.op("ReduceMax", late.as_double(), g.const(np.array([1])), keepdims=1) > 0.0
    last_late = g.op("Cast", g.op("ArgMax", late.as_double(), axis=1, keepdims=1, select_last_index=1), to=11)
    blocks.append((g.where(any_late, last_late, -1.0), ["first_late_month"]))
    for code in (-2, -1, 0):
        blocks.append((_row_sum(g, status.eq(float(code)).as_double()), [f"n_status{code}_6m"]))
    blocks.append((_row_sum(g, (bill < 0.0).as_double()), ["n_negative_bill"]))
    blocks.append((_row_sum(g, (util > 0.8).as_double()), ["n_util_over80"]))
    blocks.append((_row_sum(g, (util > 1.0).as_double()), ["n_over_limit"]))
    blocks.append((g.divide(_row_sum(g, paid), _row_sum(g, g.clip(bill, 0.0, None))), ["total_paid_to_bill"]))
    blocks.append((limit, ["limit"]))
    blocks.append((g.op("Log", 1.0 + g.clip(limit, 0.0, None)), ["log_limit"]))  # log1p: no ONNX operator
    age = raw["AGE"]
    blocks += [(age, ["age"]), (g.divide(limit, age), ["limit_per_age"]), (raw["SEX"].eq(2.0).as_double(), ["female"])]
    education = raw["EDUCATION"]
    known = education.eq(1.0) | education.eq(2.0) | education.eq(3.0)
    for level in (1, 2, 3):
        blocks.append((education.eq(float(level)).as_double(), [f"education={level}"]))
    blocks.append(((~known).as_double(), ["education=4"]))
    marriage = raw["MARRIAGE"]
    for level in (1, 2):
        blocks.append((marriage.eq(float(level)).as_double(), [f"marriage={level}"]))
    blocks.append(((~(marriage.eq(1.0) | marriage.eq(2.0))).as_double(), ["marriage=3"]))
    return blocks


def _gmsc(g: GraphBuilder, raw: dict[str, Var]) -> Blocks:
    util = raw["RevolvingUtilizationOfUnsecuredLines"]
    age = raw["age"]
    late = {k: raw[c] for k, c in zip((30, 60, 90), ("NumberOfTime30-59DaysPastDueNotWorse",
                                                      "NumberOfTime60-89DaysPastDueNotWorse",
                                                      "NumberOfTimes90DaysLate"), strict=True)}
    special = {k: v.eq(96.0) | v.eq(98.0) for k, v in late.items()}
    sentinel = special[30] | special[60] | special[90]
    clean = {k: g.where(special[k], np.nan, v) for k, v in late.items()}
    income = raw["MonthlyIncome"]
    debt_ratio = raw["DebtRatio"]
    lines = raw["NumberOfOpenCreditLinesAndLoans"]
    real_estate = raw["NumberRealEstateLoansOrLines"]
    dependents = raw["NumberOfDependents"]
    income_missing = income.isnan() | income.eq(0.0)
    capped_util = g.clip(util, 0.0, 10.0)
    total_late = clean[30] + clean[60] + clean[90]
    income_given = g.where(income_missing, np.nan, income)
    blocks = [(capped_util, ["revolving_util"]), ((util > 1.0).as_double(), ["util_over_1"]),
              (g.where(age < 18.0, np.nan, age), ["age"]),
              *((clean[k], [f"late_{k}"]) for k in (30, 60, 90)),
              (sentinel.as_double(), ["late_sentinel"]), (total_late, ["late_total"]),
              (clean[30] + 2.0 * clean[60] + 3.0 * clean[90], ["late_weighted"]),
              ((total_late > 0.0).as_double(), ["ever_late"]),
              ((clean[60] + clean[90] > 0.0).as_double(), ["ever_late_60"]),
              (income_given, ["monthly_income"]),
              (g.op("Log", 1.0 + income_given), ["log_income"]),  # log1p: no ONNX operator
              (income_missing.as_double(), ["income_missing"]),
              (g.where(income_missing, np.nan, g.clip(debt_ratio, 0.0, 20.0)), ["debt_ratio"]),
              (g.where(income_missing, debt_ratio, debt_ratio * income), ["debt_amount"]),
              (lines, ["open_lines"]), (real_estate, ["real_estate_lines"]), (lines - real_estate, ["other_lines"]),
              (dependents, ["dependents"]), (dependents.isnan().as_double(), ["dependents_missing"]),
              (g.divide(income, 1.0 + g.where(dependents.isnan(), 0.0, dependents)), ["income_per_person"]),
              (g.divide(total_late, lines + 1.0), ["late_per_line"]),
              (capped_util * g.where(total_late.isnan(), 0.0, total_late), ["util_x_late"]),
              (g.divide(lines, age), ["lines_per_age"])]
    return blocks


_BUILDERS: dict[str, Callable[[GraphBuilder, dict[str, Var]], Blocks]] = {"taiwan": _taiwan, "gmsc": _gmsc}


def feature_matrix(g: GraphBuilder, raw: dict[str, Var], pipeline: FeaturePipeline,
                   names: list[str] | None = None) -> Var:
    """(N, len(names)) float32: the pipeline's features `names` (default all, in its fitted order)."""
    if pipeline.dataset not in _BUILDERS:
        raise BundleError(f"no ONNX feature pipeline for dataset {pipeline.dataset!r} (taiwan and gmsc are covered)")
    names = list(pipeline.feature_names_) if names is None else names
    wanted = set(names)
    # only the blocks holding a wanted feature: the graph then drops the nodes no output needs
    if not hasattr(g, "credit_blocks"):  # built once per graph: ensemble members share them
        g.credit_blocks = _BUILDERS[pipeline.dataset](g, raw)
    blocks = [(b, n) for b, n in g.credit_blocks if wanted.intersection(n)]
    position: dict[str, int] = {}
    for _block, block_names in blocks:
        for name in block_names:
            position.setdefault(name, len(position))
    unknown = [n for n in names if n not in position]
    if unknown:
        raise BundleError(f"the fitted pipeline has features this bundle builder does not know: {unknown[:5]}")
    everything = g.concat([b for b, _ in blocks], axis=1)
    chosen = g.take(everything, [position[n] for n in names], axis=1)
    return g.op("Cast", chosen, to=1)  # float32, as FeaturePipeline.transform returns
