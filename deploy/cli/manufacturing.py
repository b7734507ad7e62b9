"""`moeworks defects ...` and `moeworks maintenance ...`: the manufacturing commands."""

from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError

defects_app = typer.Typer(help="Surface defect detection (YOLO + MoE), sizes in mm.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Predictive maintenance: RUL on C-MAPSS, failures on AI4I.",
                              no_args_is_help=True)

# Predictive maintenance commands (deploy/cli/maintenance.py).
from deploy.cli.maintenance import register as _register_maintenance  # noqa: E402

_register_maintenance(maintenance_app)


# ---- defects -------------------------------------------------------------------------------------
# Heavy imports (torch, ultralytics) stay inside the commands so that `moeworks --help` is instant.
# Ultralytics prints ~150 lines per run: they go into the run's log file unless --verbose.

JSON = typer.Option(False, "--json", help="print the result as one JSON object on stdout (tables and notes on "
                                          "stderr)")
MOE_STAGE = typer.Option(None, "--moe-stage", help="MoE stage (.pt or .onnx) to score YOLO + MoE as well "
                                                   "(was --moe)")


def _model_or_shipped(model: Path | None) -> Path:
    """--model, or the shipped NEU-DET detector (its SHA-256 checked) when it is left out, said on stderr."""
    if model is not None:
        return model
    from manufacturing.defects.shipped import CARD_FILE, verified_path

    path = verified_path()
    output.note(f"no --model: using the shipped NEU-DET detector {path} (trained on the NEU-DET research data "
                f"set; model card {CARD_FILE})")
    return path


@defects_app.command("train")
def defects_train(
    data: Path = typer.Option(..., help="VOC folder (IMAGES/+ANNOTATIONS/, JPEGImages/+Annotations/, or flat)"),
    out: Path = typer.Option(Path("runs/defects"), help="run folder: split, dataset, detector.pt, moe_stage.pt"),
    imgsz: int = typer.Option(640, help="detector input size (px); 224-320 is practical on a CPU"),
    epochs: int = typer.Option(100, help="YOLO epochs (from scratch: 100-300)"),
    hours: float = typer.Option(0.0, help="wall-clock budget in hours (0: none); epochs are re-planned to fit"),
    batch: int = typer.Option(16),
    workers: int = typer.Option(2, help="dataloader processes (augmentation); 8-12 keep a GPU fed"),
    device: str = typer.Option("cpu", help="'cpu' or a CUDA index such as '0'"),
    val_fraction: float = typer.Option(0.2, help="share of images held out, stratified, seeded"),
    seed: int = typer.Option(0, help="split and training seed"),
    train_moe: bool = typer.Option(True, "--train-moe/--no-train-moe", help="also train the MoE second stage on "
                                                                          "crops (was --moe/--no-moe)"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out from its "
                                                        "yolo/weights/last.pt (same --data and split only)"),
    weights: Path = typer.Option(None, "--weights", help="start from this detector file (e.g. the shipped one, "
                                                         "manufacturing/defects/weights/neu_det.pt) to fine-tune"),
    threads: int = typer.Option(1, help="torch threads for training (1 suits 2 shared cores; more on a machine "
                                        "of its own)"),
    as_json: bool = JSON,
) -> None:
    """Train YOLO from its model YAML (offline) or from a detector file, and the MoE crop stage."""
    from manufacturing.defects.train import DetectorConfig
    from manufacturing.defects.workflow import TrainJob, train_job

    if resume and weights is not None:
        raise UserInputError("--resume continues a run from its own last.pt; it takes no --weights")
    if weights is not None and not weights.is_file():
        raise UserInputError(f"--weights {weights}: no such detector file")
    try:
        detector = DetectorConfig(imgsz=imgsz, epochs=epochs, time=hours or None, batch=batch, workers=workers,
                                  device=device, seed=seed, threads=threads,
                                  weights=None if weights is None else str(weights))
    except ValueError as error:
        raise UserInputError(str(error)) from None
    job = TrainJob(detector=detector, val_fraction=val_fraction, split_seed=seed, train_moe=train_moe)
    with output.third_party_output_to(out / "logs" / "defects.log"):
        result = train_job(data, out, job, resume=resume)
    output.say(f"trained {result.get('detector')} ({result.get('train_images')} training images)"
               + (f" and {result['moe_stage']}" if result.get("moe_stage") else "") + f"; run folder {out}",
               as_json=as_json)
    if as_json:
        output.emit("defects.train", {"data": str(data), "out": str(out), **result})


@defects_app.command("evaluate")
def defects_evaluate(
    data: Path = typer.Option(..., help="any VOC folder with the model's class names"),
    model: Path = typer.Option(None, help="detector (.pt or .onnx); default: the shipped NEU-DET detector"),
    moe_stage: Path = MOE_STAGE,
    split_file: Path = typer.Option(None, help="score only the 'val' images of this recorded split"),
    as_json: bool = JSON,
) -> None:
    """mAP50, mAP50-95, per-class AP, precision and recall: YOLO alone and YOLO + MoE."""
    from rich.table import Table

    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.moe_stage import CropMoEClassifier
    from manufacturing.defects.pipeline import DefectInspector, evaluate_records
    from manufacturing.defects.voc import read_voc_folder
    from manufacturing.defects.workflow import records_by_split

    model = _model_or_shipped(model)
    records = read_voc_folder(data)
    if split_file is not None:
        records = records_by_split(records, split_file, "val")
    with output.third_party_output_to(Path("runs/logs/defects-evaluate.log")):
        detector = YoloDetector.load(model)
        stage = CropMoEClassifier.load(moe_stage)[0] if moe_stage else None
        metrics = evaluate_records(DefectInspector(detector=detector, second_stage=stage), records)
    table = Table(title=f"{data} ({len(records)} images), {model.name}")
    table.add_column("class")
    for variant in metrics:
        table.add_column(f"{variant} AP50", justify="right")
        table.add_column(f"{variant} AP50-95", justify="right")
    for name in detector.names:
        table.add_row(name, *[f"{m['per_class'][name][k]:.3f}" for m in metrics.values() for k in ("AP50", "AP50-95")])
    table.add_row("[bold]all", *[f"[bold]{m[k]:.3f}" for m in metrics.values() for k in ("mAP50", "mAP50-95")])
    output.console(as_json=as_json).print(table)
    for variant, m in metrics.items():
        output.say(f"{variant}: precision {m['precision']:.3f}, recall {m['recall']:.3f}", as_json=as_json)
    if as_json:
        output.emit("defects.evaluate", {"data": str(data), "model": str(model),
                                         "moe_stage": None if moe_stage is None else str(moe_stage),
                                         "images": len(records), **metrics})


@defects_app.command("predict")
def defects_predict(
    data: Path = typer.Option(..., help="an image or a folder of images (any size; large frames are tiled; "
                                        "was --source)"),
    model: Path = typer.Option(None, help="detector (.pt or .onnx); default: the shipped NEU-DET detector"),
    moe_stage: Path = MOE_STAGE,
    out: Path = typer.Option(Path("runs/defects/predict"), help="predictions.json and annotated images"),
    calibration: Path = typer.Option(None, help="JSON/YAML with mm_per_pixel(_x/_y) and min_size_mm"),
    mm_per_pixel: float = typer.Option(None, help="camera scale (overrides the calibration file's)"),
    reference: Path = typer.Option(None, help="image of a reference object of known size, to measure the scale"),
    reference_mm: str = typer.Option("", help="the reference object's size, WIDTHxHEIGHT in mm, e.g. 40x20"),
    min_size_mm: float = typer.Option(None, help="smallest defect to report, longer side in mm (default 0.2)"),
    conf: float = typer.Option(0.25, help="score threshold"),
    as_json: bool = JSON,
) -> None:
    """Detect defects; write JSON (class, score, box in px and mm, size in mm) and annotated images."""
    import dataclasses

    from manufacturing.defects.calibration import Calibration
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.moe_stage import CropMoEClassifier
    from manufacturing.defects.pipeline import DefectInspector, InspectionConfig, predict_to_folder

    model = _model_or_shipped(model)
    cal = Calibration.from_file(calibration) if calibration else Calibration()
    if reference is not None:
        from manufacturing.defects.dataset import load_image

        try:
            width_mm, height_mm = (float(v) for v in reference_mm.lower().split("x"))
        except ValueError:
            raise UserInputError(f"--reference-mm must be WIDTHxHEIGHT in mm, got {reference_mm!r}") from None
        cal = Calibration.from_reference(load_image(reference), width_mm=width_mm, height_mm=height_mm,
                                         min_size_mm=cal.min_size_mm)
        output.note(f"calibrated from {reference}: {cal.mm_per_pixel_x:.4g} x {cal.mm_per_pixel_y:.4g} mm/px")
    if mm_per_pixel is not None:
        cal = dataclasses.replace(cal, mm_per_pixel_x=mm_per_pixel, mm_per_pixel_y=mm_per_pixel)
    if min_size_mm is not None:
        cal = dataclasses.replace(cal, min_size_mm=min_size_mm)
    with output.third_party_output_to(out / "logs" / "defects.log"):
        inspector = DefectInspector(detector=YoloDetector.load(model), calibration=cal,
                                    second_stage=CropMoEClassifier.load(moe_stage)[0] if moe_stage else None,
                                    config=InspectionConfig(conf=conf))
        payload = predict_to_folder(inspector, data, out)
    found = sum(len(image["defects"]) for image in payload["images"])
    output.say(f"{found} defects in {len(payload['images'])} images; wrote {out / 'predictions.json'}",
               as_json=as_json)
    if as_json:
        output.emit("defects.predict", {"data": str(data), "model": str(model), "out": str(out),
                                        "predictions": str(out / "predictions.json"),
                                        "images": len(payload["images"]), "defects": found})


@defects_app.command("export")
def defects_export(
    model: Path = typer.Option(..., help="detector checkpoint (.pt)"),
    data: Path = typer.Option(..., help="VOC folder of real images for INT8 calibration and the parity check"),
    moe_stage: Path = typer.Option(None, "--moe-stage", help="MoE stage (.pt) to export as well (was --moe)"),
    out: Path = typer.Option(Path("runs/defects/export"), help="folder for the ONNX files and export.json"),
    int8: bool = typer.Option(True, help="also write a static INT8 ONNX for edge devices"),
    split: Path = typer.Option(None, help="split file whose train images calibrate INT8 (default: the "
                                          "split.json beside the model, when there is one)"),
    as_json: bool = JSON,
) -> None:
    """ONNX export (FP32, INT8) with a PyTorch vs onnxruntime parity check on real images (export.json)."""
    from manufacturing.defects.workflow import export_job

    with output.third_party_output_to(out / "logs" / "defects.log"):
        result = export_job(model, out, data, moe_path=moe_stage, int8=int8, split_file=split)
    parity = result["parity"]
    output.say(f"parity on {parity['images']} images: boxes within {parity['max_box_difference_px']:.2g} px "
               f"(tolerance {parity['box_tolerance_px']}), scores within {parity['max_score_difference']:.2g} "
               f"(tolerance {parity['score_tolerance']}): {'passed' if parity['passed'] else 'FAILED'}; wrote "
               f"{out / 'export.json'}", as_json=as_json)
    if as_json:
        output.emit("defects.export", {"model": str(model), "data": str(data), "out": str(out), **result})
    if not parity["passed"]:
        raise typer.Exit(1)


@defects_app.command("annotate")
def defects_annotate(
    pool: Path = typer.Option(..., help="annotation pool folder (versioned; made on the first run)"),
    model: Path = typer.Option(None, help="a `defects train` run folder or its detector file (.pt or .onnx)"),
    data: Path = typer.Option(None, help="new images: a folder or one image file"),
    import_export: Path = typer.Option(None, "--import", help="reviewers' Label Studio JSON export to take back "
                                                              "into the pool (instead of --model/--data)"),
    threshold: float = typer.Option(0.9, help="auto-accept an image when it has a box and every box scores at "
                                              "least this (else it is queued for review)"),
    floor: float = typer.Option(0.25, help="score from which a box counts as reported (below: ignored)"),
    calibrate: Path = typer.Option(None, help="a VOC folder of labelled images the detector was not trained on: "
                                              "fit an isotonic map from score to the chance a box is right, apply "
                                              "--threshold to calibrated scores, and store the map in the pool"),
    out: Path = typer.Option(None, help="review folder: tasks.json (Label Studio import with pre-annotations), "
                                        "labeling_config.xml, images/ (default POOL/review/<UTC time>)"),
    image_url: str = typer.Option("/data/local-files/?d=images/", help="prefix of each task's data.image before "
                                  "the file name (default: Label Studio local files with "
                                  "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the review folder)"),
    as_json: bool = JSON,
) -> None:
    """The annotation loop: auto-accept confident detections into a versioned pool, queue the rest as a
    Label Studio import; `--import` takes the reviewers' export back. Writes the new version as VOC."""
    import datetime

    from manufacturing.defects.annotation import AcceptRule, AnnotationPool, annotate, import_review, read_new_images

    if import_export is not None:
        if model is not None or data is not None or calibrate is not None:
            raise UserInputError("give either --import EXPORT or --model and --data (and --calibrate), not both")
        annotation_pool = AnnotationPool.open(pool)
        result = import_review(annotation_pool, import_export)
        summary = (f"imported {result['reviewed']} reviewed images ({result['added']} added, {result['relabelled']} "
                   f"relabelled, {result['unchanged']} unchanged); {result['queue_total']} still queued")
    else:
        if model is None or data is None:
            raise UserInputError("--model and --data are needed (or --import EXPORT)")
        try:
            rule = AcceptRule(threshold=threshold, floor=floor)
        except ValueError as error:
            raise UserInputError(f"--threshold/--floor: {error}") from None
        from core.onnx_export import file_sha256
        from manufacturing.defects.detector import YoloDetector
        from manufacturing.defects.workflow import DETECTOR_FILE

        detector_file = model / DETECTOR_FILE if model.is_dir() else model
        images = read_new_images(data)
        with output.third_party_output_to(Path("runs/logs/defects-annotate.log")):
            detector = YoloDetector.load(detector_file)
        annotation_pool = AnnotationPool.open(pool, classes=detector.names)
        detector_hash, calibration = file_sha256(detector_file), None
        if calibrate is not None:
            from manufacturing.defects.confidence import fit_score_calibration
            from manufacturing.defects.dataset import load_image
            from manufacturing.defects.voc import read_voc_folder

            labelled = read_voc_folder(calibrate)
            found = []
            for start in range(0, len(labelled), 16):  # decoded a batch at a time
                found += detector.detect([load_image(r.image_path) for r in labelled[start:start + 16]],
                                         conf=rule.floor)
            calibration = fit_score_calibration(found, labelled, names=detector.names, model=detector_hash,
                                                floor=rule.floor)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        if out is not None and out.exists():
            raise UserInputError(f"--out {out}: exists; choose a new review folder")
        review_dir, n = out or pool / "review" / stamp, 2
        while review_dir.exists():  # two runs within one second: the default folder takes a suffix
            review_dir, n = pool / "review" / f"{stamp}-{n}", n + 1
        result = annotate(annotation_pool, detector, images, rule=rule, review_dir=review_dir, image_url=image_url,
                          model_name=f"{detector_file.name}@{detector_hash[:12]}", calibration=calibration)
        summary = (f"{result['auto_accepted']} of {result['images']} images auto-accepted (every box >= "
                   f"{threshold}{', calibrated' if calibration else ''}), {result['queued']} queued for review"
                   + (f" in {result['tasks']}" if result["tasks"] else "")
                   + (f", {result['skipped_known']} already in the pool or queue" if result["skipped_known"] else ""))
    result["voc"] = str(annotation_pool.write_voc(result["version"])) if result["version"] else None
    output.say(f"{summary}; pool version {(result['version'] or 'none')[:16]}"
               + (f", VOC for `defects train --data`: {result['voc']}" if result["voc"] else ""), as_json=as_json)
    if as_json:
        output.emit("defects.annotate", {"pool": str(pool), "model": None if model is None else str(model),
                                         "data": str(import_export if import_export is not None else data),
                                         "out": str(Path(result["tasks"]).parent if result.get("tasks") else pool),
                                         **result})
