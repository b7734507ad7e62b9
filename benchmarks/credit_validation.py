"""Choosing credit recipes without the test split: honest validation AUC on two halves.

Protocol (benchmarks/credit.py's split): the 20% test part is split off and never transformed;
inside the 80%, the 80/20 train/validation split. The validation part is cut into two stratified
halves; each model is trained twice on the training part, early-stopped on one half and scored on
the other ("honest" AUC: its epoch or tree count was not chosen on the rows it is scored on).
Blends of LightGBM with each MoE variant are fitted on one half and scored on the other, once on
the models' own (early-stopping) predictions and once on the other copy's (cross-fitted) ones.

    nice -n 10 python -m benchmarks.credit_validation --datasets taiwan,gmsc --json

--variants takes JSON, name -> MoEModelConfig overrides, e.g. '{"lr1e-3": {"learning_rate": 0.001}}'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from benchmarks.common import machine, write_results
from benchmarks.fixtures import CREDIT_FOLDERS, add_data_argument
from finance.data import load_records
from finance.features import FeaturePipeline
from finance.models import build_model
from finance.models.ensemble import _logit
from finance.models.moe import MoEModelConfig
from finance.scorer import split_records

DEFAULT_VARIANTS = {"single_best_epoch": {"average_last": 1}, "mean_of_last_3_epochs": {"average_last": 3}}


def two_fold_logits(name: str, config, train: tuple[np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray],
                    halves, *, names: list[str], dataset: str, seed: int) -> np.ndarray:
    """(2, n_valid) log-odds: row j from the copy early-stopped on halves[j]. train, valid: (X, y)."""
    out = []
    X_valid, y_valid = valid
    for stop in halves:
        model = build_model(name, feature_names=names, dataset=dataset, seed=seed, config=config)
        model.fit(*train, eval_set=[(X_valid[stop], y_valid[stop])])
        out.append(_logit(model.predict_proba(X_valid)[:, 1]))
    return np.stack(out)


def run(dataset: str, data_root: Path, variants: dict, seed: int) -> dict:
    records = load_records(dataset, data_root / CREDIT_FOLDERS[dataset])
    fit_part, _ = split_records(records, valid_share=0.2, seed=seed)  # the test part is not used below
    train_records, valid_records = split_records(fit_part, valid_share=0.2, seed=seed)
    pipe = FeaturePipeline(dataset=dataset).fit(train_records.frame)
    train = (pipe.transform(train_records.frame), train_records.target)
    valid = (pipe.transform(valid_records.frame), valid_records.target)
    y = valid[1]
    halves = [np.isin(np.arange(len(y)), rows) for _, rows in
              StratifiedKFold(2, shuffle=True, random_state=123).split(y, y)]
    fold = {"names": pipe.feature_names_, "dataset": dataset, "seed": seed}
    logits = {"lightgbm": two_fold_logits("lightgbm", None, train, valid, halves, **fold)}
    for variant, overrides in variants.items():
        logits[variant] = two_fold_logits("moe", MoEModelConfig(**overrides), train, valid, halves, **fold)

    def honest(z: np.ndarray) -> float:  # copy j scored on the half it did not stop on
        return float(np.mean([roc_auc_score(y[halves[1 - j]], z[j][halves[1 - j]]) for j in (0, 1)]))

    def blend(variant: str, cross_fitted: bool) -> float:
        def pair(copy: int, rows: np.ndarray) -> np.ndarray:  # (rows, 2) LightGBM and MoE log-odds
            return np.column_stack([logits["lightgbm"][copy][rows], logits[variant][copy][rows]])

        aucs = []
        for j in (0, 1):
            stop, score = halves[j], halves[1 - j]
            fit_copy = 1 - j if cross_fitted else j  # the copy whose predictions on `stop` the weights see
            weights = LogisticRegression(C=100.0, max_iter=1000).fit(pair(fit_copy, stop), y[stop])
            aucs.append(roc_auc_score(y[score], weights.decision_function(pair(j, score))))
        return float(np.mean(aucs))

    reference = honest(logits["lightgbm"])
    return {"rows_train": len(train[1]), "rows_valid": len(valid[1]), "lightgbm_honest_auc": reference,
            "moe": {v: {"honest_auc": honest(logits[v]), "blend_gain_own": blend(v, False) - reference,
                        "blend_gain_cross_fitted": blend(v, True) - reference} for v in variants}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--datasets", default="taiwan,gmsc")
    parser.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    args = parser.parse_args()
    torch.set_num_threads(1)
    measured_on = machine()
    results = {d: run(d, args.data, args.variants, args.seed) for d in filter(None, args.datasets.split(","))}
    for dataset, r in results.items():
        print(f"{dataset}: LightGBM honest validation AUC {r['lightgbm_honest_auc']:.4f}")
        for variant, m in r["moe"].items():
            print(f"  moe {variant:28s} {m['honest_auc']:.4f}   LightGBM + it: own {m['blend_gain_own']:+.4f}, "
                  f"cross-fitted {m['blend_gain_cross_fitted']:+.4f}")
    write_results({"machine": measured_on, **results}, None, as_json=args.json)


if __name__ == "__main__":
    main()
