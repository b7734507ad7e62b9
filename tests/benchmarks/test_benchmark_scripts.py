"""Every benchmark script is a module of the `benchmarks` package: it imports, parses `--help`
(`python -m benchmarks.NAME --help`), imports only the shared modules, and a cheap one runs end to end."""

import ast
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# Modules the scripts share (serving_models: the sequence MoE only benchmarks.serving builds, issue 19).
SHARED = {"common", "fixtures", "serving_models"}
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in SHARED | {"__init__"})


def test_every_script_imports_and_parses_help(monkeypatch):
    # One process for all of them: the heavy imports (torch, onnxruntime, ultralytics) are paid once.
    assert len(SCRIPTS) >= 20
    for name in SCRIPTS:
        module = importlib.import_module(f"benchmarks.{name}")
        monkeypatch.setattr(sys, "argv", [f"python -m benchmarks.{name}", "--help"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            module.main()
        assert exited.value.code == 0, name
        assert out.getvalue().startswith(f"usage: python -m benchmarks.{name}"), name


def test_scripts_import_only_the_shared_modules_and_never_edit_sys_path():
    for path in BENCHMARKS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = f"benchmarks.{node.module or ''}".rstrip(".") if node.level else node.module or ""
                if module == "benchmarks":  # from benchmarks import common
                    assert {a.name for a in node.names} <= SHARED, f"{path.name} imports {module}"
                elif module.startswith("benchmarks."):
                    assert module.split(".")[1] in SHARED, f"{path.name} imports {module}"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path.name} touches sys.path (line {node.lineno})")
        assert "noqa: E402" not in path.read_text(), path.name


def test_a_cheap_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "sparkplug_codec.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.sparkplug_codec", "--messages", "20", "--repeats", "1",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=120,
                          cwd=BENCHMARKS.parent, env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["machine"]["cpu_model"] and last["machine"]["logical_cores"] >= 1
    for case in last["cases"].values():
        assert case["protobuf"]["bytes"] < case["json"]["bytes"]  # the point of the binary encoding
        assert all(case[codec][f"{step}_us"] > 0 for codec in ("json", "protobuf") for step in ("encode", "decode"))


def test_bundles_refuses_the_detector_stage_case_without_a_stage_before_any_case_runs(monkeypatch, tmp_path, capsys):
    module = importlib.import_module("benchmarks.bundles")
    monkeypatch.setattr(sys, "argv", ["bundles", "--cases", "taiwan:scorecard,neu_det:detector-stage",
                                      "--detector-run", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 2
    assert f"neu_det:detector-stage: {tmp_path} has no moe_stage.pt" in capsys.readouterr().err
