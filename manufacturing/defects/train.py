"""Train a YOLO detector with ultralytics from a model YAML, fully offline."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manufacturing.defects.offline import ultralytics_offline


@dataclass
class DetectorConfig:
    """How the YOLO stage is trained. Augmentation defaults suit grey, orientation-free surfaces."""

    model: str = "yolo11n.yaml"  # architecture only: no pretrained weights can be fetched here
    imgsz: int = 640  # the published NEU-DET protocol (200 px images upscaled); use 224-320 on a CPU
    epochs: int = 100  # from scratch needs far more epochs than fine-tuning COCO weights
    batch: int = 16
    # Wall-clock budget in hours (None: no limit). ultralytics then re-plans the epoch count after
    # the first epoch so that the schedule (and the mosaic close-out) ends inside the budget.
    time: float | None = None
    patience: int = 50  # ultralytics' early stop on validation fitness
    workers: int = 2  # dataloader processes; the CI machine has 2 cores
    seed: int = 0
    device: str = "cpu"  # "0" for the first GPU
    optimizer: str = "auto"  # ultralytics picks AdamW for short runs, SGD for long ones
    cos_lr: bool = False
    warmup_epochs: float = 3.0  # ultralytics' default; a few-epoch demo run needs less
    hsv_h: float = 0.0  # steel and PCB images are grey or fixed-colour: hue shifts only add noise
    hsv_s: float = 0.0
    hsv_v: float = 0.4  # lighting changes along a line: brightness jitter is realistic
    fliplr: float = 0.5  # a surface has no left/right ...
    flipud: float = 0.5  # ... and no up/down
    degrees: float = 0.0  # rotation would loosen the axis-aligned boxes of long scratches
    scale: float = 0.5
    translate: float = 0.1
    mosaic: float = 1.0  # mosaic helps small defects; switched off for the last `close_mosaic` epochs
    close_mosaic: int = 10
    mixup: float = 0.0  # blending two surfaces invents textures that do not occur
    cache: bool = True  # images in RAM: NEU-DET is ~30 MB

    def train_arguments(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("model")
        values["cache"] = "ram" if self.cache else False
        if self.time is None:
            values.pop("time")
        return values


@dataclass
class TrainSummary:
    weights: Path  # best.pt (by validation fitness)
    epochs: int
    imgsz: int
    seconds: float
    train_images: int
    images_per_second: float
    metrics: dict[str, float]  # ultralytics' validation metrics of the best weights


def _csv_number(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def _detection_trainer():
    """ultralytics' detection trainer, reading its results.csv with the standard library.

    ultralytics reads it with polars on every checkpoint save; polars' 54 MB runtime is most of what
    a bare GPU or edge machine must be sent to train there (and its plots, the only other use, are
    skipped when polars is absent).
    """
    from ultralytics.models.yolo.detect import DetectionTrainer

    class Trainer(DetectionTrainer):
        def read_results_csv(self) -> dict[str, list]:
            try:
                rows = list(csv.DictReader(io.StringIO(Path(self.csv).read_text())))
            except OSError:
                return {}
            return {key.strip(): [_csv_number(row[key].strip()) for row in rows] for key in rows[0]} if rows else {}

    return Trainer


def train_detector(data_yaml: str | Path, config: DetectorConfig, run_dir: str | Path, *,
                   verbose: bool = True) -> TrainSummary:
    """Train `config.model` on the dataset of `data_yaml`; outputs go to `run_dir/yolo`."""
    run_dir = Path(run_dir).resolve()
    ultralytics_offline(run_dir / "ultralytics-config")
    from ultralytics import YOLO

    model = YOLO(config.model, task="detect")
    plots = verbose and importlib.util.find_spec("polars") is not None  # ultralytics draws them with polars
    started = time.perf_counter()
    model.train(data=str(data_yaml), project=str(run_dir), name="yolo", exist_ok=True, pretrained=False,
                amp=False, plots=plots, verbose=verbose, deterministic=True, trainer=_detection_trainer(),
                **config.train_arguments())
    seconds = time.perf_counter() - started
    trainer = model.trainer
    weights = Path(trainer.best if Path(trainer.best).exists() else trainer.last)
    train_images = len(trainer.train_loader.dataset)
    epochs_run = int(trainer.epoch) + 1
    metrics = {k.replace("metrics/", "").replace("(B)", ""): float(v)
               for k, v in (trainer.metrics or {}).items() if k.startswith("metrics/")}
    summary = TrainSummary(weights, epochs_run, config.imgsz, seconds, train_images,
                           train_images * epochs_run / seconds, metrics)
    (run_dir / "train_summary.json").write_text(json.dumps(
        {**dataclasses.asdict(summary), "weights": str(weights), "config": dataclasses.asdict(config)}, indent=1))
    return summary
