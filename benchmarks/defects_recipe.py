"""Training throughput (images/s) of the defects CPU recipe against ultralytics' defaults, side by side.

Each configuration trains YOLO11n from its YAML for --epochs epochs on the same --images images of
NEU-DET's seed-0 training split (validation on --val images only at the end, outside the timing),
in this one process, one after the other. Timed: each training epoch, from ultralytics'
on_train_epoch_start to on_train_epoch_end (data loading, augmentation, forward, backward, optimiser);
images/s = training images / that wall time (median over the epochs), and images per CPU-second =
training images / the CPU time this process and its dataloader workers spent in it: on a machine
other work shares, the wall figure says what share of the CPU the run got, the CPU figure how much
work an image costs. Set-up (building the dataset, filling the RAM cache) is reported on its own.

Configurations: the chosen recipe (imgsz 192, batch 16, workers 0, 1 torch thread, cache ram,
rect off: what `moeworks defects train` now runs), ultralytics' defaults at the same image size
(workers 8, which ultralytics capped to the 2 cores and sets to 0 on a CPU anyway, cache off, batch 16,
2 threads), and variants of the recipe: workers 1 (forced on: ultralytics' CPU override undone),
batch 32, imgsz 224.

Run it under `nice -n 19` beside other work (it never raises its own priority), and read its machine
line: the load average says what else ran.

    nice -n 19 python -m benchmarks.defects_recipe --data /work/shared/data/neu_det --images 300 [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_output_arguments, describe, machine, markdown_table, write_results
from deploy.cli.output import third_party_output_to

SPLIT = Path(__file__).resolve().parents[1] / "manufacturing" / "defects" / "splits" / "neu_det_seed0.json"

# name: (DetectorConfig fields, force workers past ultralytics' CPU override)
CONFIGS: dict[str, tuple[dict, bool]] = {
    "recipe (192 px, batch 16, workers 0, 1 thread, cache ram)": (
        {"imgsz": 192, "batch": 16, "workers": 0, "threads": 1, "cache": True}, False),
    "ultralytics defaults (192 px, batch 16, workers 8, 2 threads, no cache)": (
        {"imgsz": 192, "batch": 16, "workers": 8, "threads": 2, "cache": False}, False),
    "recipe + workers 1 (forced)": ({"imgsz": 192, "batch": 16, "workers": 1, "threads": 1, "cache": True}, True),
    "recipe + batch 32": ({"imgsz": 192, "batch": 32, "workers": 0, "threads": 1, "cache": True}, False),
    "recipe + imgsz 224": ({"imgsz": 224, "batch": 16, "workers": 0, "threads": 1, "cache": True}, False),
}


def subset_dataset(voc: Path, out: Path, images: int, val: int) -> Path:
    """data.yaml of the first `images` training and `val` validation images of the seed-0 split,
    every class equally represented (names sorted, then taken round-robin by class)."""
    from manufacturing.defects.dataset import write_yolo_dataset
    from manufacturing.defects.voc import class_names, read_voc_folder
    from manufacturing.defects.workflow import records_by_split

    records = read_voc_folder(voc)
    names = class_names(records)

    def balanced(chosen, count):
        by_class: dict[str, list] = {}
        for record in sorted(chosen, key=lambda r: r.name):
            by_class.setdefault(record.labels[0] if record.labels else "", []).append(record)
        queues = [by_class[k] for k in sorted(by_class)]
        picked = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
        return picked[:count]

    return write_yolo_dataset({"train": balanced(records_by_split(records, SPLIT, "train"), images),
                               "val": balanced(records_by_split(records, SPLIT, "val"), val)}, out, names)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its live children (dataloader workers):
    on a machine shared with other work, wall time says how much of the CPU this run was given,
    CPU time how much work an epoch is."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # a worker that exited between the listing and the read
            pass
    return total


def measure(data_yaml: Path, run_dir: Path, fields: dict, force_workers: bool, epochs: int) -> dict:
    from manufacturing.defects.train import DetectorConfig, _detection_trainer, train_detector

    base = _detection_trainer()
    trainer_class = None
    if force_workers:
        class KeepWorkers(base):  # ultralytics sets workers=0 on a CPU device; this config measures > 0
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.args.workers = fields["workers"]

        trainer_class = KeepWorkers
    marks: dict[str, list[tuple[float, float]]] = {"start": [], "end": []}
    seen = {}

    def mark(which):
        marks[which].append((time.perf_counter(), cpu_seconds()))

    def epoch_start(trainer):
        mark("start")
        seen["workers"] = trainer.train_loader.num_workers

    callbacks = {"on_train_epoch_start": epoch_start, "on_train_epoch_end": lambda trainer: mark("end")}
    config = DetectorConfig(epochs=epochs, warmup_epochs=0.0, close_mosaic=0, patience=epochs + 1, **fields)
    started = time.perf_counter()
    summary = train_detector(data_yaml, config, run_dir, verbose=False, callbacks=callbacks, trainer=trainer_class)
    total = time.perf_counter() - started
    pairs = list(zip(marks["start"], marks["end"], strict=True))
    epoch_seconds = [end[0] - start[0] for start, end in pairs]
    epoch_cpu = [end[1] - start[1] for start, end in pairs]
    median = statistics.median(epoch_seconds)
    return {**fields, "force_workers": force_workers, "dataloader_workers": seen.get("workers"),
            "train_images": summary.train_images, "epoch_seconds": [round(s, 2) for s in epoch_seconds],
            "epoch_cpu_seconds": [round(s, 2) for s in epoch_cpu],
            "images_per_second": round(summary.train_images / median, 2),
            "images_per_cpu_second": round(summary.train_images / statistics.median(epoch_cpu), 2),
            "setup_and_validation_seconds": round(total - sum(epoch_seconds), 1), "total_seconds": round(total, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the NEU-DET VOC folder")
    parser.add_argument("--images", type=int, default=300, help="training images per configuration (<= 1200)")
    parser.add_argument("--val", type=int, default=12, help="validation images (validated once, not timed)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per configuration (median)")
    parser.add_argument("--only", nargs="*", default=None, help="run only configurations whose name has this text")
    parser.add_argument("--note", default="", help="what else the machine ran (recorded with the results)")
    add_output_arguments(parser, Path("benchmarks/results/defects_recipe.json"))
    args = parser.parse_args(argv)
    if not (16 <= args.images <= 1200 and 1 <= args.val <= 300 and 1 <= args.epochs <= 10):
        parser.error("--images must be in [16, 1200], --val in [1, 300], --epochs in [1, 10]")
    from manufacturing.defects.offline import ultralytics_offline

    work = Path(tempfile.mkdtemp(prefix="defects-recipe-"))
    ultralytics_offline(work / "ultralytics-config")
    data_yaml = subset_dataset(args.data, work / "dataset", args.images, args.val)
    host = machine()
    rows, results = [], {}
    for name, (fields, force) in CONFIGS.items():
        if args.only and not any(text in name for text in args.only):
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        # ultralytics prints ~150 lines a run: into a log beside the work files
        with third_party_output_to(work / "ultralytics.log"):
            results[name] = measure(data_yaml, work / f"run{len(results)}", fields, force, args.epochs)
        r = results[name]
        if args.out is not None:  # what is measured so far survives a run stopped part-way
            write_results({"machine": host, "partial": True, "configs": results}, args.out, as_json=False)
        rows.append([name, r["dataloader_workers"], f"{r['images_per_second']:.1f}",
                     f"{r['images_per_cpu_second']:.1f}", " / ".join(f"{s:.1f}" for s in r["epoch_seconds"]),
                     f"{r['setup_and_validation_seconds']:.0f}"])
    host_after = machine()
    table = markdown_table(["configuration", "workers used", "images/s (wall)", "images per CPU-s", "epoch s",
                            "set-up + val s"], rows)
    print(f"YOLO11n training on {args.images} NEU-DET images, {args.epochs} timed epoch(s) each; {describe(host)}; "
          f"load average after {host_after['load_average'][0]:.1f}" + (f"; {args.note}" if args.note else ""))
    print(table)
    write_results({"machine": host, "load_average_after": host_after["load_average"], "note": args.note,
                   "images": args.images, "val_images": args.val, "epochs": args.epochs,
                   "nice": __import__("os").getpriority(__import__("os").PRIO_PROCESS, 0), "configs": results,
                   "table": table}, args.out, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
