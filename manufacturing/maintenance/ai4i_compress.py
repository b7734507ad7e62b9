"""A smaller MoE backend for an AI4I failure model (core.compress.tabular): a distilled student (the
teacher: the folder's default backend, LightGBM or the MoE, or another AI4I folder), the
least-routed experts removed, or the experts' weights hashed; each fine-tuned.

The rows are split as `maintenance ai4i-train` split them (the source's seed), so the compressed
network trains on the source's training rows and is scored on the same validation rows. The
LightGBM backend is kept as it is; the default backend is chosen again on the validation rows'
failure PR-AUC, as `fit` chooses it. The result is a normal AI4I folder.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from core.compress.tabular import TabularFineTuneConfig, compress_tabular, logits_of
from core.trainer import data_fingerprint
from manufacturing.maintenance.ai4i import (
    INPUTS,
    LABELS,
    OUTPUTS,
    AI4IFailureModel,
    alert_metrics,
    split_rows,
    validate_ai4i,
)
from manufacturing.maintenance.errors import MaintenanceDataError


def compress_ai4i(source: AI4IFailureModel, frame: pd.DataFrame, method: Literal["distill", "prune", "hash"], *,
                  config: TabularFineTuneConfig | None = None, teacher: AI4IFailureModel | None = None,
                  student: dict[str, int] | None = None, keep_experts: int | None = None,
                  mode: Literal["drop", "merge"] = "drop",
                  compression: float = 8.0) -> tuple[AI4IFailureModel, dict[str, Any], dict[str, Any]]:
    """Returns (the AI4I model with the compressed MoE backend, both backends' metrics on the
    validation rows (AI4IFailureModel.evaluate), what was done).
    Soft targets: distill, the guide's default backend; prune and hash, the guide's MoE (the dense
    source guiding its compressed copy); the guide is `teacher` or the source."""
    config = config or TabularFineTuneConfig()
    frame = validate_ai4i(frame, source="training data", labels=True)
    train_rows, val_rows = split_rows(frame, seed=source.seed)
    inputs, valid_inputs = source.moe_inputs(train_rows), source.moe_inputs(val_rows)
    target = torch.from_numpy(train_rows[LABELS].to_numpy(np.float32))
    valid_target = torch.from_numpy(val_rows[LABELS].to_numpy(np.float32))
    guide = teacher or source
    soft = None
    if config.alpha > 0:
        backend = guide.default_backend_ if method == "distill" else "moe"
        soft = logits_of(guide.predict_proba(train_rows, backend=backend)[OUTPUTS].to_numpy())
    sizes = None
    if method == "distill":
        sizes = {"num_experts": 4, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, **(student or {})}
    try:
        net, details, result = compress_tabular(
            source.moe_, method, inputs, target, valid_inputs, valid_target, config, teacher_logits=soft,
            student=sizes, keep_experts=keep_experts, mode=mode, compression=compression)
    except ValueError as error:  # keep-experts out of range, already hashed
        raise MaintenanceDataError(str(error), field="model") from None
    if soft is not None:
        details.update(guided_by="teacher" if teacher is not None else "source",
                       teacher_backend=guide.default_backend_ if method == "distill" else "moe")
    compressed = copy.copy(source)
    compressed.moe_, compressed.moe_config_, compressed.moe = net, net.config, net.config.moe
    compressed.history_, compressed.moe_seconds_ = result.history, result.seconds
    val_pr = {b: alert_metrics(compressed.predict_proba(val_rows, backend=b)["failure"].to_numpy(),
                               val_rows["Machine failure"].to_numpy(), alert_rate=0.05)["pr_auc"] or 0.0
              for b in ("lightgbm", "moe")}
    compressed.default_backend_ = max(val_pr, key=val_pr.get)
    compressed.fingerprint_ = data_fingerprint(train_rows[INPUTS + LABELS])
    details["source_moe"] = source.evaluate(val_rows)["moe"]  # the dense source on the same rows
    return compressed, compressed.evaluate(val_rows), details
