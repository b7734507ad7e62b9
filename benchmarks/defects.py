"""Defect detection on NEU-DET: YOLO alone vs YOLO + MoE, PyTorch vs ONNX vs INT8 ONNX.

Trains YOLO from its model YAML (no pretrained weights) on a seeded 8:2 split, trains the MoE crop
stage on the training split, then on the validation split measures mAP50 / mAP50-95 for each
variant, and, in one timed section under the shared bench lock: per-image latency of the network
alone; per-image latency end to end for YOLO alone and YOLO + MoE stage (the stage batched over
each image's crops) in PyTorch, ONNX and ONNX INT8; and network throughput at batch 1 and 8.
Writes a JSON results file and prints tables.

    python -m benchmarks.defects --imgsz 192 --hours 0.7 --json          # what fits a shared CPU
    python -m benchmarks.defects --imgsz 640 --epochs 200 --device 0     # the published protocol
    python -m benchmarks.defects --weights runs/bench-defects/detector.pt  # re-measure a trained model

Run it under `nice -n 19`: training and evaluation stay at low priority, and the timed section
alone takes the lock (`--lock`) and returns to normal priority while it holds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, timed_section, write_results
from benchmarks.fixtures import add_data_argument, detector_latency_ms, detector_throughput
from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import Detections, YoloDetector
from manufacturing.defects.moe_stage import CropMoEClassifier, CropTrainingConfig
from manufacturing.defects.pipeline import DefectInspector, InspectionConfig, evaluate_records
from manufacturing.defects.train import DetectorConfig
from manufacturing.defects.voc import read_voc_folder, seeded_split, write_split
from manufacturing.defects.workflow import (
    MOE_FILE,
    TrainJob,
    export_job,
    fit_moe_stage,
    train_job,
)

PUBLISHED = {"YOLO11n (COCO-pretrained, 640 px)": 0.753, "YOLOv8n (COCO-pretrained, 640 px)": 0.78}
TARGET_MAP50 = 0.75


def end_to_end_ms(inspector: DefectInspector, images, gt_boxes, repeats: int) -> dict:
    """Per-image cost of YOLO alone and of YOLO + MoE stage, measured on the same calls.

    Each repeat times, for one image: the detector (letterbox, network, NMS at the reporting
    threshold), then the MoE stage on its boxes (crops, one batched call over the image's crops,
    blend, NMS), as `DefectInspector.detect` runs them; then, separately, the MoE stage on the
    image's ground-truth boxes: the crop count a detector at the target would send it.
    """
    stage, cfg = inspector.second_stage, inspector.config
    yolo, moe, moe_gt, boxes, gt_counts = [], [], [], [], []
    for i in range(repeats):
        image, gt = images[i % len(images)], gt_boxes[i % len(images)]
        started = time.perf_counter()
        (dets,) = inspector.detect([image], use_second_stage=False)
        detected = time.perf_counter()
        rescored = stage.rescore(image, dets, iou=cfg.iou)
        rescored.select(rescored.scores >= cfg.conf)
        rescored_at = time.perf_counter()
        unsure = np.full((len(gt), len(inspector.detector.names)), 0.5, np.float32)
        stage.rescore(image, Detections(gt, unsure.max(1), np.zeros(len(gt), np.int64), unsure), iou=cfg.iou)
        gt_done = time.perf_counter()
        yolo.append((detected - started) * 1000)
        moe.append((rescored_at - detected) * 1000)
        moe_gt.append((gt_done - rescored_at) * 1000)
        boxes.append(len(dets))
        gt_counts.append(len(gt))
    warm = slice(2, None) if repeats > 4 else slice(None)  # first calls warm caches
    yolo, moe, moe_gt, boxes, gt_counts = (x[warm] for x in (yolo, moe, moe_gt, boxes, gt_counts))
    yolo_ms, both_ms = statistics.median(yolo), statistics.median([a + b for a, b in zip(yolo, moe, strict=True)])
    # The stage's own cost as a mean: most images of a weak detector send it no box, so its median is ~0.
    return {"yolo_ms": yolo_ms, "yolo_moe_ms": both_ms, "moe_ms_mean": statistics.mean(moe),
            "moe_cost_ratio": both_ms / yolo_ms, "boxes_per_image": statistics.mean(boxes),
            "moe_ms_per_box": sum(moe) / sum(boxes) if sum(boxes) else None,
            "moe_on_ground_truth_ms": statistics.median(moe_gt),
            "ground_truth_boxes_per_image": statistics.mean(gt_counts),
            "yolo_moe_on_ground_truth_ratio": (yolo_ms + statistics.median(moe_gt)) / yolo_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, under="neu_det", what="NEU-DET VOC folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-defects"))
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--hours", type=float, default=0.0, help="training wall-clock budget (0: none)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="YOLO dataloader processes (2 on the shared CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moe-epochs", type=int, default=CropTrainingConfig.epochs)
    parser.add_argument("--weights", type=Path, help="an already trained detector: skip YOLO training")
    parser.add_argument("--moe-weights", type=Path, help="an already trained MoE stage (.pt) for --weights")
    parser.add_argument("--latency-repeats", type=int, default=60)
    parser.add_argument("--throughput-batch", type=int, default=8, help="compared with batch 1")
    parser.add_argument("--throughput-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="per runtime; on a shared, loaded CPU more threads spin and slow down")
    parser.add_argument("--lock", default="/tmp/moeworks-bench.lock",
                        help="flock held (at normal priority) while timing; '' for none")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json, width=150)  # wide tables also when written to a log
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    records = read_voc_folder(args.data)
    train, val = seeded_split(records, val_fraction=0.2, seed=args.seed)
    moe_training = CropTrainingConfig(seed=args.seed, epochs=args.moe_epochs)
    if args.weights is None:
        job = TrainJob(detector=DetectorConfig(imgsz=args.imgsz, epochs=args.epochs, time=args.hours or None,
                                               batch=args.batch, workers=args.workers, device=args.device,
                                               seed=args.seed),
                       split_seed=args.seed, moe_training=moe_training)
        trained = train_job(args.data, out, job)
        detector_path, moe_path = Path(trained["detector"]), Path(trained["moe_stage"])
    else:
        detector_path = args.weights
        trained = {"detector": str(args.weights)}
        # The training record of `defects train` (train_result.json) or of train_detector (train_summary.json).
        for folder in list(args.weights.resolve().parents)[:3]:
            if (folder / "train_result.json").exists():
                trained = json.loads((folder / "train_result.json").read_text())
                break
            if (folder / "train_summary.json").exists():
                summary = json.loads((folder / "train_summary.json").read_text())
                trained = {"epochs": summary["epochs"], "train_seconds": round(summary["seconds"], 1),
                           "train_images_per_second": round(summary["images_per_second"], 2)}
                break
        if args.moe_weights is not None:
            moe_path = args.moe_weights
        else:
            started = time.perf_counter()
            stage = fit_moe_stage(YoloDetector.load(detector_path), train, moe_training)
            moe_path = stage.save(out / MOE_FILE, names=YoloDetector.load(detector_path).names)
            trained["moe_train_seconds"] = round(time.perf_counter() - started, 1)
            trained["moe_epochs"] = args.moe_epochs

    detector = YoloDetector.load(detector_path)
    stage, _ = CropMoEClassifier.load(moe_path)
    metrics = evaluate_records(DefectInspector(detector=detector, second_stage=stage), val)
    split_file = write_split(out / "split.json", train, val, seed=args.seed, val_fraction=0.2, source=str(args.data))
    exported = export_job(detector_path, out / "export", args.data, moe_path=moe_path, split_file=split_file)
    for variant, path in (("onnx", exported["detector_onnx"]), ("onnx-int8", exported["detector_int8_onnx"])):
        metrics[variant] = evaluate_records(DefectInspector(detector=YoloDetector.load(path)), val)["yolo"]

    # Timed section: every model loaded first, so the lock is held for timing alone.
    chosen = sorted(np.random.default_rng(2).choice(len(val), size=min(16, len(val)), replace=False))
    images = [load_image(val[i].image_path) for i in chosen]
    gt_boxes = [val[i].boxes for i in chosen]
    detectors = {"pytorch": detector,
                 "onnx": YoloDetector.load(exported["detector_onnx"], threads=args.threads),
                 "onnx-int8": YoloDetector.load(exported["detector_int8_onnx"], threads=args.threads)}
    onnx_stage, _ = CropMoEClassifier.load(exported["moe_onnx"], threads=args.threads)
    stages = {"pytorch": stage, "onnx": onnx_stage, "onnx-int8": onnx_stage}
    with timed_section(args.lock) as timing:
        latency = {k: detector_latency_ms(d, images, args.latency_repeats) for k, d in detectors.items()}
        end_to_end = {k: end_to_end_ms(DefectInspector(detector=d, second_stage=stages[k]), images, gt_boxes,
                                       args.latency_repeats) for k, d in detectors.items()}
        rates = {k: {str(b): detector_throughput(d, images, b, args.throughput_rounds)
                     for b in (1, args.throughput_batch)} for k, d in detectors.items()}

    measured_on = {**machine(), "onnxruntime_threads": args.threads, "device": args.device}
    gain = metrics["yolo+moe"]["mAP50"] - metrics["yolo"]["mAP50"]
    results = {
        "data": str(args.data), "train_images": len(train), "val_images": len(val), "split_seed": args.seed,
        "detector": str(detector_path), "moe_stage": str(moe_path),
        "epochs": trained.get("epochs"), "imgsz": detector.imgsz, "train_seconds": trained.get("train_seconds"),
        "train_images_per_second": trained.get("train_images_per_second"),
        "moe_train_seconds": trained.get("moe_train_seconds"), "moe_epochs": trained.get("moe_epochs"),
        "mAP50": {k: m["mAP50"] for k, m in metrics.items()},
        "mAP50-95": {k: m["mAP50-95"] for k, m in metrics.items()},
        "per_class_AP50": {k: {c: v["AP50"] for c, v in m["per_class"].items()} for k, m in metrics.items()},
        "precision": {k: m["precision"] for k, m in metrics.items()},
        "recall": {k: m["recall"] for k, m in metrics.items()},
        "moe_stage_mAP50_gain": gain,
        "latency_ms_per_image": latency, "end_to_end_ms_per_image": end_to_end,
        "throughput_images_per_second": rates, "timing": timing,
        "parity": exported["parity"], "int8_difference": exported.get("int8_difference"),
        "moe_parity": exported.get("moe_parity"),
        "moe_onnx_max_abs_logit_difference": exported.get("moe_max_abs_logit_difference"),
        "target_mAP50": TARGET_MAP50, "published_mAP50": PUBLISHED, "machine": measured_on,
    }

    base = metrics["yolo"]["mAP50"]
    table = Table(title=f"NEU-DET val ({len(val)} images), YOLO11n from scratch, {results['epochs']} epochs at "
                        f"{detector.imgsz} px; {measured_on['logical_cores']} CPUs ({measured_on['processor']})")
    for column in ("variant", "mAP50", "vs YOLO", "mAP50-95", "precision", "recall", "network ms", "vs PyTorch"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, m in metrics.items():
        runtime = {"yolo": "pytorch", "onnx": "onnx", "onnx-int8": "onnx-int8"}.get(variant)
        ms = latency.get(runtime) if runtime else None
        table.add_row(variant, f"{m['mAP50']:.3f}", f"{m['mAP50'] / max(base, 1e-9):.2f}x", f"{m['mAP50-95']:.3f}",
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{ms:.1f}" if ms else "-",
                      f"{latency['pytorch'] / ms:.2f}x faster" if ms else "-")
    console.print(table)
    per_class = Table(title="per-class AP50")
    per_class.add_column("class")
    for variant in metrics:
        per_class.add_column(variant, justify="right")
    for name in detector.names:
        per_class.add_row(name, *[f"{metrics[v]['per_class'][name]['AP50']:.3f}" for v in metrics])
    console.print(per_class)
    cost = Table(title=f"per image, end to end (letterbox, network, NMS at conf {InspectionConfig.conf}; MoE: "
                       f"crops, one batched call, blend, NMS), median ms, {args.threads} thread(s)")
    for column in ("runtime", "YOLO", "YOLO + MoE", "MoE (mean)", "cost", "boxes / image", "MoE on GT boxes",
                   "GT boxes / image", "cost at GT"):
        cost.add_column(column, justify="left" if column == "runtime" else "right")
    for runtime, e in end_to_end.items():
        cost.add_row(runtime, f"{e['yolo_ms']:.1f}", f"{e['yolo_moe_ms']:.1f}", f"{e['moe_ms_mean']:.1f}",
                     f"{e['moe_cost_ratio']:.2f}x", f"{e['boxes_per_image']:.1f}", f"{e['moe_on_ground_truth_ms']:.1f}",
                     f"{e['ground_truth_boxes_per_image']:.1f}", f"{e['yolo_moe_on_ground_truth_ratio']:.2f}x")
    console.print(cost)
    batch = str(args.throughput_batch)
    rate_table = Table(title="network throughput, images/s (preprocessed batches)")
    for column in ("runtime", "batch 1", f"batch {batch}", "ratio"):
        rate_table.add_column(column, justify="left" if column == "runtime" else "right")
    for runtime, r in rates.items():
        rate_table.add_row(runtime, f"{r['1']:.1f}", f"{r[batch]:.1f}", f"{r[batch] / r['1']:.2f}x")
    console.print(rate_table)
    console.print(f"training: {results['train_seconds']} s, {results['train_images_per_second']} images/s; "
                  f"MoE stage {results['moe_train_seconds']} s. MoE stage: {gain:+.3f} mAP50 for "
                  f"{end_to_end['onnx']['moe_cost_ratio']:.2f}x the ONNX per-image time. Target mAP50 "
                  f"{TARGET_MAP50}: gap {TARGET_MAP50 - base:+.3f}. Published (COCO-pretrained, 640 px): {PUBLISHED}")
    console.print(f"timing: {timing}; parity PyTorch vs ONNX: {exported['parity']}; "
                  f"MoE stage: {exported.get('moe_parity')}; results in {out / 'results.json'}")
    write_results(results, out / "results.json", as_json=args.json)


if __name__ == "__main__":
    main()
