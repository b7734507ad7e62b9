"""`moeworks defects annotate` with a real detector (trained one epoch at 64 px on generated surfaces):
the auto-accept threshold applied to its own scores, the review round trip, and a training run on the
pool's VOC that records the pool version. Slow: two tiny ultralytics trainings."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from manufacturing.defects import labelstudio
from manufacturing.defects.annotation import read_new_images
from manufacturing.defects.detector import YoloDetector
from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
from manufacturing.defects.voc import read_voc_folder

pytestmark = pytest.mark.slow


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_annotate_with_a_trained_detector_review_and_train_on_the_pool(tmp_path):
    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=12, size=96, seed=1))
    trained = _cli("defects", "train", "--data", voc, "--out", tmp_path / "run", "--imgsz", 64, "--epochs", 1,
                   "--batch", 4, "--val-fraction", 0.25, "--no-train-moe", "--json")
    new = write_synthetic_voc(tmp_path / "new", SyntheticConfig(images=8, size=96, seed=7))
    truth = {r.name: r for r in read_voc_folder(new)}
    # A detector trained for seconds gives nearly the same scores to every image (its head's biases), so
    # the thresholds are set from its own scores: the floor between its best and next distinct score
    # over all images, then a threshold above the best (everything queued) and one between floor and
    # best (the images whose reported boxes all score the best are accepted).
    detector = YoloDetector.load(trained["detector"])
    images = read_new_images(new / "IMAGES")
    scores = [d.scores.astype(np.float64) for d in detector.detect([i.decode() for i in images], conf=0.0001)]
    top, below = np.unique(np.concatenate(scores))[::-1][:2]
    floor, accept_all = (top + below) / 2, (3 * top + below) / 4
    reported = [np.sort(s[s >= floor])[::-1] for s in scores]
    expected = {images[i].path.stem for i, s in enumerate(reported) if len(s) and (s >= accept_all).all()}
    assert expected  # at least the image holding the best score

    low = _cli("defects", "annotate", "--model", tmp_path / "run", "--data", new / "IMAGES", "--pool",
               tmp_path / "pool-low", "--threshold", accept_all, "--floor", floor, "--json")
    assert (low["auto_accepted"], low["queued"]) == (len(expected), 8 - len(expected))
    assert {r.name for r in read_voc_folder(low["voc"])} == expected
    pool = tmp_path / "pool"
    first = _cli("defects", "annotate", "--model", tmp_path / "run", "--data", new / "IMAGES", "--pool", pool,
                 "--floor", floor, "--json")  # the default threshold, 0.9: above every score
    assert first["schema"] == "moeworks.defects.annotate/1" and first["threshold"] == 0.9
    assert (first["auto_accepted"], first["queued"], first["version"], first["voc"]) == (0, 8, None, None)
    tasks = json.loads(open(first["tasks"]).read())
    for task in tasks:  # the model's reported boxes as pre-annotations, with its scores
        i = [im.path.stem for im in images].index(task["data"]["name"])
        got = sorted((r["score"] for r in task["predictions"][0]["result"]), reverse=True)
        assert np.allclose(got, reported[i], atol=1e-5)
    # the same images again: nothing new
    assert _cli("defects", "annotate", "--model", tmp_path / "run" / "detector.pt", "--data", new / "IMAGES",
                "--pool", pool, "--json")["skipped_known"] == 8

    export = []
    for n, task in enumerate(tasks):
        record = truth[task["data"]["name"]]
        export.append({"id": n, "data": task["data"], "annotations": [{"result": [
            labelstudio.box_result(box, label, 96, 96, result_id=f"{n}-{k}")
            for k, (box, label) in enumerate(zip(record.boxes, record.labels, strict=True))]}]})
    (tmp_path / "export.json").write_text(json.dumps(export))
    second = _cli("defects", "annotate", "--import", tmp_path / "export.json", "--pool", pool, "--json")
    assert (second["parent"], second["added"], second["queue_total"]) == (None, 8, 0)
    assert len(read_voc_folder(second["voc"])) == 8

    trained_on_pool = _cli("defects", "train", "--data", second["voc"], "--out", tmp_path / "run2", "--imgsz", 64,
                           "--epochs", 1, "--batch", 4, "--val-fraction", 0.25, "--no-train-moe", "--json")
    assert trained_on_pool["pool_version"] == second["version"]
    recorded = json.loads((tmp_path / "run2" / "train_result.json").read_text())
    assert recorded["pool_version"] == second["version"] and recorded["pool"] == str(pool.resolve())
