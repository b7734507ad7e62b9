"""INT8 variants of the defect detector: mAP and speed of each static QDQ recipe against FP32 ONNX.

Each variant is named `<float part>-<calibration>-<images>[-symmetric][-per-tensor]`:
  float part   decode (box decoding after the DFL stays float) or outputs (also the Detect head's
               output convolutions and DFL: what `float_nodes` keeps)
  calibration  minmax, percentile (99.999) or entropy, over <images> training-split images
  -symmetric   symmetric activation ranges; -per-tensor one weight scale per tensor
On the validation split of the seeded split (the calibration images come from its training split,
never from the images mAP is measured on): mAP50 and mAP50-95 of FP32 ONNX and of every variant;
then, in one timed section under the shared bench lock, median batch-1 latency and batch-8
throughput of each, side by side. The rule that picks the export's default is printed with its
choice: the fastest variant (batch-8 images/s) whose mAP50 and mAP50-95 are both within 1% relative
of FP32; variants within 5% of the fastest count as equally fast, and the most accurate of them wins.

    nice -n 19 python benchmarks/defects_int8.py --weights runs/bench-neu/yolo/weights/best.pt --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.defects import latency_ms, throughput, timed_section  # noqa: E402
from manufacturing.defects.dataset import load_image  # noqa: E402
from manufacturing.defects.detector import YoloDetector  # noqa: E402
from manufacturing.defects.export import Int8Recipe, export_detector_onnx, quantize_detector_int8  # noqa: E402
from manufacturing.defects.pipeline import DefectInspector, evaluate_records  # noqa: E402
from manufacturing.defects.voc import read_voc_folder, seeded_split  # noqa: E402
from manufacturing.defects.workflow import sample_images  # noqa: E402

DEFAULT_VARIANTS = ("decode-minmax-64,decode-minmax-256,outputs-minmax-64,outputs-minmax-256,"
                    "outputs-percentile-256,outputs-entropy-256,outputs-minmax-256-symmetric,"
                    "outputs-minmax-256-per-tensor")
GATE = 0.01  # the seed's accuracy gate: under 1% relative loss
SAME_SPEED = 0.05  # throughput differences under 5% are within this machine's run-to-run noise


def parse_variant(name: str) -> tuple[Int8Recipe, int]:
    """`outputs-minmax-256-symmetric` -> (Int8Recipe(...), 256 calibration images)."""
    parts = name.split("-")
    flags = set(parts[3:])
    assert len(parts) >= 3 and parts[0] in ("decode", "outputs") and parts[1] in ("minmax", "percentile", "entropy") \
        and parts[2].isdigit() and flags <= {"symmetric", "per", "tensor"}, f"bad variant name {name!r}"
    recipe = Int8Recipe(keep_float=parts[0], calibration=parts[1], symmetric_activations="symmetric" in flags,
                        per_channel="tensor" not in flags)
    return recipe, int(parts[2])


def choose(results: dict[str, dict], fp32: dict) -> tuple[str | None, str]:
    """The variant the rule of the module docstring picks, and why."""
    def loss(r, key):
        return (fp32[key] - r[key]) / fp32[key]

    passing = {n: r for n, r in results.items() if loss(r, "mAP50") < GATE and loss(r, "mAP50-95") < GATE}
    if not passing:
        return None, "no variant within 1% relative mAP50 and mAP50-95"
    fastest = max(r["images_per_second_batch8"] for r in passing.values())
    tied = {n: r for n, r in passing.items() if r["images_per_second_batch8"] >= (1 - SAME_SPEED) * fastest}
    chosen = max(tied, key=lambda n: (tied[n]["mAP50"], tied[n]["mAP50-95"]))
    return chosen, (f"{len(passing)} of {len(results)} within 1%; {len(tied)} within {SAME_SPEED:.0%} of the "
                    f"fastest ({fastest:.1f} images/s at batch 8); the most accurate of them")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("MOEWORKS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--weights", type=Path, required=True, help="a trained detector checkpoint (.pt)")
    parser.add_argument("--data", type=Path, default=root / "neu_det", help="NEU-DET VOC folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 8:2 split")
    parser.add_argument("--calibration-seed", type=int, default=0, help="which training images calibrate")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list (see the names above)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-defects-int8"))
    parser.add_argument("--latency-repeats", type=int, default=60)
    parser.add_argument("--throughput-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--lock", default="/tmp/moeworks-bench.lock", help="flock held while timing; '' for none")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json, width=150)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = {name: parse_variant(name) for name in filter(None, args.variants.split(","))}

    train, val = seeded_split(read_voc_folder(args.data), val_fraction=0.2, seed=args.seed)
    assert not {r.name for r in train} & {r.name for r in val}, "calibration images overlap the validation split"
    detector = YoloDetector.load(args.weights)
    fp32_path = export_detector_onnx(detector, out / "detector.onnx")

    def evaluate(path: Path) -> dict:
        metrics = evaluate_records(DefectInspector(detector=YoloDetector.load(path)), val, progress=False)["yolo"]
        return {"mAP50": metrics["mAP50"], "mAP50-95": metrics["mAP50-95"],
                "per_class_AP50": {c: v["AP50"] for c, v in metrics["per_class"].items()}}

    with console.status("FP32 ONNX: mAP on the validation split"):
        fp32 = evaluate(fp32_path)
    calibration_sets: dict[int, list] = {}
    results: dict[str, dict] = {}
    for name, (recipe, count) in variants.items():
        with console.status(f"{name}: quantizing on {count} training images, then mAP"):
            if count not in calibration_sets:
                calibration_sets[count] = sample_images(train, count, seed=args.calibration_seed)
            path = quantize_detector_int8(fp32_path, out / f"{name}.onnx", calibration_sets[count], detector.imgsz,
                                          recipe=recipe)
            results[name] = {"recipe": recipe.describe(), "calibration_images": count, "path": str(path),
                             **evaluate(path)}
        console.print(f"{name}: mAP50 {results[name]['mAP50']:.4f} (FP32 {fp32['mAP50']:.4f})")

    chosen_images = [load_image(val[i].image_path) for i in range(0, len(val), max(1, len(val) // 16))][:16]
    sessions = {"fp32": YoloDetector.load(fp32_path, threads=args.threads),
                **{n: YoloDetector.load(r["path"], threads=args.threads) for n, r in results.items()}}
    with timed_section(args.lock) as timing:
        speed = {n: {"latency_ms": latency_ms(d, chosen_images, args.latency_repeats),
                     "images_per_second_batch8": throughput(d, chosen_images, 8, args.throughput_rounds)}
                 for n, d in sessions.items()}
    fp32.update(speed["fp32"])
    for name in results:
        results[name].update(speed[name])
    chosen, why = choose(results, fp32)

    table = Table(title=f"INT8 variants vs FP32 ONNX, {len(val)} validation images, {detector.imgsz} px, "
                        f"{args.threads} thread(s), load {timing['load_average_at_start']}")
    for column in ("variant", "mAP50", "rel. change", "mAP50-95", "rel. change", "ms (batch 1)", "images/s (batch 8)",
                   "vs FP32"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row("FP32 ONNX", f"{fp32['mAP50']:.4f}", "-", f"{fp32['mAP50-95']:.4f}", "-",
                  f"{fp32['latency_ms']:.2f}", f"{fp32['images_per_second_batch8']:.1f}", "1.00x")
    for name, r in results.items():
        table.add_row(("* " if name == chosen else "") + name, f"{r['mAP50']:.4f}",
                      f"{(r['mAP50'] - fp32['mAP50']) / fp32['mAP50']:+.2%}", f"{r['mAP50-95']:.4f}",
                      f"{(r['mAP50-95'] - fp32['mAP50-95']) / fp32['mAP50-95']:+.2%}", f"{r['latency_ms']:.2f}",
                      f"{r['images_per_second_batch8']:.1f}",
                      f"{r['images_per_second_batch8'] / fp32['images_per_second_batch8']:.2f}x")
    console.print(table)
    console.print(f"chosen: {chosen} ({why})")
    summary = {"weights": str(args.weights), "imgsz": detector.imgsz, "train_images": len(train),
               "val_images": len(val), "split_seed": args.seed, "calibration_seed": args.calibration_seed,
               "fp32": fp32, "variants": results, "chosen": chosen, "rule": why, "timing": timing}
    (out / "int8_variants.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
