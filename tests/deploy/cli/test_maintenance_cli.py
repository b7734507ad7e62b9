"""`moeworks maintenance ...` end to end on generated files: train, evaluate, export, AI4I, bad input."""

import json

import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.maintenance.ai4i import generate_ai4i

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["maintenance", *map(str, args)])


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["lstm", "moe"])  # moe: the recipe's ensemble over regime history, running means
def test_generate_train_evaluate_export(tmp_path, kind):
    data, model = tmp_path / "data", tmp_path / "model"
    result = invoke("generate", "--out", data, "--train-units", 12, "--test-units", 6, "--seed", 3)
    assert result.exit_code == 0, result.output
    result = invoke("train", "--subset", "FD001", "--data", data, "--kind", kind, "--out", model,
                    "--epochs", 1, "--windows-per-epoch", 256, "--cuts", 1, "--json")
    assert result.exit_code == 0, result.output
    trained = last_json(result.output)
    assert trained["schema"] == "moeworks.maintenance.train/1" and trained["model"] == str(model)
    assert trained["val_engines"] > 0 and trained["kind"] == kind and trained["val_rmse"] > 0
    assert trained["members"] == (3 if kind == "moe" else 1)
    result = invoke("evaluate", "--model", model, "--data", data / "test_FD001.txt", "--rul", data / "RUL_FD001.txt",
                    "--predictions", tmp_path / "pred.csv", "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.output)
    assert metrics["engines"] == 6 and metrics["rmse"] >= 0 and "score" in metrics
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 7
    result = invoke("export", "--model", model, "--out", tmp_path / "onnx", "--test", data / "test_FD001.txt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / f"rul_{kind}.onnx").is_file()
    assert float(result.output.strip().split("= ")[-1]) < 1e-3


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    invoke("generate", "--out", tmp_path, "--train-units", 3, "--test-units", 3)
    broken = tmp_path / "broken.txt"
    lines = (tmp_path / "test_FD001.txt").read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:20])
    broken.write_text("\n".join(lines) + "\n")
    result = invoke("evaluate", "--model", tmp_path, "--test", broken, "--rul", tmp_path / "RUL_FD001.txt")
    assert result.exit_code == 2
    assert "not a RUL model folder" in result.output and "Traceback" not in result.output
    result = invoke("train", "--subset", "FD001", "--data", broken, "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert "row 5" in result.output and "missing s_16, s_17" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("train", "--subset", "FD007", "--generated", "--out", tmp_path / "m")
    assert result.exit_code == 2 and "unknown subset" in result.output


def test_ai4i_train_and_evaluate(tmp_path):
    csv = tmp_path / "ai4i.csv"
    generate_ai4i(1500, seed=2).to_csv(csv, index=False)
    result = invoke("ai4i-train", "--data", csv, "--out", tmp_path / "model", "--epochs", 3, "--trees", 50, "--json")
    assert result.exit_code == 0, result.output
    trained = last_json(result.output)
    assert 0 <= trained["lightgbm_failure_pr_auc"] <= 1 and 0 <= trained["moe_failure_pr_auc"] <= 1
    result = invoke("ai4i-evaluate", "--model", tmp_path / "model", "--data", csv, "--alert-rate", 0.05, "--json")
    assert result.exit_code == 0, result.output
    evaluated = last_json(result.output)
    assert evaluated["rows"] == 1500
    # its own training file: the seeded 80/20 split, recognised by the saved row fingerprint
    assert abs(evaluated["share_in_training"] - 0.8) < 0.01 and abs(evaluated["share_in_validation"] - 0.2) < 0.01
    assert "warning: 80" in result.stderr
    fresh = tmp_path / "fresh.csv"
    generate_ai4i(500, seed=9).to_csv(fresh, index=False)
    result = invoke("ai4i-evaluate", "--model", tmp_path / "model", "--data", fresh, "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["share_in_training"] == 0.0 and "warning" not in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text(csv.read_text().replace(",L,", ",Q,", 1))
    result = invoke("ai4i-evaluate", "--model", tmp_path / "model", "--data", bad)
    assert result.exit_code == 2 and "field 'Type'" in result.output
