from typer.testing import CliRunner

from deploy.cli import app


def test_demo_runs_on_embedded_defaults(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "validation AUC" in result.output
    assert (tmp_path / "core_demo_moe.pt").exists()
    # ultralytics' banner and layer table go to the demo's log, not between the demo's tables
    assert (tmp_path / "demo.log").is_file()
    assert "Ultralytics" not in result.output and "ultralytics.nn" not in result.output
