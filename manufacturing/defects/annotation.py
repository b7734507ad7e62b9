"""The annotation loop for defects: auto-accept confident detections, queue the rest for review in
Label Studio, take the review back, all into a versioned, content-addressed data pool.

Auto-accept rule (`AcceptRule`): the detector is run with its score floor (0.25, what `defects
predict` reports by default); an image is accepted with the model's labels when it has at least one
box and every reported box scores >= threshold (0.9, the design guide's figure). Everything else is
queued for a person: an image with one unsure box (0.25 <= score < 0.9) may hide a defect the model
half-sees, and accepting only its confident boxes would teach the next detector that the unsure
region is background (a missed defect, the costly error on a line); an image with no box at all
gives no confidence to trust (NEU-DET holds no defect-free images, and on a line "nothing found"
is exactly what a review has to confirm). So the rule trades review work for label precision, which
is what the pool needs: a wrong auto-label is trained on silently, a queued image costs a look.
With a score calibration (`confidence.py`, `defects annotate --calibrate`), the threshold applies to
the calibrated score, the chance a box is right: YOLO's raw scores rarely reach 0.9 even where its
0.6 boxes are right 95% of the time (benchmarks/RESULTS.md, annotation_loop).

The pool (a folder): why a manifest of our own rather than DVC. DVC versions a whole directory as
one `.dir` listing of MD5s, tied to a git repository (or `--no-scm`), with no place for what this
loop must record per image: which label file, whether a model or a person made it, which version
added or relabelled it and from which model or review export. That record is the point of the pool,
and a manifest of ~JSON gives it with the same content addressing DVC uses (SHA-256 here), without
a git repository or a new dependency in the product. A pool folder can still be `dvc add`ed for
remote storage. Layout:

- `objects/<aa>/<sha256>`: image bytes and label documents (canonical JSON: size and integer xyxy
  boxes with class names), each stored once by the SHA-256 of its bytes, checked on every read.
- `versions/<id>.json`: one version: `parent`, `classes`, `images` (name, image and label hashes,
  size, source auto/review), `changes` (added / relabelled, source, and the run's origin: model and
  threshold, or the review export's hash). `id` is the SHA-256 of the version's canonical JSON.
- `state.json`: the current version (`head`) and the review queue (images waiting for a person).
- `voc/<id16>/`: a VOC folder (IMAGES/ + ANNOTATIONS/ + POOL_VERSION.json) of a version, for
  `defects train --data`, which records the version in train_result.json. Derived: deletable.

Writes are atomic: every file is written aside and renamed into place, objects and the version
file first, `state.json` last; a run killed at any point leaves the previous head and queue intact
(at worst unreferenced objects, which are harmless).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manufacturing.defects.errors import DefectDataError
from manufacturing.defects.voc import IMAGE_SUFFIXES

POOL_SCHEMA = "moeworks.defects.pool/1"
STATE_FILE, POOL_FILE, CHECKOUT_FILE = "state.json", "pool.json", "POOL_VERSION.json"
MAX_NEW_IMAGES = 100_000  # per annotate run
MAX_IMAGE_BYTES = 50 << 20
MAX_POOL_FILE_BYTES = 256 << 20  # a version listing ~1M images; larger means a broken or foreign file
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class AcceptRule:
    """When an image's detections are taken as its labels without a person (see the module docstring).

    threshold: every reported box must score at least this; floor: the score from which a box counts
    as reported (below it the detector's output is noise and ignored).
    """

    threshold: float = 0.9
    floor: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.floor < self.threshold <= 1:
            raise ValueError(f"need 0 < floor < threshold <= 1, got floor {self.floor}, threshold {self.threshold}")

    def accepts(self, scores: np.ndarray, calibration=None) -> bool:
        """scores: (n,) the image's raw box scores. True: at least one reported box (raw score >= floor),
        all >= threshold; with `calibration` (confidence.ScoreCalibration) the threshold applies to the
        reported boxes' calibrated scores."""
        reported = np.asarray(scores, np.float64)
        reported = reported[reported >= self.floor]
        if calibration is not None:
            reported = calibration(reported)
        return bool(len(reported)) and bool((reported >= self.threshold).all())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(document) -> bytes:
    """The one byte form of a JSON document that its hash is taken of."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file beside it, fsynced, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def label_document(width: int, height: int, boxes: np.ndarray, labels: list[str]) -> dict:
    """Size and boxes as the pool stores them: integer pixel xyxy (VOC's own precision), each at least
    1 px wide and inside the image, sorted so that the same labels give the same hash."""
    objects = []
    for (x1, y1, x2, y2), label in zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels, strict=True):
        left, top = min(int(round(x1)), width - 1), min(int(round(y1)), height - 1)
        right, bottom = min(max(int(round(x2)), left + 1), width), min(max(int(round(y2)), top + 1), height)
        objects.append({"name": label, "box": [max(left, 0), max(top, 0), right, bottom]})
    objects.sort(key=lambda o: (o["box"], o["name"]))
    return {"width": int(width), "height": int(height), "objects": objects}


@dataclass
class Change:
    """An image entering the pool or relabelled: its bytes' hash, name, size and labels."""

    image: str
    name: str
    suffix: str
    width: int
    height: int
    boxes: np.ndarray
    labels: list[str]
    source: str  # "auto" (the model, above the threshold) or "review" (a person)


@dataclass
class PoolState:
    """state.json: the head version (None before the first) and the review queue (sha256 -> entry)."""

    head: str | None = None
    queue: dict[str, dict] = field(default_factory=dict)


class AnnotationPool:
    """A versioned pool of labelled defect images in `root` (see the module docstring).

    Open with `AnnotationPool.open(root, classes=...)`: makes the pool when `root` holds none
    (classes required then), else checks that `classes`, when given, are the pool's.
    """

    def __init__(self, root: Path, classes: list[str]) -> None:
        self.root, self.classes = root, classes

    @classmethod
    def open(cls, root: str | Path, *, classes: list[str] | None = None) -> AnnotationPool:
        root = Path(root)
        if (root / POOL_FILE).is_file():
            meta = _read_json(root / POOL_FILE)
            if meta.get("schema") != POOL_SCHEMA or not _names(meta.get("classes")):
                raise DefectDataError(f"{root / POOL_FILE}: not a moeworks defects pool (field 'schema' or 'classes')")
            if classes is not None and list(classes) != meta["classes"]:
                raise DefectDataError(f"{root}: the pool's classes are {meta['classes']}, the model's {list(classes)}")
            return cls(root, meta["classes"])
        if classes is None:
            raise DefectDataError(f"{root}: no annotation pool here ({POOL_FILE} missing); run `moeworks defects "
                                  "annotate --model ... --data ...` first")
        if root.exists() and any(root.iterdir()):
            raise DefectDataError(f"{root}: folder exists, is not empty and holds no pool; choose a new --pool")
        if not _names(list(classes)):
            raise DefectDataError(f"class names must be non-empty strings, got {classes}")
        atomic_write(root / POOL_FILE, json.dumps({"schema": POOL_SCHEMA, "classes": list(classes)}).encode())
        return cls(root, list(classes))

    # ---- objects ------------------------------------------------------------------------------
    def _object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store bytes once by their SHA-256; the hash."""
        digest = sha256(data)
        path = self._object_path(digest)
        if not path.is_file():
            atomic_write(path, data)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes stored under `digest`, checked against it (a changed object is refused)."""
        path = self._object_path(digest)
        if not (_SHA.fullmatch(digest) and path.is_file()):
            raise DefectDataError(f"{self.root}: object {digest[:70]!r} is missing from the pool")
        data = path.read_bytes()
        if sha256(data) != digest:
            raise DefectDataError(f"{path}: content does not match its SHA-256 (the pool was modified)")
        return data

    # ---- state and versions -------------------------------------------------------------------
    def state(self) -> PoolState:
        path = self.root / STATE_FILE
        if not path.is_file():
            return PoolState()
        state = _read_json(path)
        head, queue = state.get("head"), state.get("queue")
        if not ((head is None or (isinstance(head, str) and _SHA.fullmatch(head))) and isinstance(queue, dict)):
            raise DefectDataError(f"{path}: fields 'head' (a version id) and 'queue' (an object) are malformed")
        return PoolState(head, queue)

    def version(self, version_id: str) -> dict:
        """A version's document, checked against its id."""
        if not (isinstance(version_id, str) and _SHA.fullmatch(version_id)):
            raise DefectDataError(f"{version_id[:70]!r} is not a pool version id (64 hex digits)")
        path = self.root / "versions" / f"{version_id}.json"
        if not path.is_file():
            raise DefectDataError(f"{self.root}: no version {version_id}")
        document = _read_json(path)
        if sha256(canonical({k: v for k, v in document.items() if k != "id"})) != version_id:
            raise DefectDataError(f"{path}: content does not match its version id (the pool was modified)")
        return document

    def images(self, version_id: str | None) -> dict[str, dict]:
        """The version's images, sha256 -> entry; {} for no version."""
        return {} if version_id is None else {e["image"]: e for e in self.version(version_id)["images"]}

    def commit(self, changes: list[Change], *, origin: dict, queue: dict[str, dict] | None = None) -> str | None:
        """A new version on top of the head with `changes` (and the queue replaced by `queue`, when
        given): objects and the version are written first, state.json last. The new head, or the old
        one when nothing changed."""
        state = self.state()
        entries = self.images(state.head)
        changed = []
        for change in changes:
            unknown = sorted(set(change.labels) - set(self.classes))
            if unknown:
                raise DefectDataError(f"{change.name}: class {unknown[0]!r} is not one of the pool's {self.classes}")
            label = self.put(canonical(label_document(change.width, change.height, change.boxes, change.labels)))
            previous = entries.get(change.image)
            if previous is not None and previous["label"] == label:
                continue  # a reviewer confirmed the labels the pool already holds
            entries[change.image] = {"name": previous["name"] if previous else change.name, "image": change.image,
                                     "label": label, "suffix": change.suffix, "width": change.width,
                                     "height": change.height, "source": change.source}
            changed.append({"name": entries[change.image]["name"], "image": change.image, "source": change.source,
                            "change": "relabelled" if previous else "added"})
        head = state.head
        if changed:
            document = {"schema": POOL_SCHEMA, "parent": state.head, "classes": self.classes,
                        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                        "origin": origin, "images": sorted(entries.values(), key=lambda e: e["name"]),
                        "changes": changed}
            head = sha256(canonical(document))
            atomic_write(self.root / "versions" / f"{head}.json",
                         json.dumps({"id": head, **document}, indent=1).encode())
        new_queue = state.queue if queue is None else queue
        if head != state.head or new_queue != state.queue:
            atomic_write(self.root / STATE_FILE, json.dumps({"head": head, "queue": new_queue}, indent=1).encode())
        return head

    def unique_name(self, stem: str, digest: str, taken: set[str]) -> str:
        """A file-system-safe name for a new image, its stem unless another image holds it."""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100] or "image"
        return name if name not in taken else f"{name}-{digest[:10]}"

    def write_voc(self, version_id: str, out: str | Path | None = None) -> Path:
        """A version as a VOC folder (IMAGES/, ANNOTATIONS/, POOL_VERSION.json), default voc/<id16>/.

        Written aside and renamed into place; an existing checkout of this version is kept as it is.
        """
        from manufacturing.defects.synthetic import voc_xml

        out = Path(out) if out is not None else self.root / "voc" / version_id[:16]
        if (out / CHECKOUT_FILE).is_file() and checkout_version(out).get("version") == version_id:
            return out
        if out.exists():
            raise DefectDataError(f"{out}: exists and is no checkout of version {version_id[:16]}; choose another "
                                  "folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            (temporary / "IMAGES").mkdir()
            (temporary / "ANNOTATIONS").mkdir()
            images = self.version(version_id)["images"]
            for entry in images:
                filename = f"{entry['name']}{entry['suffix']}"
                (temporary / "IMAGES" / filename).write_bytes(self.get(entry["image"]))
                labels = json.loads(self.get(entry["label"]))
                boxes = np.asarray([o["box"] for o in labels["objects"]], np.float32).reshape(-1, 4)
                (temporary / "ANNOTATIONS" / f"{entry['name']}.xml").write_text(voc_xml(
                    filename, labels["width"], labels["height"], boxes, [o["name"] for o in labels["objects"]],
                    database="moeworks annotation pool"))
            (temporary / CHECKOUT_FILE).write_text(json.dumps(
                {"pool": str(self.root.resolve()), "version": version_id, "images": len(images)}, indent=1))
            os.replace(temporary, out)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return out


def checkout_version(voc_dir: str | Path) -> dict:
    """The pool version a VOC folder was written from ({} when it is no pool checkout)."""
    path = Path(voc_dir) / CHECKOUT_FILE
    if not path.is_file():
        return {}
    document = _read_json(path)
    return document if isinstance(document.get("version"), str) else {}


def _names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_POOL_FILE_BYTES:
        raise DefectDataError(f"{path}: larger than {MAX_POOL_FILE_BYTES >> 20} MiB; not a pool file")
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise DefectDataError(f"{path}: not valid JSON (a pool file was modified or truncated)") from None
    if not isinstance(document, dict):
        raise DefectDataError(f"{path}: a pool file holds one JSON object")
    return document


# ---- the two steps of the loop ---------------------------------------------------------------

@dataclass
class NewImage:
    """An image file for the pool: its path, the SHA-256 of its bytes and its size. Neither the bytes
    nor the pixels are held (a run may take many large frames): `read` and `decode` load them again."""

    path: Path
    digest: str
    width: int
    height: int

    def read(self) -> bytes:
        """The file's bytes, refused if they changed since the image was hashed."""
        data = self.path.read_bytes()
        if sha256(data) != self.digest:
            raise DefectDataError(f"{self.path}: the file changed while annotate ran")
        return data

    def decode(self) -> np.ndarray:
        from manufacturing.defects.dataset import load_image

        return load_image(self.path, expected_size=(self.width, self.height))


def read_new_images(folder: str | Path) -> list[NewImage]:
    """The images of a folder (or one image file), hashed and decoded once (a corrupt file is refused
    here, before anything is written); bounded in count and size."""
    from manufacturing.defects.dataset import load_image

    folder = Path(folder)
    if folder.is_file():
        paths = [folder]
    elif folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        raise DefectDataError(f"{folder}: no such image file or folder")
    if not paths:
        raise DefectDataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(paths) > MAX_NEW_IMAGES:
        raise DefectDataError(f"{folder}: {len(paths)} images, more than {MAX_NEW_IMAGES} for one annotate run")
    images = []
    for path in paths:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise DefectDataError(f"{path}: larger than {MAX_IMAGE_BYTES >> 20} MiB")
        height, width = load_image(path).shape[:2]
        images.append(NewImage(path, sha256(path.read_bytes()), width, height))
    return images


@contextlib.contextmanager
def pool_lock(pool: AnnotationPool):
    """One writer at a time: a second annotate or import on the same pool is refused, not interleaved
    (each reads the head and the queue, then writes them)."""
    pool.root.mkdir(parents=True, exist_ok=True)
    with open(pool.root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DefectDataError(f"{pool.root}: another annotate or import is writing this pool; try again when it "
                                  "ends") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def not_yet_seen(pool: AnnotationPool, images: list[NewImage]) -> list[NewImage]:
    """The images neither in the pool's head nor in its queue (nor repeated in `images`)."""
    state = pool.state()
    known = set(pool.images(state.head)) | set(state.queue)
    fresh = []
    for image in images:
        if image.digest not in known:
            fresh.append(image)
            known.add(image.digest)
    return fresh


def annotate(pool: AnnotationPool, detector, images: list[NewImage], *, rule: AcceptRule, review_dir: Path,
             image_url: str, model_name: str, batch_size: int = 16, calibration=None) -> dict:
    """Detect on the images the pool has not seen, then `file_detections` (calibration: see there)."""
    fresh = not_yet_seen(pool, images)
    detections = []
    for start in range(0, len(fresh), batch_size):  # decoded a batch at a time
        chunk = fresh[start:start + batch_size]
        detections += detector.detect([i.decode() for i in chunk], conf=rule.floor, batch_size=batch_size)
    result = file_detections(pool, fresh, detections, names=detector.names, rule=rule, review_dir=review_dir,
                             image_url=image_url, model_name=model_name, calibration=calibration)
    return {**result, "images": len(images), "skipped_known": len(images) - len(fresh)}


def file_detections(pool: AnnotationPool, images: list[NewImage], detections: list, *, names: list[str],
                    rule: AcceptRule, review_dir: Path, image_url: str, model_name: str, calibration=None) -> dict:
    """Accept the images whose detections pass `rule` into a new pool version (source "auto"), queue
    the rest and write them as a Label Studio import in review_dir (tasks.json, labeling_config.xml,
    images/). detections: one Detections per image (boxes xyxy px, scores, class indices into names).

    calibration (a `confidence.ScoreCalibration` of this detector): a box is reported by its raw score
    (>= rule.floor, as without), and the threshold applies to its calibrated score (the probability
    that it is right); the map is stored in the pool and named in the new version's origin, and the
    review tasks carry calibrated scores."""
    with pool_lock(pool):
        return _file_detections(pool, images, detections, names=names, rule=rule, review_dir=review_dir,
                                image_url=image_url, model_name=model_name, calibration=calibration)


def _file_detections(pool, images, detections, *, names, rule, review_dir, image_url, model_name,
                     calibration) -> dict:
    from manufacturing.defects.labelstudio import labeling_config, prediction_task

    state = pool.state()
    taken = {e["name"] for e in pool.images(state.head).values()} | {e["name"] for e in state.queue.values()}
    accepted, queued, tasks = [], {}, []
    for image, found in zip(images, detections, strict=True):
        name = pool.unique_name(image.path.stem, image.digest, taken)
        taken.add(name)
        width, height = image.width, image.height
        suffix = image.path.suffix.lower()
        keep = np.asarray(found.scores) >= rule.floor
        boxes, scores = np.asarray(found.boxes)[keep], np.asarray(found.scores)[keep]
        labels = [names[c] for c in np.asarray(found.classes)[keep]]
        pool.put(image.read())
        accept = rule.accepts(scores, calibration)
        if calibration is not None:
            scores = calibration(scores)  # what the review tasks show
        if accept:
            accepted.append(Change(image=image.digest, name=name, suffix=suffix, width=width, height=height,
                                   boxes=boxes, labels=labels, source="auto"))
            continue
        queued[image.digest] = {"name": name, "suffix": suffix, "width": width, "height": height,
                                "model": model_name, "boxes": len(scores)}
        tasks.append(prediction_task(image_url=f"{image_url}{name}{suffix}", sha256=image.digest, name=name,
                                     width=width, height=height, boxes=boxes, labels=labels, scores=scores,
                                     model_version=model_name))
    tasks_file = None
    if tasks:  # the review folder before the queue: a queued image always has its task file
        review_dir.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=review_dir.parent, prefix=f".{review_dir.name}.", suffix=".tmp"))
        try:
            (temporary / "images").mkdir()
            for image in images:
                if image.digest in queued:
                    entry = queued[image.digest]
                    (temporary / "images" / f"{entry['name']}{entry['suffix']}").write_bytes(image.read())
            (temporary / "tasks.json").write_text(json.dumps(tasks, indent=1))
            (temporary / "labeling_config.xml").write_text(labeling_config(pool.classes))
            os.replace(temporary, review_dir)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        tasks_file = review_dir / "tasks.json"
    origin = {"command": "annotate", "model": model_name, "threshold": rule.threshold, "floor": rule.floor}
    if calibration is not None:
        origin["calibration"] = pool.put(canonical(calibration.to_json()))
    head = pool.commit(accepted, origin=origin, queue={**state.queue, **queued})
    return {"version": head, "parent": state.head, "auto_accepted": len(accepted), "queued": len(queued),
            "queue_total": len(state.queue) + len(queued), "tasks": None if tasks_file is None else str(tasks_file),
            "threshold": rule.threshold, "floor": rule.floor, "calibration": origin.get("calibration")}


def import_review(pool: AnnotationPool, export: str | Path) -> dict:
    """A reviewers' Label Studio export into a new pool version (source "review"); the reviewed
    images leave the queue. Images already in the pool may be relabelled."""
    with pool_lock(pool):
        return _import_review(pool, export)


def _import_review(pool: AnnotationPool, export: str | Path) -> dict:
    from manufacturing.defects.labelstudio import read_export

    state = pool.state()
    held = pool.images(state.head)
    known = {**held, **state.queue}
    sizes = {digest: (int(e["width"]), int(e["height"])) for digest, e in known.items()}
    reviewed = read_export(export, classes=pool.classes, sizes=sizes)
    changes = []
    for item in reviewed:
        entry = known[item.sha256]
        pool.get(item.sha256)  # the image itself is still the one queued
        changes.append(Change(image=item.sha256, name=entry["name"], suffix=entry["suffix"], width=entry["width"],
                              height=entry["height"], boxes=item.boxes, labels=item.labels, source="review"))
    done = {item.sha256 for item in reviewed}
    origin = {"command": "import", "export": Path(export).name, "export_sha256": sha256(Path(export).read_bytes())}
    queue = {k: v for k, v in state.queue.items() if k not in done}
    head = pool.commit(changes, origin=origin, queue=queue)
    changed = pool.version(head)["changes"] if head != state.head else []
    return {"version": head, "parent": state.head, "reviewed": len(reviewed),
            "added": sum(c["change"] == "added" for c in changed),
            "relabelled": sum(c["change"] == "relabelled" for c in changed),
            "unchanged": len(reviewed) - len(changed), "queue_total": len(queue)}
