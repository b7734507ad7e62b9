"""Credit model evaluation: discrimination, the decision at an approval rate, calibration,
population stability (PSI of the score, CSI of each feature) and speed."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve


def ks_statistic(y: np.ndarray, pd_: np.ndarray) -> float:
    """Kolmogorov-Smirnov: the largest gap between the score distributions of defaulters and others."""
    fpr, tpr, _ = roc_curve(y, pd_)
    return float(np.max(tpr - fpr))


def recall_at_approval(y: np.ndarray, pd_: np.ndarray, approval_rate: float) -> float:
    """Share of defaulters declined when the safest `approval_rate` of applicants is approved."""
    order = np.argsort(pd_, kind="stable")
    declined = order[int(round(approval_rate * len(pd_))):]
    return float(y[declined].sum() / max(y.sum(), 1))


def calibration_table(y: np.ndarray, pd_: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Deciles of predicted PD: mean predicted vs observed default rate."""
    edges = np.unique(np.quantile(pd_, np.linspace(0, 1, bins + 1)))
    group = np.clip(np.searchsorted(edges, pd_, side="right") - 1, 0, len(edges) - 2)
    frame = pd.DataFrame({"group": group, "pd": pd_, "y": y})
    table = frame.groupby("group").agg(count=("y", "size"), mean_pd=("pd", "mean"), default_rate=("y", "mean"))
    return table.reset_index(drop=True)


def population_stability(expected_shares: np.ndarray, actual_shares: np.ndarray) -> float:
    """PSI = sum (a - e) ln(a / e) over bins (shares floored at 1e-4). < 0.1 stable, > 0.25 shifted."""
    e = np.maximum(np.asarray(expected_shares, dtype=float), 1e-4)
    a = np.maximum(np.asarray(actual_shares, dtype=float), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def characteristic_reference(X: np.ndarray, *, bins: int = 10) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The CSI reference of each feature of X (n, F): its quantile edges (up to bins - 1, fewer for
    discrete features) and the shares of its bins, with a last bin for missing values."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing feature has no quantiles
        quantiles = np.nanquantile(X.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # (bins-1, F)
    edges = [np.unique(q[np.isfinite(q)]) for q in quantiles.T]
    return edges, characteristic_shares(X, edges)


def characteristic_shares(X: np.ndarray, edges: list[np.ndarray]) -> list[np.ndarray]:
    """Per feature, the shares of X (n, F) in the bins cut by `edges`, the last share being missing values."""
    out = []
    for j, cut in enumerate(edges):
        x = X[:, j].astype(np.float64)
        bin_ = np.where(np.isnan(x), len(cut) + 1, np.searchsorted(cut, x, side="right"))
        out.append(np.bincount(bin_, minlength=len(cut) + 2) / max(len(x), 1))
    return out


def characteristic_stability(reference: list[np.ndarray], actual: list[np.ndarray]) -> np.ndarray:
    """(F,) characteristic stability index: the PSI of each feature's distribution over its reference
    bins (the same reading: < 0.1 stable, 0.1-0.25 shifting, > 0.25 shifted)."""
    return np.array([population_stability(e, a) for e, a in zip(reference, actual, strict=True)])


def credit_metrics(y: np.ndarray, pd_: np.ndarray, *, approval_rate: float = 0.8) -> dict[str, float]:
    y = np.asarray(y)
    auc = float(roc_auc_score(y, pd_))
    calib = calibration_table(y, pd_)
    approved = np.argsort(pd_, kind="stable")[: int(round(approval_rate * len(pd_)))]
    return {
        "rows": int(len(y)), "default_rate": float(y.mean()), "auc": auc, "gini": 2 * auc - 1,
        "ks": ks_statistic(y, pd_), "approval_rate": approval_rate,
        "recall_at_approval": recall_at_approval(y, pd_, approval_rate),
        "bad_rate_approved": float(y[approved].mean()), "brier": float(brier_score_loss(y, pd_)),
        "log_loss": float(log_loss(y, np.clip(pd_, 1e-7, 1 - 1e-7))),
        "calibration_error": float(np.average(np.abs(calib["mean_pd"] - calib["default_rate"]),
                                              weights=calib["count"])),
        "mean_pd": float(np.mean(pd_)),
    }


def scoring_speed(scorer: Any, frame: pd.DataFrame, *, single_runs: int = 200, batch_rows: int = 20_000,
                  batch_reasons: str = "declined") -> dict[str, float]:
    """Latency of one application end to end (raw record -> pd, points, decision and reason codes),
    p50 and p99 in ms, and batch throughput in rows/s (reason codes for `batch_reasons`, as the
    batch job gives them). The first calls warm up and are not counted. cpu_p50/p99_ms: the same
    calls in CPU time of the scoring thread, which leaves out the waits of a busy machine."""
    n = len(frame)
    rows = [frame.iloc[[i % n]] for i in range(single_runs + 10)]
    timings, cpu = [], []
    for i, row in enumerate(rows):
        started, started_cpu = time.perf_counter(), time.thread_time()
        scorer.score(row, reasons="all")
        if i >= 10:
            timings.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    batch = frame.iloc[np.arange(min(batch_rows, n))] if n >= batch_rows else pd.concat(
        [frame] * (batch_rows // n + 1), ignore_index=True).iloc[:batch_rows]
    started = time.perf_counter()
    scorer.score(batch, reasons=batch_reasons)
    seconds = time.perf_counter() - started
    ms, cpu_ms = np.asarray(timings) * 1000, np.asarray(cpu) * 1000
    return {"latency_p50_ms": float(np.percentile(ms, 50)), "latency_p99_ms": float(np.percentile(ms, 99)),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
            "batch_rows_per_s": len(batch) / seconds}


def seen_rows(scorer: Any, frame: pd.DataFrame) -> dict[str, Any]:
    """Shares of `frame`'s rows that the model was trained on and validated on (None: the model
    folder has no row fingerprint), and whether the shares are exact or estimated from a sample."""
    fingerprint = getattr(scorer, "row_fingerprint_", None)
    if fingerprint is None:
        return {"share_in_training": None, "share_in_validation": None, "share_exact": None}
    hashes = scorer.row_hashes(frame)
    train, train_exact = fingerprint.train.share(hashes)
    valid, valid_exact = fingerprint.valid.share(hashes)
    return {"share_in_training": train, "share_in_validation": valid, "share_exact": train_exact and valid_exact}


def evaluate_scorer(scorer: Any, records: Any, *, speed: bool = True) -> dict[str, Any]:
    """Every metric of a saved scorer on labelled records, plus PSI (of the PD) and CSI (of each
    feature) against its validation split.

    Returns metrics (dict), pd (n,), psi_shares (PD decile shares here) and csi: a table of feature,
    source, definition and CSI, most shifted first (None for a model saved without the reference).
    """
    data = scorer.features(records.frame)
    pd_ = scorer.model_.predict_proba(data)[:, 1]
    metrics = credit_metrics(records.target, pd_, approval_rate=scorer.policy_.approval_rate)
    shares = np.bincount(np.searchsorted(scorer.reference_edges_, pd_, side="right"),
                         minlength=len(scorer.reference_edges_) + 1) / len(pd_)
    metrics["psi"] = population_stability(scorer.reference_shares_, shares)
    csi = None
    if getattr(scorer, "reference_feature_edges_", None) is not None:
        values = characteristic_stability(scorer.reference_feature_shares_,
                                          characteristic_shares(data.X, scorer.reference_feature_edges_))
        catalogue = scorer.pipeline_.catalogue_
        csi = pd.DataFrame({"feature": scorer.pipeline_.feature_names_, "source": [c.source for c in catalogue],
                            "definition": [c.definition for c in catalogue], "csi": values})
        csi = csi.sort_values("csi", ascending=False, kind="stable").reset_index(drop=True)
        metrics["csi_max"] = float(values.max())
        metrics["csi_max_feature"] = str(csi["feature"].iloc[0])
        metrics["features_csi_over_0.25"] = int((values > 0.25).sum())
        metrics["features_csi_0.1_to_0.25"] = int(((values > 0.1) & (values <= 0.25)).sum())
    metrics["approval_rate_at_cutoff"] = float(np.mean(pd_ <= scorer.cutoff_pd_))
    metrics.update(seen_rows(scorer, records.frame))
    if speed:
        metrics.update(scoring_speed(scorer, records.frame))
    return {"metrics": metrics, "pd": pd_, "psi_shares": shares, "csi": csi}
