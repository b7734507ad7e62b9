"""A small, shared training loop: AdamW, warm-up then linear decay, accumulation, early stopping,
and end-of-epoch callbacks (`EpochCallback`: keep the best weights, average the last epochs' weights)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from core.model_files import CheckpointError


@dataclass
class TrainerConfig:
    learning_rate: float = 1e-4  # the design guide's range is 3e-5 to 1e-4; from-scratch tabular nets want the top
    weight_decay: float = 0.01  # AdamW's usual value; biases and norms are excluded
    warmup_fraction: float = 0.06  # linear warm-up over the first 6% of optimizer steps
    grad_accumulation: int = 4  # the guide's 4-8 micro-batches per optimizer step
    max_epochs: int = 20
    patience: int = 3  # epochs without improvement of the monitored metric before stopping
    max_grad_norm: float = 1.0
    monitor: str = "val_loss"  # metric name returned by the evaluate function
    mode: Literal["min", "max"] = "min"
    seed: int = 0
    progress: bool = True  # tqdm bar per epoch; off in tests

    def __post_init__(self) -> None:
        checks = ((self.learning_rate > 0, "learning_rate must be > 0"),
                  (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
                  (self.grad_accumulation >= 1, "grad_accumulation must be >= 1"),
                  (self.max_epochs >= 1, "max_epochs must be >= 1"), (self.patience >= 1, "patience must be >= 1"),
                  (self.mode in ("min", "max"), "mode must be 'min' or 'max'"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainerConfig: {message}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code still draws from the legacy global state
    torch.manual_seed(seed)


def data_fingerprint(*arrays: Any) -> str:
    """sha256 over arrays / tensors / DataFrames, to record what a model was trained on."""
    digest = hashlib.sha256()
    for array in arrays:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if hasattr(array, "to_numpy") and hasattr(array, "columns"):
            digest.update(",".join(map(str, array.columns)).encode())
            import pandas as pd

            array = pd.util.hash_pandas_object(array, index=False).to_numpy()
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def warmup_linear_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or "embedding" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    seconds: float


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EpochCallback:
    """A hook into `Trainer.fit` at the end of each epoch; override what is needed (the rest do nothing).

    after_training(model, epoch): the epoch's optimizer steps are done, before evaluation (the model
        is in eval mode).
    on_epoch_end(model, epoch, metrics, improved): after evaluation; `improved` is True when the
        monitored metric is the best so far (the epoch early stopping measures from).
    on_fit_end(model): after the last epoch, whether early-stopped or not.
    """

    def after_training(self, model: nn.Module, epoch: int) -> None:
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float], improved: bool) -> None:
        return None

    def on_fit_end(self, model: nn.Module) -> None:
        return None


class KeepBest(EpochCallback):
    """Copy the weights of the best epoch (by the monitored metric) and load them into the trained
    model at the end. source: the module whose weights are kept (default: the trained model; a
    `WeightAveraging.averaged` keeps the best averaged weights instead)."""

    def __init__(self, source: nn.Module | None = None) -> None:
        self.source = source
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float], improved: bool) -> None:
        if improved:
            self.state = _copy_state(self.source if self.source is not None else model)

    def on_fit_end(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


class WeightAveraging(EpochCallback):
    """`averaged`: a copy of `model` holding the mean of its weights at the end of the last `last`
    epochs (tail averaging), refreshed after each epoch's training, before evaluation, so that an
    evaluate function can score the averaged weights instead of the single epoch's."""

    def __init__(self, model: nn.Module, *, last: int) -> None:
        if not isinstance(last, int) or last < 1:
            raise ValueError(f"WeightAveraging: last must be a positive integer, got {last!r}")
        self.averaged = copy.deepcopy(model)
        self.window: deque[dict[str, torch.Tensor]] = deque(maxlen=last)

    def after_training(self, model: nn.Module, epoch: int) -> None:
        self.window.append(_copy_state(model))
        self.averaged.load_state_dict({k: torch.stack([w[k] for w in self.window]).mean(0) for k in self.window[-1]})
        self.averaged.eval()


class Trainer:
    """Train any nn.Module with a loss function and an evaluation function.

    loss_fn(model, batch) -> scalar loss (task loss plus the model's auxiliary losses).
    evaluate_fn(model) -> dict of validation metrics that includes `config.monitor`.
    callbacks: `EpochCallback`s run at each epoch's end, in order; None means [KeepBest()], i.e. the
    best state (by the monitored metric) is restored into the model at the end.
    """

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config

    def fit(self, model: nn.Module, train_batches: Callable[[int], Iterable[Any]], steps_per_epoch: int,
            loss_fn: Callable[[nn.Module, Any], torch.Tensor],
            evaluate_fn: Callable[[nn.Module], dict[str, float]],
            callbacks: Sequence[EpochCallback] | None = None) -> TrainResult:
        """train_batches(epoch) yields the epoch's micro-batches (reshuffled by the caller per epoch)."""
        cfg = self.config
        callbacks = [KeepBest()] if callbacks is None else list(callbacks)
        seed_everything(cfg.seed)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        optimizer_steps = max(1, math.ceil(steps_per_epoch / cfg.grad_accumulation)) * cfg.max_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(optimizer_steps, int(cfg.warmup_fraction * optimizer_steps)))
        sign = 1.0 if cfg.mode == "min" else -1.0
        best_value, best_metrics, best_epoch = math.inf, {}, -1
        history: list[dict[str, float]] = []
        started = time.perf_counter()
        epoch = 0
        for epoch in range(cfg.max_epochs):
            model.train()
            running, seen = 0.0, 0
            bar = tqdm(train_batches(epoch), total=steps_per_epoch, disable=not cfg.progress,
                       desc=f"epoch {epoch + 1}/{cfg.max_epochs}", leave=False)
            optimizer.zero_grad(set_to_none=True)
            for step, batch in enumerate(bar):
                loss = loss_fn(model, batch)
                assert torch.isfinite(loss), f"non-finite loss {loss.item()} at epoch {epoch}, step {step}"
                (loss / cfg.grad_accumulation).backward()
                running += loss.item()
                seen += 1
                if (step + 1) % cfg.grad_accumulation == 0 or step + 1 == steps_per_epoch:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if cfg.progress:
                    bar.set_postfix(loss=f"{running / seen:.4f}")
            model.eval()
            with torch.no_grad():
                for callback in callbacks:
                    callback.after_training(model, epoch + 1)
                metrics = {"train_loss": running / max(seen, 1), **evaluate_fn(model)}
            metrics["epoch"] = epoch + 1
            history.append(metrics)
            assert cfg.monitor in metrics, f"evaluate_fn must return {cfg.monitor!r}; got {sorted(metrics)}"
            value = sign * float(metrics[cfg.monitor])
            improved = value < best_value
            if improved:
                best_value, best_metrics, best_epoch = value, metrics, epoch + 1
            for callback in callbacks:
                callback.on_epoch_end(model, epoch + 1, metrics, improved)
            if not improved and epoch + 1 - best_epoch >= cfg.patience:
                break
        for callback in callbacks:
            callback.on_fit_end(model)
        return TrainResult(best_metrics, best_epoch, epoch + 1, history, time.perf_counter() - started)


def save_checkpoint(path: str | Path, model: nn.Module, *, config: Any, metrics: dict[str, Any] | None = None,
                    data_fingerprint: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write weights plus metadata (config, metrics, data fingerprint, versions) to one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    metadata = {
        "config": config_dict,
        "metrics": metrics or {},
        "data_fingerprint": data_fingerprint,
        "torch_version": str(torch.__version__),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    # Plain JSON types only: fails here rather than at load time, and numpy scalars become floats.
    metadata = json.loads(json.dumps(metadata, default=float))
    torch.save({"state_dict": model.state_dict(), "metadata": metadata}, path)
    return path


def _torch_load_reason(error: BaseException) -> str:
    """The one informative sentence of torch.load's error (the global it refused, the bad opcode),
    without its paragraphs of advice to retry with weights_only=False."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please|\n|$)", text, re.S)
    reason = " ".join((found.group(1) if found else text).split()) or type(error).__name__
    return f"{type(error).__name__}: {reason[:160]}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """{"state_dict", "metadata"} of a save_checkpoint file, read weights-only: nothing in it can run.

    torch's weights-only unpickler admits tensors and plain containers only; any other global (the
    way a crafted pickle reaches os.system, or an ultralytics checkpoint its classes) is refused
    before it is imported or called. Raises FileNotFoundError for a missing file and CheckpointError
    for anything else that is not a checkpoint of this shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... with paragraphs
        raise CheckpointError(f"{path}: refused: not a weights-only checkpoint (a full pickle, which could run code "
                              f"when loaded, or a damaged file): {_torch_load_reason(error)}") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict)
            and isinstance(payload.get("metadata"), dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items())):
        raise CheckpointError(f"{path}: not a moeworks checkpoint (expected 'state_dict' tensors and 'metadata')")
    return payload


def load_checkpoint(path: str | Path,
                    build_model: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its saved config with `build_model(config_dict)` and load its weights.

    The file is read weights-only (read_checkpoint): a pickle that would run code is refused.
    """
    payload = read_checkpoint(path)
    metadata = payload["metadata"]
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"{path}: checkpoint metadata has no 'config' object")
    model = build_model(metadata["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, metadata
