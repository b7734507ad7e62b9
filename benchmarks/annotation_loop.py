"""The annotation loop on NEU-DET: validation mAP50 against images a person reviewed, and the precision
of the auto-accepted labels (issue 21's experiment, at a size set by the arguments).

Protocol: the seed-0 split (manufacturing/defects/splits/neu_det_seed0.json); its training images,
optionally a class-stratified subset (--train-limit), are shuffled; the first --start-fraction are
labelled by a person (the seed version of the pool), the rest come in --rounds equal batches.
Round 0 trains YOLO from scratch (--start-epochs) on the pool's VOC checkout; each later detector
fine-tunes the previous round's for --round-epochs (a CPU budget: no detector is trained to
convergence). With --calibrate (default) a --calibration-fraction of the seed set is held out of
the rounds' training and each round's detector is calibrated on it (manufacturing.defects.confidence,
isotonic, as `defects annotate --calibrate` does). Each round runs the product's annotate step on the
next batch (the AcceptRule at --threshold, --floor, on calibrated scores): accepted images enter the
pool with the model's labels, the queued ones are "reviewed" by a Label Studio export holding their
true labels, imported as the product imports one. After the last round the loop's detector
fine-tunes on the whole pool (the calibration part included); the reference is a detector trained
from scratch on every training image with its true labels for the same number of image-epochs as
the loop's detectors together (--full-epochs 0). mAP50 on the validation images (--val-limit) with
the product's evaluator; ultralytics' per-epoch validation (which picks best.pt) sees --fit-val of
them. Finished trainings are kept in --work, and a rerun with the same --work resumes after them.

Precision of auto-accepted labels: a box is right when a true box of the same class overlaps it at
IoU >= 0.5 (each true box matched once); an image is right when all its boxes are right and no true
box is missed. Reported at --threshold and, from the same detections, at lower thresholds, on raw and
on calibrated scores.

    nice -n 5 python -m benchmarks.annotation_loop --imgsz 160 --start-epochs 40 --round-epochs 5 \
        --work /work/runs/loop --plot benchmarks/results/annotation_loop_map50_vs_reviewed.png \
        --json --out benchmarks/results/annotation_loop.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import REPO, add_data_argument

SPLIT = REPO / "manufacturing" / "defects" / "splits" / "neu_det_seed0.json"
OTHER_THRESHOLDS = (0.5, 0.7, 0.8)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) xyxy -> (n, m) intersection over union."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def matched(boxes, labels, scores, truth) -> tuple[int, bool]:
    """(boxes right, image right) for the model's labels of one image against its true record."""
    order = np.argsort(-np.asarray(scores))
    overlaps = iou(np.asarray(boxes, np.float64).reshape(-1, 4), truth.boxes.astype(np.float64))
    free = np.ones(len(truth.labels), bool)
    right = 0
    for i in order:
        candidates = [j for j in np.argsort(-overlaps[i]) if free[j] and overlaps[i, j] >= 0.5
                      and truth.labels[j] == labels[i]]
        if candidates:
            free[candidates[0]] = False
            right += 1
    return right, right == len(labels) and not free.any()


def stratified(records, limit: int, seed: int):
    """`limit` records, as many of each first class as the whole has in proportion (seeded)."""
    if not limit or limit >= len(records):
        return list(records)
    from manufacturing.defects.voc import seeded_split

    _, chosen = seeded_split(records, val_fraction=limit / len(records), seed=seed)
    return chosen


def train_and_score(train_records, val_records, names, args, work: Path, tag: str, *, epochs: int,
                    start: Path | None = None) -> tuple[object, float, float]:
    """A detector trained on `train_records` for `epochs`, from scratch or fine-tuned from the detector
    file `start`; (detector, val mAP50, train seconds). A stage whose result.json exists in the working
    folder is read back, not retrained (the run resumes after the last finished stage)."""
    from manufacturing.defects.dataset import write_yolo_dataset
    from manufacturing.defects.detector import YoloDetector, save_detector
    from manufacturing.defects.pipeline import DefectInspector, evaluate_records
    from manufacturing.defects.train import DetectorConfig, train_detector

    run = work / tag
    if (run / "result.json").exists():
        done = json.loads((run / "result.json").read_text())
        print(f"  {tag}: done before, val mAP50 {done['mAP50']:.3f}", flush=True)
        return YoloDetector.load(run / "detector.pt"), done["mAP50"], done["seconds"]
    # ultralytics validates every epoch (and keeps the best epoch's weights): on a small stratified part
    # of the validation images, to keep that cost off the budget; mAP50 is reported on all of them.
    fit_val = stratified(val_records, args.fit_val, args.seed)
    data_yaml = write_yolo_dataset({"train": train_records, "val": fit_val}, run / "dataset", names)
    config = DetectorConfig(imgsz=args.imgsz, epochs=epochs, batch=args.batch, workers=0, seed=0,
                            patience=epochs, close_mosaic=max(1, epochs // 4), warmup_epochs=1.0,
                            weights=None if start is None else str(start))
    started = time.perf_counter()
    summary = train_detector(data_yaml, config, run, verbose=False)
    seconds = time.perf_counter() - started
    detector = YoloDetector.load(save_detector(summary.weights, run / "detector.pt"))
    metrics = evaluate_records(DefectInspector(detector=detector), val_records, progress=False)["yolo"]
    (run / "result.json").write_text(json.dumps({"mAP50": float(metrics["mAP50"]), "seconds": seconds,
                                                 "epochs": epochs, "images": len(train_records)}))
    print(f"  {tag}: {len(train_records)} training images, {epochs} epochs"
          f"{'' if start is None else ' from ' + start.parent.name}, val mAP50 {metrics['mAP50']:.3f} "
          f"({seconds:.0f} s)", flush=True)
    return detector, float(metrics["mAP50"]), seconds


def one_round(pool, detector, batch, truth, args, work: Path, r: int, calibration_part) -> dict:
    """The product's annotate step on `batch`, the review of what it queued, and the labels' precision.
    With --calibrate, the detector's scores are first calibrated on `calibration_part` (labelled images
    it was not trained on) as the product does it (manufacturing.defects.confidence)."""
    from core.onnx_export import file_sha256
    from manufacturing.defects import labelstudio
    from manufacturing.defects.annotation import AcceptRule, file_detections, import_review, read_new_images
    from manufacturing.defects.confidence import fit_score_calibration
    from manufacturing.defects.dataset import load_image
    from manufacturing.defects.errors import DefectDataError

    images = [image for record in batch for image in read_new_images(record.image_path)]
    rule = AcceptRule(threshold=args.threshold, floor=args.floor)
    detections = detector.detect([i.decode() for i in images], conf=rule.floor)
    calibration = None
    if args.calibrate:
        found = detector.detect([load_image(c.image_path) for c in calibration_part], conf=rule.floor)
        try:
            calibration = fit_score_calibration(found, calibration_part, names=detector.names, floor=rule.floor,
                                                model=file_sha256(work / f"round{r}" / "detector.pt"))
        except DefectDataError as error:  # too few boxes to calibrate on: this round judges raw scores
            print(f"  round {r}: no calibration ({error})", flush=True)
    precision = {"raw": {}, "calibrated": {}}
    for kind, judge in (("raw", None), ("calibrated", calibration)):
        if kind == "calibrated" and judge is None:
            continue
        precision[kind] = label_precision(images, detections, truth, detector.names, rule.floor, judge,
                                          (*OTHER_THRESHOLDS, args.threshold))
    result = file_detections(pool, images, detections, names=detector.names, rule=rule,
                             review_dir=work / f"review{r}", image_url="/data/local-files/?d=images/",
                             model_name=f"round{r}", calibration=calibration)
    export = []
    for n, task in enumerate(json.loads(Path(result["tasks"]).read_text()) if result["tasks"] else []):
        record = truth[task["data"]["name"]]  # the review reveals the true labels
        export.append({"id": n, "data": task["data"], "annotations": [{"result": [
            labelstudio.box_result(box, label, record.width, record.height, result_id=f"{n}-{k}")
            for k, (box, label) in enumerate(zip(record.boxes, record.labels, strict=True))]}]})
    (work / f"export{r}.json").write_text(json.dumps(export))
    reviewed = import_review(pool, work / f"export{r}.json")
    best = [float(d.scores.max()) for d in detections if len(d)]
    return {"batch": len(images), "auto_accepted": result["auto_accepted"], "reviewed": reviewed["reviewed"],
            "precision": precision, "version": reviewed["version"],
            "calibration": None if calibration is None else {
                "images": calibration.images, "boxes": calibration.boxes, "right": calibration.right,
                "raw_score_for_0.9": first_at(calibration, 0.9)},
            "images_with_a_box": len(best), "best_score": max(best, default=None),
            "median_best_score": float(np.median(best)) if best else None}


def first_at(calibration, level: float) -> float | None:
    """The lowest raw score the calibration maps to >= level (None: none does)."""
    at = [x for x, y in zip(calibration.x, calibration.y, strict=True) if y >= level]
    return min(at) if at else None


def label_precision(images, detections, truth, names, floor, calibration, thresholds) -> dict:
    """Per threshold: the images the rule accepts (every reported box >= threshold, raw or calibrated
    score) and the precision of their boxes and of whole images."""
    from manufacturing.defects.annotation import AcceptRule

    precision = {}
    for threshold in thresholds:
        rule = AcceptRule(threshold=threshold, floor=floor)
        boxes = right = images_right = accepted = 0
        for image, found in zip(images, detections, strict=True):
            if not rule.accepts(found.scores, calibration):
                continue
            keep = found.scores >= floor
            labels = [names[c] for c in found.classes[keep]]
            n_right, whole = matched(found.boxes[keep], labels, found.scores[keep], truth[image.path.stem])
            accepted, boxes, right, images_right = accepted + 1, boxes + len(labels), right + n_right, \
                images_right + whole
        precision[str(threshold)] = {"images": accepted, "boxes": boxes, "right": right, "images_right": images_right,
                                     "box_precision": right / boxes if boxes else None,
                                     "image_precision": images_right / accepted if accepted else None}
    return precision


def calibration_check(model: Path, val, args) -> dict:
    """Auto-accept precision of a trained detector on images it never saw (the validation images), raw
    and calibrated: two-fold, each half calibrated on the other (as `defects annotate --calibrate`)."""
    from types import SimpleNamespace

    from core.onnx_export import file_sha256
    from manufacturing.defects.confidence import fit_score_calibration
    from manufacturing.defects.dataset import load_image
    from manufacturing.defects.detector import YoloDetector

    detector = YoloDetector.load(model)
    found = detector.detect([load_image(r.image_path) for r in val], conf=args.floor)
    truth = {r.name: r for r in val}
    thresholds = (*OTHER_THRESHOLDS, args.threshold)
    totals = {"raw": {}, "calibrated": {}}
    folds = []
    for fit_part, judge_part in ((0, 1), (1, 0)):
        fit_rows, judge_rows = list(range(fit_part, len(val), 2)), list(range(judge_part, len(val), 2))
        calibration = fit_score_calibration([found[i] for i in fit_rows], [val[i] for i in fit_rows],
                                            names=detector.names, model=file_sha256(model), floor=args.floor)
        folds.append({"calibrated_on": len(fit_rows), "boxes": calibration.boxes, "right": calibration.right,
                      "raw_score_for_0.9": first_at(calibration, args.threshold)})
        images = [SimpleNamespace(path=val[i].image_path) for i in judge_rows]
        for kind, judge in (("raw", None), ("calibrated", calibration)):
            part = label_precision(images, [found[i] for i in judge_rows], truth, detector.names, args.floor, judge,
                                   thresholds)
            for t, counts in part.items():
                into = totals[kind].setdefault(t, {"images": 0, "boxes": 0, "right": 0, "images_right": 0})
                for k in into:
                    into[k] += counts[k]
    for kind in totals.values():
        for counts in kind.values():
            counts["box_precision"] = counts["right"] / counts["boxes"] if counts["boxes"] else None
            counts["image_precision"] = counts["images_right"] / counts["images"] if counts["images"] else None
    return {"model": str(model), "model_sha256": file_sha256(model), "images": len(val), "folds": folds,
            "precision": totals}


def plot(results: dict, path: Path) -> None:
    """Validation mAP50 against the images a person reviewed: the loop's detectors and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["reviewed_before"], r["val_mAP50"]) for r in results["rounds"]]
    points.append((results["loop"]["reviewed"], results["loop"]["val_mAP50"]))
    full = results["full"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([x for x, _ in points], [y for _, y in points], "o-", label="annotation loop (rounds 0-2, final)")
    axes.plot([full["reviewed"]], [full["val_mAP50"]], "s", color="black", label="every image labelled")
    axes.axhline(0.95 * full["val_mAP50"], ls=":", color="grey", label="95% of fully labelled")
    axes.axvline(0.5 * full["reviewed"], ls="--", color="grey", label="50% of images reviewed")
    axes.set_xlabel("training images reviewed by a person")
    axes.set_ylabel("validation mAP50 (seed-0 split)")
    s = results["settings"]
    axes.set_title(f"NEU-DET annotation loop, YOLO11n {s['imgsz']} px, CPU budget (reduced)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser, under="neu_det", what="NEU-DET folder")
    parser.add_argument("--split", type=Path, default=SPLIT)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--start-epochs", type=int, default=25, help="round 0's detector, from scratch")
    parser.add_argument("--round-epochs", type=int, default=8,
                        help="each later detector (rounds 1.., the loop's final) fine-tunes the previous one")
    parser.add_argument("--full-epochs", type=int, default=0,
                        help="the fully labelled reference, from scratch (0: the loop's total image-epochs)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--start-fraction", type=float, default=0.2)
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="accept on calibrated scores, fitted on a held-out labelled part of the seed set")
    parser.add_argument("--calibration-fraction", type=float, default=0.25,
                        help="part of the seed set held out of the rounds' training to calibrate on")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--floor", type=float, default=0.25)
    parser.add_argument("--train-limit", type=int, default=0, help="class-stratified subset of training images")
    parser.add_argument("--val-limit", type=int, default=0, help="class-stratified subset of validation images")
    parser.add_argument("--fit-val", type=int, default=48, help="validation images ultralytics checks each epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: a temporary one); rerun with it to resume")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of mAP50 against images reviewed")
    parser.add_argument("--calibration-check", type=Path, default=None, metavar="DETECTOR",
                        help="only: auto-accept precision of this trained detector on the validation images, raw "
                             "and calibrated (two-fold), no loop")
    add_output_arguments(parser, Path("runs/bench/annotation_loop.json"))
    args = parser.parse_args()

    import shutil

    from manufacturing.defects.annotation import AnnotationPool, Change
    from manufacturing.defects.voc import class_names, read_voc_folder
    from manufacturing.defects.workflow import records_by_split

    work = args.work or Path(tempfile.mkdtemp(prefix="annotation-loop-"))
    records = read_voc_folder(args.data)
    names = class_names(records)
    train = stratified(records_by_split(records, args.split, "train"), args.train_limit, args.seed)
    val = stratified(records_by_split(records, args.split, "val"), args.val_limit, args.seed)
    if args.calibration_check:
        check = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()},
                 **calibration_check(args.calibration_check, val, args)}
        for kind, by_threshold in check["precision"].items():
            for t, c in by_threshold.items():
                print(f"  {kind:10s} >= {t}: {c['images']} of {len(val)} images accepted, box precision "
                      f"{c['box_precision']}, image precision {c['image_precision']}", flush=True)
        write_results(check, args.out, as_json=args.json)
        return
    truth = {r.name: r for r in train}
    order = np.random.default_rng(args.seed).permutation(len(train))
    start = round(args.start_fraction * len(train))
    seed_set = [train[i] for i in order[:start]]
    held = round(args.calibration_fraction * start) if args.calibrate else 0
    calibration_part, held_names = seed_set[:held], {r.name for r in seed_set[:held]}
    batches = [[train[i] for i in part] for part in np.array_split(order[start:], args.rounds)]
    results = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
               "train_images": len(train), "val_images": len(val), "classes": names, "rounds": []}
    print(f"NEU-DET annotation loop: {len(train)} training images ({start} labelled to start, {held} of them held "
          f"out to calibrate, {args.rounds} rounds), {len(val)} validation images, {args.imgsz} px, "
          f"{args.start_epochs} epochs then {args.round_epochs} per round; {describe(results['machine'])}", flush=True)

    # The pool is rebuilt on every run (cheap); finished training stages are read back (resume).
    shutil.rmtree(work / "pool", ignore_errors=True)
    for r in range(args.rounds):
        shutil.rmtree(work / f"review{r}", ignore_errors=True)
    pool = AnnotationPool.open(work / "pool", classes=names)
    pool.commit([Change(image=pool.put(r.image_path.read_bytes()), name=r.name, suffix=r.image_path.suffix,
                        width=r.width, height=r.height, boxes=r.boxes, labels=r.labels, source="review")
                 for r in seed_set], origin={"command": "seed", "labelled_by": "person (true labels)"})
    reviewed, previous, image_epochs = start, None, 0
    for r, batch in enumerate(batches):
        pool_records = [p for p in read_voc_folder(pool.write_voc(pool.state().head)) if p.name not in held_names]
        epochs = args.start_epochs if previous is None else args.round_epochs
        detector, map50, seconds = train_and_score(pool_records, val, names, args, work, f"round{r}",
                                                   epochs=epochs, start=previous)
        previous, image_epochs = work / f"round{r}" / "detector.pt", image_epochs + epochs * len(pool_records)
        outcome = one_round(pool, detector, batch, truth, args, work, r, calibration_part)
        results["rounds"].append({"round": r, "trained_on": len(pool_records), "epochs": epochs,
                                  "reviewed_before": reviewed, "val_mAP50": map50, "train_seconds": seconds,
                                  **outcome})
        reviewed += outcome["reviewed"]
        kind = "calibrated" if outcome["calibration"] else "raw"  # what the round accepted on
        p = outcome["precision"][kind][str(args.threshold)]
        print(f"  round {r}: {outcome['auto_accepted']} of {outcome['batch']} auto-accepted ({kind} box precision "
              f"{p['box_precision']}, image precision {p['image_precision']}), {outcome['reviewed']} reviewed; "
              f"raw score at calibrated 0.9: {(outcome['calibration'] or {}).get('raw_score_for_0.9')}", flush=True)
    final = read_voc_folder(pool.write_voc(pool.state().head))
    _, loop_map, loop_s = train_and_score(final, val, names, args, work, "loop", epochs=args.round_epochs,
                                          start=previous)
    image_epochs += args.round_epochs * len(final)
    full_epochs = args.full_epochs or max(1, round(image_epochs / len(train)))
    _, full_map, full_s = train_and_score(train, val, names, args, work, "full", epochs=full_epochs)
    accepted = sum(r["auto_accepted"] for r in results["rounds"])
    boxes = [r["precision"]["calibrated" if r["calibration"] else "raw"][str(args.threshold)]
             for r in results["rounds"]]
    box_total = sum(p["boxes"] for p in boxes)
    right = sum(p["right"] for p in boxes)
    results.update(loop={"val_mAP50": loop_map, "trained_on": len(final), "reviewed": reviewed,
                         "reviewed_fraction": reviewed / len(train), "auto_accepted": accepted,
                         "auto_box_precision": right / box_total if box_total else None, "auto_boxes": box_total,
                         "image_epochs": image_epochs, "train_seconds": loop_s, "pool_version": pool.state().head},
                   full={"val_mAP50": full_map, "trained_on": len(train), "reviewed": len(train),
                         "epochs": full_epochs, "image_epochs": full_epochs * len(train), "train_seconds": full_s},
                   loop_over_full=loop_map / full_map if full_map else None)
    print(f"loop: val mAP50 {loop_map:.3f} with {reviewed} of {len(train)} images reviewed "
          f"({100 * reviewed / len(train):.0f}%), {accepted} auto-accepted (box precision "
          f"{results['loop']['auto_box_precision']}); everything labelled ({full_epochs} epochs): {full_map:.3f}",
          flush=True)
    if args.plot:
        plot(results, args.plot)
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
