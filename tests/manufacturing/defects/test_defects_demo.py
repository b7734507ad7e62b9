"""The defects part of `moeworks demo`: it fine-tunes the shipped detector on generated images, says
so, and reports the defects it finds in mm."""

import io
import json

import pytest
from rich.console import Console

from manufacturing.defects.demo import run_defects_demo

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_the_shipped_detector_and_reports_in_mm(tmp_path):
    text = io.StringIO()
    result = run_defects_demo(tmp_path, quick=True, console=Console(file=text, width=200))
    printed = text.getvalue()
    assert result["start"] == "shipped" and result["epochs"] >= 1
    assert "the shipped NEU-DET detector (neu_det.pt) fine-tuned" in printed and "GENERATED" in printed
    for variant in ("yolo", "yolo+moe"):
        assert 0 <= result["metrics"][variant]["mAP50-95"] <= result["metrics"][variant]["mAP50"] <= 1
    frame = json.loads((tmp_path / "defects" / "frame.predictions.json").read_text())
    assert frame["generated"] is True and len(frame["defects"]) == result["frame_defects"]
    for defect in frame["defects"]:
        assert defect["width_mm"] > 0 and defect["height_mm"] > 0 and len(defect["box_mm"]) == 4
