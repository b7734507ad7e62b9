import json

import typer
from typer.testing import CliRunner

from finance.reject_cli import register


def app() -> typer.Typer:
    cli = typer.Typer()
    register(cli)
    cli.command("noop")(lambda: None)  # a group, so the command is addressed by name as in `moeworks finance`
    return cli


def test_reject_inference_command_prints_the_table_and_json(data_root):
    result = CliRunner().invoke(app(), ["reject-inference", "--dataset", "taiwan", "--data", str(data_root),
                                        "--estimator", "logistic", "--method", "fuzzy", "--method", "parcelling",
                                        "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert {"accepted-only_auc", "fuzzy_auc", "parcelling_auc", "upper-bound_auc", "best_gap_closed"} <= set(metrics)
    assert metrics["upper-bound_gap_closed"] == 1.0 and metrics["accepted-only_gap_closed"] == 0.0
    assert 0.6 < metrics["upper-bound_auc"] < 0.85


def test_bad_options_end_with_one_line_and_code_2(tmp_path):
    result = CliRunner().invoke(app(), ["reject-inference", "--data", str(tmp_path), "--method", "magic"])
    assert result.exit_code == 2 and "magic" in result.output
    result = CliRunner().invoke(app(), ["reject-inference", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "no such file" in result.output
    assert "Traceback" not in result.output


def test_finance_train_takes_a_reject_inference_method(data_root, tmp_path):
    import gzip

    import pandas as pd

    from deploy.cli import app as moeworks

    with gzip.open(data_root / "taiwan_credit_default" / "UCI_Credit_Card.csv.gz") as handle:
        raw = pd.read_csv(handle, nrows=2000)
    raw.iloc[:1500].to_csv(tmp_path / "accepted.csv", index=False)
    raw.iloc[1500:].drop(columns="default.payment.next.month").to_csv(tmp_path / "rejects.csv", index=False)
    args = ["finance", "train", "--dataset", "taiwan", "--data", str(tmp_path / "accepted.csv"), "--model", "lightgbm",
            "--unlabelled", str(tmp_path / "rejects.csv"), "--out", str(tmp_path / "model")]
    result = CliRunner().invoke(moeworks, [*args, "--reject-inference", "parcelling", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["auc"] > 0.6
    assert (tmp_path / "model" / "scorer.json").is_file()
    bad = CliRunner().invoke(moeworks, [*args, "--reject-inference", "magic"])
    assert bad.exit_code == 2 and "magic" in bad.output
    listed = CliRunner().invoke(moeworks, ["finance", "--help"])
    assert "reject-inference" in listed.output
