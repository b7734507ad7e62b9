"""The annotation loop: auto-accept rule, Label Studio tasks out, reviewed export back, the versioned pool
and its VOC checkout. Detections here are the detector's output type filled from the generated ground
truth (the detection level); test_defects_annotation_cli.py runs the loop with a trained detector."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.defects import labelstudio
from manufacturing.defects.annotation import (
    AcceptRule,
    AnnotationPool,
    checkout_version,
    file_detections,
    import_review,
    not_yet_seen,
    read_new_images,
)
from manufacturing.defects.detector import Detections
from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, write_synthetic_voc
from manufacturing.defects.voc import read_voc_folder

CLASSES = sorted(SYNTHETIC_CLASSES)
# per image: the scores the "model" gives its boxes (ground-truth boxes, one score each)
SCORES = {0: 0.95, 1: 0.99, 2: 0.5, 3: None, 4: 0.6, 5: 0.93}  # None: the model finds nothing


def test_accept_rule_needs_a_box_and_every_reported_box_above_the_threshold():
    rule = AcceptRule(threshold=0.9, floor=0.25)
    assert rule.accepts(np.array([0.95, 0.91]))
    assert not rule.accepts(np.array([0.95, 0.5]))  # one unsure box sends the image to review
    assert rule.accepts(np.array([0.95, 0.1]))  # below the floor: not reported, ignored
    assert not rule.accepts(np.array([]))  # nothing found: a person confirms
    assert not rule.accepts(np.array([0.2]))
    assert rule.accepts(np.array([0.9]))  # >= threshold
    for bad in ({"threshold": 0.2, "floor": 0.25}, {"threshold": 1.5}, {"floor": 0.0}):
        with pytest.raises(ValueError, match="floor < threshold"):
            AcceptRule(**bad)


@pytest.fixture
def loop(tmp_path):
    """A pool after one annotate round over 6 generated images (3 accepted, 3 queued)."""
    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=6, size=96, max_defects=2, seed=3))
    truth = {r.name: r for r in read_voc_folder(voc)}
    images = read_new_images(voc / "IMAGES")
    detections = []
    for i, image in enumerate(images):
        record = truth[image.path.stem]
        n = 0 if SCORES[i] is None else len(record.labels)
        detections.append(Detections(record.boxes[:n], np.full(n, SCORES[i] or 0, np.float32),
                                     np.array([CLASSES.index(label) for label in record.labels[:n]], np.int64)))
    pool = AnnotationPool.open(tmp_path / "pool", classes=CLASSES)
    result = file_detections(pool, images, detections, names=CLASSES, rule=AcceptRule(), image_url="/files/",
                             review_dir=tmp_path / "review", model_name="detector.pt@test")
    return pool, truth, images, result, tmp_path


def _export_from_tasks(tasks, truth, path, *, relabel=None):
    """What reviewers give back: each task annotated with the true boxes (`relabel`: name -> class)."""
    exported = []
    for n, task in enumerate(tasks):
        record = truth[task["data"]["name"]]
        labels = [relabel.get(record.name, label) if relabel else label for label in record.labels]
        result = [labelstudio.box_result(box, label, record.width, record.height, result_id=f"r{n}-{i}")
                  for i, (box, label) in enumerate(zip(record.boxes, labels, strict=True))]
        exported.append({"id": n + 1, "data": task["data"], "predictions": task.get("predictions", []),
                         "annotations": [{"id": 10 + n, "result": result, "was_cancelled": False}]})
    path.write_text(json.dumps(exported))
    return path


def test_confident_images_enter_the_pool_and_the_rest_become_label_studio_tasks(loop):
    pool, truth, images, result, tmp_path = loop
    assert (result["auto_accepted"], result["queued"], result["parent"]) == (3, 3, None)
    version = pool.version(result["version"])
    assert {e["name"] for e in version["images"]} == {images[i].path.stem for i in (0, 1, 5)}
    assert {e["source"] for e in version["images"]} == {"auto"}
    assert [c["change"] for c in version["changes"]] == ["added"] * 3
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    assert {t["data"]["name"] for t in tasks} == {images[i].path.stem for i in (2, 3, 4)}
    for task in tasks:  # Label Studio's pre-annotation format: percent of the image, original size, score
        record = truth[task["data"]["name"]]
        assert task["data"]["image"] == f"/files/{record.name}.png"
        assert (tmp_path / "review" / "images" / f"{record.name}.png").read_bytes() == record.image_path.read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "detector.pt@test"
        for item, box in zip(prediction["result"], record.boxes if prediction["result"] else [], strict=True):
            assert item["type"] == "rectanglelabels" and (item["from_name"], item["to_name"]) == ("label", "image")
            assert (item["original_width"], item["original_height"]) == (96, 96)
            assert item["value"]["x"] == pytest.approx(100 * box[0] / 96)
            assert item["value"]["width"] == pytest.approx(100 * (box[2] - box[0]) / 96)
            assert item["score"] == pytest.approx(SCORES[[i.path.stem for i in images].index(record.name)])
    config = (tmp_path / "review" / "labeling_config.xml").read_text()
    assert '<RectangleLabels name="label" toName="image">' in config and '<Label value="scratch"/>' in config
    # a second run over the same images does nothing: they are in the pool or the queue
    assert not_yet_seen(pool, images) == []


def test_review_round_trip_export_to_pool_to_voc(loop):
    pool, truth, images, first, tmp_path = loop
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    result = import_review(pool, _export_from_tasks(tasks, truth, tmp_path / "export.json"))
    assert (result["reviewed"], result["added"], result["queue_total"]) == (3, 3, 0)
    version = pool.version(result["version"])
    assert version["parent"] == first["version"] and version["origin"]["command"] == "import"
    assert {c["name"]: c["source"] for c in version["changes"]} == {t["data"]["name"]: "review" for t in tasks}
    voc = pool.write_voc(result["version"])
    assert checkout_version(voc)["version"] == result["version"]
    records = read_voc_folder(voc)
    assert len(records) == 6
    for record in records:  # every box back as VOC, to VOC's integer pixels
        expected = truth[record.name]
        order = np.lexsort(expected.boxes.T[::-1])  # the pool sorts a label's boxes by position
        assert record.labels == [expected.labels[i] for i in order]
        assert np.abs(record.boxes - expected.boxes[order]).max() <= 0.5
        assert record.image_path.read_bytes() == expected.image_path.read_bytes()
    # a reviewer relabels an auto-accepted image: a new version records it as relabelled, by review
    accepted = images[0].path.stem
    task = {"data": {"image": "x", "sha256": images[0].digest, "name": accepted}}
    again = import_review(pool, _export_from_tasks([task], truth, tmp_path / "relabel.json",
                                                   relabel={accepted: "patch"}))
    assert again["relabelled"] == 1 and pool.version(again["version"])["changes"] == [
        {"name": accepted, "image": images[0].digest, "source": "review", "change": "relabelled"}]
    # the same export again changes nothing and makes no version
    assert import_review(pool, tmp_path / "relabel.json")["version"] == again["version"]


def _refused(pool, export, tmp_path):
    head = pool.state().head
    path = tmp_path / "bad.json"
    path.write_text(export if isinstance(export, str) else json.dumps(export))
    result = CliRunner().invoke(app, ["defects", "annotate", "--import", str(path), "--pool", str(pool.root)])
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(errors) == 1 and errors[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert pool.state().head == head and len(pool.state().queue) == 3  # nothing changed
    return errors[0]


def _with(tasks, truth, tmp_path, change):
    export = json.loads(_export_from_tasks(tasks, truth, tmp_path / "ok.json").read_text())
    change(export)
    return export


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e[0]["annotations"][0]["result"][0]["value"].update(rectanglelabels=["rust"]), "not one of the pool"),
    (lambda e: e[0]["annotations"][0]["result"][0]["value"].update(x=90.0, width=20.0), "outside the image"),
    (lambda e: e[0]["annotations"][0]["result"][0]["value"].update(width=-1.0), "empty or outside"),
    (lambda e: e[0]["annotations"][0]["result"][0]["value"].update(y=float("nan")), "finite number"),
    (lambda e: e[0]["annotations"][0]["result"][0].update(original_width=200), "original_width"),
    (lambda e: e[0]["annotations"][0]["result"][0]["value"].update(rotation=30), "rotation"),
    (lambda e: e[0]["annotations"][0]["result"][0].update(type="polygonlabels"), "only 'rectanglelabels'"),
    (lambda e: e[0]["data"].update(sha256="0" * 64), "names no image this pool"),
    (lambda e: e.append(e[0]), "appears in two tasks"),
    (lambda e: e[0]["annotations"][0].update(result=[e[0]["annotations"][0]["result"][0]] * 301), "more than 300"),
], ids=["unknown-class", "box-outside", "negative-size", "nan", "wrong-size", "rotated", "polygon", "tampered-sha",
        "duplicate-task", "too-many-boxes"])
def test_a_bad_export_is_refused_in_one_line_and_leaves_the_pool_as_it_was(loop, change, message):
    pool, truth, images, result, tmp_path = loop
    tasks = [t for t in json.loads((tmp_path / "review" / "tasks.json").read_text()) if truth[t["data"]["name"]].labels]
    assert message in _refused(pool, _with(tasks, truth, tmp_path, change), tmp_path)


def test_oversized_or_malformed_exports_are_refused(loop, monkeypatch):
    pool, truth, images, result, tmp_path = loop
    assert "not valid JSON" in _refused(pool, "[{", tmp_path)
    assert "list of tasks" in _refused(pool, {"tasks": []}, tmp_path)
    assert "not valid JSON" in _refused(pool, "[" * 100_000 + "]" * 100_000, tmp_path)
    monkeypatch.setattr(labelstudio, "MAX_EXPORT_BYTES", 1 << 20)  # the real limit is 64 MiB
    assert "more than the 1 MiB" in _refused(pool, "[" + " " * (2 << 20) + "]", tmp_path)


def test_a_modified_pool_is_refused_and_a_failed_commit_keeps_the_previous_version(loop):
    pool, truth, images, result, tmp_path = loop
    head = result["version"]
    entry = pool.version(head)["images"][0]
    from manufacturing.defects.annotation import Change

    good = Change(image=images[2].digest, name="x", suffix=".png", width=96, height=96,
                  boxes=np.array([[1, 1, 9, 9]]), labels=["pit"], source="review")
    bad = Change(image=images[4].digest, name="y", suffix=".png", width=96, height=96,
                 boxes=np.array([[1, 1, 9, 9]]), labels=["rust"], source="review")
    with pytest.raises(DefectDataError, match="'rust' is not one of"):
        pool.commit([good, bad], origin={"command": "test"})  # fails after some objects were written
    assert pool.state().head == head and len(pool.state().queue) == 3
    assert len(read_voc_folder(pool.write_voc(head))) == 3  # the previous version is whole
    object_path = pool.root / "objects" / entry["image"][:2] / entry["image"]
    object_path.write_bytes(object_path.read_bytes() + b"\0")
    with pytest.raises(DefectDataError, match="does not match its SHA-256"):
        pool.write_voc(head, tmp_path / "voc-again")
    version_file = pool.root / "versions" / f"{head}.json"
    version_file.write_text(version_file.read_text().replace('"auto"', '"review"'))
    with pytest.raises(DefectDataError, match="does not match its version id"):
        pool.version(head)


def test_a_pool_keeps_its_classes(loop):
    pool, *_ = loop
    with pytest.raises(DefectDataError, match="the pool's classes are"):
        AnnotationPool.open(pool.root, classes=["crazing", "inclusion"])
    assert AnnotationPool.open(pool.root).classes == CLASSES


@pytest.mark.parametrize(("args", "message"), [
    (["--import", "{tmp}/e.json", "--model", "{tmp}/m.pt"], "not both"),
    (["--import", "{tmp}/e.json", "--calibrate", "{tmp}"], "not both"),
    (["--data", "{tmp}"], "--model and --data are needed"),
    (["--model", "{tmp}/m.pt", "--data", "{tmp}", "--threshold", "0.1"], "floor < threshold"),
    (["--import", "{tmp}/e.json"], "no annotation pool here"),
])
def test_annotate_mistakes_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["defects", "annotate", "--pool", str(tmp_path / "pool"),
                                      *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output


def test_one_writer_at_a_time_and_an_image_changed_during_the_run_is_refused(loop):
    from manufacturing.defects.annotation import pool_lock

    pool, truth, images, result, tmp_path = loop
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    export = _export_from_tasks(tasks, truth, tmp_path / "export.json")
    with pool_lock(pool), pytest.raises(DefectDataError, match="another annotate or import"):
        import_review(pool, export)
    assert len(pool.state().queue) == 3
    more = write_synthetic_voc(tmp_path / "more", SyntheticConfig(images=2, size=96, seed=9))
    fresh = read_new_images(more / "IMAGES")
    fresh[1].path.write_bytes(fresh[1].path.read_bytes() + b"\0")
    with pytest.raises(DefectDataError, match="changed while annotate ran"):
        file_detections(pool, fresh, [Detections(), Detections()], names=CLASSES, rule=AcceptRule(),
                        image_url="", review_dir=tmp_path / "review2", model_name="m")
    assert pool.state().head == result["version"] and len(pool.state().queue) == 3
