"""Train a YOLO detector with ultralytics from a model YAML, fully offline."""

from __future__ import annotations

import copy
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
    # A detector file of ours (weights only) to start from instead of random weights: fine-tuning the
    # shipped NEU-DET detector on a factory's own line. Layers whose shape differs (the class head
    # when the classes differ) start from random weights.
    weights: str | None = None
    # torch threads for the training step. 1 on the project's 2 shared cores: a second thread did not
    # make an image cheaper (benchmarks.defects_recipe: 22.4 vs 23.9 images per CPU-second, within
    # noise) and takes the core other work needs; ultralytics runs augmentation in the main process
    # on a CPU (it sets workers=0 there). Raise it on a machine of its own.
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be in [1, 256], got {self.threads}")
        if not (32 <= self.imgsz <= 8192 and self.imgsz % 32 == 0):
            raise ValueError(f"imgsz must be a multiple of 32 in [32, 8192], got {self.imgsz}")
        if not 1 <= self.batch <= 1024:
            raise ValueError(f"batch must be in [1, 1024], got {self.batch}")
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be in [0, 64], got {self.workers}")

    def train_arguments(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for key in ("model", "weights", "threads"):
            values.pop(key)
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
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer

    from manufacturing.defects.pruning import SplitC2f

    class Trainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            # A channel-pruned start (manufacturing.defects.pruning) has narrower layers than its YAML
            # builds: ultralytics would copy only the layers whose shapes match into a full-width
            # model, so the pruned module itself is what trains.
            if isinstance(weights, torch.nn.Module) and any(isinstance(m, SplitC2f) for m in weights.modules()):
                model = copy.deepcopy(weights)
                for parameter in model.parameters():
                    parameter.requires_grad_(True)
                return model
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

        def read_results_csv(self) -> dict[str, list]:
            try:
                rows = list(csv.DictReader(io.StringIO(Path(self.csv).read_text())))
            except OSError:
                return {}
            return {key.strip(): [_csv_number(row[key].strip()) for row in rows] for key in rows[0]} if rows else {}

    return Trainer


def last_checkpoint(run_dir: str | Path) -> Path:
    """ultralytics' last.pt of a run folder, where `resume` continues from."""
    return Path(run_dir) / "yolo" / "weights" / "last.pt"


def _start_model(config: DetectorConfig, run_dir: Path):
    """An ultralytics YOLO of `config.model`, or of the model in `config.weights` with its weights."""
    from ultralytics import YOLO

    if config.weights is None:
        return YOLO(config.model, task="detect")
    import yaml

    from manufacturing.defects.detector import training_model
    from manufacturing.defects.pruning import PRUNED_KEY

    start, metadata = training_model(config.weights)  # weights only, its YAML checked before it is built
    # ultralytics builds a model from a YAML file: the checked YAML of the detector file, written here.
    model_yaml = run_dir / "start_model.yaml"
    model_yaml.parent.mkdir(parents=True, exist_ok=True)
    model_yaml.write_text(yaml.safe_dump(metadata["config"], sort_keys=False))
    model = YOLO(str(model_yaml), task="detect")
    # Loading a module (not a file) makes ultralytics' train() start from its weights: layers of the same
    # name and shape are copied, the rest (a class head for other classes) keep their random start.
    model.load(start)
    if PRUNED_KEY in metadata:  # narrower than its YAML: the trainer takes this module (_detection_trainer)
        model.model = start
    return model


def _add_callbacks(model, callbacks: dict[str, Any] | None) -> None:
    for event, function in (callbacks or {}).items():
        model.add_callback(event, function)


def train_detector(data_yaml: str | Path, config: DetectorConfig, run_dir: str | Path, *,
                   verbose: bool = True, resume: bool = False, callbacks: dict[str, Any] | None = None,
                   trainer: type | None = None) -> TrainSummary:
    """Train `config.model` on the dataset of `data_yaml`; outputs go to `run_dir/yolo`.

    resume: continue the interrupted run in `run_dir` from its yolo/weights/last.pt with ultralytics'
    resume (the epoch, optimiser and schedule it saved; of `config`, only workers, cache, batch, time
    and device apply). last.pt is ultralytics' own full pickle, which ultralytics loads: resume only a
    run folder this machine's own `defects train` wrote (workflow.train_job checks its split and data).
    callbacks: {ultralytics event: function(trainer)} added to the run (benchmarks time epochs with them);
    trainer: an ultralytics trainer class in place of this module's (a subclass of it).
    """
    import torch

    run_dir = Path(run_dir).resolve()
    ultralytics_offline(run_dir / "ultralytics-config")
    torch.set_num_threads(config.threads)
    plots = verbose and importlib.util.find_spec("polars") is not None  # ultralytics draws them with polars
    started = time.perf_counter()
    if resume:
        from ultralytics import YOLO

        model = YOLO(config.model, task="detect")  # replaced by last.pt's model when training starts
        _add_callbacks(model, callbacks)
        extra = {"time": config.time} if config.time is not None else {}
        model.train(data=str(data_yaml), resume=str(last_checkpoint(run_dir)), trainer=trainer or _detection_trainer(),
                    workers=config.workers, cache="ram" if config.cache else False, batch=config.batch,
                    device=config.device, plots=plots, **extra)
    else:
        model = _start_model(config, run_dir)
        _add_callbacks(model, callbacks)
        model.train(data=str(data_yaml), project=str(run_dir), name="yolo", exist_ok=True,
                    pretrained=config.weights is not None, amp=False, plots=plots, verbose=verbose,
                    deterministic=True, trainer=trainer or _detection_trainer(),
                    **config.train_arguments())
    seconds = time.perf_counter() - started
    trainer = model.trainer
    weights = Path(trainer.best if Path(trainer.best).exists() else trainer.last)
    train_images = len(trainer.train_loader.dataset)
    epochs_run = int(trainer.epoch) + 1
    metrics = {k.replace("metrics/", "").replace("(B)", ""): float(v)
               for k, v in (trainer.metrics or {}).items() if k.startswith("metrics/")}
    # On a resume, this process trained only the epochs after the one last.pt held.
    epochs_here = max(1, epochs_run - int(getattr(trainer, "start_epoch", 0)))
    summary = TrainSummary(weights, epochs_run, int(trainer.args.imgsz), seconds, train_images,
                           train_images * epochs_here / seconds, metrics)
    (run_dir / "train_summary.json").write_text(json.dumps(
        {**dataclasses.asdict(summary), "weights": str(weights), "config": dataclasses.asdict(config)}, indent=1))
    return summary
