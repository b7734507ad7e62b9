"""A small RUL model trained in seconds on generated data, for demos and the digital twin."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from manufacturing.maintenance.features import FeatureConfig
from manufacturing.maintenance.generator import generate_cmapss
from manufacturing.maintenance.models import RULNetConfig, default_net_config
from manufacturing.maintenance.protocol import ProtocolConfig, train_and_validate
from manufacturing.maintenance.rul import RULEstimator, RULTrainConfig


def train_quick_rul_model(out_dir: str | Path | None = None, *, kind: str = "lstm", num_units: int = 40,
                          num_regimes: int = 1, max_epochs: int = 6, seed: int = 0, life_features: bool = False,
                          progress: bool = False) -> tuple[RULEstimator, dict[str, Any]]:
    """Train a compact RUL model on `num_units` generated engines (well under 30 s on 2 CPU cores).

    life_features: with the features that read the engine's whole life so far (regime history and
    running means, `FeatureConfig.history` / `running_mean`), as the MoE recipe has them.
    Returns (estimator, validation metrics on held-back generated engines); saves the model folder
    to `out_dir` when given, ready for `StreamingRULPredictor.from_dir` or `maintenance evaluate`.
    """
    frame = generate_cmapss(num_units, num_regimes=num_regimes, seed=seed, min_life=128, max_life=240)
    estimator = RULEstimator(
        net=default_net_config(kind, hidden_size=32, num_layers=1, members=1,
                               moe=replace(RULNetConfig().moe, hidden_size=32, intermediate_size=64)),
        features=FeatureConfig(num_regimes=num_regimes, history=life_features, running_mean=life_features),
        train=RULTrainConfig(max_epochs=max_epochs, patience=max_epochs, windows_per_epoch=2048,
                             learning_rate=5e-3, seed=seed, progress=progress))
    estimator, metrics = train_and_validate(estimator, frame, ProtocolConfig(val_fraction=0.25, seed=seed))
    metrics["generated"] = True
    if out_dir is not None:
        estimator.save(out_dir, metrics=metrics)
    return estimator, metrics
