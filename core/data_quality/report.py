"""The check's outputs: report.html (tables and embedded plots), summary.json, findings.csv."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from core.data_quality.check import CheckResult

SHOWN_FINDINGS = 200  # rows of findings listed in the HTML; findings.csv holds them all


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _plots(result: CheckResult) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    counts = result.findings.groupby("check").size()
    if len(counts):
        figure, axis = plt.subplots(figsize=(6, 2.8))
        axis.barh(counts.index, counts.to_numpy(), color="#4c72b0")
        axis.set_xlabel("rows")
        axis.set_title("Findings per check")
        plots.append(_png(figure))
    if len(result.coverage):
        coverage = result.coverage
        figure, axis = plt.subplots(figsize=(6, 2.8))
        x = coverage["segment"].to_numpy()
        axis.bar(x - 0.2, coverage["train_share"], 0.4, label="training")
        axis.bar(x + 0.2, coverage["data_share"], 0.4, label="checked data")
        axis.set_xlabel("segment")
        axis.set_ylabel("share of rows")
        axis.set_title("Domain coverage")
        axis.legend()
        plots.append(_png(figure))
    if result.label_scores is not None:
        scores = result.label_scores[np.isfinite(result.label_scores)]
        flagged = result.findings.loc[result.findings["check"] == "label_issue", "row"].to_numpy() - 1
        figure, axis = plt.subplots(figsize=(6, 2.8))
        axis.hist(scores, bins=50, range=(0, 1), color="#999999", label="all labelled rows")
        axis.hist(result.label_scores[flagged], bins=50, range=(0, 1), color="#c44e52", label="label issues")
        axis.set_yscale("log")
        axis.set_xlabel("label quality (tabular: out-of-fold probability of the given label)")
        axis.set_title("Confident learning")
        axis.legend()
        plots.append(_png(figure))
    return plots


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(result: CheckResult, out: Path) -> dict[str, Path]:
    """Write the three files into `out` (made if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    paths = {"summary": out / "summary.json", "findings": out / "findings.csv", "report": out / "report.html"}
    paths["summary"].write_text(json.dumps(summary, indent=1) + "\n")
    result.findings.to_csv(paths["findings"], index=False)
    rules = summary["rules"]
    level1 = [{"check": k, "rows": v if not isinstance(v, dict) else ", ".join(f"{s}: {c}" for s, c in v.items())
               or "not checked (no --reference or --model)"} for k, v in rules.items()]
    shown = result.findings.head(SHOWN_FINDINGS).to_dict(orient="records")
    labels = summary["labels"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Data check</title><style>"
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>",
        f"<h1>Data check: {html.escape(summary['dataset'])}</h1>",
        f"<p>{html.escape(summary['source'])}: {summary['rows']} rows, {summary['rows_passing_rules']} pass the "
        f"loader's checks; {summary['rows_to_remove']} would be removed by --fix "
        f"({', '.join(summary['removed_checks'])}). {summary['seconds']} s.</p>",
        "<h2>Level 1: rules</h2>", _table(level1),
        "<h2>Level 2: domains</h2>",
        f"<p>{summary['domains'].get('segments', 0)} segments on {html.escape(', '.join(summary['domains']['fields']))}"
        f"; {summary['domains']['unseen']} rows outside every training segment.</p>",
        _table(summary["domains"].get("coverage", [])),
        "<h2>Level 3: labels</h2>",
        f"<p>{labels['issues']} label issues among {labels['checked']} rows"
        f"{'; ' + html.escape(labels['method']) if 'method' in labels else ''}"
        f"{'; skipped: ' + html.escape(labels['skipped']) if 'skipped' in labels else ''}.</p>",
        "<h2>Plots</h2>", *_plots(result),
        "<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"]) + "</ul>",
        f"<h2>Findings (first {min(SHOWN_FINDINGS, len(result.findings))} of {len(result.findings)}; all in "
        "findings.csv)</h2>", _table(shown), "</body></html>"]
    paths["report"].write_text("\n".join(parts))
    return paths
