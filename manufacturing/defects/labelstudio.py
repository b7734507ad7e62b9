"""Label Studio's JSON formats for boxes: pre-annotated import tasks out, reviewers' export back in.

Follows Label Studio's documented formats ("Import pre-annotated data", "Export annotations",
rectanglelabels): a task is `{"data": {...}, "predictions": [{"model_version", "score", "result":
[...]}]}`; a result item is `{"id", "type": "rectanglelabels", "from_name", "to_name",
"original_width", "original_height", "image_rotation", "value": {"x", "y", "width", "height",
"rotation", "rectanglelabels": [class]}, "score"}` with x/y/width/height in percent of the image's
width and height (x, y the top-left corner). An export is a JSON list of tasks, each with
`annotations: [{"result": [...], "was_cancelled", ...}]` and the task's `data` as imported.

The task's `data` carries `image` (the URL Label Studio shows) and `sha256` (the image's content
hash): the export is matched back to the pool by that hash, never by a file name. The labelling
configuration (`labeling_config`) names the tags FROM_NAME and TO_NAME that the results use.

An export is outside input: its size, task count, boxes per image, classes, box geometry and image
sizes are checked, and every problem is one DefectDataError naming the task and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from manufacturing.defects.errors import DefectDataError

FROM_NAME, TO_NAME, BOX_TYPE = "label", "image", "rectanglelabels"
MAX_EXPORT_BYTES = 64 << 20  # ~100k tasks of a few boxes each; a larger file is not one review round
MAX_TASKS = 100_000
MAX_BOXES = 300  # per image: the detector's own max_det
PERCENT_TOLERANCE = 1e-3  # Label Studio writes float percentages; 100.0000001 is the image edge


def labeling_config(classes: list[str]) -> str:
    """The Label Studio labelling configuration (XML) whose tag names the tasks' results use."""
    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
            f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </RectangleLabels>\n</View>\n')


def box_result(box, label: str, width: int, height: int, *, result_id: str, score: float | None = None) -> dict:
    """One xyxy pixel box as a rectanglelabels result item (percent of the image size)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    item = {"id": result_id, "type": BOX_TYPE, "from_name": FROM_NAME, "to_name": TO_NAME,
            "original_width": int(width), "original_height": int(height), "image_rotation": 0,
            "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                      "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [label]}}
    if score is not None:
        item["score"] = float(score)
    return item


def prediction_task(*, image_url: str, sha256: str, name: str, width: int, height: int, boxes: np.ndarray,
                    labels: list[str], scores: np.ndarray, model_version: str) -> dict:
    """An import task for one image with the model's boxes as pre-annotations (`predictions`).

    The prediction's own `score` is its least confident box (what sent it to review); 0 without boxes.
    """
    results = [box_result(box, label, width, height, result_id=f"{sha256[:12]}-{i}", score=score)
               for i, (box, label, score) in enumerate(zip(boxes, labels, scores, strict=True))]
    return {"data": {"image": image_url, "sha256": sha256, "name": name},
            "predictions": [{"model_version": model_version,
                             "score": float(min(scores)) if len(scores) else 0.0, "result": results}]}


@dataclass
class ReviewedImage:
    """One task of an export: the image's hash and the reviewer's boxes, (n, 4) float64 xyxy pixels."""

    sha256: str
    boxes: np.ndarray
    labels: list[str]
    annotation_id: object = None


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DefectDataError(f"{where} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def result_box(item, *, classes: list[str], width: int, height: int, where: str) -> tuple[list[float], str]:
    """A rectanglelabels result item -> (xyxy pixel box, class); DefectDataError for anything else."""
    if not isinstance(item, dict):
        raise DefectDataError(f"{where}: a result item must be an object")
    if item.get("type") != BOX_TYPE:
        raise DefectDataError(f"{where}: field 'type' is {str(item.get('type'))[:40]!r}; only {BOX_TYPE!r} boxes "
                              "are read")
    for field, size in (("original_width", width), ("original_height", height)):
        if field in item and _number(item[field], f"{where} field {field!r}") != size:
            raise DefectDataError(f"{where}: field {field!r} is {item[field]}, the pool's image is {width}x{height}")
    value = item.get("value")
    if not isinstance(value, dict):
        raise DefectDataError(f"{where}: field 'value' must be an object")
    if _number(value.get("rotation", 0), f"{where} field 'rotation'") % 360 != 0:
        raise DefectDataError(f"{where}: field 'rotation' is {value['rotation']}; VOC boxes are axis-aligned, "
                              "rotate none")
    x, y, w, h = (_number(value.get(key), f"{where} field {key!r}") for key in ("x", "y", "width", "height"))
    tol = PERCENT_TOLERANCE
    if not (-tol <= x and -tol <= y and w > 0 and h > 0 and x + w <= 100 + tol and y + h <= 100 + tol):
        raise DefectDataError(f"{where}: box x={x:g}% y={y:g}% width={w:g}% height={h:g}% is empty or outside the "
                              "image")
    names = value.get(BOX_TYPE)
    if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)):
        raise DefectDataError(f"{where}: field {BOX_TYPE!r} must hold exactly one class name")
    if names[0] not in classes:
        raise DefectDataError(f"{where}: class {names[0][:60]!r} is not one of the pool's classes {classes}")
    clip = lambda v, top: min(max(v, 0.0), top)  # noqa: E731 - within the tolerance checked above
    box = [clip(x, 100) * width / 100, clip(y, 100) * height / 100, clip(x + w, 100) * width / 100,
           clip(y + h, 100) * height / 100]
    return box, names[0]


def read_export(path: str | Path, *, classes: list[str], sizes: dict[str, tuple[int, int]]) -> list[ReviewedImage]:
    """Reviewed images of a Label Studio JSON export, for images the pool knows (`sizes`: sha256 ->
    (width, height)). Each task's latest annotation that was not cancelled counts; tasks without one
    are left out (still to review). An empty result is a reviewed image without defects."""
    path = Path(path)
    if not path.is_file():
        raise DefectDataError(f"{path}: no such export file")
    if path.stat().st_size > MAX_EXPORT_BYTES:
        raise DefectDataError(f"{path}: export is {path.stat().st_size >> 20} MiB, more than the "
                              f"{MAX_EXPORT_BYTES >> 20} MiB one review round may hold; export it in parts")
    try:
        tasks = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise DefectDataError(f"{path}: not valid JSON ({str(error)[:120]})") from None
    if not isinstance(tasks, list):
        raise DefectDataError(f"{path}: a Label Studio JSON export is a list of tasks")
    if len(tasks) > MAX_TASKS:
        raise DefectDataError(f"{path}: {len(tasks)} tasks, more than {MAX_TASKS}")
    reviewed, seen = [], set()
    for row, task in enumerate(tasks):
        where = f"{path} task {row}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DefectDataError(f"{where}: field 'data' must be an object (export as Label Studio's \"JSON\", not "
                                  "JSON-MIN or CSV)")
        sha = task["data"].get("sha256")
        if not (isinstance(sha, str) and sha in sizes):
            raise DefectDataError(f"{where}: field data.sha256 {str(sha)[:70]!r} names no image this pool queued or "
                                  "holds (a task from another project, or edited)")
        if sha in seen:
            raise DefectDataError(f"{where}: image {sha[:12]} appears in two tasks")
        seen.add(sha)
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise DefectDataError(f"{where}: field 'annotations' must be a list of objects")
        done = [a for a in annotations if not a.get("was_cancelled")]
        if not done:
            continue
        annotation = done[-1]  # Label Studio lists a task's annotations oldest first
        results = annotation.get("result")
        if not isinstance(results, list):
            raise DefectDataError(f"{where}: field annotations[].result must be a list")
        if len(results) > MAX_BOXES:
            raise DefectDataError(f"{where}: {len(results)} results, more than {MAX_BOXES} boxes per image")
        width, height = sizes[sha]
        boxes, labels = [], []
        for i, item in enumerate(results):
            box, label = result_box(item, classes=classes, width=width, height=height, where=f"{where} result {i}")
            boxes.append(box)
            labels.append(label)
        reviewed.append(ReviewedImage(sha, np.asarray(boxes, np.float64).reshape(-1, 4), labels,
                                      annotation.get("id")))
    return reviewed
