"""The defect-detection part of `moeworks demo`: generated images, the shipped detector fine-tuned on them, a
prediction in mm."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from manufacturing.defects.calibration import Calibration
from manufacturing.defects.detector import YoloDetector
from manufacturing.defects.moe_stage import CropMoEClassifier, CropTrainingConfig
from manufacturing.defects.pipeline import DefectInspector, InspectionConfig, draw, evaluate_records
from manufacturing.defects.synthetic import SyntheticConfig, planted_image, write_synthetic_voc
from manufacturing.defects.train import DetectorConfig
from manufacturing.defects.voc import read_voc_folder
from manufacturing.defects.workflow import SPLIT_FILE, TrainJob, records_by_split, train_job

# Fine-tuning the shipped detector on the generated surfaces: mosaic off (on 100-odd small images it
# shrinks the defects and slowed learning), a short warm-up, batch 8 at 128 px (the images' size).
# Measured with an epoch-23 snapshot of the NEU-DET run (2026-12-05, 1 torch thread): 25 epochs on 128
# images reached mAP50 0.617 in 73 CPU-seconds (10 epochs: 0.327; batch 4 x 12 epochs: 0.470; from
# scratch, 12 epochs: 0.000). The whole defects demo from the provisional shipped file (best of the run's
# first 50 epochs): YOLO mAP50 0.715, YOLO + MoE 0.681, 91 CPU-seconds (1 thread: ~1.5 min on 2 idle cores).
DEMO_IMAGES, QUICK_IMAGES = 128, 64
DEMO_EPOCHS, QUICK_EPOCHS = 25, 6


def starting_weights() -> tuple[str | None, str]:
    """The shipped NEU-DET detector's path (hash checked) to fine-tune from, or None to train from
    scratch; and the sentence that says which the demo did."""
    from manufacturing.defects.errors import DefectDataError
    from manufacturing.defects.shipped import verified_path

    try:
        path = verified_path()
    except DefectDataError as error:
        return None, f"YOLO trained from scratch (no usable shipped detector: {error})"
    return str(path), f"the shipped NEU-DET detector ({path.name}) fine-tuned"


def run_defects_demo(out_dir: Path, *, quick: bool = False, console: Console | None = None) -> dict:
    """Fine-tune the shipped detector (+ train the MoE stage) on generated images, score them, and
    inspect a large generated frame, reporting defects in mm."""
    console = console or Console()
    console.rule("[bold]manufacturing: YOLO + MoE defect detection on GENERATED surface images")
    started = time.perf_counter()
    out_dir = Path(out_dir) / "defects"
    voc = write_synthetic_voc(out_dir / "generated_voc",
                              SyntheticConfig(images=QUICK_IMAGES if quick else DEMO_IMAGES, size=128))
    weights, how = starting_weights()
    epochs = QUICK_EPOCHS if quick else DEMO_EPOCHS
    job = TrainJob(detector=DetectorConfig(imgsz=128, epochs=epochs, batch=8, workers=0, cache=False,
                                           warmup_epochs=0.5, mosaic=0.0, close_mosaic=0, weights=weights),
                   moe_training=CropTrainingConfig(epochs=3 if quick else 8, progress=False))
    console.print(f"detector: {how} for {epochs} epochs on {job.detector.imgsz} px GENERATED images")
    trained = train_job(voc, out_dir / "run", job, verbose=False)
    detector = YoloDetector.load(trained["detector"])
    stage, _ = CropMoEClassifier.load(Path(trained["moe_stage"]))
    calibration = Calibration(mm_per_pixel_x=0.05, mm_per_pixel_y=0.05, min_size_mm=0.2)
    inspector = DefectInspector(detector=detector, calibration=calibration, second_stage=stage,
                                config=InspectionConfig(conf=0.1))
    val = records_by_split(read_voc_folder(voc), out_dir / "run" / SPLIT_FILE)
    metrics = evaluate_records(inspector, val, progress=False)

    # A line-scan-like frame, wider than two detector inputs, so it is inspected in tiles.
    rng = np.random.default_rng(7)
    frame = np.hstack([planted_image(rng, 128, 2)[0] for _ in range(4)])
    frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    defects = inspector.report(inspector.detect([frame])[0])
    cv2.imwrite(str(out_dir / "frame.annotated.jpg"), draw(frame, defects))
    (out_dir / "frame.predictions.json").write_text(json.dumps({"generated": True, "defects": defects}, indent=1))

    table = Table(title=f"{len(val)} generated validation images, {job.detector.imgsz} px, after "
                        f"{trained['epochs']} fine-tune epochs" if weights else
                        f"{len(val)} generated validation images, {job.detector.imgsz} px, {trained['epochs']} "
                        "epochs from scratch")
    table.add_column("model")
    table.add_column("mAP50", justify="right")
    table.add_column("mAP50-95", justify="right")
    for variant, m in metrics.items():
        table.add_row(variant, f"{m['mAP50']:.3f}", f"{m['mAP50-95']:.3f}")
    console.print(table)
    console.print(f"a {frame.shape[1]}x{frame.shape[0]} px generated frame, tiled at {detector.imgsz} px: "
                  f"{len(defects)} defects reported at score >= 0.1 (0.05 mm/px; smallest reported 0.2 mm); "
                  f"annotated image and JSON in {out_dir}")
    for defect in defects[:3]:  # the highest scores: what a line operator would see first
        console.print(f"  {defect['class']:<10} score {defect['score']:.2f}  {defect['width_mm']:.2f} x "
                      f"{defect['height_mm']:.2f} mm at x {defect['box_mm'][0]:.1f}-{defect['box_mm'][2]:.1f} mm")
    console.print("[dim]Generated surfaces, a demo-length fine-tune: on your own line, label images and run "
                  "`moeworks defects train --weights manufacturing/defects/weights/neu_det.pt --data YOUR_VOC` "
                  "(the shipped detector's card: manufacturing/defects/weights/neu_det.md).")
    seconds = time.perf_counter() - started
    console.print(f"defects demo took {seconds:.0f} s")
    return {"metrics": metrics, "frame_defects": len(defects), "seconds": seconds,
            "start": "shipped" if weights else "scratch", "epochs": trained["epochs"]}
