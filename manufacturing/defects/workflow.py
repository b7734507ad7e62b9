"""The end-to-end jobs behind `moeworks defects ...`: train, evaluate, export."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.model_files import MANIFEST, write_manifest
from manufacturing.defects.annotation import checkout_version
from manufacturing.defects.dataset import load_image, write_yolo_dataset
from manufacturing.defects.detector import YoloDetector, save_detector
from manufacturing.defects.errors import DefectDataError, one_line
from manufacturing.defects.moe_stage import CropMoEClassifier, CropMoEConfig, CropTrainingConfig
from manufacturing.defects.train import DetectorConfig, train_detector
from manufacturing.defects.voc import (
    VOCImage,
    class_names,
    data_sha256,
    read_voc_folder,
    seeded_split,
    write_split,
)

DETECTOR_FILE, MOE_FILE, SPLIT_FILE = "detector.pt", "moe_stage.pt", "split.json"


@dataclass
class TrainJob:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    val_fraction: float = 0.2  # NEU-DET papers use 8:2, 7:3 or 9:1 random splits; 8:2 is the most common
    split_seed: int = 0
    train_moe: bool = True
    moe_training: CropTrainingConfig = field(default_factory=CropTrainingConfig)


def records_by_split(records: list[VOCImage], split_file: str | Path, split: str = "val") -> list[VOCImage]:
    """The records named in a recorded split's `split` list (names missing from the folder are skipped)."""
    try:
        wanted = set(json.loads(Path(split_file).read_text())[split])
    except (OSError, ValueError, KeyError) as error:
        raise DefectDataError(f"{split_file}: unreadable split file or no field {split!r} ({error})") from None
    chosen = [r for r in records if r.name in wanted]
    if not chosen:
        raise DefectDataError(f"{split_file}: none of its {split!r} images are in this folder")
    return chosen


def fit_moe_stage(detector: YoloDetector, records: list[VOCImage], training: CropTrainingConfig) -> CropMoEClassifier:
    from manufacturing.defects.crop_data import crop_training_set

    config = CropMoEConfig(num_classes=len(detector.names))
    crops, geometry, labels = crop_training_set(records, detector, detector.names, config, seed=training.seed,
                                                progress=training.progress)
    return CropMoEClassifier(config=config, training=training).fit(crops, geometry, labels)


def check_resumable(out_dir: Path, voc_dir: str | Path, records: list[VOCImage], train: list[VOCImage],
                    val: list[VOCImage], job: TrainJob) -> Path:
    """The run folder's data.yaml, after checking that `out_dir` is an unfinished `defects train` run
    on this very data and split; DefectDataError (one line) otherwise."""
    from manufacturing.defects.train import last_checkpoint

    split_path, last = out_dir / SPLIT_FILE, last_checkpoint(out_dir)
    if not split_path.is_file() or not last.is_file():
        raise DefectDataError(f"{out_dir}: nothing to resume: no {SPLIT_FILE} or yolo/weights/last.pt (not an "
                              "interrupted `moeworks defects train` run folder)")
    if (out_dir / "train_summary.json").is_file():
        raise DefectDataError(f"{out_dir}: this run finished training; start a new run, or fine-tune its "
                              f"detector with --weights {out_dir / DETECTOR_FILE}")
    try:
        recorded = json.loads(split_path.read_text())
        source, seed, fraction = recorded["source"], recorded["seed"], recorded["val_fraction"]
        recorded_train, recorded_val = set(recorded["train"]), set(recorded["val"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DefectDataError(f"{split_path}: unreadable split file ({one_line(error)})") from None
    if Path(str(source)).resolve() != Path(voc_dir).resolve():
        raise DefectDataError(f"{out_dir}: refused to resume: the run was trained on {source}, not on {voc_dir}")
    if (seed, fraction) != (job.split_seed, job.val_fraction):
        raise DefectDataError(f"{out_dir}: refused to resume: the run's split has seed {seed} and val fraction "
                              f"{fraction}, not {job.split_seed} and {job.val_fraction}")
    if "data_sha256" in recorded and recorded["data_sha256"] != data_sha256(records):
        raise DefectDataError(f"{out_dir}: refused to resume: {voc_dir} changed since the run started (its "
                              f"images or annotations differ from the SHA-256 in {SPLIT_FILE})")
    if recorded_train != {r.name for r in train} or recorded_val != {r.name for r in val}:
        raise DefectDataError(f"{out_dir}: refused to resume: {voc_dir} does not split into the run's recorded "
                              f"train and val images ({SPLIT_FILE})")
    data_yaml = out_dir / "dataset" / "data.yaml"
    if not data_yaml.is_file():
        raise DefectDataError(f"{data_yaml}: missing: the run folder is incomplete")
    return data_yaml


def train_job(voc_dir: str | Path, out_dir: str | Path, job: TrainJob, *, verbose: bool = True,
              resume: bool = False) -> dict:
    """Split a VOC folder, train YOLO (and the MoE stage), and save both next to the recorded split.

    resume: continue the interrupted run in `out_dir` (check_resumable) instead of starting anew.
    """
    out_dir = Path(out_dir)
    records = read_voc_folder(voc_dir)
    names = class_names(records)
    train, val = seeded_split(records, val_fraction=job.val_fraction, seed=job.split_seed)
    if resume:
        data_yaml = check_resumable(out_dir, voc_dir, records, train, val, job)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A rerun into the same folder rewrites its files: the old manifest would refuse the new ones
    # (the detector is loaded again below, before the new manifest is written).
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if not resume:
        write_split(out_dir / SPLIT_FILE, train, val, seed=job.split_seed, val_fraction=job.val_fraction,
                    source=str(voc_dir), data_hash=data_sha256(records))
        data_yaml = write_yolo_dataset({"train": train, "val": val}, out_dir / "dataset", names)
    summary = train_detector(data_yaml, job.detector, out_dir, verbose=verbose, resume=resume)
    detector_path = out_dir / DETECTOR_FILE
    # ultralytics' best.pt is a full pickle: converted here, by the process that wrote it, into the
    # weights-only file every later load reads (manufacturing.defects.detector).
    save_detector(summary.weights, detector_path, metrics=summary.metrics)
    result = {"detector": str(detector_path), "classes": names, "resumed": resume,
              "start_weights": job.detector.weights, "train_images": len(train), "val_images": len(val),
              "epochs": summary.epochs, "imgsz": summary.imgsz, "train_seconds": round(summary.seconds, 1),
              "train_images_per_second": round(summary.images_per_second, 2),
              "ultralytics_val": summary.metrics}
    pool = checkout_version(voc_dir)  # a folder an annotation pool wrote: the data's version, for the record
    if pool:
        result.update(pool=pool.get("pool"), pool_version=pool["version"])
    if job.train_moe:
        started = time.perf_counter()
        stage = fit_moe_stage(YoloDetector.load(detector_path), train, job.moe_training)
        stage.save(out_dir / MOE_FILE, names=names)
        result.update(moe_stage=str(out_dir / MOE_FILE), moe_train_seconds=round(time.perf_counter() - started, 1),
                      moe_best_epoch=stage.best_epoch_, moe_val_accuracy=stage.best_metrics_["val_accuracy"])
    (out_dir / "train_result.json").write_text(json.dumps(
        {**result, "job": dataclasses.asdict(job)}, indent=1, default=str))
    # Sealed: the files a load reads; the dataset copy and ultralytics' run folder (its own pickles)
    # stay outside the manifest and are never loaded.
    write_manifest(out_dir, unsealed=[p.name for p in out_dir.iterdir() if p.is_dir()])
    return result


def sample_images(records: list[VOCImage], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` decoded images chosen with a seed (for INT8 calibration and parity checks)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=min(count, len(records)), replace=False)
    return [load_image(records[i].image_path, expected_size=(records[i].width, records[i].height))
            for i in sorted(chosen)]


def export_job(detector_path: str | Path, out_dir: str | Path, calibration_dir: str | Path, *,
               moe_path: str | Path | None = None, int8: bool = True, calibration_images: int = 256,
               split_file: str | Path | None = None, parity_images: int = 16, dynamic_batch: bool = True) -> dict:
    """ONNX (and INT8 ONNX) of the detector, ONNX of the MoE stage, parity checked on real images.

    Both files take any batch size (`dynamic_batch=False` keeps the detector at batch 1, as earlier
    versions wrote it); parity is checked with onnxruntime at batch 1 and at PARITY_BATCH. INT8 is
    calibrated on `calibration_images` images of the `train` list of `split_file` (default: the
    split.json that `defects train` wrote beside the checkpoint), so that the images the model is
    evaluated on never set its activation ranges; without a split file, on any images of the folder.
    """
    import torch

    from core.onnx_export import file_sha256, max_abs_difference
    from manufacturing.defects.export import (
        PARITY_BATCH,
        detector_parity,
        export_detector_onnx,
        export_moe_stage_onnx,
        moe_stage_parity,
        quantize_detector_int8,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # rewritten below; the exports are loaded back before it is
    detector = YoloDetector.load(detector_path)
    records = read_voc_folder(calibration_dir)
    parity_set = sample_images(records, parity_images, seed=1)
    batch_sizes = (1, PARITY_BATCH) if dynamic_batch else (1,)
    provenance = {"data": Path(calibration_dir).resolve().name, "source_checkpoint": Path(detector_path).name}
    onnx_path = export_detector_onnx(detector, out_dir / "detector.onnx", dynamic_batch=dynamic_batch,
                                     metadata=provenance)
    parity = detector_parity(detector, YoloDetector.load(onnx_path), parity_set, batch_sizes=batch_sizes)
    result = {"detector_onnx": str(onnx_path), "batch": "dynamic" if dynamic_batch else 1,
              "parity": {**dataclasses.asdict(parity), "passed": parity.passed},
              "sha256": {"detector.onnx": file_sha256(onnx_path)}}
    if int8:
        beside = Path(detector_path).parent / SPLIT_FILE
        split_file = split_file if split_file is not None else (beside if beside.is_file() else None)
        calibration_set = records_by_split(records, split_file, "train") if split_file is not None else records
        int8_path = quantize_detector_int8(onnx_path, out_dir / "detector.int8.onnx",
                                           sample_images(calibration_set, calibration_images, seed=0), detector.imgsz)
        int8_parity = detector_parity(detector, YoloDetector.load(int8_path), parity_set, batch_sizes=batch_sizes)
        result.update(detector_int8_onnx=str(int8_path), int8_difference=dataclasses.asdict(int8_parity),
                      int8_calibration={"images": min(calibration_images, len(calibration_set)),
                                        "from": f"train split of {split_file}" if split_file is not None
                                        else f"any images of {Path(calibration_dir).name}"})
        result["sha256"]["detector.int8.onnx"] = file_sha256(int8_path)
    if moe_path is not None:
        from manufacturing.defects.moe_stage import crops_and_geometry

        stage, _ = CropMoEClassifier.load(moe_path)
        rng = np.random.default_rng(0)
        crops, geometry = [], []
        for image in parity_set:  # four boxes of random place and size on each real image
            h, w = image.shape[:2]
            x1, y1 = rng.uniform(0, 0.5, 4) * w, rng.uniform(0, 0.5, 4) * h
            boxes = np.stack([x1, y1, x1 + rng.uniform(0.2, 0.5, 4) * w, y1 + rng.uniform(0.2, 0.5, 4) * h], 1)
            c, g = crops_and_geometry(image, boxes, stage.config)
            crops.append(c)
            geometry.append(g)
        crops, geometry = np.concatenate(crops), np.concatenate(geometry)
        moe_onnx = export_moe_stage_onnx(stage, out_dir / "moe_stage.onnx", crops, geometry, names=detector.names,
                                         metadata=provenance)
        inputs = {"crops": torch.from_numpy(crops), "geometry": torch.from_numpy(geometry)}
        result.update(moe_onnx=str(moe_onnx),
                      moe_max_abs_logit_difference=max_abs_difference(stage.model_, moe_onnx, inputs),
                      moe_parity=moe_stage_parity(stage, CropMoEClassifier.load(moe_onnx)[0], crops, geometry))
        result["sha256"]["moe_stage.onnx"] = file_sha256(moe_onnx)
    (out_dir / "export.json").write_text(json.dumps(result, indent=1))
    write_manifest(out_dir, unsealed=[p.name for p in out_dir.iterdir() if p.is_dir()])
    return result


@dataclass
class PruneJob:
    """`moeworks compress prune` of a detector: channel removal (manufacturing.defects.pruning), then
    fine-tuning by `defects train`'s own trainer on the detector's split."""

    ratio: float = 0.35  # share of channels removed per group; 0.35 leaves ~47% of YOLO11n's parameters
    epochs: int = 10  # fine-tuning epochs (0: the pruned detector as it is)
    batch: int = 16
    workers: int = 0  # ultralytics augments in the main process on a CPU anyway
    seed: int = 0
    val_fraction: float = 0.2  # the split, when no split file is given: train_job's seeded split
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"--ratio must be in (0, 1) (the share of channels removed), got {self.ratio}")
        if not 0 <= self.epochs <= 1000:
            raise ValueError(f"--epochs must be in [0, 1000], got {self.epochs}")


def prune_job(detector_path: str | Path, voc_dir: str | Path, out_dir: str | Path, job: PruneJob, *,
              split_file: str | Path | None = None, verbose: bool = False) -> dict:
    """Prune the detector file's channels, fine-tune it on its training split, and write a detector
    folder (detector.pt, split.json, prune.json; sealed) that `defects evaluate`, `defects export` and
    serving load as any other.

    The split: `split_file` (a split.json), else the split.json beside the detector, else train_job's
    seeded split of `voc_dir` (the shipped NEU-DET detector's split: its card says so).
    """
    from core.model_files import ModelFilesError, file_sha256, verify_file
    from manufacturing.defects.detector import training_model
    from manufacturing.defects.pruning import prune_detector, save_pruned

    detector_path, out_dir = Path(detector_path), Path(out_dir)
    try:
        verify_file(detector_path)
    except ModelFilesError as error:
        raise DefectDataError(str(error)) from None
    model, metadata = training_model(detector_path)
    names, imgsz = metadata["names"], metadata["imgsz"]
    records = read_voc_folder(voc_dir)
    unknown = sorted(set(class_names(records)) - set(names))
    if unknown:
        raise DefectDataError(f"{voc_dir}: class {unknown[0]!r} is not one of the detector's {names}")
    split_file = split_file or (detector_path.parent / SPLIT_FILE if (detector_path.parent / SPLIT_FILE).is_file()
                                else None)
    if split_file is not None:
        train, val = records_by_split(records, split_file, "train"), records_by_split(records, split_file, "val")
        seed, val_fraction = json.loads(Path(split_file).read_text()).get("seed"), None
    else:
        train, val = seeded_split(records, val_fraction=job.val_fraction, seed=job.seed)
        seed, val_fraction = job.seed, job.val_fraction
    out_dir.mkdir(parents=True, exist_ok=True)
    write_split(out_dir / SPLIT_FILE, train, val, seed=seed, val_fraction=val_fraction, source=str(voc_dir),
                data_hash=data_sha256(records))
    started = time.perf_counter()
    counts = prune_detector(model, ratio=job.ratio, imgsz=imgsz)
    result = {"method": "prune", "source": str(detector_path), "source_sha256": file_sha256(detector_path),
              "ratio": job.ratio, "parameters": counts["parameters_after"],
              "source_parameters": counts["parameters_before"], "epochs": job.epochs, "imgsz": imgsz,
              "train_images": len(train), "val_images": len(val), "split_file": None if split_file is None
              else str(split_file), "prune_seconds": round(time.perf_counter() - started, 2)}
    detector_file = out_dir / DETECTOR_FILE
    if job.epochs == 0:
        save_pruned(model, detector_file, config=metadata["config"], names=names, imgsz=imgsz)
    else:
        # Fine-tuned from a weights-only file of the pruned model (float32: exactly the pruned weights),
        # through the same path as `defects train --weights`.
        start = save_pruned(model, out_dir / "work" / "pruned_start.pt", config=metadata["config"], names=names,
                            imgsz=imgsz, half=False)
        data_yaml = write_yolo_dataset({"train": train, "val": val}, out_dir / "dataset", names)
        config = DetectorConfig(imgsz=imgsz, epochs=job.epochs, batch=job.batch, workers=job.workers, seed=job.seed,
                                threads=job.threads, weights=str(start))
        summary = train_detector(data_yaml, config, out_dir, verbose=verbose)
        save_detector(summary.weights, detector_file, metrics=summary.metrics)
        result.update(train_seconds=round(summary.seconds, 1), ultralytics_val=summary.metrics,
                      epochs_run=summary.epochs)
    (out_dir / "prune.json").write_text(json.dumps(result, indent=1))
    # Sealed: the files a load reads; the dataset copy, the pruned start and ultralytics' run folder
    # (its own pickles) stay outside the manifest and are never loaded.
    write_manifest(out_dir, unsealed=[p.name for p in out_dir.iterdir() if p.is_dir()])
    return {**result, "detector": str(detector_file)}
