"""Nothing the product loads can run code, and a model folder loads only as it was saved.

A crafted pickle whose __reduce__ opens (creates) a marker file is planted in every place a model
is loaded from: the scorecard, a core checkpoint, a RUL folder's model.pt, the defect detector,
the MoE stage and `moeworks serve x.pt`. Each load must refuse it with one line naming the file,
and the marker must not exist afterwards. The plant is live: `torch.load(weights_only=False)` of
the same file does create its marker (first test). Then tampering with a saved folder (a changed,
missing or added file) is refused by its MANIFEST.json.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from core.model_files import MANIFEST, ModelFilesError, verify_manifest, write_manifest
from core.trainer import CheckpointError, load_checkpoint, save_checkpoint


class Planted:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_checkpoint(path, marker):
    """A torch .pt (zip) whose pickle runs code on a full load; shaped like our checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "metadata": {"config": {}, "kind": Planted(marker)}}, path)
    return path


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


def test_the_planted_file_runs_code_when_fully_unpickled(tmp_path):
    """The control: without the refusals below, the planted files would create their markers."""
    marker = tmp_path / "ran"
    torch.load(plant_checkpoint(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    (tmp_path / "x.pkl").write_bytes(pickle.dumps(Planted(marker)))
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert marker.exists()


def test_core_checkpoint_refuses_a_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = plant_checkpoint(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError, match="model.pt: refused: not a weights-only checkpoint") as caught:
        load_checkpoint(path, lambda config: torch.nn.Linear(1, 1))
    one_line(caught.value)
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(Planted(marker)))  # a plain pickle, not torch's zip
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "legacy.pt", lambda config: torch.nn.Linear(1, 1))
    assert not marker.exists()
    # The weights-only file of save_checkpoint loads.
    good = save_checkpoint(tmp_path / "good.pt", torch.nn.Linear(3, 1), config={"n": 3})
    model, metadata = load_checkpoint(good, lambda config: torch.nn.Linear(config["n"], 1))
    assert metadata["config"] == {"n": 3}


# --- the scorecard ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorecard_folder(tmp_path_factory):
    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate
    from finance.scorer import split_records, train_scorer

    root = tmp_path_factory.mktemp("credit")
    records = load_generated(generate(root / "data", GeneratorConfig(n_applicants=2_500, seed=7)))
    scorer = train_scorer(records, "scorecard", seed=0)
    folder = scorer.save(root / "scorecard")
    return scorer, folder, split_records(records, seed=1)[1].frame


def test_a_reloaded_scorecard_scores_bit_for_bit(scorecard_folder):
    from finance.scaling import PointsScale
    from finance.scorer import load_model

    scorer, folder, frame = scorecard_folder
    assert not list(folder.rglob("*.joblib")) and not list(folder.rglob("*.pkl"))
    reloaded = load_model(folder)
    pd.testing.assert_frame_equal(reloaded.score(frame, reasons="all"), scorer.score(frame, reasons="all"))
    np.testing.assert_array_equal(reloaded.predict_pd(frame), scorer.predict_pd(frame))
    pd.testing.assert_frame_equal(reloaded.model_.scorecard_table(PointsScale()),
                                  scorer.model_.scorecard_table(PointsScale()))


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def test_scorecard_pickles_are_refused_unread(scorecard_folder, tmp_path):
    from finance.errors import CreditDataError
    from finance.scorer import load_model

    marker = tmp_path / "ran"
    _, folder, _ = scorecard_folder
    # 1. A pickle planted beside the model files: not in the manifest.
    copy = _copy(folder, tmp_path)
    (copy / "model" / "scorecard.joblib").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CreditDataError, match="scorecard.joblib: not in MANIFEST.json") as caught:
        load_model(copy)
    one_line(caught.value)
    # 2. The old layout (scorecard.joblib holding the fitted objects), sealed as if saved so.
    state = json.loads((copy / "model" / "scorecard.json").read_text())
    (copy / "model" / "scorecard.json").write_text(json.dumps({"config": state["config"],
                                                               "selected": state["selected"]}))
    write_manifest(copy)
    with pytest.raises(CreditDataError, match="scorecard.json: not a valid scorecard.*format") as caught:
        load_model(copy)
    one_line(caught.value)
    # 3. A pickle in place of scorecard.json, sealed.
    (copy / "model" / "scorecard.json").write_bytes(pickle.dumps(Planted(marker)))
    write_manifest(copy)
    with pytest.raises(CreditDataError, match="scorecard.json: not a valid scorecard") as caught:
        load_model(copy)
    one_line(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s["bins"][next(iter(s["bins"]))]["woe"].pop(), "woe' has"),
    (lambda s: s["logistic"].update(coef=[1e999] * len(s["selected"])), "non-finite"),
    (lambda s: s.update(columns=[0] * len(s["selected"])), "do not match the model's feature pipeline"),
    (lambda s: s["bins"][next(iter(s["bins"]))].update(splits=[2.0, 1.0]), "not strictly increasing"),
])
def test_a_malformed_scorecard_file_is_one_line(scorecard_folder, tmp_path, change, message):
    from finance.errors import CreditDataError
    from finance.scorer import load_model

    copy = _copy(scorecard_folder[1], tmp_path)
    state = json.loads((copy / "model" / "scorecard.json").read_text())
    change(state)
    (copy / "model" / "scorecard.json").write_text(json.dumps(state))
    write_manifest(copy)
    with pytest.raises(CreditDataError, match=message) as caught:
        load_model(copy)
    one_line(caught.value)


def test_a_changed_or_added_credit_model_file_is_refused(scorecard_folder, tmp_path):
    from finance.errors import CreditDataError
    from finance.scorer import load_model

    copy = _copy(scorecard_folder[1], tmp_path)
    (copy / "generated-data-elsewhere").mkdir()  # a folder (never loaded) is outside the manifest ...
    with pytest.raises(CreditDataError, match="scorer.json: changed since the model was saved"):
        (copy / "scorer.json").write_text((copy / "scorer.json").read_text().replace('"cutoff_pd"', '"cutoff_pd" '))
        load_model(copy)
    shutil.copy(scorecard_folder[1] / "scorer.json", copy / "scorer.json")
    load_model(copy)  # ... and the folder as saved loads
    (copy / "notes.txt").write_text("x")
    with pytest.raises(CreditDataError, match="notes.txt: not in MANIFEST.json"):
        load_model(copy)


# --- manufacturing ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rul_folder(tmp_path_factory, tiny_rul_estimator):
    from manufacturing.maintenance.generator import generate_cmapss

    estimator = tiny_rul_estimator("lstm").fit(generate_cmapss(6, seed=4, max_life=160))
    return estimator.save(tmp_path_factory.mktemp("rul") / "model", metrics={"val_rmse": 1.0})


def test_rul_model_pt_pickle_is_refused(rul_folder, tmp_path):
    from manufacturing.maintenance.errors import MaintenanceDataError
    from manufacturing.maintenance.rul import RULEstimator

    marker = tmp_path / "ran"
    copy = _copy(rul_folder, tmp_path)
    RULEstimator.load(copy)  # as saved: loads
    plant_checkpoint(copy / "model.pt", marker)
    with pytest.raises(MaintenanceDataError, match="model.pt: changed since the model was saved"):
        RULEstimator.load(copy)
    write_manifest(copy)  # sealed with the pickle in it: the weights-only read still refuses it
    with pytest.raises(MaintenanceDataError, match="model.pt: refused: not a weights-only checkpoint") as caught:
        RULEstimator.load(copy)
    one_line(caught.value)
    (copy / "model.json").unlink()
    with pytest.raises(MaintenanceDataError, match="model.json: missing"):
        RULEstimator.load(copy)
    assert not marker.exists()


def test_moe_stage_pickle_is_refused(tmp_path):
    from manufacturing.defects.errors import DefectDataError
    from manufacturing.defects.moe_stage import CropMoEClassifier

    marker = tmp_path / "ran"
    with pytest.raises(DefectDataError, match="moe_stage.pt: refused: not a weights-only checkpoint") as caught:
        CropMoEClassifier.load(plant_checkpoint(tmp_path / "moe_stage.pt", marker))
    one_line(caught.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def yolo_model():
    from manufacturing.defects.offline import ultralytics_offline

    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=2, verbose=False).eval()
    model.names = {0: "crack", 1: "scratch"}
    return model


def _detector_file(path, model, **changes):
    config = json.loads(json.dumps(model.yaml))
    extra = {"kind": "moeworks.defects.yolo", "names": ["crack", "scratch"], "imgsz": 64}
    for key, value in changes.items():
        (config if key in ("activation", "backbone", "nc", "scales") else extra)[key] = value
    return save_checkpoint(path, model, config=config, extra=extra)


def test_detector_loads_only_our_weights_only_file(yolo_model, tmp_path):
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.errors import DefectDataError

    marker = tmp_path / "ran"
    detector = YoloDetector.load(_detector_file(tmp_path / "detector.pt", yolo_model))
    assert detector.names == ["crack", "scratch"] and detector.imgsz == 64
    batch = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = copy.deepcopy(yolo_model).fuse(verbose=False).eval()(batch)  # fuse works in place
    expected = expected[0] if isinstance(expected, tuple | list) else expected
    np.testing.assert_array_equal(detector.raw(batch.numpy()), expected.numpy())
    # An ultralytics-style checkpoint (the whole model pickled) and a crafted one: refused, unread.
    torch.save({"model": yolo_model, "train_args": {"imgsz": 64}, "x": Planted(marker)}, tmp_path / "yolo.pt")
    for path in (tmp_path / "yolo.pt", plant_checkpoint(tmp_path / "crafted.pt", marker)):
        with pytest.raises(DefectDataError, match="refused: not a weights-only detector file") as caught:
            YoloDetector.load(path)
        one_line(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("changes, message", [
    # ultralytics' YAML parser evals `activation` and calls the module each layer names.
    ({"activation": f"open({'ran'!r}, 'w')"}, "'activation' must be one of"),
    ({"backbone": [[-1, 1, "torch_safe_load", ["ran.pt"]]]}, "names 'torch_safe_load', not an ultralytics"),
    ({"backbone": [[-1, 1, "nn.functional", []]]}, "not an ultralytics or torch.nn layer class"),
    ({"nc": 3}, "3 classes, field 'names' has 2"),
    # Sizes the builder would allocate before the weights could be compared: bounded.
    ({"backbone": [[-1, 1, "Conv", [10**9, 3, 2]]]}, "layer 0 is not"),
    ({"scales": {"n": [0.5, 1000.0, 1024]}}, "'scales' entries must be"),
    ({"kind": "moeworks.defects.crop_moe"}, "field 'kind' is not moeworks.defects.yolo"),
    ({"imgsz": 65}, "field 'imgsz' must be a multiple of 32"),
])
def test_a_detector_yaml_that_would_run_code_is_refused(yolo_model, tmp_path, monkeypatch, changes, message):
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.errors import DefectDataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DefectDataError, match=message) as caught:
        YoloDetector.load(_detector_file(tmp_path / "detector.pt", yolo_model, **changes))
    one_line(caught.value)
    assert not (tmp_path / "ran").exists()


def test_a_detector_beside_a_manifest_must_match_it(yolo_model, tmp_path):
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.errors import DefectDataError

    path = _detector_file(tmp_path / "run" / "detector.pt", yolo_model)
    (tmp_path / "run" / "dataset").mkdir()
    write_manifest(tmp_path / "run", unsealed=["dataset"])
    (tmp_path / "run" / "dataset" / "anything.pt").write_bytes(b"x")  # unsealed: never loaded, not checked
    YoloDetector.load(path)
    _detector_file(path, yolo_model, names=["scratch", "crack"])  # same weights, classes swapped
    with pytest.raises(DefectDataError, match="detector.pt: changed since the model was saved"):
        YoloDetector.load(path)


# --- serving ---------------------------------------------------------------------------------------------

def test_serve_refuses_a_pickled_pt_before_starting(tmp_path):
    from deploy.cli import app
    from deploy.serving.registry import REGISTRY

    marker = tmp_path / "ran"
    crafted = plant_checkpoint(tmp_path / "x.pt", marker)
    with pytest.raises(ValueError, match="x.pt: refused: not a weights-only checkpoint"):
        REGISTRY.from_path(crafted)
    result = CliRunner().invoke(app, ["serve", str(crafted), "--port", "0"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    last = result.output.strip().splitlines()[-1]
    assert "x.pt: refused: not a weights-only checkpoint" in last and "Traceback" not in result.output
    assert not marker.exists()


def test_serve_refuses_a_tampered_model_folder(rul_folder, tmp_path):
    from deploy.cli import app

    copy = _copy(rul_folder, tmp_path)
    (copy / "extra.pt").write_bytes(b"\x80\x04N.")
    result = CliRunner().invoke(app, ["serve", str(copy), "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "extra.pt: not in MANIFEST.json" in result.output.strip().splitlines()[-1]


# --- the manifest itself ---------------------------------------------------------------------------------

def _sealed(tmp_path):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"\x00" * 100)
    (folder / "sub" / "config.json").write_text("{}")
    write_manifest(folder)
    return folder


@pytest.mark.parametrize("tamper, message", [
    (lambda f: (f / "weights.bin").write_bytes(b"\x00" * 99 + b"\x01"), "weights.bin: changed since"),
    (lambda f: (f / "weights.bin").write_bytes(b"\x00" * 101), "weights.bin: changed since"),
    (lambda f: (f / "sub" / "config.json").unlink(), "config.json: missing"),
    (lambda f: (f / "sub" / "more.bin").write_bytes(b""), "more.bin: not in MANIFEST.json"),
    (lambda f: (f / MANIFEST).unlink(), "no MANIFEST.json"),
    (lambda f: (f / MANIFEST).write_text("[" * 100_000), "not valid JSON"),
    (lambda f: (f / MANIFEST).write_bytes(pickle.dumps({"format": 1})), "not valid JSON"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({"format": "moeworks-manifest/1", "files": {
        "../outside": {"sha256": "0" * 64, "bytes": 0}}})), "not a relative path inside the folder"),
    (lambda f: (f / MANIFEST).write_text(json.dumps({"format": "moeworks-manifest/1", "files": {},
                                                     "unsealed": ["../.."]})), "top-level folder names"),
])
def test_manifest_refuses_tampering_in_one_line(tmp_path, tamper, message):
    folder = _sealed(tmp_path)
    assert set(verify_manifest(folder)) == {"weights.bin", "sub/config.json"}
    tamper(folder)
    with pytest.raises(ModelFilesError, match=message) as caught:
        verify_manifest(folder)
    one_line(caught.value)
