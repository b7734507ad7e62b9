"""The NEU-DET steel-defect detector shipped in the repository, and the command that makes it.

`manufacturing/defects/weights/neu_det.pt` is a weights-only detector file (detector.py: state dict
in float16 + model YAML, class names, input size as JSON; nothing in it can run). Its SHA-256 is
recorded beside it in `neu_det.sha256.json` and checked on every load, so a changed or damaged file
is refused in one line rather than detecting with whatever it now holds. `moeworks defects predict`
and `evaluate` use it when `--model` is left out; `defects train --weights` fine-tunes from it.

    python -m manufacturing.defects.shipped --run RUN_DIR --data VOC_FOLDER --status "final"

converts RUN_DIR/yolo/weights/best.pt into the shipped file, scores it on the seed-0 validation
split (splits/neu_det_seed0.json, which must be the run's split) with the product's own evaluation
(pipeline.evaluate_records, what `defects evaluate` runs), and writes the model card
(`neu_det.md`, `neu_det.json`) and the hash file. best.pt is ultralytics' own pickle: convert only a
run folder that this machine's `moeworks defects train` wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

from core.model_files import file_sha256
from manufacturing.defects.errors import DefectDataError

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
SHIPPED = WEIGHTS_DIR / "neu_det.pt"
HASH_FILE = WEIGHTS_DIR / "neu_det.sha256.json"
CARD_FILE = WEIGHTS_DIR / "neu_det.md"
SPLIT = HERE / "splits" / "neu_det_seed0.json"
MAX_BYTES = 6_000_000  # the bound for a file kept in git; YOLO11n in float16 is ~5.4 MB
EXPECTED_VAL_IMAGES = 300  # 20 % of the 1,500 NEU-DET images present here
# The recipe the shipped detector was trained with (issue 22; throughput in benchmarks.defects_recipe).
RECIPE = ("OMP_NUM_THREADS=1 nice -n 3 moeworks defects train --data /work/shared/data/neu_det "
          "--out /work/runs/neu-det-cpu --imgsz 192 --epochs 300 --hours 1.7 --batch 16 --workers 0 "
          "--no-train-moe --json")
INTENDED_USE = (
    "A starting point: detecting the six NEU-DET defect classes on 200 x 200 px grey-scale hot-rolled steel "
    "strip images like NEU-DET's, and the weights a factory fine-tunes on its own line "
    "(`moeworks defects train --weights manufacturing/defects/weights/neu_det.pt --data YOUR_VOC`).")
LIMITS = (
    "NEU-DET is a research data set (Northeastern University, 1,800 images, 300 per class, one class per "
    "image, one camera set-up); 1,500 of its images are here. The detector has seen no other steel, camera, "
    "lighting or defect types: measure it on your own labelled images before relying on it, and fine-tune. "
    "Trained at 192 px from scratch on 2 CPU cores (no pretrained weights could be downloaded); the published "
    "YOLO11n figure (0.753 mAP50) used COCO-pretrained weights at 640 px. Not a safety device.")


def verified_path(path: str | Path = SHIPPED, hash_file: str | Path = HASH_FILE) -> Path:
    """`path` after checking its SHA-256 against `hash_file`; DefectDataError (one line) otherwise."""
    path, hash_file = Path(path), Path(hash_file)
    if not path.is_file():
        raise DefectDataError(f"{path}: no shipped detector here (pass --model, or run "
                              "`python -m manufacturing.defects.shipped` on a training run)")
    try:
        expected = json.loads(hash_file.read_text())
        sha, size = expected["sha256"], expected["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DefectDataError(f"{hash_file}: unreadable hash file of the shipped detector ({error})") from None
    if path.stat().st_size != size or file_sha256(path) != sha:
        raise DefectDataError(f"{path}: refused: its SHA-256 differs from the one in {hash_file.name} (a changed "
                              "or damaged detector file)")
    return path


def load_shipped(**kwargs):
    """The shipped detector (YoloDetector), its hash checked first; kwargs go to YoloDetector.load."""
    from manufacturing.defects.detector import YoloDetector

    return YoloDetector.load(verified_path(), **kwargs)


def write_hash_file(path: Path, hash_file: Path) -> dict:
    entry = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    hash_file.write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def results_history(run_dir: Path) -> list[dict[str, float]]:
    """ultralytics' results.csv of a run, one dict of floats per epoch (keys stripped of spaces)."""
    path = run_dir / "yolo" / "results.csv"
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except OSError:
        raise DefectDataError(f"{path}: no results.csv: not a `moeworks defects train` run folder") from None
    if not rows:
        raise DefectDataError(f"{path}: no epochs recorded yet")
    return [{k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")} for row in rows]


def wall_seconds(rows: list[dict[str, float]]) -> list[float]:
    """Each epoch's wall-clock seconds since the run first started. ultralytics' `time` column restarts
    from zero when a run is resumed: each restart continues from where the previous part ended."""
    out, offset, previous = [], 0.0, 0.0
    for row in rows:
        now = row.get("time", 0.0)
        if now < previous:  # a resumed part: its clock started again
            offset += previous
        out.append(offset + now)
        previous = now
    return out


def check_run_split(run_dir: Path, split: Path = SPLIT) -> None:
    """The run's split.json must list the same train and val images as the repository's split file."""
    try:
        run, ours = json.loads((run_dir / "split.json").read_text()), json.loads(split.read_text())
        same = all(sorted(run[k]) == sorted(ours[k]) for k in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DefectDataError(f"{run_dir / 'split.json'}: unreadable split file ({error})") from None
    if not same:
        raise DefectDataError(f"{run_dir}: its split.json differs from {split.name}: the shipped detector must be "
                              "trained on the seed-0 split the repository records")


def build_shipped(run_dir: str | Path, data: str | Path, *, status: str, out_dir: str | Path = WEIGHTS_DIR,
                  recipe: str = RECIPE) -> dict:
    """Convert the run's best.pt into out_dir/neu_det.pt, score it, write hash file and model card."""
    import torch
    import ultralytics

    from manufacturing.defects.detector import YoloDetector, save_detector
    from manufacturing.defects.pipeline import DefectInspector, evaluate_records
    from manufacturing.defects.voc import read_voc_folder
    from manufacturing.defects.workflow import records_by_split

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    best = run_dir / "yolo" / "weights" / "best.pt"
    if not best.is_file():
        raise DefectDataError(f"{best}: missing: no validated epoch in this run yet")
    check_run_split(run_dir)
    history = results_history(run_dir)
    best_row = max(history, key=lambda r: r.get("metrics/mAP50-95(B)", 0.0))  # what ultralytics keeps as best.pt
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / SHIPPED.name
    partial = target.with_suffix(".partial.pt")
    save_detector(best, partial, metrics={k: v for k, v in best_row.items() if k.startswith("metrics/")})
    if partial.stat().st_size > MAX_BYTES:
        size = partial.stat().st_size
        partial.unlink()
        raise DefectDataError(f"{best}: converted detector is {size:,} bytes, over the {MAX_BYTES:,} allowed")
    partial.replace(target)
    entry = write_hash_file(target, out_dir / HASH_FILE.name)

    records = records_by_split(read_voc_folder(data), SPLIT, "val")
    started = time.perf_counter()
    detector = YoloDetector.load(verified_path(target, out_dir / HASH_FILE.name))
    metrics = evaluate_records(DefectInspector(detector=detector), records, progress=False)["yolo"]
    eval_seconds = time.perf_counter() - started
    try:
        import yaml

        args = yaml.safe_load((run_dir / "yolo" / "args.yaml").read_text()) or {}
    except OSError:
        args = {}
    last = history[-1]
    card = {
        "schema": "moeworks.defects.model_card/1",
        "file": f"manufacturing/defects/weights/{target.name}", "sha256": entry["sha256"], "bytes": entry["bytes"],
        "status": status,
        "data": {"name": "NEU-DET (NEU surface defect database, Northeastern University)",
                 "kind": "research data set", "published_images": 1800, "classes": detector.names,
                 "images_here": 1500, "image_size_px": "200 x 200, grey-scale"},
        "split": {"file": "manufacturing/defects/splits/neu_det_seed0.json", "seed": 0,
                  "train_val": "80/20, stratified by class", "val_images": len(records),
                  "equals_run_split": True},
        "recipe": {"command": recipe, "model": "YOLO11n from its YAML, random initial weights",
                   **{k: args[k] for k in ("imgsz", "batch", "epochs", "time", "workers", "cache", "optimizer",
                                           "close_mosaic", "mosaic", "seed") if k in args}},
        "training": {"epochs_run": int(last["epoch"]), "best_epoch": int(best_row["epoch"]),
                     "wall_hours": round(wall_seconds(history)[-1] / 3600, 3) if "time" in last else None,
                     "ultralytics_val_best": {k.replace("metrics/", "").replace("(B)", ""): round(v, 4)
                                              for k, v in best_row.items() if k.startswith("metrics/")}},
        "metrics": {"evaluated_with": "moeworks defects evaluate (pipeline.evaluate_records), seed-0 val split",
                    "images": len(records), "map50": round(metrics["mAP50"], 4),
                    "map50_95": round(metrics["mAP50-95"], 4), "precision": round(metrics["precision"], 4),
                    "recall": round(metrics["recall"], 4),
                    "per_class": {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                                  for n, m in metrics["per_class"].items()},
                    "seconds": round(eval_seconds, 1)},
        "intended_use": INTENDED_USE, "limits": LIMITS,
        "software": {"ultralytics": ultralytics.__version__, "torch": str(torch.__version__),
                     "python": platform.python_version()},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if len(records) != EXPECTED_VAL_IMAGES:
        card["metrics"]["note"] = f"{len(records)} val images found, not {EXPECTED_VAL_IMAGES}: not the full split"
    (out_dir / "neu_det.json").write_text(json.dumps(card, indent=1) + "\n")
    (out_dir / CARD_FILE.name).write_text(model_card_markdown(card))
    return card


def model_card_markdown(card: dict) -> str:
    m, t, r = card["metrics"], card["training"], card["recipe"]
    rows = "\n".join(f"| {name} | {v['AP50']:.3f} | {v['AP50-95']:.3f} | {v['instances']} |"
                     for name, v in m["per_class"].items())
    hours = "unknown" if t["wall_hours"] is None else f"{t['wall_hours']:.2f} h"
    return f"""# Model card: shipped NEU-DET steel-defect detector (`neu_det.pt`)

Status: **{card['status']}** (written {card['written_at']}).

| | |
|---|---|
| File | `{card['file']}` ({card['bytes']:,} bytes, weights-only, float16) |
| SHA-256 | `{card['sha256']}` (checked on every load against `neu_det.sha256.json`) |
| Model | {r['model']}, input {r.get('imgsz', '?')} px, classes: {', '.join(card['data']['classes'])} |
| Data | {card['data']['name']}: a **{card['data']['kind']}**, 1,800 images, 6 classes; 1,500 here |
| Split | seed 0, 80/20 stratified, `{card['split']['file']}` (checked equal to the run's split); \
{card['split']['val_images']} val images |
| Training | {t['epochs_run']} epochs (best {t['best_epoch']}), {hours} wall-clock on 2 shared CPU cores |
| Recipe | `{r['command']}` |

## Metrics on the seed-0 validation split

Measured with the product's own evaluation (`moeworks defects evaluate --data NEU-DET --split-file \
{card['split']['file']}`; multi-label boxes at score >= 0.001, up to 300 per image, as ultralytics'
validator): **mAP50 {m['map50']:.3f}**, **mAP50-95 {m['map50_95']:.3f}**, precision {m['precision']:.3f},
recall {m['recall']:.3f} over {m['images']} images. ultralytics' own validation of the best epoch:
{', '.join(f'{k} {v:.3f}' for k, v in t['ultralytics_val_best'].items())}.

| class | AP50 | AP50-95 | boxes |
|---|---:|---:|---:|
{rows}

## Intended use

{card['intended_use']}

## Limits

{card['limits']}

Software: ultralytics {card['software']['ultralytics']}, torch {card['software']['torch']}, \
Python {card['software']['python']}. Rebuild with `python -m manufacturing.defects.shipped --run RUN_DIR \
--data NEU_DET_VOC --status "..."`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manufacturing.defects.shipped", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a `moeworks defects train` run folder")
    parser.add_argument("--data", type=Path, required=True, help="the NEU-DET VOC folder the run was trained on")
    parser.add_argument("--status", required=True, help="what this file is, e.g. 'final: 142 epochs, 1.7 h'")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for neu_det.pt and its card")
    parser.add_argument("--recipe", default=RECIPE, help="the training command, for the card")
    args = parser.parse_args(argv)
    try:
        card = build_shipped(args.run, args.data, status=args.status[:200], out_dir=args.out, recipe=args.recipe)
    except DefectDataError as error:
        parser.exit(2, f"error: {error}\n")
    m = card["metrics"]
    print(f"wrote {args.out / SHIPPED.name} ({card['bytes']:,} bytes, sha256 {card['sha256'][:16]}...): "
          f"mAP50 {m['map50']:.3f}, mAP50-95 {m['map50_95']:.3f} on {m['images']} val images; "
          f"card {args.out / CARD_FILE.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
