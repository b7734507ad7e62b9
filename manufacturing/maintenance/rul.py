"""The RUL estimator: normaliser + window net, trained with the shared trainer, saved to a folder.

A model folder holds `model.pt` (weights, net config, the fitted normaliser and the training
metrics, written by core.trainer.save_checkpoint) and `model.json` (the same metadata, readable),
sealed by MANIFEST.json (core.model_files): `load` refuses a changed, missing or added file, and
reads model.pt weights-only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.model_files import verify_manifest, write_manifest
from core.trainer import Trainer, TrainerConfig, TrainResult, data_fingerprint, load_checkpoint, save_checkpoint
from manufacturing.maintenance.cmapss import add_rul, validate_frame
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.features import ConditionNormalizer, FeatureConfig
from manufacturing.maintenance.models import RULEnsemble, RULNetConfig, build_member, build_rul_net
from manufacturing.maintenance.windows import Windows, build_windows

CHECKPOINT = "model.pt"


@dataclass
class RULTrainConfig:
    max_epochs: int = 40  # early stopping usually ends FD001 runs near epoch 20-30
    patience: int = 8  # the validation loss of 20-50 engines is noisy from epoch to epoch
    batch_size: int = 256  # 32 steps per epoch at the default sample below
    # Windows drawn (without replacement) per epoch. Neighbouring windows overlap in 29 of 30
    # cycles, so a random 8k of FD004's 48k teaches nearly as much as all of them at a sixth of
    # the cost on a 2-core CPU; None uses every window every epoch.
    windows_per_epoch: int | None = 8192
    learning_rate: float = 2e-3  # small from-scratch nets; warm-up then linear decay (core trainer)
    weight_decay: float = 1e-4  # light: dropout already regularises
    seed: int = 0
    progress: bool = True


# Each kind's recipe where it differs from the RULTrainConfig defaults. Both kinds use the
# defaults: in tuning runs on split seed 1, every window every epoch and lr 1e-3 did no better.
KIND_RECIPES: dict[str, dict[str, Any]] = {"lstm": {}, "moe": {}}


def default_train_config(kind: str, **overrides: Any) -> RULTrainConfig:
    """The benchmarked training recipe of a model kind (overrides replace fields)."""
    return RULTrainConfig(**{**KIND_RECIPES[kind], **overrides})


# Each kind's features where they differ from the FeatureConfig defaults. The MoE model reads the
# regime history (cycles run in each regime so far): on split seed 1 a single MoE went from 18.51
# to 16.21 validation RMSE on FD002 with it (13.43 to 13.60 on FD004, level within noise). It also
# reads each sensor's mean since the engine's first cycle: on split seed 1 that took a single MoE
# from 13.94 / 16.21 / 8.88 / 13.60 to 9.01 / 11.68 / 7.95 / 9.73 on FD001-FD004.
KIND_FEATURES: dict[str, dict[str, Any]] = {"lstm": {}, "moe": {"history": True, "running_mean": True}}


def default_feature_config(kind: str, num_regimes: int, **overrides: Any) -> FeatureConfig:
    """The benchmarked features of a model kind on data with `num_regimes` operating regimes."""
    return FeatureConfig(num_regimes=num_regimes, **{**KIND_FEATURES[kind], **overrides})


@dataclass
class RULEstimator:
    """fit(run-to-failure frame, val_frame=...) -> self; predict(frame) -> RUL at each unit's last cycle.

    Learned: `normalizer_`, `net_` (the net config with the fitted feature count), `model_` (one
    net, or a RULEnsemble of `net.members`), `train_results_` (a core TrainResult per member),
    `metadata_`.
    """

    net: RULNetConfig = field(default_factory=RULNetConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: RULTrainConfig = field(default_factory=RULTrainConfig)

    # -- training ---------------------------------------------------------------------------
    def _windows(self, frame: pd.DataFrame, *, last_only: bool = False) -> Windows:
        return build_windows(self.normalizer_.transform(frame), frame["unit"].to_numpy(),
                             window=self.net.window, last_only=last_only)

    def fit(self, frame: pd.DataFrame, *, val_frame: pd.DataFrame | None = None) -> RULEstimator:
        """frame, val_frame: run-to-failure rows (C-MAPSS columns) of disjoint units.

        Early stopping watches the loss over every window of `val_frame` (not the last-cycle
        metric reported on it), so that the reported figure is not the one selected on.
        """
        frame = add_rul(validate_frame(frame, source="training data"), cap=self.net.rul_cap)
        self.normalizer_ = ConditionNormalizer(self.features).fit(frame)
        self.net_ = replace(self.net, num_features=self.normalizer_.num_features)
        train = self._windows(frame)
        target = torch.from_numpy(frame["rul"].to_numpy(np.float32)[train.cycle_row])
        if val_frame is not None:
            val_frame = add_rul(validate_frame(val_frame, source="validation data"), cap=self.net.rul_cap)
            val = self._windows(val_frame)
            val_x, val_y = val.gather(), torch.from_numpy(val_frame["rul"].to_numpy(np.float32)[val.cycle_row])
        else:  # no held-out engines: early stopping can only watch (a slice of) the training windows
            val_x, val_y = train.gather(slice(0, min(len(train), 4096))), target[:4096]
        members = [self._fit_member(train, target, val_x, val_y, seed=self.train.seed + k)
                   for k in range(self.net_.members)]
        self.train_results_ = [result for _, result in members]
        model = members[0][0] if len(members) == 1 else RULEnsemble([m for m, _ in members])
        self.model_ = model.eval()
        self.metadata_ = {
            "kind": self.net.kind, "members": self.net_.members,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_units": int(frame["unit"].nunique()), "train_windows": len(train),
            "best_epoch": [r.best_epoch for r in self.train_results_],
            "epochs_run": [r.epochs_run for r in self.train_results_],
            "train_seconds": sum(r.seconds for r in self.train_results_), "sensors": self.normalizer_.sensors_,
            "data_fingerprint": data_fingerprint(frame),
        }
        return self

    def _fit_member(self, train: Windows, target: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
                    seed: int) -> tuple[torch.nn.Module, TrainResult]:
        """Train one net (its own init, window draws and early stopping from `seed`); the best state."""
        torch.manual_seed(seed)
        model = build_member(self.net_)
        return model, self.train_net(model, train, target, val_x, val_y, seed=seed)

    def train_net(self, model: torch.nn.Module, train: Windows, target: torch.Tensor, val_x: torch.Tensor,
                  val_y: torch.Tensor, *, seed: int, config: RULTrainConfig | None = None,
                  grad_accumulation: int = 1) -> TrainResult:
        """Train `model` (in place; a fresh member, or a fitted net being adapted) on windows of this
        estimator's features, early-stopped on the loss over (val_x, val_y); leaves the best state."""
        config = config or self.train
        cap = self.net.rul_cap
        batch_size = config.batch_size
        per_epoch = min(len(train), config.windows_per_epoch or len(train))

        def batches(epoch: int):
            order = np.random.default_rng(seed + epoch).permutation(len(train))[:per_epoch]
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                yield train.gather(index), target[torch.from_numpy(index)]

        def loss_fn(m, batch):
            predicted, aux = m(batch[0])
            return F.mse_loss(predicted / cap, batch[1] / cap) + aux

        def evaluate(m):
            predicted = torch.cat([m(val_x[i:i + 4096])[0] for i in range(0, len(val_x), 4096)])
            mse = F.mse_loss(predicted, val_y).item()
            return {"val_loss": mse / cap**2, "val_window_rmse": mse**0.5}

        trainer = Trainer(TrainerConfig(
            learning_rate=config.learning_rate, weight_decay=config.weight_decay, grad_accumulation=grad_accumulation,
            max_epochs=config.max_epochs, patience=config.patience, seed=seed, progress=config.progress))
        return trainer.fit(model, batches, steps_per_epoch=-(-per_epoch // batch_size), loss_fn=loss_fn,
                           evaluate_fn=evaluate)

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def predict_windows(self, windows: torch.Tensor, *, member: int | None = None) -> np.ndarray:
        """windows: (batch, window, features) normalised -> (batch,) RUL in cycles.

        member: the index of one ensemble member to run alone (None: the whole model).
        """
        if member is not None and not isinstance(self.model_, RULEnsemble):
            raise ValueError("member: only an ensemble has members")
        model = self.model_ if member is None else self.model_.members[member]
        return torch.cat([model(windows[i:i + 4096])[0] for i in range(0, max(len(windows), 1), 4096)]).numpy()

    def predict(self, frame: pd.DataFrame, *, source: str = "data", member: int | None = None) -> pd.DataFrame:
        """RUL after the last cycle of each unit in `frame` (C-MAPSS columns; a test file).

        Returns a frame with `unit`, `cycle` (the last one) and `rul` (predicted), sorted by unit;
        `member` as in `predict_windows`.
        """
        needed = ["unit", "cycle", "setting_1", "setting_2", "setting_3", *self.normalizer_.sensors_]
        frame = validate_frame(frame, source=source, columns=needed)
        if frame.empty:
            raise MaintenanceDataError("no rows to score", source=source)
        windows = self._windows(frame, last_only=True)
        predicted = self.predict_windows(windows.gather(), member=member)
        return pd.DataFrame({"unit": windows.unit, "cycle": frame["cycle"].to_numpy()[windows.cycle_row],
                             "rul": predicted})

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        extra = {"normalizer": self.normalizer_.state(), "train_config": asdict(self.train),
                 "info": self.metadata_}
        save_checkpoint(folder / CHECKPOINT, self.model_, config=self.net_, metrics=metrics,
                        data_fingerprint=self.metadata_.get("data_fingerprint"), extra=extra)
        summary = {"net": self.net_.to_dict(), "metrics": metrics or {}, **extra, "saved_at": time.time()}
        (folder / "model.json").write_text(json.dumps(summary, indent=2, default=float))
        write_manifest(folder, unsealed=[p.name for p in folder.iterdir() if p.is_dir()])
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> RULEstimator:
        path = Path(folder) / CHECKPOINT
        if not path.is_file():
            raise MaintenanceDataError(f"no {CHECKPOINT} here: not a RUL model folder (make one with "
                                       "`moeworks maintenance train`)", source=str(folder))
        try:
            verify_manifest(folder)
            model, metadata = load_checkpoint(path, build_rul_net)
        except ValueError as error:  # ModelFilesError, CheckpointError: one line naming the file
            raise MaintenanceDataError(str(error)) from None  # the message names the file
        except (TypeError, RuntimeError) as error:  # unknown config fields or mismatched weights
            raise MaintenanceDataError(f"saved with another model layout than this version builds ({error}); "
                                       "retrain it with `moeworks maintenance train`", source=str(folder)) from error
        net = RULNetConfig(**metadata["config"])
        self = cls(net=net,
                   features=FeatureConfig(**metadata["normalizer"]["config"]),
                   train=RULTrainConfig(**metadata["train_config"]))
        self.normalizer_ = ConditionNormalizer.from_state(metadata["normalizer"])
        self.net_, self.model_ = net, model
        self.metadata_ = {**metadata["info"], "metrics": metadata.get("metrics", {})}
        return self
