"""The batch job's fault matrix: every bad file or row is quarantined or refused with a reason, the
summary is always written, counts reconcile, and two inputs or two models never mix."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from finance.batch import JobRefused, read_quarantine, read_scored, run_batch
from finance.data import load_generated
from finance.generate import GeneratorConfig, generate
from finance.scorer import train_scorer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    records = load_generated(generate(root / "train", GeneratorConfig(n_applicants=2_000, seed=4)))
    lightgbm = train_scorer(records, "lightgbm").save(root / "lightgbm")
    scorecard = train_scorer(records, "scorecard").save(root / "scorecard")
    new = load_generated(generate(root / "new", GeneratorConfig(n_applicants=900, seed=5)), require_target=False)
    frame = new.frame.astype(object)
    return root, lightgbm, scorecard, frame


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _summary(out: Path) -> dict:
    return json.loads((out / "_SUMMARY.json").read_text())


def test_every_bad_file_is_quarantined_whole_and_the_rest_completes(env, tmp_path):
    root, model, _, frame = env
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = frame.iloc[:300].copy()
    good.loc[5, "monthly_income"] = "inf"
    good.loc[6, "requested_amount"] = "Infinity"
    good.loc[7, "existing_debt"] = "1e309"
    good.loc[8, "years_at_address"] = "-1e39"  # below float32's range (and the minimum)
    good.loc[9, "age"] = "1e39"
    (inputs / "a_good.csv").write_bytes(_csv(good))
    text = _csv(frame.iloc[300:400])
    (inputs / "b_truncated.csv.gz").write_bytes(gzip.compress(text)[: len(gzip.compress(text)) // 2])
    corrupt = bytearray(gzip.compress(text))
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 16] = b"\xff" * 16
    (inputs / "c_corrupt.csv.gz").write_bytes(bytes(corrupt))
    (inputs / "d_plain_named.csv.gz").write_bytes(text)
    latin = frame.iloc[400:450].copy()
    latin.loc[latin.index[20], "region"] = "Zürich"
    (inputs / "e_latin1.csv").write_bytes(latin.to_csv(index=False).encode("latin-1"))
    lines = _csv(frame.iloc[450:500]).decode().splitlines()
    lines[10] += ",surplus"
    (inputs / "f_extra_field.csv").write_text("\n".join(lines) + "\n")
    (inputs / "g_empty.csv").write_bytes(b"")
    (inputs / "h_header_only.csv").write_text(lines[0] + "\n")
    (inputs / "i_taiwan.csv").write_text("ID,LIMIT_BAL,SEX\n1,20000,2\n")
    (inputs / "j_not_parquet.parquet").write_bytes(b"PAR1 this is not parquet")
    frame.iloc[500:600].to_parquet(inputs / "k_good.parquet", index=False)

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["finance", "score", "--model", str(model), "--input", str(inputs),
                                      "--output", str(out), "--chunk-rows", "64", "--json"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    summary = _summary(out)
    assert summary["status"] == "complete_with_quarantine" and summary["reconciled"]
    assert (summary["read"], summary["scored"], summary["quarantined"]) == (400, 395, 5)
    reasons = {Path(f["file"]).name: f["reason"] for f in summary["files"]}
    assert reasons["a_good.csv"] == "" and reasons["k_good.parquet"] == ""
    assert "truncated gzip" in reasons["b_truncated.csv.gz"]
    assert "gzip" in reasons["c_corrupt.csv.gz"] or "CRC" in reasons["c_corrupt.csv.gz"]
    assert "not a gzip file" in reasons["d_plain_named.csv.gz"]
    assert "not UTF-8" in reasons["e_latin1.csv"] and "line 22" in reasons["e_latin1.csv"]
    assert "line 11" in reasons["f_extra_field.csv"] and "fields" in reasons["f_extra_field.csv"]
    assert reasons["g_empty.csv"] == "empty file (0 bytes)"
    assert "header only" in reasons["h_header_only.csv"]
    assert "missing column" in reasons["i_taiwan.csv"]
    assert "Parquet" in reasons["j_not_parquet.parquet"]
    assert summary["files_quarantined"] == 9
    files_json = json.loads((out / "quarantine" / "files.json").read_text())
    assert len(files_json) == 9 and all(f["reason"] for f in files_json)
    quarantine = read_quarantine(out).sort_values("source_row")
    assert quarantine["source_row"].tolist() == [6, 7, 8, 9, 10]
    assert quarantine["reason"].tolist() == [
        "monthly_income: not a finite number ('inf')", "requested_amount: not a finite number ('Infinity')",
        "existing_debt: not a finite number ('1e309')",
        "years_at_address: outside the float32 range ('-1e39')", "age: outside the float32 range ('1e39')"]
    scored = read_scored(out)
    assert len(scored) == 395 and scored["id"].is_unique
    assert set(scored["source_file"].map(lambda p: Path(p).name)) == {"a_good.csv", "k_good.parquet"}
    from_csv = scored[scored["source_file"].str.endswith("a_good.csv")]
    assert (from_csv["source_line"] == from_csv["source_row"] + 1).all()  # header on line 1, no blank lines


def test_blank_lines_and_newlines_inside_quotes_are_records_as_the_parser_reads_them(env, tmp_path):
    root, model, _, frame = env
    part = frame.iloc[:40].copy()
    part["region"] = part["region"].astype(str)
    part.loc[3, "region"] = "North\nWest, upper"  # quoted by to_csv, a newline inside
    lines = _csv(part).decode().split("\n")
    text = "\n".join(lines[:5] + ["", "   "] + lines[5:12] + [""] + lines[12:]) + "\n\n"
    (tmp_path / "odd.csv").write_text(text)
    summary = run_batch(model, tmp_path / "odd.csv", tmp_path / "out", chunk_rows=7, progress=False)
    assert summary.status == "complete" and (summary.read, summary.scored) == (40, 40) and summary.reconciled
    scored = read_scored(tmp_path / "out")
    assert scored["id"].tolist() == part["applicant_id"].tolist()
    assert scored["source_row"].tolist() == list(range(1, 41))
    physical = text.split("\n")
    for row in scored.itertuples():  # each record's line starts with its id
        assert physical[row.source_line - 1].startswith(f"{row.id},")


def test_a_resume_refuses_another_input_model_or_setting_and_restart_rescores_clean(env, tmp_path):
    root, lightgbm, scorecard, frame = env
    data, out = tmp_path / "in.csv", tmp_path / "out"
    data.write_bytes(_csv(frame.iloc[:400]))
    first = run_batch(lightgbm, data, out, chunk_rows=100, max_chunks=2, progress=False)
    assert first.status == "incomplete" and first.exit_code == 4 and _summary(out)["complete"] is False
    data.write_bytes(_csv(frame.iloc[400:800]))  # other applicants, same path and row count
    with pytest.raises(JobRefused, match="has changed"):
        run_batch(lightgbm, data, out, chunk_rows=100, progress=False)
    data.write_bytes(_csv(frame.iloc[:400]))
    with pytest.raises(JobRefused, match="another model"):
        run_batch(scorecard, data, out, chunk_rows=100, progress=False)
    with pytest.raises(JobRefused, match="chunk_rows"):
        run_batch(lightgbm, data, out, chunk_rows=50, progress=False)
    result = CliRunner().invoke(app, ["finance", "score", "--model", str(scorecard), "--input", str(data),
                                      "--output", str(out), "--chunk-rows", "100"])
    assert result.exit_code == 2 and "--restart" in result.output and "Traceback" not in result.output
    data.write_bytes(_csv(frame.iloc[400:800]))
    summary = run_batch(scorecard, data, out, chunk_rows=100, restart=True, progress=False)
    assert summary.status == "complete" and summary.chunks_scored_now == 4
    scored = read_scored(out)
    assert sorted(scored["id"]) == sorted(frame.iloc[400:800]["applicant_id"])  # nothing of the old input
    assert scored["model_version"].nunique() == 1 and _summary(out)["model_version"] == scored["model_version"][0]


def test_repeated_ids_are_quarantined_or_kept_flagged(env, tmp_path):
    root, model, _, frame = env
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_bytes(_csv(frame.iloc[:100]))
    (tmp_path / "in" / "b.csv").write_bytes(_csv(pd.concat([frame.iloc[100:150], frame.iloc[[3, 120]]])))
    summary = run_batch(model, tmp_path / "in", tmp_path / "q", chunk_rows=30, progress=False)
    assert (summary.read, summary.scored, summary.quarantined, summary.duplicates) == (152, 150, 2, 2)
    quarantine = read_quarantine(tmp_path / "q")
    a, b = str(tmp_path / "in" / "a.csv"), str(tmp_path / "in" / "b.csv")
    assert quarantine["reason"].tolist() == [f"applicant_id: duplicate of {a} row 4",
                                             f"applicant_id: duplicate of {b} row 21"]
    kept = run_batch(model, tmp_path / "in", tmp_path / "k", chunk_rows=30, duplicates="keep", progress=False)
    assert (kept.scored, kept.quarantined, kept.duplicates) == (152, 0, 2)
    flagged = read_scored(tmp_path / "k").query("duplicate_of != ''")
    assert flagged["source_row"].tolist() == [51, 52] and flagged["duplicate_of"].tolist()[0] == f"{a} row 4"


def test_an_empty_or_header_only_input_fails_with_a_summary_and_exit_2(env, tmp_path):
    root, model, _, frame = env
    for name, content in (("empty.csv", b""), ("header.csv", _csv(frame.iloc[:0]))):
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out-{name}"
        result = CliRunner().invoke(app, ["finance", "score", "--model", str(model), "--input",
                                          str(tmp_path / name), "--output", str(out)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "nothing to score" in result.output
        summary = _summary(out)
        assert summary["status"] == "failed" and summary["read"] == 0 and summary["complete"] is False


@pytest.mark.slow
def test_a_job_killed_with_sigkill_resumes_to_the_uninterrupted_output(env, tmp_path):
    root, model, _, frame = env
    data = tmp_path / "in.csv.gz"
    big = pd.concat([frame] * 4, ignore_index=True)
    big["applicant_id"] = range(len(big))
    data.write_bytes(gzip.compress(_csv(big)))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "deploy.cli", "finance", "score", "--model", str(model), "--input", str(data),
               "--output", str(out), "--chunk-rows", "60", "--reasons", "all"]
    env_vars = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(command, env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "_chunks").glob("*.json"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(list((out / "_chunks").glob("*.json")))
    assert 3 <= finished_before < 60
    resumed = run_batch(model, data, out, chunk_rows=60, reasons="all", progress=False)
    assert resumed.status == "complete" and resumed.reconciled and resumed.read == len(big)
    assert resumed.chunks_scored_now == resumed.chunks - finished_before
    run_batch(model, data, tmp_path / "whole", chunk_rows=60, reasons="all", progress=False)
    pd.testing.assert_frame_equal(read_scored(out), read_scored(tmp_path / "whole"))
