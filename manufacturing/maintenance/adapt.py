"""Adapt a trained RUL model to new engines (a new fault mode, a new line) from a few run-to-failure
trajectories: LoRA (core.lora) or full fine-tuning, keeping the base model's features.

The base's fitted normaliser is kept (the adapted net reads the same features), the new engines are
split by unit (early stopping on the held-back ones' windows, as in training) and the result is a
normal RUL model folder: the LoRA update merged into the weights (`maintenance evaluate`, `export`,
`serve` load it as any other), with the adapter itself beside it (adapter.safetensors, adapter.json)
for swapping on the base model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from core import lora
from core.model_files import write_manifest
from core.trainer import data_fingerprint
from manufacturing.maintenance.cmapss import add_rul, validate_frame
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.metrics import rul_metrics
from manufacturing.maintenance.rul import RULEstimator
from manufacturing.maintenance.split import split_units, truncate_units

ADAPTER = "adapter"  # the adapter's file names in the model folder: adapter.safetensors, adapter.json


@dataclass
class RULAdaptConfig:
    """How to adapt. Learning rate and accumulation from the design guide's LoRA settings."""

    method: Literal["lora", "full"] = "lora"
    # None: 1e-2 for LoRA, 1e-4 (the top of the design guide's 3e-5 to 1e-4) for full fine-tuning.
    # On 10 FD003 engines (8 to train, 2 to early-stop on) an FD001 net's LoRA scored a validation
    # RMSE of 21.6 / 12.0 / 14.0 / 11.1 on the 2 held-back engines at 1e-4 / 1e-3 / 3e-3 / 1e-2
    # (25 epochs, benchmarks/adapt.py's split): at the guide's rate a zero-initialised adapter hardly
    # moves in the ~200 optimizer steps a few engines give. Full fine-tuning moves every weight and
    # keeps the guide's rate.
    learning_rate: float | None = None
    # The guide's 4-8 micro-batches per step; 4 of 64 windows (the from-scratch batch of 256) so
    # that 10 new engines (~2,000 windows) still make ~8 optimizer steps an epoch.
    grad_accumulation: int = 4
    batch_size: int = 64
    max_epochs: int = 30
    patience: int = 8  # as in training: the validation loss of a few engines is noisy
    val_fraction: float = 0.2  # new engines held back for early stopping and the reported metrics
    seed: int = 0
    progress: bool = False
    lora: lora.LoRAConfig = field(default_factory=lora.LoRAConfig)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.learning_rate is None:
            self.learning_rate = 1e-2 if self.method == "lora" else 1e-4
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not (isinstance(self.grad_accumulation, int) and 1 <= self.grad_accumulation <= 64):
            raise ValueError(f"grad_accumulation must be an integer in [1, 64], got {self.grad_accumulation!r}")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536):
            raise ValueError(f"batch_size must be an integer in [1, 65536], got {self.batch_size!r}")
        if not (isinstance(self.max_epochs, int) and 1 <= self.max_epochs <= 1000):
            raise ValueError(f"max_epochs must be an integer in [1, 1000], got {self.max_epochs!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


@dataclass
class RULAdaptation:
    """The adapted estimator, its metrics, and the peft model holding the adapter (None for full)."""

    estimator: RULEstimator
    metrics: dict[str, Any]
    lora_model: Any = None


def adapt_rul(base: RULEstimator, frame: pd.DataFrame, config: RULAdaptConfig | None = None, *,
              val_frame: pd.DataFrame | None = None) -> RULAdaptation:
    """Adapt `base` to the run-to-failure engines in `frame`; `base` is left unchanged.

    val_frame: engines to early-stop on (default: `config.val_fraction` of `frame`'s engines).
    Metrics: the held-back engines cut at random cycles (5 cuts each, as `maintenance train`
    validates), scored by the base model and by the adapted one.
    """
    config = config or RULAdaptConfig()
    needed = ["unit", "cycle", "setting_1", "setting_2", "setting_3", *base.normalizer_.sensors_]
    frame = validate_frame(frame, source="adaptation data", columns=needed)
    if val_frame is None:
        if frame["unit"].nunique() < 2:
            raise MaintenanceDataError("adaptation needs at least two run-to-failure engines (one is held back "
                                       "for early stopping)", source="adaptation data", field="unit")
        train_units, val_units = split_units(frame["unit"].to_numpy(), val_fraction=config.val_fraction,
                                             seed=config.seed)
        train_frame, val_frame = frame[frame["unit"].isin(train_units)], frame[frame["unit"].isin(val_units)]
    else:
        train_frame, val_frame = frame, validate_frame(val_frame, source="validation data", columns=needed)
    cap = base.net.rul_cap
    train_frame, labelled_val = add_rul(train_frame, cap=cap), add_rul(val_frame, cap=cap)
    estimator = copy.deepcopy(base)  # the base's normaliser and net config; its weights are trained below
    train = estimator._windows(train_frame)
    if len(train) == 0:
        raise MaintenanceDataError(f"no engine here runs for the model's window of {base.net.window} cycles",
                                   source="adaptation data")
    target = torch.from_numpy(train_frame["rul"].to_numpy(np.float32)[train.cycle_row])
    val = estimator._windows(labelled_val)
    val_x, val_y = val.gather(), torch.from_numpy(labelled_val["rul"].to_numpy(np.float32)[val.cycle_row])

    model = estimator.model_
    lora_model = None
    if config.method == "lora":
        torch.manual_seed(config.seed)  # peft draws A from the global generator: same seed, same adapter
        model = lora_model = lora.attach(model, config.lora, adapter=ADAPTER)
    share = lora.trainable_share(model)
    train_config = replace(base.train, learning_rate=config.learning_rate, batch_size=config.batch_size,
                           max_epochs=config.max_epochs, patience=config.patience, windows_per_epoch=None,
                           progress=config.progress)
    result = estimator.train_net(model, train, target, val_x, val_y, seed=config.seed, config=train_config,
                                 grad_accumulation=config.grad_accumulation)
    estimator.model_ = (lora.merged(lora_model, ADAPTER) if lora_model is not None else model).eval()

    cut, true_rul = truncate_units(val_frame, seed=config.seed, cuts_per_unit=5)
    before = rul_metrics(base.predict(cut, source="validation engines")["rul"].to_numpy(), true_rul, cap=cap)
    after = rul_metrics(estimator.predict(cut, source="validation engines")["rul"].to_numpy(), true_rul, cap=cap)
    trained = share["trainable"] if lora_model is None else lora.describe(lora_model, ADAPTER)["adapter_parameters"]
    base_parameters = sum(p.numel() for p in estimator.model_.parameters())
    adaptation = {
        "method": config.method, "base_data_fingerprint": base.metadata_.get("data_fingerprint"),
        "data_fingerprint": data_fingerprint(frame), "train_units": int(train_frame["unit"].nunique()),
        "val_units": int(val_frame["unit"].nunique()), "train_windows": len(train),
        "trained_parameters": trained, "parameters": base_parameters,
        "trained_share": trained / base_parameters, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "train_seconds": result.seconds, "learning_rate": config.learning_rate,
        "grad_accumulation": config.grad_accumulation,
        **({"lora": lora.describe(lora_model, ADAPTER)} if lora_model is not None else {}),
    }
    estimator.metadata_ = {**base.metadata_, "adaptation": adaptation}
    metrics = {"method": config.method, **{f"base_val_{k}": v for k, v in before.items()},
               **{f"val_{k}": v for k, v in after.items()}, "val_units": adaptation["val_units"],
               "train_units": adaptation["train_units"], "trained_parameters": trained,
               "parameters": base_parameters, "trained_share": adaptation["trained_share"],
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": result.seconds}
    return RULAdaptation(estimator, metrics, lora_model)


def save_adapted(adaptation: RULAdaptation, folder: str | Path) -> Path:
    """The adapted model folder: the merged model as `RULEstimator.save` writes it, the adapter
    files beside it, then the manifest over all of them (written last)."""
    folder = Path(folder)
    adaptation.estimator.save(folder, metrics=adaptation.metrics)
    if adaptation.lora_model is not None:
        lora.save_adapter(adaptation.lora_model, folder, ADAPTER)
    write_manifest(folder, unsealed=[p.name for p in folder.iterdir() if p.is_dir()])
    return folder
