"""The shipped NEU-DET detector: its hash check, the commands that default to it, fine-tuning from it
(`defects train --weights`), and `--resume` refusing a run folder of other data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.shipped import HASH_FILE, MAX_BYTES, SHIPPED, load_shipped, verified_path
from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
from manufacturing.defects.voc import read_voc_folder, seeded_split, write_split

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
# The generated classes under NEU-DET's names, so that the shipped detector can score them.
AS_NEU = {"inclusion": "inclusion", "patch": "patches", "pit": "pitted_surface", "scratch": "scratches"}


def _neu_named_voc(root: Path, images: int = 4) -> Path:
    voc = write_synthetic_voc(root, SyntheticConfig(images=images, size=96, seed=3))
    for xml in (voc / "ANNOTATIONS").glob("*.xml"):
        text = xml.read_text()
        for generated, neu in AS_NEU.items():
            text = text.replace(f"<name>{generated}</name>", f"<name>{neu}</name>")
        xml.write_text(text)
    return voc


def test_shipped_detector_loads_after_its_hash_check_and_is_small():
    assert verified_path() == SHIPPED
    assert SHIPPED.stat().st_size <= MAX_BYTES
    detector = load_shipped()
    assert detector.names == NEU_CLASSES and detector.imgsz == 192 and detector.backend == "pytorch"
    card = json.loads((SHIPPED.parent / "neu_det.json").read_text())
    assert card["sha256"] == json.loads(HASH_FILE.read_text())["sha256"]
    assert card["data"]["kind"] == "research data set" and card["split"]["equals_run_split"]
    assert 0 <= card["metrics"]["map50_95"] <= card["metrics"]["map50"] <= 1


def test_a_tampered_copy_of_the_shipped_detector_is_refused(tmp_path):
    copy, hashes = tmp_path / SHIPPED.name, tmp_path / HASH_FILE.name
    shutil.copyfile(SHIPPED, copy)
    shutil.copyfile(HASH_FILE, hashes)
    assert verified_path(copy, hashes) == copy
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the weights, same size
    copy.write_bytes(bytes(data))
    with pytest.raises(DefectDataError, match="refused: its SHA-256 differs") as caught:
        verified_path(copy, hashes)
    assert "\n" not in str(caught.value)
    with pytest.raises(DefectDataError, match="no shipped detector"):
        verified_path(tmp_path / "absent.pt", hashes)


def test_predict_and_evaluate_use_the_shipped_detector_without_model(tmp_path):
    voc = _neu_named_voc(tmp_path / "voc")
    runner = CliRunner()
    result = runner.invoke(app, ["defects", "predict", "--data", str(voc / "IMAGES"), "--out", str(tmp_path / "p"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert "using the shipped NEU-DET detector" in result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["model"] == str(SHIPPED) and payload["images"] == 4
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["model"] == str(SHIPPED)
    result = runner.invoke(app, ["defects", "evaluate", "--data", str(voc), "--json"])
    assert result.exit_code == 0, result.output
    assert "using the shipped NEU-DET detector" in result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["model"] == str(SHIPPED) and metrics["images"] == 4
    assert set(metrics["yolo"]["per_class"]) == set(NEU_CLASSES)


def _interrupted_run(run: Path, voc: Path) -> None:
    """What `defects train` leaves when stopped mid-training: the split, the dataset, a last.pt."""
    records = read_voc_folder(voc)
    train, val = seeded_split(records, val_fraction=0.25, seed=0)
    from manufacturing.defects.voc import data_sha256

    write_split(run / "split.json", train, val, seed=0, val_fraction=0.25, source=str(voc),
                data_hash=data_sha256(records))
    (run / "dataset").mkdir(parents=True)
    (run / "dataset" / "data.yaml").write_text("path: .\n")
    (run / "yolo" / "weights").mkdir(parents=True)
    (run / "yolo" / "weights" / "last.pt").write_bytes(b"never loaded: the refusal comes first")


@pytest.mark.parametrize("change", ["other folder", "changed annotation", "other split"])
def test_resume_refuses_a_run_folder_of_other_data(tmp_path, change):
    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=8, size=64, seed=1))
    run = tmp_path / "run"
    _interrupted_run(run, voc)
    data, extra = voc, []
    if change == "other folder":
        data = write_synthetic_voc(tmp_path / "voc2", SyntheticConfig(images=8, size=64, seed=2))
        expected = "the run was trained on"
    elif change == "changed annotation":
        xml = sorted((voc / "ANNOTATIONS").glob("*.xml"))[0]
        xml.write_text(xml.read_text().replace("<xmin>", "<xmin>1", 1))
        expected = "changed since the run started"
    else:
        extra = ["--val-fraction", "0.5"]
        expected = "the run's split has seed 0 and val fraction 0.25"
    result = CliRunner().invoke(app, ["defects", "train", "--data", str(data), "--out", str(run), "--resume",
                                      "--val-fraction", "0.25", *extra])
    assert result.exit_code == 2, result.output
    assert "refused to resume" in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "yolo" / "weights" / "last.pt").read_bytes().startswith(b"never loaded")


def test_resume_of_a_folder_that_is_no_run_and_resume_with_weights_are_refused(tmp_path):
    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=4, size=64, seed=1))
    runner = CliRunner()
    result = runner.invoke(app, ["defects", "train", "--data", str(voc), "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    result = runner.invoke(app, ["defects", "train", "--data", str(voc), "--out", str(tmp_path / "r"), "--resume",
                                 "--weights", str(SHIPPED)])
    assert result.exit_code == 2 and "takes no --weights" in result.stderr
    result = runner.invoke(app, ["defects", "train", "--data", str(voc), "--threads", "0"])
    assert result.exit_code == 2 and "threads must be in [1, 256]" in result.stderr


@pytest.mark.slow
def test_weights_fine_tunes_the_shipped_detector_for_one_epoch(tmp_path):
    import torch

    from manufacturing.defects.detector import training_model

    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=8, size=96, seed=1))
    result = CliRunner().invoke(app, ["defects", "train", "--data", str(voc), "--out", str(tmp_path / "run"),
                                      "--weights", str(SHIPPED), "--imgsz", "64", "--epochs", "1", "--batch", "4",
                                      "--val-fraction", "0.25", "--no-train-moe", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["start_weights"] == str(SHIPPED) and summary["epochs"] == 1
    tuned, metadata = training_model(summary["detector"])
    assert metadata["names"] == sorted(AS_NEU) and metadata["imgsz"] == 64  # the generated classes
    shipped, _ = training_model(SHIPPED)
    tuned_state, shipped_state = tuned.state_dict(), shipped.state_dict()
    # The backbone starts from the shipped weights (one epoch moves them little); the class head, of
    # another shape for 4 classes, could not and was built anew.
    first = "model.0.conv.weight"
    cosine = torch.nn.functional.cosine_similarity(tuned_state[first].flatten(), shipped_state[first].flatten(), 0)
    assert cosine > 0.9
    head = [k for k in shipped_state if k.startswith("model.23.cv3") and shipped_state[k].ndim == 1
            and shipped_state[k].shape[0] == 6]
    assert head and all(tuned_state[k].shape[0] == 4 for k in head)
    assert not np.allclose(tuned_state[first].numpy(), 0)
