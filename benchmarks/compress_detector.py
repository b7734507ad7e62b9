"""Channel-pruned defect detector vs the shipped one: size, CPU images/s and mAP on NEU-DET validation.

Variants are detector files (`--variants name=path,...`): the shipped detector, the same detector
fine-tuned for the same epochs unpruned (`defects train --weights`: the fair comparison, since the
fine-tuning alone moves mAP), and `moeworks compress prune` folders at some ratio, fine-tuned. With
`--unfinetuned RATIOS`, the shipped detector pruned at each ratio and not fine-tuned is measured too
(in this process; manufacturing.defects.pruning.prune_detector, as `compress prune --epochs 0`).

Per variant: parameters, detector file bytes (float16 weights, as stored), FP32 ONNX bytes, mAP50 and
mAP50-95 of the PyTorch detector and of its ONNX export on the validation images of the split
(`defects evaluate`'s code), and images/s at batch 1 on the CPU for PyTorch and onnxruntime (the
network alone, 1 thread each; interleaved rounds so that the machine's other load falls on all
alike). The target of issue 20: >= 50% fewer parameters at < 1% relative loss of mAP50 after
fine-tuning, judged against the shipped detector (and shown against the unpruned fine-tune of the
same epochs, `--same-budget`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.common import add_output_arguments, machine, markdown_table, timed_section, write_results
from benchmarks.fixtures import add_data_argument, detector_latency_ms
from manufacturing.defects.dataset import load_image
from manufacturing.defects.detector import YoloDetector, training_model
from manufacturing.defects.export import export_detector_onnx
from manufacturing.defects.pipeline import DefectInspector, evaluate_records
from manufacturing.defects.voc import read_voc_folder
from manufacturing.defects.workflow import records_by_split

PARAMETER_TARGET = 0.5  # >= 50% fewer parameters ...
MAP_TARGET = 0.01  # ... at < 1% relative loss of mAP50 (issue 20)
SPLIT = Path("manufacturing/defects/splits/neu_det_seed0.json")


def _variants(text: str) -> dict[str, Path]:
    variants = {}
    for item in filter(None, text.split(",")):
        name, _, path = item.partition("=")
        if not name or not path:
            raise ValueError(f"--variants: give name=path, got {item!r}")
        variants[name] = Path(path)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True,
                        help="name=detector.pt,...; the first is the reference (the shipped detector)")
    add_data_argument(parser, under="neu_det", what="NEU-DET VOC folder")
    parser.add_argument("--split-file", type=Path, default=SPLIT, help="split whose 'val' images are scored")
    parser.add_argument("--same-budget", default="",
                        help="pruned=unpruned,...: each pruned variant's unpruned fine-tune of the same epochs")
    parser.add_argument("--unfinetuned", default="", help="comma list of ratios: the reference pruned, not "
                                                          "fine-tuned")
    parser.add_argument("--latency-repeats", type=int, default=12, help="batch-1 calls per model per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--lock", default="/tmp/moeworks-bench.lock", help="flock held while timing; '' for none")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-compress-detector"),
                        help="folder for the ONNX exports and the unfine-tuned pruned detectors")
    add_output_arguments(parser, Path("runs/bench-compress-detector/compress_detector.json"))
    args = parser.parse_args()
    try:
        variants = _variants(args.variants)
        pairs = {k: str(v) for k, v in _variants(args.same_budget).items()}
        if not set(pairs) | set(pairs.values()) <= set(variants):
            raise ValueError("--same-budget: name variants given in --variants")
        ratios = [float(r) for r in filter(None, args.unfinetuned.split(","))]
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    console = Console(stderr=args.json, width=160)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    reference = next(iter(variants))
    if ratios:
        from manufacturing.defects.pruning import prune_detector, save_pruned

        for ratio in ratios:
            model, metadata = training_model(variants[reference])
            prune_detector(model, ratio=ratio, imgsz=metadata["imgsz"])
            variants[f"pruned {ratio} (no fine-tuning)"] = save_pruned(
                model, work / f"pruned_{ratio}_no_finetune.pt", config=metadata["config"], names=metadata["names"],
                imgsz=metadata["imgsz"])
    val = records_by_split(read_voc_folder(args.data), args.split_file, "val")
    images = [load_image(r.image_path) for r in val[:24]]
    results: dict[str, dict] = {}
    pytorch, onnx = {}, {}
    for name, path in variants.items():
        model, _ = training_model(path)
        pytorch[name] = YoloDetector.load(path)
        onnx_path = export_detector_onnx(pytorch[name], work / f"{len(results)}.onnx")
        onnx[name] = YoloDetector.load(onnx_path, threads=1)
        with console.status(f"{name}: mAP on {len(val)} validation images"):
            scored = {backend: evaluate_records(DefectInspector(detector=d), val, progress=False)["yolo"]
                      for backend, d in (("pytorch", pytorch[name]), ("onnx", onnx[name]))}
        results[name] = {"path": str(path), "parameters": sum(p.numel() for p in model.parameters()),
                         "file_bytes": path.stat().st_size, "onnx_fp32_bytes": onnx_path.stat().st_size,
                         "mAP50": scored["pytorch"]["mAP50"], "mAP50-95": scored["pytorch"]["mAP50-95"],
                         "onnx_mAP50": scored["onnx"]["mAP50"], "onnx_mAP50-95": scored["onnx"]["mAP50-95"]}
    measured_on = machine()
    names = list(variants)
    with timed_section(args.lock) as section:
        latency: dict[str, dict[str, list[float]]] = {n: {"pytorch": [], "onnx": []} for n in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                latency[name]["pytorch"].append(detector_latency_ms(pytorch[name], images, args.latency_repeats))
                latency[name]["onnx"].append(detector_latency_ms(onnx[name], images, args.latency_repeats))
    for name in names:
        for backend in ("pytorch", "onnx"):
            results[name][f"{backend}_images_per_second"] = 1000 / statistics.median(latency[name][backend])
            # the least disturbed round: on shared cores the other jobs only ever slow a round down
            results[name][f"{backend}_images_per_second_best_round"] = 1000 / min(latency[name][backend])
            results[name][f"{backend}_latency_ms_rounds"] = latency[name][backend]
    base = results[reference]
    for name, r in results.items():
        r["parameters_removed"] = 1 - r["parameters"] / base["parameters"]
        r["mAP50_relative_change"] = r["mAP50"] / base["mAP50"] - 1
        if name in pairs:
            r["same_budget"] = pairs[name]
            r["mAP50_relative_change_vs_same_budget"] = r["mAP50"] / results[pairs[name]]["mAP50"] - 1
        r["pytorch_speedup"] = r["pytorch_images_per_second"] / base["pytorch_images_per_second"]
        r["onnx_speedup"] = r["onnx_images_per_second"] / base["onnx_images_per_second"]
        r["target_met"] = bool(r["parameters_removed"] >= PARAMETER_TARGET and r["mAP50_relative_change"] > -MAP_TARGET)
    header = ["variant", "params", "fewer", ".pt bytes", "ONNX bytes", "mAP50", "vs ref", "vs same budget", "mAP50-95",
              "ONNX mAP50", "PyTorch img/s b1 (best round)",
              "ONNX img/s b1 (best round)", "target"]
    rows = [[n, f"{r['parameters']:,}", f"{r['parameters_removed']:.1%}", f"{r['file_bytes']:,}",
             f"{r['onnx_fp32_bytes']:,}", f"{r['mAP50']:.4f}", f"{r['mAP50_relative_change']:+.1%}",
             f"{r['mAP50_relative_change_vs_same_budget']:+.1%}" if n in pairs else "",
             f"{r['mAP50-95']:.4f}", f"{r['onnx_mAP50']:.4f}",
             f"{r['pytorch_images_per_second']:.1f} ({r['pytorch_images_per_second_best_round']:.1f}), "
             f"{r['pytorch_speedup']:.2f}x",
             f"{r['onnx_images_per_second']:.1f} ({r['onnx_images_per_second_best_round']:.1f}), "
             f"{r['onnx_speedup']:.2f}x",
             "met" if r["target_met"] else "no"]
            for n, r in results.items()]
    table = markdown_table(header, rows)
    console.print(table)
    summary = {"benchmark": "compress_detector", "data": str(args.data), "split_file": str(args.split_file),
               "val_images": len(val), "timing_images": len(images), "reference": reference,
               "same_budget": pairs, "target": {"parameters_removed_at_least": PARAMETER_TARGET,
                                                               "mAP50_relative_loss_under": MAP_TARGET},
               "variants": results, "table": table, "machine": measured_on, "timed_section": section}
    write_results(summary, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
