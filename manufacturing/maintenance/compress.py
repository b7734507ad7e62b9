"""Compressed RUL models from a trained one: a distilled student, pruned channels or experts,
hashed weights (core.compress), each fine-tuned and saved as an ordinary RUL model folder.

Every method trains on the same engines as the source model and validates on the engines it
held back (the split is rebuilt from the source's recorded protocol: seed and share of engines),
so the compressed model's validation figures compare with the source's one for one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.compress.distill import DistillConfig, Distiller
from core.compress.hashed import hash_weights, hashed_parameters
from core.compress.prune import channel_pruner, expert_load, l1_penalty, prune_experts, prune_step
from core.trainer import Trainer, TrainerConfig, TrainResult, data_fingerprint
from manufacturing.maintenance.cmapss import add_rul, validate_frame
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.metrics import rul_metrics
from manufacturing.maintenance.models import RULEnsemble, RULNetConfig, build_member, hashable_weights
from manufacturing.maintenance.protocol import ProtocolConfig
from manufacturing.maintenance.rul import RULEstimator
from manufacturing.maintenance.split import split_units, truncate_units


@dataclass
class FineTuneConfig:
    epochs: int = 10  # short: the compressed nets start from a trained model or learn from a teacher
    patience: int = 4
    learning_rate: float = 2e-3  # the RUL recipe's rate (warm-up then linear decay, core trainer)
    batch_size: int = 256
    windows_per_epoch: int | None = 8192  # as the RUL recipe: random windows drawn per epoch
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be an integer in [1, 1000], got {self.epochs!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if self.windows_per_epoch is not None and self.windows_per_epoch < 1:
            raise ValueError(f"windows_per_epoch must be >= 1 or None, got {self.windows_per_epoch!r}")


def source_protocol(estimator: RULEstimator) -> ProtocolConfig:
    """The unit split and cuts the source model was validated with (from its saved metrics)."""
    metrics = estimator.metadata_.get("metrics", {})
    train_units, val_units = metrics.get("train_units"), metrics.get("val_units")
    share = val_units / (train_units + val_units) if train_units and val_units else 0.2
    return ProtocolConfig(val_fraction=share, cuts_per_unit=int(metrics.get("cuts_per_unit", 5)),
                          seed=estimator.train.seed)


@dataclass
class SplitData:
    train: pd.DataFrame
    val: pd.DataFrame
    protocol: ProtocolConfig


def split_like_source(estimator: RULEstimator, frame: pd.DataFrame) -> SplitData:
    """Run-to-failure `frame` split by unit as the source model's training split it."""
    frame = validate_frame(frame, source="training data")
    protocol = source_protocol(estimator)
    train_units, val_units = split_units(frame["unit"].to_numpy(), val_fraction=protocol.val_fraction,
                                         seed=protocol.seed)
    return SplitData(frame[frame["unit"].isin(train_units)], frame[frame["unit"].isin(val_units)], protocol)


def _windows_and_target(estimator: RULEstimator, frame: pd.DataFrame) -> tuple[Any, torch.Tensor]:
    frame = add_rul(frame, cap=estimator.net.rul_cap)
    windows = estimator._windows(frame)
    return windows, torch.from_numpy(frame["rul"].to_numpy(np.float32)[windows.cycle_row])


def fine_tune(estimator: RULEstimator, model: torch.nn.Module, data: SplitData, config: FineTuneConfig, *,
              teacher: torch.nn.Module | None = None, alpha: float = 0.5, l1: float = 0.0) -> TrainResult:
    """Train `model` (in place; the best state by validation loss is kept) on the source's training
    engines, through the source's normaliser. With `teacher`: distillation (core.compress.distill,
    RUL / cap on both sides). `l1`: the L1 penalty on weight matrices that precedes channel pruning."""
    cap = estimator.net.rul_cap
    train, target = _windows_and_target(estimator, data.train)
    val, val_target = _windows_and_target(estimator, data.val)
    val_x = val.gather()
    per_epoch = min(len(train), config.windows_per_epoch or len(train))
    extra = (lambda m: l1_penalty(m, l1)) if l1 > 0 else None
    if teacher is not None:
        loss_fn = Distiller(teacher, config=DistillConfig(task="regression", alpha=alpha),
                            scale=lambda rul: rul / cap, extra_loss=extra)
    else:
        def loss_fn(m, batch):
            predicted, aux = m(batch[0])
            loss = F.mse_loss(predicted / cap, batch[1] / cap) + aux
            return loss + extra(m) if extra else loss

    def batches(epoch: int):
        order = np.random.default_rng(config.seed + epoch).permutation(len(train))[:per_epoch]
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            yield train.gather(index), target[torch.from_numpy(index)]

    def evaluate(m):
        predicted = torch.cat([m(val_x[i:i + 4096])[0] for i in range(0, len(val_x), 4096)])
        mse = F.mse_loss(predicted, val_target).item()
        return {"val_loss": mse / cap**2, "val_window_rmse": mse**0.5}

    trainer = Trainer(TrainerConfig(learning_rate=config.learning_rate, weight_decay=estimator.train.weight_decay,
                                    grad_accumulation=1, max_epochs=config.epochs, patience=config.patience,
                                    seed=config.seed, progress=config.progress))
    return trainer.fit(model, batches, steps_per_epoch=-(-per_epoch // config.batch_size), loss_fn=loss_fn,
                       evaluate_fn=evaluate)


def validate(estimator: RULEstimator, data: SplitData) -> dict[str, Any]:
    """RMSE and NASA score on the held-back engines cut at random cycles (the source's protocol)."""
    cut, true_rul = truncate_units(data.val, seed=data.protocol.seed, cuts_per_unit=data.protocol.cuts_per_unit)
    predicted = estimator.predict(cut, source="validation engines")["rul"].to_numpy()
    metrics = {"val_" + k: v for k, v in rul_metrics(predicted, true_rul, cap=estimator.net.rul_cap).items()}
    return {**metrics, "val_units": int(data.val["unit"].nunique()), "train_units": int(data.train["unit"].nunique()),
            "cuts_per_unit": data.protocol.cuts_per_unit}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _derived(source: RULEstimator, net: RULNetConfig, model: torch.nn.Module, method: str,
             details: dict[str, Any], data: SplitData, results: list[TrainResult]) -> RULEstimator:
    """A new estimator that shares the source's normaliser and features, with `model` and `net`."""
    derived = RULEstimator(net=net, features=source.features, train=source.train)
    derived.normalizer_, derived.net_, derived.model_ = source.normalizer_, net, model.eval()
    derived.train_results_ = results
    derived.metadata_ = {
        **{k: v for k, v in source.metadata_.items() if k != "metrics"},
        "kind": net.kind, "members": net.members, "parameters": count_parameters(model),
        "best_epoch": [r.best_epoch for r in results], "epochs_run": [r.epochs_run for r in results],
        "train_seconds": sum(r.seconds for r in results), "data_fingerprint": data_fingerprint(data.train),
        "compression": {"method": method, "source_parameters": count_parameters(source.model_), **details},
    }
    return derived


def _members(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.members) if isinstance(model, RULEnsemble) else [model]


def _rebuild(members: list[torch.nn.Module]) -> torch.nn.Module:
    return members[0] if len(members) == 1 else RULEnsemble(members)


def _refuse_hashed(source: RULEstimator, method: str) -> None:
    if source.net_.hashed_compression is not None:
        raise MaintenanceDataError(f"{method}: this model's weights are already hashed; {method} its dense "
                                   "source model instead", field="model")


def distill(source: RULEstimator, frame: pd.DataFrame, *, hidden_size: int = 32, num_layers: int = 1,
            alpha: float = 0.5, config: FineTuneConfig | None = None) -> tuple[RULEstimator, dict[str, Any]]:
    """Distil `source` (any RUL model: the MoE seed ensemble included) into one small LSTM that reads
    the same normalised features. Returns (student, validation metrics)."""
    config = config or FineTuneConfig()
    if not 1 <= hidden_size <= 1024 or not 1 <= num_layers <= 8:
        raise MaintenanceDataError("hidden size must be in [1, 1024] and layers in [1, 8]", field="hidden")
    data = split_like_source(source, frame)
    net = RULNetConfig(kind="lstm", num_features=source.net_.num_features, window=source.net_.window,
                       rul_cap=source.net_.rul_cap, hidden_size=hidden_size, num_layers=num_layers,
                       dropout=source.net_.dropout)
    torch.manual_seed(config.seed)
    student = build_member(net)
    result = fine_tune(source, student, data, config, teacher=source.model_, alpha=alpha)
    derived = _derived(source, net, student, "distill",
                       {"alpha": alpha, "teacher_kind": source.net_.kind, "teacher_members": source.net_.members},
                       data, [result])
    return derived, validate(derived, data)


def _teacher_for(source: RULEstimator, teacher: RULEstimator | None, alpha: float) -> torch.nn.Module | None:
    """The net whose outputs guide fine-tuning after pruning or hashing: `teacher` (e.g. the MoE the
    source was distilled from), else the dense source itself, the usual recovery after pruning;
    None with alpha 0 (true RUL only)."""
    if not 0 <= alpha <= 1:
        raise MaintenanceDataError(f"alpha must be in [0, 1], got {alpha}", field="alpha")
    if alpha == 0:
        return None
    if teacher is None:
        return source.model_
    if teacher.normalizer_.state() != source.normalizer_.state() or teacher.net_.window != source.net_.window:
        raise MaintenanceDataError("the teacher reads other features than this model (another normaliser or "
                                   "window); give the model it was distilled from", field="teacher")
    return teacher.model_


def _guide_name(guide: torch.nn.Module | None, teacher: RULEstimator | None) -> str | None:
    return None if guide is None else f"teacher ({teacher.net_.kind})" if teacher is not None else "source"


def prune(source: RULEstimator, frame: pd.DataFrame, *, ratio: float = 0.5, l1: float = 1e-6,
          l1_epochs: int = 5, steps: int = 1, keep_experts: int | None = None, merge: bool = False,
          teacher: RULEstimator | None = None, alpha: float = 0.5,
          config: FineTuneConfig | None = None) -> tuple[RULEstimator, dict[str, Any]]:
    """lstm kind: L1-regularised training, then `ratio` of the LSTM's hidden units and the head's
    channels removed (torch-pruning) in `steps` equal steps, each followed by fine-tuning
    (iterative pruning; 1: one removal, one fine-tuning). moe kind: each member keeps its
    `keep_experts` most-routed experts (routing counted over the training windows; the rest
    dropped or merged), then fine-tuning; both guided by `teacher` (see _teacher_for) at `alpha`."""
    config = config or FineTuneConfig()
    _refuse_hashed(source, "prune")
    guide = _teacher_for(source, teacher, alpha)
    data = split_like_source(source, frame)
    members = [copy.deepcopy(m).train() for m in _members(source.model_)]
    results: list[TrainResult] = []
    if source.net_.kind == "lstm":
        if not 0 < ratio < 1:
            raise MaintenanceDataError(f"ratio must be in (0, 1), got {ratio}", field="ratio")
        if l1_epochs:
            results += [fine_tune(source, m, data, replace(config, epochs=l1_epochs), l1=l1, teacher=guide,
                                  alpha=alpha) for m in members]
        if not isinstance(steps, int) or not 1 <= steps <= 20:
            raise MaintenanceDataError(f"steps must be an integer in [1, 20], got {steps}", field="steps")
        example = torch.zeros(2, source.net_.window, source.net_.num_features)
        pruners = [channel_pruner(m, example, ratio=ratio, steps=steps, ignored_layers=[m.head[-1]],
                                  output_transform=lambda out: out[0]) for m in members]
        for step in range(steps):
            for m, pruner in zip(members, pruners, strict=True):
                prune_step(m, pruner)
            if step < steps - 1:  # the last step's fine-tuning is the common one below
                results += [fine_tune(source, m, data, config, teacher=guide, alpha=alpha) for m in members]
        widths = {(m.lstm.hidden_size, m.head[0].out_features) for m in members}
        if len(widths) != 1:  # the same ratio should prune every member to the same widths
            raise RuntimeError(f"pruning left the ensemble's members at different widths {sorted(widths)}")
        hidden, head = widths.pop()
        net = replace(source.net_, hidden_size=hidden, head_hidden=head)
        details = {"ratio": ratio, "l1": l1, "l1_epochs": l1_epochs, "steps": steps, "hidden_size": hidden,
                   "head_hidden": head}
    else:
        experts = source.net_.moe.num_experts
        keep = keep_experts or max(source.net_.moe.top_k, experts // 2)
        if not 1 <= keep < experts:
            raise MaintenanceDataError(f"keep-experts must be in [1, {experts - 1}], got {keep}", field="keep_experts")
        train, _ = _windows_and_target(source, data.train)
        sample = np.random.default_rng(config.seed).permutation(len(train))[:8192]
        kept = {}
        for k, m in enumerate(members):
            loads = expert_load(m, [train.gather(np.sort(sample[i:i + 1024])) for i in range(0, len(sample), 1024)],
                                run=lambda net, x: net(x))
            kept[k] = {name: {"load": load.tolist(), "kept": r.kept, "merged_into": r.merged_into}
                       for (name, load), r in zip(loads.items(), prune_experts(
                           m, loads, keep=keep, mode="merge" if merge else "drop").values(), strict=True)}
        moe = replace(source.net_.moe, num_experts=keep, top_k=min(source.net_.moe.top_k, keep))
        net = replace(source.net_, moe=moe)
        details = {"keep_experts": keep, "mode": "merge" if merge else "drop", "routing": kept}
    results += [fine_tune(source, m, data, config, teacher=guide, alpha=alpha) for m in members]
    details.update(alpha=alpha if guide is not None else 0.0, guided_by=_guide_name(guide, teacher))
    derived = _derived(source, net, _rebuild(members), "prune", details, data, results)
    return derived, validate(derived, data)


def hash_model(source: RULEstimator, frame: pd.DataFrame, *, compression: float = 8.0,
               teacher: RULEstimator | None = None, alpha: float = 0.5,
               config: FineTuneConfig | None = None) -> tuple[RULEstimator, dict[str, Any]]:
    """Hashed weight sharing at `compression` (the moe kind: its experts' weights; the lstm kind:
    every weight matrix), initialised by projecting the trained weights, then fine-tuned under
    `teacher` (see _teacher_for) at `alpha`."""
    config = config or FineTuneConfig()
    _refuse_hashed(source, "hash")
    guide = _teacher_for(source, teacher, alpha)
    if not 1 < compression <= 1024:
        raise MaintenanceDataError(f"compression must be in (1, 1024], got {compression}", field="compression")
    data = split_like_source(source, frame)
    members = [copy.deepcopy(m).train() for m in _members(source.model_)]
    for m in members:
        hash_weights(m, hashable_weights(m), compression=compression)
    results = [fine_tune(source, m, data, config, teacher=guide, alpha=alpha) for m in members]
    model = _rebuild(members)
    pool, virtual = hashed_parameters(model)
    details = {"compression": compression, "hashed_values": pool, "virtual_weights": virtual,
               "scope": "experts" if source.net_.kind == "moe" else "all weight matrices",
               "alpha": alpha if guide is not None else 0.0, "guided_by": _guide_name(guide, teacher)}
    derived = _derived(source, replace(source.net_, hashed_compression=compression), model, "hash", details, data,
                       results)
    return derived, validate(derived, data)

