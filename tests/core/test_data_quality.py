"""The three-level data check finds problems planted in small files of each dataset's format, and
`moeworks data check` never changes its input and refuses bad input with exit code 2."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from core.data_quality.check import run_check
from core.data_quality.table import DataCheckError, reasons_from_validator
from deploy.cli import app
from finance.data import TAIWAN, TAIWAN_PAY, load_taiwan
from finance.data_quality import credit_table
from manufacturing.maintenance.data_quality import ai4i_table, cmapss_table
from manufacturing.maintenance.errors import MaintenanceDataError


def taiwan_frame(rows: int, seed: int) -> pd.DataFrame:
    """Taiwan-format records whose default follows the repayment status (learnable, as in the real file)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"ID": np.arange(1, rows + 1), "LIMIT_BAL": rng.integers(1, 50, rows) * 10_000,
                          "SEX": rng.integers(1, 3, rows), "EDUCATION": rng.integers(1, 5, rows),
                          "MARRIAGE": rng.integers(1, 4, rows), "AGE": rng.integers(21, 70, rows)})
    for pay in TAIWAN_PAY:
        frame[pay] = rng.integers(-2, 5, rows)
    for i in range(1, 7):
        frame[f"BILL_AMT{i}"] = rng.integers(0, 100_000, rows)
        frame[f"PAY_AMT{i}"] = rng.integers(0, 10_000, rows)
    risk = 2.5 * frame["PAY_0"] + frame["PAY_2"] - 3
    frame[TAIWAN.target] = (risk + rng.logistic(0, 0.3, rows) > 0).astype(int)
    return frame


def write_csv(frame: pd.DataFrame, path) -> str:
    frame.to_csv(path, index=False)
    return path


def findings_of(result, check: str) -> set[int]:
    return set(result.findings.loc[result.findings["check"] == check, "row"].tolist())


def test_rules_find_schema_duplicates_near_copies_and_contradictions(tmp_path):
    frame = taiwan_frame(400, seed=0).astype(object)
    frame.loc[10, "AGE"] = 200  # out of the loader's range
    frame.loc[11, "LIMIT_BAL"] = "lots"  # not a number
    copies = frame.iloc[[20, 21, 22]].copy()
    copies["ID"] = [9001, 9002, 9003]  # a copy under a new id is still a copy
    copies.iloc[1, copies.columns.get_loc(TAIWAN.target)] = 1 - frame.loc[21, TAIWAN.target]  # contradiction
    copies.iloc[2, copies.columns.get_loc("BILL_AMT1")] = frame.loc[22, "BILL_AMT1"] + 1  # near copy
    frame = pd.concat([frame, copies], ignore_index=True)
    result = run_check(credit_table("taiwan", write_csv(frame, tmp_path / "t.csv")))
    assert findings_of(result, "schema") == {11, 12}
    schema = result.findings[result.findings["check"] == "schema"].set_index("row")["detail"]
    assert "AGE: above the maximum 120" in schema[11] and "LIMIT_BAL: not a number" in schema[12]
    assert findings_of(result, "duplicate") == {401}
    assert findings_of(result, "contradiction") == {22, 402}  # both rows: which label is right is unknown
    assert findings_of(result, "near_duplicate") == {403}
    assert result.summary["rules"]["schema"] == 2 and result.remove.sum() >= 5


def test_leakage_against_the_training_file_and_a_model_fingerprint(tmp_path):
    from core.model_files import write_manifest
    from core.row_fingerprint import RowFingerprint, SplitFingerprint, row_hashes

    train, fresh = taiwan_frame(300, seed=1), taiwan_frame(100, seed=2)
    checked = pd.concat([fresh, train.iloc[:5].assign(ID=np.arange(7001, 7006))], ignore_index=True)
    reference = credit_table("taiwan", write_csv(train, tmp_path / "train.csv"))
    table = credit_table("taiwan", write_csv(checked, tmp_path / "eval.csv"))
    result = run_check(table, reference=reference)
    assert findings_of(result, "leakage") == set(range(101, 106))

    model = tmp_path / "model"
    model.mkdir()
    fields = [(f.name, f.kind == "category") for f in TAIWAN.fields]  # the credit scorers' fingerprint fields
    RowFingerprint(SplitFingerprint.build(row_hashes(reference.typed, fields)),
                   SplitFingerprint.build(row_hashes(reference.typed.iloc[:0], fields))).save(model)
    write_manifest(model)
    out = tmp_path / "report"
    done = CliRunner().invoke(app, ["data", "check", "--data", str(tmp_path / "eval.csv"), "--dataset", "taiwan",
                                    "--model", str(model), "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["rules"]["leakage"] == {"model_train": 5, "model_valid": 0}
    (model / "row_fingerprint.npz").write_bytes(b"changed")  # a tampered model folder is refused
    done = CliRunner().invoke(app, ["data", "check", "--data", str(tmp_path / "eval.csv"), "--dataset", "taiwan",
                                    "--model", str(model), "--out", str(out)])
    assert done.exit_code == 2 and "row_fingerprint.npz" in done.output


def test_level3_finds_flipped_labels(tmp_path):
    frame = taiwan_frame(3000, seed=3)
    rng = np.random.default_rng(3)
    flipped = rng.choice(len(frame), 300, replace=False)
    frame.loc[flipped, TAIWAN.target] = 1 - frame.loc[flipped, TAIWAN.target]
    result = run_check(credit_table("taiwan", write_csv(frame, tmp_path / "noisy.csv")))
    found = {row - 1 for row in findings_of(result, "label_issue")}
    true_found = len(found & set(flipped.tolist()))
    assert true_found / len(flipped) >= 0.7, (true_found, len(found))
    assert true_found / len(found) >= 0.5, (true_found, len(found))


def cmapss_text(rows_per_unit: int, altitudes: list[float], seed: int) -> str:
    """C-MAPSS-format lines: one unit per operating point (altitude kft, Mach, throttle)."""
    rng = np.random.default_rng(seed)
    lines = []
    for unit, altitude in enumerate(altitudes, start=1):
        for cycle in range(1, rows_per_unit + 1):
            settings = [altitude + rng.normal(0, 0.002), 0.84 * (altitude > 0) + rng.normal(0, 0.0002), 100.0]
            sensors = 500 + altitude * 3 + rng.normal(0, 1, 21)
            lines.append(" ".join(f"{v:.4f}" for v in [unit, cycle, *settings, *sensors]))
    return "\n".join(lines) + "\n"


def test_unseen_regime_is_flagged(tmp_path):
    (tmp_path / "train.txt").write_text(cmapss_text(150, [0.0, 0.0, 20.0], seed=4))
    (tmp_path / "new.txt").write_text(cmapss_text(50, [0.0, 20.0, 42.0], seed=5))  # unit 3 runs at 42 kft
    result = run_check(cmapss_table(tmp_path / "new.txt"), reference=cmapss_table(tmp_path / "train.txt"))
    assert findings_of(result, "unseen_domain") == set(range(101, 151))
    assert result.summary["domains"]["segments"] == 2  # two regimes found in the training file
    assert findings_of(result, "out_of_range") == set(range(101, 151))


def test_cmapss_bad_lines_are_rows_not_refusals(tmp_path):
    lines = cmapss_text(20, [0.0], seed=6).splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # 25 fields
    lines[5] = " ".join(lines[5].split()[:10] + ["nan?"] + lines[5].split()[11:])
    lines.append(lines[7])  # the unit has that cycle twice
    (tmp_path / "f.txt").write_text("\n".join(lines) + "\n")
    result = run_check(cmapss_table(tmp_path / "f.txt"))
    assert findings_of(result, "schema") == {4, 6, 21}


def test_ai4i_rows_failing_the_loader_are_each_named(data_root, tmp_path):
    frame = pd.read_csv(data_root / "ai4i2020" / "ai4i2020.csv.gz", dtype=str, keep_default_na=False).head(300)
    frame.loc[4, "Torque [Nm]"] = "abc"
    frame.loc[9, "Type"] = "X"
    frame.loc[9, "Tool wear [min]"] = "inf"
    frame.loc[12, "Machine failure"] = "2"
    frame.to_csv(tmp_path / "ai4i.csv", index=False)
    table = ai4i_table(tmp_path / "ai4i.csv")
    assert set(np.flatnonzero(table.rule_reasons != "") + 1) == {5, 10, 13}
    assert "Torque [Nm]" in table.rule_reasons[4] and "Machine failure" in table.rule_reasons[12]


def test_a_file_of_another_dataset_is_refused_not_listed_row_by_row():
    frame = pd.DataFrame({"a": ["x"] * 50})

    def validate(rows):
        raise MaintenanceDataError("bad", row=1, field="a")

    with pytest.raises(DataCheckError, match="more than 10 rows"):
        reasons_from_validator(frame, validate, MaintenanceDataError, max_bad_rows=10)


def voc_folder(root, images: dict[str, tuple[np.ndarray, str]]):
    from PIL import Image

    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    for name, (pixels, label) in images.items():
        Image.fromarray(pixels).save(root / "IMAGES" / f"{name}.jpg", quality=95)
        (root / "ANNOTATIONS" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>64</height></size>"
            f"<object><name>{label}</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>30</xmax><ymax>30</ymax>"
            "</bndbox></object></annotation>")


def test_images_duplicates_near_copies_contradictions_and_corrupt_files(tmp_path):
    from manufacturing.defects.data_quality import defects_table

    rng = np.random.default_rng(7)
    base = {f"img_{i}": (np.kron(rng.integers(0, 255, (8, 8)), np.ones((8, 8))).astype(np.uint8),
                         "crazing" if i % 2 else "scratches") for i in range(12)}
    voc_folder(tmp_path / "voc", base)
    images = tmp_path / "voc" / "IMAGES"
    shutil.copyfile(images / "img_0.jpg", images / "zz_copy.jpg")
    shutil.copyfile(tmp_path / "voc" / "ANNOTATIONS" / "img_0.xml", tmp_path / "voc" / "ANNOTATIONS" / "zz_copy.xml")
    text = (tmp_path / "voc" / "ANNOTATIONS" / "img_0.xml").read_text()
    (tmp_path / "voc" / "ANNOTATIONS" / "zz_copy.xml").write_text(text.replace("img_0.jpg", "zz_copy.jpg"))
    brighter = np.clip(base["img_1"][0].astype(int) + 6, 0, 255).astype(np.uint8)
    voc_folder(tmp_path / "more", {"zz_near": (brighter, "crazing"), "zz_other": (base["img_3"][0], "patches")})
    for name in ("zz_near", "zz_other"):
        shutil.copyfile(tmp_path / "more" / "IMAGES" / f"{name}.jpg", images / f"{name}.jpg")
        shutil.copyfile(tmp_path / "more" / "ANNOTATIONS" / f"{name}.xml",
                        tmp_path / "voc" / "ANNOTATIONS" / f"{name}.xml")
    (images / "img_5.jpg").write_bytes(b"not a jpeg")
    result = run_check(defects_table(tmp_path / "voc"))
    names = result.findings.groupby("check")["name"].apply(set).to_dict()
    assert names["schema"] == {"img_5"}
    assert names["duplicate"] == {"zz_copy"}
    assert names["near_duplicate"] == {"zz_near"}
    assert names["contradiction"] == {"img_3", "zz_other"}
    # leakage: images of the checked folder that are (near) copies of the reference folder's
    leaked = run_check(defects_table(tmp_path / "voc"), reference=defects_table(tmp_path / "more"))
    assert set(leaked.findings.loc[leaked.findings["check"] == "leakage", "name"]) == {"img_1", "img_3", "zz_near",
                                                                                        "zz_other"}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fix_writes_a_cleaned_copy_and_never_touches_the_input(tmp_path):
    frame = taiwan_frame(500, seed=8).astype(object)
    frame.loc[3, "AGE"] = -1
    frame = pd.concat([frame, frame.iloc[[7]].assign(ID=9999)], ignore_index=True)
    data = tmp_path / "in" / "taiwan.csv.gz"
    data.parent.mkdir()
    with gzip.open(data, "wt") as stream:
        frame.to_csv(stream, index=False)
    before = sha256(data)
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["data", "check", "--data", str(data), "--dataset", "taiwan", "--out", str(out),
                                    "--fix", "--json"])
    assert done.exit_code == 0, done.output
    assert sha256(data) == before and sorted(p.name for p in data.parent.iterdir()) == ["taiwan.csv.gz"]
    summary = json.loads(done.stdout)  # exactly one JSON object on stdout
    cleaned = out / "cleaned" / "taiwan.csv.gz"
    with gzip.open(cleaned, "rt") as a, gzip.open(data, "rt") as b:
        assert a.readline() == b.readline()  # the same columns, in the same order
    kept = load_taiwan(cleaned)  # the loader reads the cleaned copy
    removed = pd.read_csv(out / "removed.csv")
    assert len(kept) + len(removed) == len(frame) == summary["rows"]
    assert {4, 501} <= set(removed["row"]) and summary["fix"]["rows_removed"] == len(removed)
    assert 9999 not in set(kept.frame["ID"]) and 4 not in set(kept.frame["ID"])
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 2
    # the cleaned copy cannot be written over the input's folder
    done = CliRunner().invoke(app, ["data", "check", "--data", str(data), "--dataset", "taiwan",
                                    "--out", str(data.parent / "x"), "--fix"])
    assert done.exit_code == 2 and sha256(data) == before


@pytest.mark.parametrize("case", ["missing", "empty", "bad_gzip", "wrong_columns", "unknown_dataset", "out_is_file",
                                  "binary", "cmapss_garbage", "not_a_voc_folder"])
def test_bad_inputs_exit_2_with_one_line(tmp_path, case):
    data, dataset, out = tmp_path / "d.csv", "gmsc", tmp_path / "out"
    if case == "empty":
        data.write_bytes(b"")
    elif case == "bad_gzip":
        data = tmp_path / "d.csv.gz"
        data.write_bytes(b"\x1f\x8b\x08\x00garbage")
    elif case == "wrong_columns":
        data.write_text("a,b\n1,2\n")
    elif case == "unknown_dataset":
        data.write_text("a,b\n1,2\n")
        dataset = "nope"
    elif case == "out_is_file":
        write_csv(taiwan_frame(20, seed=9), data)
        dataset, out = "taiwan", tmp_path / "file"
        out.write_text("x")
    elif case == "binary":
        data.write_bytes(bytes(range(256)) * 10)
        dataset = "ai4i"
    elif case == "cmapss_garbage":
        data.write_text("this is not\na c-mapss file\n")
        dataset = "cmapss"
    elif case == "not_a_voc_folder":
        data.write_text("x")
        dataset = "neu_det"
    done = CliRunner().invoke(app, ["data", "check", "--data", str(data), "--dataset", dataset, "--out", str(out)])
    assert done.exit_code == 2, done.output
    lines = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.output


def test_fix_of_the_generated_folder_filters_all_four_tables(tmp_path):
    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate

    folder = generate(tmp_path / "gen", GeneratorConfig(n_applicants=600, seed=1))
    applications = next((folder / "applications").glob("*.parquet"))
    table = pd.read_parquet(applications)
    table.loc[5, "age"] = 300.0  # beyond the loader's range
    table.to_parquet(applications, index=False)
    before = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["data", "check", "--data", str(folder), "--dataset", "generated",
                                    "--out", str(out), "--fix", "--json"])
    assert done.exit_code == 0, done.output
    assert {p: sha256(p) for p in folder.rglob("*") if p.is_file()} == before
    kept = load_generated(out / "cleaned" / folder.name)
    removed = pd.read_csv(out / "removed.csv")
    assert len(kept) + len(removed) == 600 and 6 in set(removed["row"])
    assert table.loc[5, "applicant_id"] not in set(kept.frame["applicant_id"])
    devices = pd.read_parquet(next((out / "cleaned" / folder.name / "devices").glob("*.parquet")))
    assert set(devices["applicant_id"]) <= set(kept.frame["applicant_id"])


@pytest.mark.slow
def test_image_domains_on_the_detectors_embeddings(tmp_path):
    """A detector folder (an untrained YOLOv8n in the file format `defects train` writes) gives the
    image domains its embeddings; a changed detector file is refused before it is read."""
    from core.model_files import write_manifest
    from core.trainer import save_checkpoint
    from manufacturing.defects.detector import DETECTOR_KIND, check_model_yaml
    from manufacturing.defects.offline import ultralytics_offline
    from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc

    ultralytics_offline()
    from ultralytics.nn.tasks import DetectionModel

    from manufacturing.defects.voc import class_names, read_voc_folder

    voc = write_synthetic_voc(tmp_path / "voc", SyntheticConfig(images=10, size=64, seed=2))
    names = class_names(read_voc_folder(voc))
    model = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False)
    save_checkpoint(tmp_path / "run" / "detector.pt", model, config=check_model_yaml(json.loads(json.dumps(model.yaml)),
                                                                                      "yolov8n"),
                    extra={"kind": DETECTOR_KIND, "names": names, "imgsz": 64})
    write_manifest(tmp_path / "run")
    args = ["data", "check", "--data", str(voc), "--dataset", "neu_det", "--model", str(tmp_path / "run"), "--json"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    fields = summary["domains"]["fields"]
    assert fields[0] == "embedding_0" and len(fields) == 64 + 128 + 256  # YOLOv8n's P3, P4, P5 channels
    assert sum(row["data_share"] for row in summary["domains"]["coverage"]) == pytest.approx(1.0)
    assert summary["labels"]["checked"] == 10 and "object_detection" in summary["labels"]["method"]
    with open(tmp_path / "run" / "detector.pt", "ab") as stream:
        stream.write(b"\0")
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out2")])
    assert done.exit_code == 2 and "detector.pt" in done.output


def test_box_label_issues_find_a_swapped_class_a_shifted_box_and_a_missing_one():
    """cleanlab's object-detection checks on detections that agree with the true boxes (a detector's
    output as it would be for a good model: the true class at 0.99): the planted swap, shift and
    missing box are the only issues, and score below every untouched image."""
    from manufacturing.defects.data_quality import box_label_issues
    from manufacturing.defects.detector import Detections

    rng = np.random.default_rng(0)
    boxes, classes, detections = [], [], []
    for _ in range(60):
        n = int(rng.integers(1, 3))
        corner = rng.uniform(0, 120, (n, 2))
        box = np.hstack([corner, corner + rng.uniform(30, 70, (n, 2))]).astype(np.float32)
        label = rng.integers(0, 3, n)
        scores = np.full((n, 3), 0.005, np.float32)
        scores[np.arange(n), label] = 0.99
        boxes.append(box.copy())
        classes.append(label.copy())
        detections.append(Detections(boxes=box, scores=scores.max(1), classes=label, class_scores=scores))
    classes[3] = (classes[3] + 1) % 3  # another class
    two = next(i for i in range(10, 60) if len(boxes[i]) == 2)
    boxes[two], classes[two] = boxes[two][1:], classes[two][1:]  # a box left out
    boxes[7] = boxes[7] + 40  # moved off the defect
    issues, quality = box_label_issues(boxes, classes, detections, 3)
    assert set(np.flatnonzero(issues)) == {3, 7, two}
    untouched = np.setdiff1d(np.arange(60), [3, 7, two])
    assert quality[[3, 7, two]].max() < quality[untouched].min()
