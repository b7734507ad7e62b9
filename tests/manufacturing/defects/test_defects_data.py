"""VOC parsing, YOLO label conversion, the seeded split, and clear errors for bad input."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.defects.dataset import load_image, voc_to_yolo, write_yolo_dataset, yolo_to_voc
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, write_synthetic_voc
from manufacturing.defects.voc import class_names, read_voc_folder, seeded_split


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_synthetic_voc(tmp_path_factory.mktemp("voc"), SyntheticConfig(images=12, size=96, seed=3))


def test_generated_folder_parses_with_planted_boxes_and_says_generated(generated):
    records = read_voc_folder(generated)
    assert len(records) == 12
    assert "GENERATED" in (generated / "GENERATED.txt").read_text()
    assert set(class_names(records)) <= set(SYNTHETIC_CLASSES)
    for record in records:
        assert len(record.boxes) == len(record.labels) >= 1
        assert (record.boxes[:, 2] > record.boxes[:, 0]).all() and (record.boxes[:, 3] > record.boxes[:, 1]).all()
        assert record.boxes.max() <= 96 and record.boxes.min() >= 0
        # A planted defect darkens or brightens its box against the surface around it.
        image = load_image(record.image_path, expected_size=(96, 96)).astype(float)
        x1, y1, x2, y2 = record.boxes[0].astype(int)
        assert abs(image[y1:y2, x1:x2].mean() - image.mean()) > 0.5


def test_yolo_labels_round_trip_boxes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 150, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (20, 2))], axis=1)
    yolo = voc_to_yolo(boxes, 200, 210)
    assert (yolo >= 0).all() and (yolo <= 1).all()
    np.testing.assert_allclose(yolo_to_voc(yolo, 200, 210), boxes, atol=1e-9)
    np.testing.assert_allclose(voc_to_yolo([[0, 0, 200, 100]], 200, 200), [[0.5, 0.25, 1.0, 0.5]])


def test_dataset_writer_writes_labels_and_data_yaml(generated, tmp_path):
    import yaml

    records = read_voc_folder(generated)
    names = class_names(records)
    train, val = seeded_split(records, val_fraction=0.25, seed=0)
    data_yaml = write_yolo_dataset({"train": train, "val": val}, tmp_path / "ds", names)
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == dict(enumerate(names)) and data["train"] == "images/train"
    record = train[0]
    rows = np.loadtxt(tmp_path / "ds" / "labels" / "train" / f"{record.name}.txt", ndmin=2)
    assert [names[int(c)] for c in rows[:, 0]] == record.labels
    np.testing.assert_allclose(yolo_to_voc(rows[:, 1:], record.width, record.height), record.boxes, atol=1e-3)
    assert (tmp_path / "ds" / "images" / "train" / record.image_path.name).exists()


def test_seeded_split_is_deterministic_stratified_and_disjoint(generated):
    records = read_voc_folder(generated)
    train, val = seeded_split(records, val_fraction=0.25, seed=0)
    again_train, again_val = seeded_split(list(reversed(records)), val_fraction=0.25, seed=0)
    assert [r.name for r in val] == [r.name for r in again_val]
    assert {r.name for r in train} | {r.name for r in val} == {r.name for r in records}
    assert not {r.name for r in train} & {r.name for r in val}
    assert {r.name for r in seeded_split(records, val_fraction=0.25, seed=1)[1]} != {r.name for r in val}


def test_recorded_neu_split_matches_the_seeded_split(data_root):
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parents[3] / "manufacturing/defects/splits/neu_det_seed0.json").read_text())
    train, val = seeded_split(read_voc_folder(data_root / "neu_det"), val_fraction=0.2, seed=0)
    assert sorted(r.name for r in val) == recorded["val"] and len(train) == len(recorded["train"])
    # Stratified: every class has a fifth of its images in validation.
    per_class = {c: sum(r.labels[0] == c for r in val) for c in {r.labels[0] for r in val}}
    assert len(per_class) == 6 and max(per_class.values()) - min(per_class.values()) <= 1


def _copy(generated, tmp_path):
    folder = tmp_path / "voc"
    shutil.copytree(generated, folder)
    return folder


def test_corrupt_image_is_a_clear_error(generated, tmp_path):
    folder = _copy(generated, tmp_path)
    (folder / "IMAGES" / "generated_0002.png").write_bytes(b"not an image at all")
    records = read_voc_folder(folder)
    with pytest.raises(DefectDataError, match=r"generated_0002\.png: corrupt"):
        write_yolo_dataset({"train": records}, tmp_path / "ds", class_names(records))


def test_wrong_image_size_is_a_clear_error(generated, tmp_path):
    import cv2

    folder = _copy(generated, tmp_path)
    cv2.imwrite(str(folder / "IMAGES" / "generated_0001.png"), np.zeros((50, 70), np.uint8))
    records = read_voc_folder(folder)
    with pytest.raises(DefectDataError, match=r"generated_0001\.png: field <size> says 96x96 but the image is 70x50"):
        write_yolo_dataset({"train": records}, tmp_path / "ds", class_names(records))


def test_bad_annotation_names_file_object_and_field(generated, tmp_path):
    folder = _copy(generated, tmp_path)
    xml = folder / "ANNOTATIONS" / "generated_0004.xml"
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>abc", 1))
    with pytest.raises(DefectDataError, match=r"generated_0004\.xml object 0 <bndbox>: field <xmin> is not a number"):
        read_voc_folder(folder)


def test_empty_folder_is_a_clear_error_and_the_cli_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectDataError, match="empty folder"):
        read_voc_folder(tmp_path / "empty")
    result = CliRunner().invoke(app, ["defects", "evaluate", "--data", str(tmp_path / "empty"),
                                      "--model", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "empty folder" in result.output
    assert "Traceback" not in result.output


def test_empty_image_file_is_a_clear_error_not_an_opencv_assertion(tmp_path):
    (tmp_path / "blank.jpg").write_bytes(b"")
    with pytest.raises(DefectDataError, match=r"blank\.jpg: empty image file \(0 bytes\)"):
        load_image(tmp_path / "blank.jpg")


def test_a_file_that_is_no_model_is_one_clear_line_naming_it_through_the_cli(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    result = CliRunner().invoke(app, ["defects", "predict", "--source", str(tmp_path / "in"), "--out",
                                      str(tmp_path / "out"), "--model", str(tmp_path / "photo.jpg")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (f"error: {tmp_path / 'photo.jpg'}: not a YOLO checkpoint (.pt) "
                                                      "or moeworks ONNX export (.onnx)")


@pytest.mark.parametrize("name", ["stage.pt", "stage.onnx", "photo.jpg"])
def test_a_file_that_is_no_moe_stage_is_a_one_line_error_naming_it(tmp_path, name):
    from manufacturing.defects.moe_stage import CropMoEClassifier

    (tmp_path / name).write_bytes(b"\x00\x01 garbage")
    with pytest.raises(DefectDataError, match=name.replace(".", r"\.")) as caught:
        CropMoEClassifier.load(tmp_path / name)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
