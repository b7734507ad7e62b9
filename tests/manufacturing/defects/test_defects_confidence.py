"""Calibrated box confidence for the annotation loop (manufacturing.defects.confidence): the isotonic map
from score to the chance a box is right, fitted on labelled images, stored in the pool and applied by the
auto-accept rule. Detections are the detector's output type filled from generated ground truth, with
right boxes (on a true box, its class) and wrong ones (moved off every true box) at known scores."""

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from manufacturing.defects.annotation import AcceptRule, AnnotationPool, file_detections, read_new_images
from manufacturing.defects.confidence import ScoreCalibration, box_outcomes, fit_score_calibration
from manufacturing.defects.detector import Detections
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, write_synthetic_voc
from manufacturing.defects.voc import read_voc_folder

CLASSES = sorted(SYNTHETIC_CLASSES)


def _detections(records, rng, *, wrong_rate):
    """Per record: every true box reported, each wrong with probability wrong_rate(score) (moved away)."""
    out, truth_right = [], []
    for record in records:
        n = len(record.labels)
        scores = rng.uniform(0.25, 0.85, n).astype(np.float32)
        wrong = rng.random(n) < wrong_rate(scores)
        boxes = record.boxes.copy()
        boxes[wrong] += np.float32(record.width)  # off the image: overlaps no true box
        classes = np.array([CLASSES.index(label) for label in record.labels], np.int64)
        out.append(Detections(boxes, scores, classes))
        truth_right.append(~wrong)
    return out, np.concatenate(truth_right)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    voc = write_synthetic_voc(tmp_path_factory.mktemp("voc") / "voc",
                              SyntheticConfig(images=60, size=96, max_defects=3, seed=5))
    return voc, read_voc_folder(voc)


def test_box_outcomes_match_like_the_validator(labelled):
    _, records = labelled
    found, right = _detections(records, np.random.default_rng(0), wrong_rate=lambda s: 0.5 + 0 * s)
    scores, outcome = box_outcomes(found, records, CLASSES)
    assert len(scores) == sum(len(r.labels) for r in records) and (outcome == right).all()
    # a right box with the wrong class is wrong
    swapped = [Detections(d.boxes, d.scores, (d.classes + 1) % len(CLASSES)) for d in found]
    assert not box_outcomes(swapped, records, CLASSES)[1].any()


def test_the_map_is_isotonic_regression_and_separates_sure_from_unsure_boxes(labelled):
    _, records = labelled
    # wrong half the time below 0.5, never above 0.6: a raw 0.7 box is right, a raw 0.3 one a coin toss
    found, _ = _detections(records, np.random.default_rng(1),
                           wrong_rate=lambda s: np.where(s < 0.5, 0.5, np.where(s < 0.6, 0.2, 0.0)))
    calibration = fit_score_calibration(found, records, names=CLASSES, model="ab" * 32, floor=0.25)
    scores, right = box_outcomes(found, records, CLASSES)
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, right)
    probe = np.linspace(0, 1, 101)
    np.testing.assert_allclose(calibration(probe), reference.predict(probe), atol=1e-6)
    assert calibration(np.array([0.7]))[0] >= 0.9 > calibration(np.array([0.3]))[0]
    assert (calibration.boxes, calibration.right, calibration.images) == (len(scores), int(right.sum()), len(records))
    again = ScoreCalibration.from_json(json.loads(json.dumps(calibration.to_json())))
    assert again == calibration


def test_too_few_boxes_and_broken_maps_are_refused(labelled):
    _, records = labelled
    found, _ = _detections(records[:5], np.random.default_rng(2), wrong_rate=lambda s: 0 * s)
    with pytest.raises(DefectDataError, match="at least 30 are needed"):
        fit_score_calibration(found, records[:5], names=CLASSES, model="ab" * 32, floor=0.25)
    good = {"schema": "moeworks.defects.score-calibration/1", "model": "m", "x": [0.1, 0.5], "y": [0.2, 0.9],
            "images": 1, "boxes": 40, "right": 30, "floor": 0.25}
    assert ScoreCalibration.from_json(good)(np.array([0.5, 0.9]))[1] == pytest.approx(0.9)
    for broken in ({**good, "schema": "other"}, {**good, "y": [0.9, 0.2]}, {**good, "y": [0.2, 1.5]},
                   {**good, "x": [0.1]}, {k: v for k, v in good.items() if k != "x"}, [1, 2]):
        with pytest.raises(DefectDataError):
            ScoreCalibration.from_json(broken)


def test_the_rule_judges_calibrated_scores_and_the_pool_keeps_the_map(labelled, tmp_path):
    voc, records = labelled
    truth = {r.name: r for r in records}
    images = read_new_images(voc / "IMAGES")[:4]
    raw = [0.7, 0.7, 0.3, 0.7]  # per image, every true box at this raw score; image 3 also gets an unsure box
    detections = []
    for image, score in zip(images, raw, strict=True):
        record = truth[image.path.stem]
        n = len(record.labels)
        detections.append(Detections(record.boxes, np.full(n, score, np.float32),
                                     np.array([CLASSES.index(label) for label in record.labels], np.int64)))
    d = detections[3]
    detections[3] = Detections(np.vstack([d.boxes, d.boxes[:1]]), np.append(d.scores, np.float32(0.3)),
                               np.append(d.classes, d.classes[:1]))
    calibration = ScoreCalibration(model="ab" * 32, x=(0.25, 0.5, 0.65), y=(0.2, 0.5, 0.95), images=10, boxes=40,
                                   right=30, floor=0.25)
    pool = AnnotationPool.open(tmp_path / "pool", classes=CLASSES)
    rule = AcceptRule(threshold=0.9, floor=0.25)
    uncalibrated = file_detections(AnnotationPool.open(tmp_path / "raw", classes=CLASSES), images, detections,
                                   names=CLASSES, rule=rule, review_dir=tmp_path / "raw-review", image_url="/f/",
                                   model_name="m")
    assert uncalibrated["auto_accepted"] == 0  # no raw score reaches 0.9
    result = file_detections(pool, images, detections, names=CLASSES, rule=rule, review_dir=tmp_path / "review",
                             image_url="/f/", model_name="m", calibration=calibration)
    assert (result["auto_accepted"], result["queued"]) == (2, 2)  # raw 0.7 -> 0.95; a 0.3 box -> 0.32 is unsure
    version = pool.version(result["version"])
    assert {e["name"] for e in version["images"]} == {images[0].path.stem, images[1].path.stem}
    assert version["origin"]["calibration"] == result["calibration"]
    stored = json.loads(pool.get(result["calibration"]))
    assert ScoreCalibration.from_json(stored) == calibration
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    scores = {t["data"]["name"]: sorted(i["score"] for i in t["predictions"][0]["result"]) for t in tasks}
    assert scores[images[2].path.stem][0] == pytest.approx(float(calibration(np.array([0.3]))[0]))


def _neu_subset(data_root, names, out):
    """A VOC folder of the named NEU-DET images (copies of their image and annotation files)."""
    import shutil

    for sub in ("IMAGES", "ANNOTATIONS"):
        (out / sub).mkdir(parents=True)
    for name in names:
        shutil.copy(data_root / "neu_det" / "IMAGES" / f"{name}.jpg", out / "IMAGES")
        shutil.copy(data_root / "neu_det" / "ANNOTATIONS" / f"{name}.xml", out / "ANNOTATIONS")
    return out


def test_annotate_calibrates_the_shipped_detector_on_held_out_neu_det_images(data_root, tmp_path):
    """`defects annotate --calibrate`: the shipped detector on seed-0 validation images it never trained on,
    calibrated on 40 of them, annotating 8 others; the map is stored in the pool and the version names it."""
    from typer.testing import CliRunner

    from deploy.cli import app
    from manufacturing.defects.shipped import SHIPPED

    split = json.loads((SHIPPED.parents[1] / "splits" / "neu_det_seed0.json").read_text())
    val = sorted(split["val"])
    calibrate = _neu_subset(data_root, val[0::6][:40], tmp_path / "calibrate")
    new = _neu_subset(data_root, val[1::6][:8], tmp_path / "new")
    result = CliRunner().invoke(app, ["defects", "annotate", "--model", str(SHIPPED), "--data", str(new / "IMAGES"),
                                      "--pool", str(tmp_path / "pool"), "--calibrate", str(calibrate), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["auto_accepted"] + summary["queued"] == 8 and summary["calibration"]
    pool = AnnotationPool.open(tmp_path / "pool")
    calibration = ScoreCalibration.from_json(json.loads(pool.get(summary["calibration"])))
    assert calibration.images == 40 and calibration.boxes >= 30
    from core.onnx_export import file_sha256

    assert calibration.model == file_sha256(SHIPPED)
    if summary["version"]:
        assert pool.version(summary["version"])["origin"]["calibration"] == summary["calibration"]
    # too few labelled images to calibrate on: one line, exit 2, nothing written to the pool
    few = _neu_subset(data_root, val[2::6][:2], tmp_path / "few")
    refused = CliRunner().invoke(app, ["defects", "annotate", "--model", str(SHIPPED), "--data", str(few / "IMAGES"),
                                       "--pool", str(tmp_path / "pool"), "--calibrate", str(few)])
    assert refused.exit_code == 2 and "at least 30 are needed" in refused.stderr, refused.output
    assert AnnotationPool.open(tmp_path / "pool").state().head == summary["version"]
