import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from finance.batch import read_quarantine, read_scored, run_batch
from finance.data import load_generated
from finance.generate import GeneratorConfig, generate
from finance.scorer import train_scorer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    records = load_generated(generate(root / "train", GeneratorConfig(n_applicants=3_000, seed=4)))
    model_dir = train_scorer(records, "lightgbm").save(root / "model")
    batch = load_generated(generate(root / "new", GeneratorConfig(n_applicants=1_000, seed=5)),
                           require_target=False).frame.astype(object)
    batch.loc[10, "age"] = "forty"  # wrong type
    batch.loc[250, "monthly_income"] = None  # missing required field
    batch.loc[600, "bureau_score"] = 2000  # out of range
    batch.loc[601, "os"] = "symbian"  # unknown level
    batch.to_csv(root / "batch.csv", index=False)
    return root, model_dir


def test_bad_rows_are_quarantined_with_reasons_and_counts_reconcile(setup):
    root, model_dir = setup
    summary = run_batch(model_dir, root / "batch.csv", root / "out", chunk_rows=300, progress=False)
    assert summary.reconciled and (summary.read, summary.scored, summary.quarantined) == (1000, 996, 4)
    quarantine = read_quarantine(root / "out").sort_values("source_row")
    assert quarantine["source_row"].tolist() == [11, 251, 601, 602]
    assert quarantine["reason"].tolist() == ["age: not a number ('forty')", "monthly_income: missing",
                                            "bureau_score: above the maximum 850", "os: unknown level 'symbian'"]
    scored = read_scored(root / "out")
    assert scored["id"].is_unique and len(scored) == 996
    assert set(scored["decision"]) == {"approve", "decline"}
    declined = scored[scored["decision"] == "decline"]
    assert (declined["reason_1"].str.len() > 0).all() and (scored["model_version"] != "").all()
    assert json.loads((root / "out" / "_SUMMARY.json").read_text())["reconciled"] is True


def test_a_stopped_job_resumes_without_rescoring_finished_chunks(setup):
    root, model_dir = setup
    out = root / "resume"
    first = run_batch(model_dir, root / "batch.csv", out, chunk_rows=300, max_chunks=2, progress=False)
    assert first.chunks_scored_now == 2 and first.read == 600
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "scored").iterdir()}
    second = run_batch(model_dir, root / "batch.csv", out, chunk_rows=300, progress=False)
    assert second.chunks_scored_now == 2 and second.reconciled and second.read == 1000  # 4 chunks in all
    assert all((out / "scored" / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    run_batch(model_dir, root / "batch.csv", root / "uninterrupted", chunk_rows=300, progress=False)
    pd.testing.assert_frame_equal(read_scored(out), read_scored(root / "uninterrupted"))


def test_dask_local_cluster_gives_the_same_output(setup):
    root, model_dir = setup
    local = run_batch(model_dir, root / "batch.csv", root / "local", chunk_rows=400, progress=False)
    dask = run_batch(model_dir, root / "batch.csv", root / "dask", chunk_rows=400, scheduler="local", progress=False)
    assert (dask.read, dask.scored, dask.quarantined) == (local.read, local.scored, local.quarantined)
    pd.testing.assert_frame_equal(read_scored(root / "dask"), read_scored(root / "local"))
    pd.testing.assert_frame_equal(read_quarantine(root / "dask"), read_quarantine(root / "local"))


def test_cli_train_evaluate_score_and_clear_errors(setup, tmp_path):
    root, model_dir = setup
    runner = CliRunner()
    result = runner.invoke(app, ["finance", "train", "--dataset", "generated", "--model", "scorecard",
                                 "--rows", "2000", "--exclude-protected", "--out", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["auc"] > 0.6
    pipeline = json.loads((tmp_path / "m" / "pipeline.json").read_text())
    assert {"age", "num_dependents"} <= set(pipeline["excluded"]) and "age" not in pipeline["feature_names"]
    result = runner.invoke(app, ["finance", "evaluate", "--model", str(tmp_path / "m"), "--data",
                                 str(tmp_path / "m" / "generated-data"), "--report", str(tmp_path / "r.html"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert {"auc", "ks", "gini", "recall_at_approval", "brier", "psi", "latency_p99_ms", "batch_rows_per_s"} <= set(
        metrics)
    # its own training data: 80% trained on, 20% validated on (the seeded split), said on stderr
    assert (metrics["share_in_training"], metrics["share_in_validation"], metrics["share_exact"]) == (0.8, 0.2, True)
    assert "warning: 80.0% of these rows were used to train the model and 20.0% to validate it" in result.stderr
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64") == 6 and "GENERATED" in html and "Characteristic stability" in html
    result = runner.invoke(app, ["finance", "score", "--model", str(model_dir), "--input", str(root / "batch.csv"),
                                 "--output", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 3, result.output  # complete, with quarantined rows
    assert json.loads(result.output.strip().splitlines()[-1])["quarantined"] == 4
    result = runner.invoke(app, ["finance", "evaluate", "--model", str(tmp_path / "m"), "--data",
                                 str(root / "train"), "--no-speed", "--json"])  # other applicants
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["share_in_training"] == 0.0 and metrics["share_in_validation"] == 0.0
    assert len(result.stdout.strip().splitlines()) == 1 and "warning" not in result.stderr
    result = runner.invoke(app, ["finance", "evaluate", "--model", str(model_dir), "--data", str(root / "batch.csv")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "default_12m" in result.output  # the unlabelled file lacks the label column: named


def test_single_application_scores_like_the_batch(setup):
    from finance.scorer import load_model

    root, model_dir = setup
    scorer = load_model(model_dir)
    frame = load_generated(root / "new", require_target=False).frame
    batch = scorer.score(frame.iloc[:20], reasons="all")
    one = pd.concat([scorer.score(frame.iloc[[i]], reasons="all") for i in range(20)], ignore_index=True)
    np.testing.assert_allclose(one["pd"], batch["pd"], rtol=1e-9)
    assert one["reason_codes"].tolist() == batch["reason_codes"].tolist()
