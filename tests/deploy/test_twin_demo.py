"""`moeworks twin demo` end to end (in-process amqtt broker, generated data), and the CLIs' errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from deploy.cli import app
from deploy.twin_demo import run_twin_demo

ROOT = Path(__file__).resolve().parents[2]


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
    from twin.sparkplug.codec import decode, with_seq

    pending = Spool(tmp_path / "e.spool").pending(limit=100)
    # Sparkplug protobuf by default; the seq is stamped as a message leaves (deploy/edge/spool.py), so here too
    cycles = [decode("DDATA", with_seq(p, 0)).metrics[0].value for _, _, p in pending]
    assert cycles == list(range(1, 41)), "C-MAPSS unit 3, cycle by cycle"


def test_twin_serve_refuses_other_addresses_without_an_auth_file(tmp_path):
    db = str(tmp_path / "t.db")
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        result = CliRunner().invoke(app, ["twin", "serve", "--http-host", host, "--db", db])
        assert result.exit_code == 2 and "refusing to bind" in result.output and "loopback only" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "t.db").exists(), "refused before the twin started"
    (tmp_path / "tokens.json").write_text("{not json")
    result = CliRunner().invoke(app, ["twin", "serve", "--http-host", "0.0.0.0", "--auth-file",
                                      str(tmp_path / "tokens.json"), "--db", db])
    assert result.exit_code == 2 and "is not JSON" in result.output and "Traceback" not in result.output


def test_demo_out_never_deletes_what_it_did_not_make(tmp_path):
    from deploy.twin_demo import MARKER, DemoOutputError, prepare_out_dir

    mine = tmp_path / "mine"
    (mine / "models").mkdir(parents=True)
    (mine / "models" / "precious.pt").write_bytes(b"weights")
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["twin", "demo", "--out", str(mine), "--quick"])
    assert result.exit_code == 2 and "not empty" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["twin", "demo", "--out", str(mine), "--quick", "--force"])
    assert result.exit_code == 2 and "holds models, which no demo made there" in result.output
    assert (mine / "models" / "precious.pt").read_bytes() == b"weights" and (mine / "notes.txt").exists()

    # a folder an earlier demo used: --force replaces that demo's outputs and nothing else
    earlier = tmp_path / "earlier"
    prepare_out_dir(earlier)
    assert json.loads((earlier / MARKER).read_text())["outputs"][-1] == "models"
    for name in ("edge", "models"):
        (earlier / name / "sub").mkdir(parents=True)
    (earlier / "twin.db").write_bytes(b"old history")
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(DemoOutputError, match="not empty"):
        prepare_out_dir(earlier)
    with pytest.raises(DemoOutputError, match="copy the model elsewhere"):
        prepare_out_dir(earlier, force=True, keep=(earlier / "models" / "sub",))
    assert (earlier / "models" / "sub").is_dir(), "a refusal changes nothing"
    prepare_out_dir(earlier, force=True, train_models=False)
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER, "notes.txt"]
    assert "models" not in json.loads((earlier / MARKER).read_text())["outputs"], "this run trains no models"
    # a marker that claims more than the demo's own outputs is not believed
    (earlier / MARKER).write_text(json.dumps({"outputs": ["notes.txt", "twin.db"]}))
    prepare_out_dir(earlier, force=True)
    assert (earlier / "notes.txt").read_text() == "mine"
