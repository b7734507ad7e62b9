"""`moeworks maintenance adapt` and `moeworks finance adapt` end to end on generated data: the result
is a sealed, normal model folder (evaluate and export run on it), and user mistakes exit 2 with one line."""

import json

import pytest
from typer.testing import CliRunner

from core.model_files import verify_manifest
from deploy.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [*map(str, args)])


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rul_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rul")
    for name, seed in (("old", 3), ("new", 4)):
        result = invoke("maintenance", "generate", "--out", root / name, "--train-units", 8, "--test-units", 4,
                        "--seed", seed)
        assert result.exit_code == 0, result.output
    result = invoke("maintenance", "train", "--data", root / "old", "--model", "moe", "--members", 1, "--epochs", 1,
                    "--windows-per-epoch", 256, "--cuts", 1, "--out", root / "base")
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("method", ["lora", "full"])
def test_maintenance_adapt_writes_a_normal_model_folder(rul_base, tmp_path, method):
    out = tmp_path / "adapted"
    result = invoke("maintenance", "adapt", "--model", rul_base / "base", "--data",
                    rul_base / "new" / "train_FD001.txt", "--out", out, "--method", method, "--units", 5,
                    "--epochs", 1, "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.output)
    assert metrics["method"] == method and metrics["train_units"] + metrics["val_units"] == 5
    assert metrics["val_rmse"] >= 0 and metrics["base_val_rmse"] >= 0
    if method == "lora":
        assert 0 < metrics["trained_share"] <= 0.05
    else:
        assert metrics["trained_share"] == 1.0
    sealed = verify_manifest(out)  # the manifest was written after the adapter files
    assert ("adapter.safetensors" in sealed) == (method == "lora") and "model.pt" in sealed
    result = invoke("maintenance", "evaluate", "--model", out, "--data", rul_base / "new" / "test_FD001.txt",
                    "--rul", rul_base / "new" / "RUL_FD001.txt", "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["engines"] == 4
    result = invoke("maintenance", "export", "--model", out, "--out", tmp_path / "onnx",
                    "--data", rul_base / "new" / "test_FD001.txt")
    assert result.exit_code == 0, result.output
    assert float(result.output.strip().split("= ")[-1]) < 1e-3  # the merged net in onnxruntime


def test_maintenance_adapt_mistakes_exit_2_with_one_line(rul_base, tmp_path):
    new = rul_base / "new" / "train_FD001.txt"
    base = rul_base / "base"
    cases = [
        (("--units", 1), "--units"),
        (("--rank", 0), "rank"),
        (("--method", "dream"), "method"),
        (("--learning-rate", -1), "learning_rate"),
    ]
    for extra, expected in cases:
        result = invoke("maintenance", "adapt", "--model", base, "--data", new, "--out", tmp_path / "o", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    result = invoke("maintenance", "adapt", "--model", base, "--data", new, "--out", base)
    assert result.exit_code == 2 and "new one" in result.output
    result = invoke("maintenance", "adapt", "--model", tmp_path, "--data", new, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a RUL model folder" in result.output
    result = invoke("maintenance", "adapt", "--model", base, "--data", tmp_path / "none.txt", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no such file" in result.output
    assert not (tmp_path / "o").exists()  # nothing written for a refused command


@pytest.fixture(scope="module")
def credit_base(tmp_path_factory):
    from finance.data import load_records
    from finance.generate import GeneratorConfig, generate
    from finance.models.moe import MoEModelConfig
    from finance.scorer import train_scorer

    root = tmp_path_factory.mktemp("credit")
    old = generate(root / "old", GeneratorConfig(n_applicants=2000, seed=0))
    generate(root / "new", GeneratorConfig(n_applicants=800, seed=1, default_rate=0.15))
    scorer = train_scorer(load_records("generated", old), "moe", model_config=MoEModelConfig(max_epochs=1))
    scorer.save(root / "base")
    return root


def test_finance_adapt_writes_a_normal_model_folder(credit_base, tmp_path):
    out = tmp_path / "adapted"
    result = invoke("finance", "adapt", "--model", credit_base / "base", "--data", credit_base / "new", "--out", out,
                    "--epochs", 2, "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.output)
    assert metrics["method"] == "lora" and 0 < metrics["trained_share"] <= 0.05
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["base_auc"] <= 1 and metrics["train_rows"] == 640
    sealed = verify_manifest(out)
    assert {"model/adapter.safetensors", "model/adapter.json", "adaptation.json", "model/moe.pt"} <= set(sealed)
    result = invoke("finance", "evaluate", "--model", out, "--data", credit_base / "new", "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    evaluated = last_json(result.output)
    assert evaluated["share_in_training"] > 0.5  # the segment's rows were used: the fingerprint says so
    result = invoke("finance", "export", "--model", out, "--out", tmp_path / "adapted.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapted.onnx").stat().st_size > 0


def test_finance_adapt_mistakes_exit_2_with_one_line(credit_base, tmp_path):
    from finance.data import load_records
    from finance.scorer import train_scorer

    lightgbm = tmp_path / "lightgbm"
    train_scorer(load_records("generated", credit_base / "old"), "lightgbm").save(lightgbm)
    cases = [
        ((lightgbm, credit_base / "new", tmp_path / "o"), (), "moe"),
        ((credit_base / "base", credit_base / "new", tmp_path / "o"), ("--rank", 0), "rank"),
        ((credit_base / "base", credit_base / "new", tmp_path / "o"), ("--grad-accumulation", 0), "grad_accumulation"),
        ((credit_base / "base", credit_base / "new", credit_base / "base"), (), "new one"),
        ((credit_base / "base", tmp_path / "missing", tmp_path / "o"), (), "missing"),
    ]
    for (model, data, out), extra, expected in cases:
        result = invoke("finance", "adapt", "--model", model, "--data", data, "--out", out, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
