"""Compression of a tabular MoE network (core.blocks.TabularMoE: the credit scorer's and the AI4I
failure model's network): a smaller student distilled from any teacher's logits, the least-routed
experts removed, or the experts' weights hashed; each then fine-tuned.

The teacher is given as logits on the training rows, so it can be anything that scores them (the
credit ensemble's blend, LightGBM, the source network itself). Each result is an ordinary
TabularMoE whose `config` says how to rebuild it (fewer experts, smaller widths,
`hashed_compression`), so a saved folder loads through its usual loader.
Multi-output networks (AI4I's failure and five modes) are independent binary outputs: the
distillation loss takes every (row, output) logit as one binary prediction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from core.blocks import TabularMoE, TabularMoEConfig
from core.compress.distill import DistillConfig, distillation_loss
from core.compress.hashed import hash_weights, hashed_parameters
from core.compress.prune import expert_load, prune_experts
from core.trainer import Trainer, TrainerConfig, TrainResult


@dataclass
class TabularFineTuneConfig:
    epochs: int = 15  # short: pruned and hashed nets start from a trained one, students learn from a teacher
    patience: int = 4
    learning_rate: float = 2e-3  # the credit MoE's from-scratch rate; early stopping guards the rest
    weight_decay: float = 0.01
    batch_size: int = 256
    alpha: float = 0.5  # weight of the teacher's soft targets (DistilBERT's balance); 0: labels only
    temperature: float = 2.0  # Hinton et al.'s 2-5 range, its low end for binary outputs
    monitor: Literal["val_loss", "val_auc"] = "val_loss"  # val_auc: ROC-AUC of output 0
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 100_000:
                raise ValueError(f"{name} must be an integer in [1, 100000], got {value!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not 0 <= self.weight_decay <= 1:
            raise ValueError(f"weight_decay must be in [0, 1], got {self.weight_decay!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.monitor not in ("val_loss", "val_auc"):
            raise ValueError(f"monitor must be val_loss or val_auc, got {self.monitor!r}")


def parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def student_config(source: TabularMoEConfig, *, num_experts: int, hidden_size: int, intermediate_size: int,
                   num_layers: int) -> TabularMoEConfig:
    """The source's inputs and outputs with fewer and smaller experts (dense weights)."""
    moe = replace(source.moe, num_experts=num_experts, top_k=min(source.moe.top_k, num_experts),
                  hidden_size=hidden_size, intermediate_size=intermediate_size)
    return replace(source, moe=moe, num_layers=num_layers, hashed_compression=None)


def _refuse_hashed(net: TabularMoE, what: str) -> None:
    if net.config.hashed_compression is not None:
        raise ValueError(f"{what}: this network's experts are already hashed; start from its dense source")


def prune_tabular_experts(net: TabularMoE, inputs: tuple[torch.Tensor, ...], *, keep: int,
                          mode: Literal["drop", "merge"] = "drop", batch: int = 4096) -> tuple[TabularMoE, dict]:
    """A copy of `net` whose MoE layers keep their `keep` most-routed experts, routing counted over
    `inputs` (the network's forward arguments, rows first). Returns (pruned, per-layer routing)."""
    _refuse_hashed(net, "expert pruning")
    if not 1 <= keep < net.config.moe.num_experts:
        raise ValueError(f"keep-experts must be in [1, {net.config.moe.num_experts - 1}], got {keep}")
    pruned = copy.deepcopy(net)
    rows = len(inputs[0])
    loads = expert_load(pruned, [tuple(t[i:i + batch] for t in inputs) for i in range(0, rows, batch)],
                        run=lambda m, b: m(*b))
    results = prune_experts(pruned, loads, keep=keep, mode=mode)
    pruned.config = replace(net.config, moe=replace(net.config.moe, num_experts=keep,
                                                    top_k=min(net.config.moe.top_k, keep)))
    routing = {name: {"load": loads[name].tolist(), "kept": r.kept, "merged_into": r.merged_into}
               for name, r in results.items()}
    return pruned, routing


def hash_tabular_experts(net: TabularMoE, *, compression: float) -> TabularMoE:
    """A copy of `net` whose experts' w_in / w_out are hashed at `compression`, each pool the
    least-squares projection of the trained weights; its config rebuilds the same layout."""
    _refuse_hashed(net, "hashing")
    if not 1 < compression <= 1024:
        raise ValueError(f"compression must be in (1, 1024], got {compression}")
    hashed = copy.deepcopy(net)  # a dense net: deep-copying is safe before any parametrization
    hash_weights(hashed, hashed.expert_weight_names(), compression=compression)
    hashed.config = replace(net.config, hashed_compression=compression)
    return hashed


def fine_tune(net: TabularMoE, inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
              valid_inputs: tuple[torch.Tensor, ...], valid_target: torch.Tensor, config: TabularFineTuneConfig, *,
              teacher_logits: torch.Tensor | None = None,
              weight_decay: float | None = None) -> TrainResult:
    """Train `net` in place (the best epoch by `config.monitor` is kept) on (inputs, target), the
    target (rows, outputs) or (rows,) of 0/1 labels; with `teacher_logits` (same shape as the
    net's logits) the loss is core.compress.distill's alpha * soft + (1 - alpha) * hard."""
    distill = DistillConfig(task="classification", alpha=config.alpha if teacher_logits is not None else 0.0,
                            temperature=config.temperature)
    target = target.to(torch.float32)
    valid_target = valid_target.to(torch.float32)
    rows = len(target)
    soft = teacher_logits if teacher_logits is not None else torch.zeros(rows)

    def batches(epoch: int):
        order = torch.from_numpy(np.random.default_rng(config.seed + epoch).permutation(rows))
        for start in range(0, rows, config.batch_size):
            index = order[start:start + config.batch_size]
            yield tuple(t[index] for t in inputs), target[index], soft[index]

    def loss_fn(m, batch) -> torch.Tensor:
        logits, aux = m(*batch[0])
        logits = logits.reshape(batch[1].shape)  # (rows,) for one output, (rows, outputs) otherwise
        teacher = batch[2].reshape(logits.shape) if teacher_logits is not None else logits.detach()
        # every (row, output) logit as one binary prediction (the two-class form of the soft loss)
        return distillation_loss(logits.reshape(-1), teacher.reshape(-1), batch[1].reshape(-1), distill) + aux

    def evaluate(m) -> dict[str, float]:
        logits = torch.cat([m(*(t[i:i + 8192] for t in valid_inputs))[0]
                            for i in range(0, len(valid_target), 8192)]).reshape(valid_target.shape)
        metrics = {"val_loss": F.binary_cross_entropy_with_logits(logits, valid_target).item()}
        first, labels = logits.reshape(len(valid_target), -1)[:, 0], valid_target.reshape(len(valid_target), -1)[:, 0]
        if config.monitor == "val_auc":
            metrics["val_auc"] = float(roc_auc_score(labels.numpy(), first.numpy()))
        return metrics

    trainer = Trainer(TrainerConfig(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay if weight_decay is None else weight_decay,
        grad_accumulation=1, max_epochs=config.epochs, patience=config.patience, monitor=config.monitor,
        mode="max" if config.monitor == "val_auc" else "min", seed=config.seed, progress=config.progress))
    result = trainer.fit(net.train(), batches, steps_per_epoch=-(-rows // config.batch_size), loss_fn=loss_fn,
                         evaluate_fn=evaluate)
    net.eval()
    return result


def compress_tabular(net: TabularMoE, method: str, inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
                     valid_inputs: tuple[torch.Tensor, ...], valid_target: torch.Tensor,
                     config: TabularFineTuneConfig, *, teacher_logits: torch.Tensor | None,
                     student: dict[str, int] | None = None, keep_experts: int | None = None,
                     mode: Literal["drop", "merge"] = "drop",
                     compression: float = 8.0) -> tuple[TabularMoE, dict[str, Any], TrainResult]:
    """One of distill (a new `student`-sized net: num_experts, hidden_size, intermediate_size,
    num_layers), prune (`keep_experts`, `mode`) or hash (`compression`) applied to `net` (left
    unchanged), then fine_tune. Returns (compressed net, details for the folder, training result)."""
    if method == "distill":
        torch.manual_seed(config.seed)
        compressed = TabularMoE(student_config(net.config, **(student or {})))
        details: dict[str, Any] = {**(student or {})}
    elif method == "prune":
        keep = keep_experts or max(net.config.moe.top_k, net.config.moe.num_experts // 2)
        compressed, routing = prune_tabular_experts(net, inputs, keep=keep, mode=mode)
        details = {"keep_experts": keep, "mode": mode, "routing": routing}
    elif method == "hash":
        compressed = hash_tabular_experts(net, compression=compression)
        pool, virtual = hashed_parameters(compressed)
        details = {"compression": compression, "hashed_values": pool, "virtual_weights": virtual}
    else:
        raise ValueError(f"method must be distill, prune or hash, got {method!r}")
    result = fine_tune(compressed, inputs, target, valid_inputs, valid_target, config, teacher_logits=teacher_logits)
    details.update(method=method, source_parameters=parameters(net), parameters=parameters(compressed),
                   alpha=config.alpha if teacher_logits is not None else 0.0, best_epoch=result.best_epoch,
                   epochs_run=result.epochs_run, train_seconds=result.seconds)
    return compressed, details, result


def logits_of(probability: np.ndarray) -> torch.Tensor:
    """Logits from probabilities (any teacher's), clipped away from 0 and 1."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
    return torch.from_numpy(np.log(p / (1 - p)).astype(np.float32))
