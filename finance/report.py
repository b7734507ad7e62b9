"""An HTML report of a credit model on a labelled population: metrics, plots, reasons, scorecard.

Plots (matplotlib, Agg) are embedded as PNG, so the report is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from finance.evaluation import calibration_table
from finance.models import FitData


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"/>'


def _plots(y: np.ndarray, pd_: np.ndarray, points: np.ndarray, reference: np.ndarray, actual: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fpr, tpr, _ = roc_curve(y, pd_)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr, tpr, label="model")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend()
    out.append(_png(fig))

    grid = np.linspace(points.min(), points.max(), 200)
    bad_cdf = np.searchsorted(np.sort(points[y == 1]), grid, side="right") / max((y == 1).sum(), 1)
    good_cdf = np.searchsorted(np.sort(points[y == 0]), grid, side="right") / max((y == 0).sum(), 1)
    gap = np.argmax(bad_cdf - good_cdf)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(grid, bad_cdf, label="defaulters")
    ax.plot(grid, good_cdf, label="non-defaulters")
    ax.vlines(grid[gap], good_cdf[gap], bad_cdf[gap], color="red", label=f"KS = {bad_cdf[gap] - good_cdf[gap]:.3f}")
    ax.set(xlabel="score points", ylabel="cumulative share", title="KS")
    ax.legend()
    out.append(_png(fig))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    bins = np.linspace(points.min(), points.max(), 40)
    ax.hist(points[y == 0], bins=bins, alpha=0.6, density=True, label="non-defaulters")
    ax.hist(points[y == 1], bins=bins, alpha=0.6, density=True, label="defaulters")
    ax.set(xlabel="score points", ylabel="density", title="Score distribution")
    ax.legend()
    out.append(_png(fig))

    calib = calibration_table(y, pd_)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    top = max(calib["mean_pd"].max(), calib["default_rate"].max()) * 1.05
    ax.plot([0, top], [0, top], "--", color="grey")
    ax.plot(calib["mean_pd"], calib["default_rate"], "o-")
    ax.set(xlabel="mean predicted PD (decile)", ylabel="observed default rate", title="Calibration")
    out.append(_png(fig))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    idx = np.arange(len(reference))
    ax.bar(idx - 0.2, reference, width=0.4, label="validation (reference)")
    ax.bar(idx + 0.2, actual, width=0.4, label="this population")
    ax.set(xlabel="PD band (validation deciles)", ylabel="share", title="Population stability")
    ax.legend()
    out.append(_png(fig))
    return out


def _csi_plot(csi: pd.DataFrame, top: int = 15) -> str:
    """Horizontal bars of the `top` most shifted features, with the 0.1 and 0.25 reading lines."""
    import matplotlib.pyplot as plt

    shown = csi.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(shown) + 1.2))
    ax.barh(shown["feature"], shown["csi"], color=np.where(shown["csi"] > 0.25, "#c0392b",
                                                           np.where(shown["csi"] > 0.1, "#e67e22", "#2e86c1")))
    for level in (0.1, 0.25):
        ax.axvline(level, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="CSI (validation -> this population)", title="Characteristic stability, most shifted features")
    ax.tick_params(axis="y", labelsize=8)
    return _png(fig)


def _csi_section(csi: pd.DataFrame | None) -> list[str]:
    """CSI of every feature against the validation split: a plot and the 20 most shifted."""
    if csi is None:
        return ["<h2>Characteristic stability (CSI)</h2><p>Not available: the model was saved without the "
                "per-feature reference (retrain to get it).</p>"]
    shifted, shifting = int((csi["csi"] > 0.25).sum()), int(((csi["csi"] > 0.1) & (csi["csi"] <= 0.25)).sum())
    return ["<h2>Characteristic stability (CSI)</h2>",
            f"<p>Each feature's distribution over its validation deciles (missing values a bin of their own), "
            f"compared with this population: {shifted} of {len(csi)} features shifted (CSI &gt; 0.25), "
            f"{shifting} shifting (0.1-0.25).</p>", "<div>" + _csi_plot(csi) + "</div>", _table(csi.head(20))]


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def write_report(path: str | Path, scorer: Any, records: Any, evaluation: dict[str, Any], *,
                 sample_rows: int = 2000) -> Path:
    """Write the report for `scorer` on labelled `records`, given `evaluate_scorer`'s result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = evaluation["metrics"]
    pd_ = evaluation["pd"]
    y = records.target
    points = scorer.policy_.scale.points(pd_)
    plots = _plots(y, pd_, points, scorer.reference_shares_, evaluation["psi_shares"])

    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(records))[:sample_rows])
    sample = records.frame.iloc[rows].reset_index(drop=True)
    X = scorer.pipeline_.transform(sample)
    contrib = scorer.model_.contributions(FitData(X, sample if scorer.model_.needs_records else None))
    importance = pd.DataFrame({"feature": scorer.pipeline_.feature_names_,
                               "definition": [s.definition for s in scorer.pipeline_.catalogue_],
                               "source": [s.source for s in scorer.pipeline_.catalogue_],
                               "mean |contribution| (log-odds)": np.abs(contrib).mean(0)})
    importance = importance.sort_values("mean |contribution| (log-odds)", ascending=False).head(20)
    scored = scorer.score(sample, reasons="declined")
    declined = scored[scored["decision"] == "decline"].head(8)[["id", "pd", "points", "reason_1", "reason_2",
                                                                 "reason_3"]]
    sections = [
        f"<h1>Credit model report: {html.escape(scorer.model_name)} on {html.escape(scorer.dataset)}</h1>",
        "<p class='warn'>Data: GENERATED (a seeded synthetic population), not real.</p>"
        if scorer.dataset == "generated" else "",
        f"<p>Model version <code>{html.escape(scorer.version_)}</code>; {len(scorer.pipeline_.feature_names_)} "
        f"features; trained on {scorer.training_rows_:,} rows; PD cut-off {scorer.cutoff_pd_:.4f} "
        f"(approval rate {scorer.policy_.approval_rate:.0%} on validation); points: "
        f"{scorer.policy_.scale.base_score:g} at {scorer.policy_.scale.base_odds:g}:1 odds, PDO "
        f"{scorer.policy_.scale.pdo:g}.</p>",
        "<h2>Metrics on this population</h2>",
        _table(pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()])),
        "<h2>Plots</h2>", "<div>" + "".join(plots) + "</div>",
        "<h2>Calibration by decile</h2>", _table(calibration_table(y, pd_)),
        *_csi_section(evaluation.get("csi")),
        "<h2>Strongest features (mean absolute contribution on a sample)</h2>", _table(importance),
        "<h2>Reason codes of declined applicants (sample)</h2>", _table(declined),
    ]
    if hasattr(scorer.model_, "scorecard_table"):
        sections += ["<h2>Scorecard</h2>", _table(scorer.model_.scorecard_table(scorer.policy_.scale))]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px} .t{border-collapse:collapse;font-size:12px}"
             " .t td,.t th{padding:2px 8px;border-bottom:1px solid #ddd} .warn{color:#b00;font-weight:bold}"
             " img{margin:4px}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Credit model report</title>"
                    f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    return path
