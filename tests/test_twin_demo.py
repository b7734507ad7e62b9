"""`moeworks twin demo` end to end (in-process amqtt broker, generated data), and the CLIs' errors."""

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from deploy.cli import app
from twin.demo import run_twin_demo

ROOT = Path(__file__).resolve().parents[1]


def test_twin_demo_runs_everything_on_generated_data(tmp_path):
    console = Console(record=True, width=120)
    summary = run_twin_demo(tmp_path, data_root=None, duration_s=3, rate_hz=40, console=console)
    text = console.export_text()
    assert "twin dashboard: http://127.0.0.1:" in text and "generated" in text
    assert summary["generated_data_for"] == ["engine-1", "engine-2", "mill-1", "mill-2"]
    assert all(a["messages"] > 20 for a in summary["assets"])
    assert summary["history_rows"] == sum(a["messages"] for a in summary["assets"])
    assert summary["dead_letters"] == 0 and summary["stats"]["counters"].get("duplicate", 0) == 0
    assert all(not a["online"] for a in summary["assets"]), "agents stopped cleanly: their death certificates"
    assert json.loads((tmp_path / "twin_summary.json").read_text())["history_rows"] == summary["history_rows"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "plant.yaml"
    bad.write_text("site: s\ngroup: g\nlines: [{id: l, machines: [{id: a}]}]\n")
    result = CliRunner().invoke(app, ["twin", "serve", "--plant", str(bad), "--db", str(tmp_path / "t.db")])
    assert result.exit_code == 2 and "machines[0]" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["edge", "run", "--source", "cmapss", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "train_FD001.txt" in result.output
    result = CliRunner().invoke(app, ["edge", "run", "--source", "lathe"])
    assert result.exit_code == 2 and "unknown source" in result.output


def test_edge_run_replays_real_data_into_the_spool_when_no_broker_is_there(tmp_path, data_root):
    # nothing listens on port 1: every message waits in the spool, in order, for a later connection
    cmd = [sys.executable, "-m", "deploy.cli", "edge", "run", "--source", "cmapss", "--data", str(data_root),
           "--unit", "3", "--rate", "200", "--port", "1", "--max-messages", "40", "--duration", "1.5",
           "--node", "edge-cell-1", "--device", "engine-1", "--spool", str(tmp_path / "e.spool"), "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["produced"] == 40 and stats["acknowledged"] == 0 and stats["spool_depth"] == 40
    assert stats["reconnect_failures"] >= 1
    from deploy.edge.spool import Spool

    pending = Spool(tmp_path / "e.spool").pending(limit=100)
    cycles = [json.loads(p)["metrics"][0]["value"] for _, _, p in pending]
    assert cycles == list(range(1, 41)), "C-MAPSS unit 3, cycle by cycle"
