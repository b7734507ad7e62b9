"""The reject-inference experiment on a real dataset: protocol x methods x seeds -> one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finance.data import Records, dataset_spec, load_records
from finance.reject_inference.methods import METHODS, make_method
from finance.reject_inference.protocol import MethodResult, ProtocolConfig, replay_policy, run_protocol

DATASETS = ("taiwan", "gmsc")
ESTIMATORS = ("lightgbm", "logistic")


def load_dataset(name: str, data_root: str | Path,
                 use_unlabelled: bool = True) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None]:
    """(features, labels, extra unlabelled applicants or None) for a dataset under `data_root`."""
    root = Path(data_root)
    if name == "taiwan":
        records = load_records("taiwan", root / "taiwan_credit_default")
        return fields(records), records.target, None
    if name == "gmsc":
        folder = root / "give_me_some_credit"
        records = load_records("gmsc", folder / "cs-training.csv.gz")
        extra = None
        if use_unlabelled:
            extra = fields(load_records("gmsc", folder / "cs-test.csv.gz", require_target=False))
        return fields(records), records.target, extra
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def fields(records: Records) -> pd.DataFrame:
    """The applicants' raw fields: the records without their id (a row number, not information)."""
    return records.frame.drop(columns=[dataset_spec(records.dataset).id_column])


def make_estimator(kind: str, seed: int = 0, threads: int = 1, dataset: str | None = None) -> Any:
    """The credit model the methods wrap: LightGBM on the raw fields (the practitioners' pick), a
    logistic regression, or `credit:NAME`, any registered credit model with its feature pipeline."""
    if kind.startswith("credit:"):
        from finance.scorer import CreditScorer

        assert dataset is not None, "a credit model needs its dataset"
        return CreditScorer(dataset=dataset, model_name=kind.partition(":")[2], seed=seed)
    if kind == "lightgbm":
        from lightgbm import LGBMClassifier

        # Conservative trees: a few thousand accepted loans, so shallow leaves and a slow rate.
        return LGBMClassifier(n_estimators=300, learning_rate=0.03, num_leaves=15, min_child_samples=50,
                              subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
                              random_state=seed, n_jobs=threads, verbose=-1)
    if kind == "logistic":
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import QuantileTransformer

        return make_pipeline(SimpleImputer(strategy="median", add_indicator=True),
                             QuantileTransformer(n_quantiles=200, output_distribution="normal", random_state=seed),
                             LogisticRegression(C=1.0, max_iter=2000))
    raise ValueError(f"estimator must be one of {ESTIMATORS} or credit:MODEL, got {kind!r}")


def run_experiment(dataset: str, data_root: str | Path, *, estimator: str = "lightgbm",
                   methods: list[str] | None = None, seeds: list[int] | None = None,
                   acceptance_rate: float = 0.6, use_unlabelled: bool = True,
                   method_params: dict[str, dict[str, Any]] | None = None,
                   max_rows: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the protocol for each seed and average. `method_params` maps a method to keyword arguments
    other than its defaults (e.g. {"fuzzy-uplift": {"bad_odds_factor": 1.5}}).
    Returns {"dataset", "rows": [...], "per_seed": [...]}."""
    X, y, extra = load_dataset(dataset, data_root, use_unlabelled)
    if max_rows is not None and len(y) > max_rows:
        keep = np.random.default_rng(0).choice(len(y), max_rows, replace=False)
        X, y = X.iloc[keep].reset_index(drop=True), y[keep]
        extra = extra.iloc[:max_rows] if extra is not None else None
    names = methods or list(METHODS)
    if "accepted-only" not in names:
        names = ["accepted-only", *names]
    per_seed: list[list[MethodResult]] = []
    for seed in seeds or [0]:
        config = ProtocolConfig(acceptance_rate=acceptance_rate, seed=seed)
        sample = replay_policy(X, y, config, extra)
        base = make_estimator(estimator, seed, dataset=dataset)
        chosen = {name: make_method(name, estimator=base, **(method_params or {}).get(name, {})) for name in names}
        per_seed.append(run_protocol(sample, chosen, base, acceptance_rate,
                                     progress=(lambda m, s=seed: progress(f"seed {s}: {m}")) if progress else None))
    rows = []
    for i, first in enumerate(per_seed[0]):
        runs = [seed_rows[i] for seed_rows in per_seed]
        row = {"method": first.method}
        for key in ("auc", "kickout", "gap_closed", "seconds"):
            values = np.array([getattr(r, key) for r in runs], dtype="float64")
            row[key] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values))
        row["train_rows"] = int(np.mean([r.train_rows for r in runs]))
        rows.append(row)
    return {"dataset": dataset, "estimator": estimator, "acceptance_rate": acceptance_rate,
            "seeds": seeds or [0], "unlabelled_extra": 0 if extra is None else len(extra),
            "method_params": method_params or {},
            "rows": rows, "per_seed": [[asdict(r) for r in seed_rows] for seed_rows in per_seed]}


def results_table(result: dict[str, Any]) -> Any:
    """A rich Table of one experiment: each method's full-population AUC, kickout and gap closed."""
    from rich.table import Table

    seeds = result["seeds"]
    title = (f"Reject inference on {result['dataset']} ({result['estimator']}, accept {result['acceptance_rate']:.0%}, "
             f"{len(seeds)} seed(s), {result['unlabelled_extra']} extra unlabelled)")
    table = Table(title=title)
    for column in ("method", "AUC (all applicants)", "+/-", "kickout", "gap closed", "train rows", "s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in result["rows"]:
        table.add_row(row["method"], f"{row['auc']:.4f}", f"{row['auc_std']:.4f}", f"{row['kickout']:+.3f}",
                      f"{row['gap_closed']:+.0%}", f"{row['train_rows']:,}", f"{row['seconds']:.1f}")
    return table


def best_method(result: dict[str, Any]) -> dict[str, Any] | None:
    """The method (not the baseline or the upper bound) that closes most of the gap; None when only
    those two were run."""
    candidates = [r for r in result["rows"] if r["method"] not in ("accepted-only", "upper-bound")]
    return max(candidates, key=lambda r: r["gap_closed"]) if candidates else None


def summary_json(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics of one experiment, for a `--json` last line."""
    best = best_method(result)
    return {"dataset": result["dataset"], "estimator": result["estimator"], "seeds": result["seeds"],
            **{f"{r['method']}_auc": r["auc"] for r in result["rows"]},
            **{f"{r['method']}_gap_closed": r["gap_closed"] for r in result["rows"]},
            **{f"{r['method']}_kickout": r["kickout"] for r in result["rows"]},
            "best_method": best and best["method"], "best_gap_closed": best and best["gap_closed"]}
