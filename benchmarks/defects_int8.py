"""INT8 variants of the defect detector: mAP and speed of each static QDQ recipe against FP32 ONNX.

Each variant is named `<float part>-<calibration>-<images>[-symmetric][-per-tensor]`:
  float part   decode (box decoding after the DFL stays float) or outputs (also the Detect head's
               output convolutions and DFL: what `float_nodes` keeps)
  calibration  minmax or percentile (99.999), over <images> training-split images
  -symmetric   symmetric activation ranges; -per-tensor one weight scale per tensor
On the validation split of the seeded split (the calibration images come from its training split,
never from the images mAP is measured on): mAP50 and mAP50-95 of FP32 ONNX and of every variant;
then, in one timed section under the shared bench lock, median batch-1 latency and batch-8
throughput of each, side by side. The rule that picks the export's default is printed with its
choice: the fastest variant (batch-8 images/s) whose mAP50 and mAP50-95 are both within 1% relative
of FP32 for every calibration sample (`--calibration-seeds`: which training images calibrate; a
variant that passes for one draw and not another is not within the gate); variants within 5% of the
fastest count as equally fast, and the most accurate of them (mean mAP50) wins.

    nice -n 19 python -m benchmarks.defects_int8 --weights runs/bench-neu/detector.pt --json

(--weights: the weights-only detector.pt of `moeworks defects train`; ultralytics' own best.pt is a
full pickle, which YoloDetector.load refuses.)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, machine, timed_section, write_results
from benchmarks.fixtures import add_data_argument, detector_latency_ms, detector_throughput
from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import YoloDetector
from manufacturing.defects.export import Int8Recipe, export_detector_onnx, quantize_detector_int8
from manufacturing.defects.pipeline import DefectInspector, evaluate_records
from manufacturing.defects.voc import read_voc_folder, seeded_split
from manufacturing.defects.workflow import sample_images

DEFAULT_VARIANTS = ("decode-minmax-64,decode-minmax-256,outputs-minmax-64,outputs-minmax-256,"
                    "outputs-percentile-256,outputs-minmax-256-symmetric,"
                    "outputs-minmax-256-per-tensor")
GATE = 0.01  # the seed's accuracy gate: under 1% relative loss
SAME_SPEED = 0.05  # throughput differences under 5% are within this machine's run-to-run noise


def parse_variant(name: str) -> tuple[Int8Recipe, int]:
    """`outputs-minmax-256-symmetric` -> (Int8Recipe(...), 256 calibration images); ValueError for another form."""
    parts = name.split("-")
    flags = set(parts[3:])
    if not (len(parts) >= 3 and parts[0] in ("decode", "outputs") and parts[1] in ("minmax", "percentile")
            and parts[2].isdigit() and flags <= {"symmetric", "per", "tensor"}):
        raise ValueError(f"bad variant name {name!r}: KEEP-CALIBRATION-IMAGES[-symmetric][-per-tensor]")
    recipe = Int8Recipe(keep_float=parts[0], calibration=parts[1], symmetric_activations="symmetric" in flags,
                        per_channel="tensor" not in flags)
    return recipe, int(parts[2])


def choose(results: dict[str, dict], fp32: dict) -> tuple[str | None, str]:
    """The variant the rule of the module docstring picks, and why."""
    def within(r, key):
        return all((fp32[key] - m[key]) / fp32[key] < GATE for m in r["by_calibration_seed"].values())

    passing = {n: r for n, r in results.items() if within(r, "mAP50") and within(r, "mAP50-95")}
    if not passing:
        return None, "no variant within 1% relative mAP50 and mAP50-95 for every calibration sample"
    fastest = max(r["images_per_second_batch8"] for r in passing.values())
    tied = {n: r for n, r in passing.items() if r["images_per_second_batch8"] >= (1 - SAME_SPEED) * fastest}
    chosen = max(tied, key=lambda n: (tied[n]["mAP50"], tied[n]["mAP50-95"]))
    return chosen, (f"{len(passing)} of {len(results)} within 1% for every calibration sample; "
                    f"{len(tied)} within {SAME_SPEED:.0%} of the "
                    f"fastest ({fastest:.1f} images/s at batch 8); the most accurate of them")


def interleaved_speed(sessions: dict[str, YoloDetector], images, rounds: int, repeats: int) -> dict[str, dict]:
    """Batch-1 latency (median ms) and batch-8 images/s (median over rounds) of every session.

    Short slices of every model in turn, `rounds` times, starting at a different model each round:
    drifts in the machine's other load then fall on all alike (timed one after another, two
    identical graphs differed by 30-50% here).
    """
    names = list(sessions)
    latency: dict[str, list[float]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            latency[name].append(detector_latency_ms(sessions[name], images, repeats))
            rates[name].append(detector_throughput(sessions[name], images, 8, 1))
    return {n: {"latency_ms": statistics.median(latency[n]), "images_per_second_batch8": statistics.median(rates[n]),
                "images_per_second_batch8_rounds": rates[n]} for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="the detector.pt of `defects train`")
    add_data_argument(parser, under="neu_det", what="NEU-DET VOC folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 8:2 split")
    parser.add_argument("--calibration-seeds", default="0,1,2",
                        help="calibration samples (seeds drawing the training images); the gate holds for each")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list (see the names above)")
    parser.add_argument("--latency-repeats", type=int, default=12, help="batch-1 calls per model per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--lock", default="/tmp/moeworks-bench.lock", help="flock held while timing; '' for none")
    add_output_arguments(parser, Path("runs/bench-defects-int8"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=args.json, width=150)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        variants = {name: parse_variant(name) for name in filter(None, args.variants.split(","))}
    except ValueError as error:
        parser.error(str(error))

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
    if min(fp32["mAP50"], fp32["mAP50-95"]) <= 0:  # the gate is relative to FP32: nothing to compare with
        raise SystemExit(f"error: the FP32 detector scores mAP50 {fp32['mAP50']:.4f}, mAP50-95 "
                         f"{fp32['mAP50-95']:.4f} on the validation split: train it further before gating INT8")
    seeds = [int(s) for s in args.calibration_seeds.split(",")]
    calibration_sets: dict[tuple[int, int], list] = {}
    results: dict[str, dict] = {}
    for name, (recipe, count) in variants.items():
        by_seed = {}
        for seed in seeds:  # the files of the first seed are the ones timed (the others differ in scales only)
            with console.status(f"{name}: quantizing on {count} training images (seed {seed}), then mAP"):
                if (count, seed) not in calibration_sets:
                    calibration_sets[count, seed] = sample_images(train, count, seed=seed)
                path = quantize_detector_int8(fp32_path, out / f"{name}.seed{seed}.onnx", calibration_sets[count, seed],
                                              detector.imgsz, recipe=recipe)
                by_seed[seed] = {"path": str(path), **evaluate(path)}
        results[name] = {"recipe": recipe.describe(), "calibration_images": count, "path": by_seed[seeds[0]]["path"],
                         "by_calibration_seed": by_seed,
                         **{k: statistics.mean(m[k] for m in by_seed.values()) for k in ("mAP50", "mAP50-95")}}
        console.print(f"{name}: mAP50 {[round(m['mAP50'], 4) for m in by_seed.values()]} (FP32 {fp32['mAP50']:.4f})")

    chosen_images = [load_image(val[i].image_path) for i in range(0, len(val), max(1, len(val) // 16))][:16]
    sessions = {"fp32": YoloDetector.load(fp32_path, threads=args.threads),
                **{n: YoloDetector.load(r["path"], threads=args.threads) for n, r in results.items()}}
    measured_on = {**machine(), "onnxruntime_threads": args.threads}
    with timed_section(args.lock) as timing:
        speed = interleaved_speed(sessions, chosen_images, args.rounds, args.latency_repeats)
    fp32.update(speed["fp32"])
    for name in results:
        results[name].update(speed[name])
    chosen, why = choose(results, fp32)

    table = Table(title=f"INT8 variants vs FP32 ONNX, {len(val)} validation images, {detector.imgsz} px, "
                        f"{args.threads} thread(s), load {timing['load_average_at_start']}")
    for column in ("variant", "mAP50 (mean)", "rel. change per seed", "mAP50-95 (mean)", "rel. change per seed",
                   "ms (batch 1)", "images/s (batch 8)", "vs FP32"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row("FP32 ONNX", f"{fp32['mAP50']:.4f}", "-", f"{fp32['mAP50-95']:.4f}", "-",
                  f"{fp32['latency_ms']:.2f}", f"{fp32['images_per_second_batch8']:.1f}", "1.00x")

    def changes(r, key):
        return " ".join(f"{(m[key] - fp32[key]) / fp32[key]:+.1%}" for m in r["by_calibration_seed"].values())

    for name, r in results.items():
        table.add_row(("* " if name == chosen else "") + name, f"{r['mAP50']:.4f}", changes(r, "mAP50"),
                      f"{r['mAP50-95']:.4f}", changes(r, "mAP50-95"), f"{r['latency_ms']:.2f}",
                      f"{r['images_per_second_batch8']:.1f}",
                      f"{r['images_per_second_batch8'] / fp32['images_per_second_batch8']:.2f}x")
    console.print(table)
    console.print(f"chosen: {chosen} ({why})")
    summary = {"weights": str(args.weights), "imgsz": detector.imgsz, "train_images": len(train),
               "val_images": len(val), "split_seed": args.seed, "calibration_seeds": seeds,
               "fp32": fp32, "variants": results, "chosen": chosen, "rule": why, "timing": timing,
               "machine": measured_on}
    write_results(summary, out / "int8_variants.json", as_json=args.json)


if __name__ == "__main__":
    main()
