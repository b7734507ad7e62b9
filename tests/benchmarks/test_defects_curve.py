"""benchmarks.defects_curve: a run's results.csv as mAP50 against wall-clock hours, resumed parts joined."""

import json

from benchmarks.defects_curve import curve, main

HEADER = "epoch,time,train/box_loss,metrics/mAP50(B),metrics/mAP50-95(B)\n"


def test_curve_joins_a_resumed_runs_clock_and_finds_the_best_epoch(tmp_path):
    (tmp_path / "yolo").mkdir()
    # epochs 1-2, then a resume: ultralytics' time column starts again from zero
    (tmp_path / "yolo" / "results.csv").write_text(
        HEADER + "1, 1800, 3.0, 0.10, 0.03\n2, 3600, 2.0, 0.40, 0.15\n3, 1800, 1.5, 0.55, 0.25\n")
    points = curve(tmp_path)
    assert points["hours"] == [0.5, 1.0, 1.5] and points["epoch"] == [1, 2, 3]
    assert points["best"] == {"hours": 1.5, "epoch": 3, "map50": 0.55, "map50_95": 0.25}
    out = tmp_path / "curve.png"
    assert main(["--run", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.with_suffix(".json").read_text())["map50"] == [0.1, 0.4, 0.55]
