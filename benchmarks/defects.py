"""Defect detection on NEU-DET: YOLO alone vs YOLO + MoE, PyTorch vs ONNX vs INT8 ONNX.

Trains YOLO from its model YAML (no pretrained weights) on a seeded 8:2 split, trains the MoE crop
stage on the training split, then on the validation split measures mAP50 / mAP50-95 for each
variant and per-image latency for each runtime. Writes a JSON results file and prints a table.

    python benchmarks/defects.py --imgsz 192 --hours 0.7 --json          # what fits a shared CPU
    python benchmarks/defects.py --imgsz 640 --epochs 200 --device 0     # the published protocol
    python benchmarks/defects.py --weights runs/bench-defects/detector.pt  # re-measure a trained model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from manufacturing.defects.detector import YoloDetector, to_input  # noqa: E402
from manufacturing.defects.moe_stage import CropMoEClassifier, CropTrainingConfig  # noqa: E402
from manufacturing.defects.pipeline import DefectInspector, evaluate_records  # noqa: E402
from manufacturing.defects.train import DetectorConfig  # noqa: E402
from manufacturing.defects.voc import read_voc_folder, seeded_split  # noqa: E402
from manufacturing.defects.workflow import (  # noqa: E402
    MOE_FILE,
    TrainJob,
    export_job,
    fit_moe_stage,
    sample_images,
    train_job,
)

PUBLISHED = {"YOLO11n (COCO-pretrained, 640 px)": 0.753, "YOLOv8n (COCO-pretrained, 640 px)": 0.78}
TARGET_MAP50 = 0.75


def latency_ms(detector: YoloDetector, images, repeats: int) -> float:
    """Median wall time of one image through preprocessing and the network (batch 1)."""
    times = []
    for i in range(repeats):
        batch, _ = to_input([images[i % len(images)]], detector.imgsz)
        started = time.perf_counter()
        detector.raw(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[2:] if len(times) > 4 else times)  # first calls warm caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("MOEWORKS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=root / "neu_det", help="NEU-DET VOC folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-defects"))
    parser.add_argument("--imgsz", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--hours", type=float, default=0.0, help="training wall-clock budget (0: none)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moe-epochs", type=int, default=CropTrainingConfig.epochs)
    parser.add_argument("--weights", type=Path, help="an already trained detector: skip YOLO training")
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1,
                        help="per runtime; on a shared, loaded CPU more threads spin and slow down")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    records = read_voc_folder(args.data)
    train, val = seeded_split(records, val_fraction=0.2, seed=args.seed)
    moe_training = CropTrainingConfig(seed=args.seed, epochs=args.moe_epochs)
    if args.weights is None:
        job = TrainJob(detector=DetectorConfig(imgsz=args.imgsz, epochs=args.epochs, time=args.hours or None,
                                               batch=args.batch, device=args.device, seed=args.seed),
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
        started = time.perf_counter()
        stage = fit_moe_stage(YoloDetector.load(detector_path), train, moe_training)
        moe_path = stage.save(out / MOE_FILE, names=YoloDetector.load(detector_path).names)
        trained["moe_train_seconds"] = round(time.perf_counter() - started, 1)

    detector = YoloDetector.load(detector_path)
    stage, _ = CropMoEClassifier.load(moe_path)
    metrics = evaluate_records(DefectInspector(detector=detector, second_stage=stage), val)
    exported = export_job(detector_path, out / "export", args.data, moe_path=moe_path)
    for variant, path in (("onnx", exported["detector_onnx"]), ("onnx-int8", exported["detector_int8_onnx"])):
        metrics[variant] = evaluate_records(DefectInspector(detector=YoloDetector.load(path)), val)["yolo"]
    images = sample_images(val, 16, seed=2)
    latency = {"pytorch": latency_ms(detector, images, args.latency_repeats)}
    for variant, path in (("onnx", exported["detector_onnx"]), ("onnx-int8", exported["detector_int8_onnx"])):
        latency[variant] = latency_ms(YoloDetector.load(path, threads=args.threads), images, args.latency_repeats)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
               "load_average_1m": os.getloadavg()[0]}
    results = {
        "data": str(args.data), "train_images": len(train), "val_images": len(val), "split_seed": args.seed,
        "epochs": trained.get("epochs"), "imgsz": detector.imgsz, "train_seconds": trained.get("train_seconds"),
        "train_images_per_second": trained.get("train_images_per_second"),
        "moe_train_seconds": trained.get("moe_train_seconds"),
        "mAP50": {k: m["mAP50"] for k, m in metrics.items()},
        "mAP50-95": {k: m["mAP50-95"] for k, m in metrics.items()},
        "per_class_AP50": {k: {c: v["AP50"] for c, v in m["per_class"].items()} for k, m in metrics.items()},
        "precision": {k: m["precision"] for k, m in metrics.items()},
        "recall": {k: m["recall"] for k, m in metrics.items()},
        "latency_ms_per_image": latency, "parity": exported["parity"],
        "moe_onnx_max_abs_logit_difference": exported.get("moe_max_abs_logit_difference"),
        "target_mAP50": TARGET_MAP50, "published_mAP50": PUBLISHED, "machine": machine,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    base = metrics["yolo"]["mAP50"]
    table = Table(title=f"NEU-DET val ({len(val)} images), YOLO11n from scratch, {results['epochs']} epochs at "
                        f"{detector.imgsz} px; {machine['cpu_count']} CPUs ({machine['processor']})")
    for column in ("variant", "mAP50", "vs YOLO", "mAP50-95", "precision", "recall", "ms / image", "vs PyTorch"):
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
    console.print(f"training: {results['train_seconds']} s, {results['train_images_per_second']} images/s; "
                  f"MoE stage {results['moe_train_seconds']} s. Target mAP50 {TARGET_MAP50}: gap "
                  f"{TARGET_MAP50 - base:+.3f}. Published (COCO-pretrained, 640 px): {PUBLISHED}")
    console.print(f"parity PyTorch vs ONNX: {exported['parity']}; results in {out / 'results.json'}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
