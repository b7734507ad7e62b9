"""One grammar: --json prints exactly one JSON object (with its schema) on stdout, --quiet and --verbose
work anywhere on the line, the previous release's flag names still work with one deprecation line,
and every user-input error the CLI translates is importable from where errors.py says it lives."""

import importlib
import json

import pytest
from typer.testing import CliRunner

from deploy.cli import app
from deploy.cli.errors import VERTICAL_ERRORS, UserInputError, user_error_types
from deploy.cli.main import DEPRECATED_FLAGS, modernize

runner = CliRunner()


def _one_json_object(stdout: str) -> dict:
    """stdout must hold exactly one JSON object and nothing else."""
    decoded, end = json.JSONDecoder().raw_decode(stdout.strip())
    assert end == len(stdout.strip()), f"more than one JSON object on stdout: {stdout!r}"
    assert isinstance(decoded, dict)
    return decoded


@pytest.mark.parametrize(("argv", "schema", "keys"), [
    ("finance generate --rows 300 --out {tmp}/gen --json", "moeworks.finance.generate/1", {"out", "rows"}),
    ("maintenance generate --train-units 3 --test-units 2 --out {tmp}/cm --json", "moeworks.maintenance.generate/1",
     {"out", "files"}),
    ("twin etl --db {tmp}/history.db --out {tmp}/daily --json", "moeworks.twin.etl/1", {"db", "out", "files"}),
])
def test_json_is_one_object_on_stdout_with_its_schema(tmp_path, argv, schema, keys):
    if "twin etl" in argv:
        from twin.store.history import HistoryStore

        HistoryStore(str(tmp_path / "history.db")).close()  # an empty history: zero daily files
    result = runner.invoke(app, argv.format(tmp=tmp_path).split())
    assert result.exit_code == 0, result.output
    payload = _one_json_object(result.stdout)
    assert payload["schema"] == schema and keys <= set(payload)
    assert str(tmp_path) in payload["out"]


def test_quiet_anywhere_on_the_line_leaves_only_the_result(tmp_path):
    quiet = runner.invoke(app, ["finance", "generate", "--rows", "200", "--out", str(tmp_path / "a"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    assert (tmp_path / "a").is_dir()
    loud = runner.invoke(app, ["finance", "generate", "--rows", "200", "--out", str(tmp_path / "b")])
    assert loud.exit_code == 0 and "generated 200 applicants" in loud.stdout
    with_json = runner.invoke(app, ["--quiet", "finance", "generate", "--rows", "200", "--out", str(tmp_path / "c"),
                                    "--json"])
    assert _one_json_object(with_json.stdout)["rows"] == 200 and with_json.stderr == ""


@pytest.mark.parametrize(("argv", "renamed"), [
    ("finance score --model {tmp}/none --input {tmp}/in.csv --output {tmp}/out",
     [("--input", "--data"), ("--output", "--out")]),
    ("defects predict --source {tmp}/in --model {tmp}/none.pt", [("--source", "--data")]),
    ("edge run --source lathe --max-messages 1", [("--source", "--kind")]),
    ("serve {tmp}/none", [("MODEL", "--model")]),
])
def test_old_flag_names_work_with_one_deprecation_line_each(tmp_path, argv, renamed):
    result = runner.invoke(app, argv.format(tmp=tmp_path).split())
    assert result.exit_code == 2, result.output  # each names a missing model/source: refused as before
    lines = result.stderr.splitlines()
    deprecations = [line for line in lines if line.startswith("deprecated:")]
    assert len(deprecations) == len(renamed), lines
    for (old, new), line in zip(renamed, deprecations, strict=True):
        assert old in line and new in line, line
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1


def test_modernize_renames_only_the_commands_old_flags_and_hoists_global_flags():
    assert modernize(["finance", "score", "--input=a.csv", "--output", "o", "--quiet"]) == \
        ["--quiet", "finance", "score", "--data=a.csv", "--out", "o"]
    # --model is a kind only in `train`: elsewhere it is the model path and stays
    assert modernize(["finance", "evaluate", "--model", "m", "--data", "d"]) == \
        ["finance", "evaluate", "--model", "m", "--data", "d"]
    assert modernize(["--verbose", "maintenance", "train", "--model", "moe"])[-2:] == ["--kind", "moe"]
    assert modernize(["edge", "run", "--", "--source"]) == ["edge", "run", "--", "--source"]
    assert modernize(["serve", "m.pt", "--port", "1"]) == ["serve", "--model", "m.pt", "--port", "1"]
    assert modernize(["serve", "--port", "1", "--model", "m.pt"]) == ["serve", "--port", "1", "--model", "m.pt"]
    for renames in DEPRECATED_FLAGS.values():
        assert all(old.startswith("--") and new.startswith("--") for old, new in renames.items())


def test_every_translated_error_lives_where_errors_py_says():
    for spec in VERTICAL_ERRORS:
        module, name = spec.split(":")
        error = getattr(importlib.import_module(module), name)
        assert issubclass(error, Exception), spec
        assert error in user_error_types(), spec  # imported now, so translated
    assert UserInputError in user_error_types() and ValueError not in user_error_types()


def test_only_user_errors_become_exit_code_2_and_a_bug_keeps_its_traceback():
    import typer

    from deploy.cli.main import MoeworksGroup

    probe = typer.Typer(cls=MoeworksGroup)

    @probe.command()
    def mistake():
        raise UserInputError("--rows must be >= 1\nsecond line")

    @probe.command()
    def bug():
        raise ValueError("an internal invariant broke")

    refused = runner.invoke(probe, ["mistake"])
    assert refused.exit_code == 2 and refused.stderr == "error: --rows must be >= 1 second line\n"
    crashed = runner.invoke(probe, ["bug"])
    assert crashed.exit_code == 1 and isinstance(crashed.exception, ValueError)


def test_library_warnings_go_to_the_commands_log_unless_verbose(tmp_path, monkeypatch):
    import warnings

    import typer

    from deploy.cli.main import MoeworksGroup, main_options

    probe = typer.Typer(cls=MoeworksGroup)
    probe.callback()(main_options)

    @probe.command()
    def fit():
        warnings.warn("torch.cuda.amp.autocast is deprecated", FutureWarning, stacklevel=1)
        typer.echo("fitted")

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(probe, ["fit"])
    assert result.exit_code == 0 and result.stdout == "fitted\n"
    log = tmp_path / "runs" / "logs" / "fit.log"
    assert "FutureWarning: torch.cuda.amp.autocast is deprecated" in log.read_text()
    assert result.stderr == f"1 warning(s) from libraries written to {log.relative_to(tmp_path)} (--verbose shows " \
                            "them here)\n"
    with pytest.warns(FutureWarning, match="autocast"):  # --verbose: warnings take their usual way
        loud = runner.invoke(probe, ["fit", "--verbose"])
    assert loud.exit_code == 0 and "written to" not in loud.stderr
    assert log.read_text().count("FutureWarning: torch.cuda.amp.autocast") == 1
