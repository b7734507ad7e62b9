"""`moeworks compress prune` of a defect detector folder: a tiny YOLO11n (random weights, 64 px) on
generated VOC images, pruned and fine-tuned one epoch by the ultralytics trainer, comes out as a
sealed detector folder that `defects evaluate` and `defects export` take; its refusals are one
line, exit 2."""

import json

import pytest
from typer.testing import CliRunner

from core.model_files import verify_manifest
from deploy.cli import app
from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
from tests.manufacturing.defects.test_defects_pruning import tiny_detector


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_prune_fine_tune_then_evaluate_and_export(tmp_path):
    from manufacturing.defects.synthetic import SYNTHETIC_CLASSES

    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=12, size=96, seed=1))
    model = tmp_path / "model"
    model.mkdir()
    tiny_detector(model / "detector.pt", names=sorted(SYNTHETIC_CLASSES))
    out = tmp_path / "pruned"
    result = invoke("compress", "prune", "--model", model, "--data", voc, "--out", out, "--ratio", 0.35,
                    "--epochs", 1, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["kind"] == "detector" and summary["epochs_run"] == 1
    assert summary["parameters"] < 0.6 * summary["source_parameters"]
    verify_manifest(out)
    assert json.loads((out / "prune.json").read_text())["ratio"] == 0.35
    result = invoke("defects", "evaluate", "--model", out / "detector.pt", "--data", voc, "--split-file",
                    out / "split.json", "--json")
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.output.strip().splitlines()[-1])["yolo"]["mAP50"] <= 1
    result = invoke("defects", "export", "--model", out / "detector.pt", "--data", voc, "--out", tmp_path / "onnx",
                    "--no-int8", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "detector.onnx").is_file()


def test_prune_without_fine_tuning_writes_a_loadable_folder(tmp_path):
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.synthetic import SYNTHETIC_CLASSES

    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=8, size=96, seed=1))
    shipped = tmp_path / "weights"  # a folder holding one detector .pt, as the shipped weights folder
    shipped.mkdir()
    tiny_detector(shipped / "neu.pt", names=sorted(SYNTHETIC_CLASSES))
    out = tmp_path / "pruned"
    result = invoke("compress", "prune", "--model", shipped, "--data", voc, "--out", out, "--epochs", 0, "--json")
    assert result.exit_code == 0, result.output
    verify_manifest(out)
    detector = YoloDetector.load(out / "detector.pt")
    assert detector.names == sorted(SYNTHETIC_CLASSES)


def test_detector_refusals_are_one_line_exit_2(tmp_path):
    from manufacturing.defects.synthetic import SYNTHETIC_CLASSES

    model = tmp_path / "model"
    model.mkdir()
    tiny_detector(model / "detector.pt", names=sorted(SYNTHETIC_CLASSES))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "detector.pt").write_bytes(b"not a model")
    other = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=4, size=96, seed=2))
    cases = [
        (("distill", "--model", model, "--out", tmp_path / "o1"), "takes `compress prune`"),
        (("hash", "--model", model, "--out", tmp_path / "o2"), "takes `compress prune`"),
        (("prune", "--model", model, "--out", tmp_path / "o3"), "--data"),
        (("prune", "--model", model, "--out", tmp_path / "o4", "--data", other, "--ratio", 1.5), "--ratio"),
        (("prune", "--model", model, "--out", tmp_path / "o5", "--data", other, "--ratio", 0), "--ratio"),
        (("prune", "--model", model, "--out", tmp_path / "o6", "--data", other, "--epochs", -1), "--epochs"),
        (("prune", "--model", model, "--out", tmp_path / "o7", "--data", other, "--subset", "FD001"), "--subset"),
        (("prune", "--model", model, "--out", tmp_path / "o8", "--data", other, "--keep-experts", 2),
         "--keep-experts"),
        (("prune", "--model", model, "--out", tmp_path / "o9", "--data", other, "--split-file", tmp_path / "no.json"),
         "no such split file"),
        (("prune", "--model", model, "--out", model, "--data", other), "new folder"),
        (("prune", "--model", bad, "--out", tmp_path / "o10", "--data", other), "not a YOLO checkpoint"),
        (("prune", "--model", model, "--out", tmp_path / "o11", "--data", tmp_path / "missing"), "no such folder"),
    ]
    for args, says in cases:
        result = invoke("compress", *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and says in result.output, (args, result.output)
