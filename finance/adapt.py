"""Adapt a trained credit MoE to a new segment (a product, a region, an education group) from a few
labelled rows: LoRA (core.lora) or full fine-tuning of the network, keeping the base's features.

The base's feature pipeline and input standardisation are kept (the segment's rows are read the
way the base reads them); the segment's rows are split (seeded, stratified) into a part to train on
and a part for early stopping, the PD cut-off, the PSI/CSI references and the reported metrics.
The result is a normal credit model folder: the update merged into the network (`finance
evaluate`, `score`, `export` and the server load it as any MoE scorer), the adapter beside it
(model/adapter.safetensors, model/adapter.json).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from core import lora
from core.model_files import write_manifest
from core.row_fingerprint import RowFingerprint
from core.trainer import Trainer, TrainerConfig, data_fingerprint
from finance.data import Records
from finance.errors import CreditDataError
from finance.evaluation import credit_metrics
from finance.models.input_gradients import TabularMoEGradient
from finance.models.moe import MoEModel
from finance.scorer import CreditScorer, split_records

ADAPTER = "adapter"


@dataclass
class CreditAdaptConfig:
    """How to adapt. Learning rate and accumulation from the design guide's LoRA settings."""

    method: Literal["lora", "full"] = "lora"
    # The top of the design guide's 3e-5 to 1e-4, for LoRA and full fine-tuning alike: on 10% of the
    # Taiwan high-school segment (benchmarks/adapt.py's split) LoRA's validation AUC was 0.747 / 0.745
    # / 0.745 at 1e-4 / 1e-3 / 1e-2 (the RUL model, further from its base, takes 1e-2: see
    # manufacturing.maintenance.adapt).
    learning_rate: float = 1e-4
    # The guide's 4-8 micro-batches per step, 4 of 64 rows: 500 segment rows still make ~2 steps an epoch.
    grad_accumulation: int = 4
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 8  # validation AUC on a hundred rows moves by luck from epoch to epoch
    valid_share: float = 0.2  # the segment's rows kept for early stopping, the cut-off and the metrics
    seed: int = 0
    progress: bool = False
    lora: lora.LoRAConfig = field(default_factory=lora.LoRAConfig)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not (isinstance(self.grad_accumulation, int) and 1 <= self.grad_accumulation <= 64):
            raise ValueError(f"grad_accumulation must be an integer in [1, 64], got {self.grad_accumulation!r}")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 65536):
            raise ValueError(f"batch_size must be an integer in [1, 65536], got {self.batch_size!r}")
        if not (isinstance(self.max_epochs, int) and 1 <= self.max_epochs <= 1000):
            raise ValueError(f"max_epochs must be an integer in [1, 1000], got {self.max_epochs!r}")
        if not 0 < self.valid_share < 1:
            raise ValueError(f"valid_share must be in (0, 1), got {self.valid_share!r}")


@dataclass
class CreditAdaptation:
    scorer: CreditScorer
    metrics: dict[str, Any]
    lora_model: Any = None  # the peft model holding the adapter (None for full fine-tuning)


def adapt_scorer(base: CreditScorer, records: Records, config: CreditAdaptConfig | None = None) -> CreditAdaptation:
    """Adapt `base` (a `moe` scorer) to the labelled segment `records`; `base` is left unchanged."""
    config = config or CreditAdaptConfig()
    if base.model_name != "moe" or not isinstance(base.model_, MoEModel):
        raise CreditDataError(f"adapt needs a `moe` model folder (LoRA adapts the MoE network); this one is "
                              f"{base.model_name!r}", field="model")
    if base.model_.config_.hashed_compression is not None:
        raise CreditDataError("adapt needs a dense network; this folder's experts are hashed (`compress hash`): "
                              "adapt its dense source, then hash the result", field="model")
    if records.dataset != base.dataset:
        raise CreditDataError(f"the model scores {base.dataset!r} records, not {records.dataset!r}", field="data")
    counts = np.bincount(records.target.astype(int), minlength=2)
    if counts.min() < 5:
        raise CreditDataError(f"the segment has {counts[1]} defaulters and {counts[0]} non-defaulters; adaptation "
                              "needs at least 5 of each (some are held back for early stopping)",
                              field="target")
    train, valid = split_records(records, valid_share=config.valid_share, seed=config.seed)
    X_train = base.pipeline_.transform(train.frame)
    X_valid = base.pipeline_.transform(valid.frame)
    model = copy.copy(base.model_)  # the base's config and feature names; the network is copied below
    module = copy.deepcopy(base.model_.module_)
    with torch.no_grad():
        xs, xv = module.standardise(torch.from_numpy(X_train)), module.standardise(torch.from_numpy(X_valid))
    ys = torch.as_tensor(train.target, dtype=torch.float32)
    net = module.net
    lora_model = None
    if config.method == "lora":
        torch.manual_seed(config.seed)  # peft draws A from the global generator: same seed, same adapter
        net = lora_model = lora.attach(net, config.lora, adapter=ADAPTER)
    trained = lora.trainable_share(net)["trainable"]

    def batches(epoch: int):
        order = torch.from_numpy(np.random.default_rng(config.seed + epoch).permutation(len(ys)))
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            yield xs[index], ys[index]

    def loss_fn(m, batch) -> torch.Tensor:
        logits, aux = m(batch[0])
        return F.binary_cross_entropy_with_logits(logits[:, 0], batch[1]) + aux

    def evaluate(m) -> dict[str, float]:
        logits = m(xv)[0][:, 0]
        return {"val_loss": F.binary_cross_entropy_with_logits(logits, torch.as_tensor(
            valid.target, dtype=torch.float32)).item(), "val_auc": float(roc_auc_score(valid.target, logits.numpy()))}

    trainer = Trainer(TrainerConfig(learning_rate=config.learning_rate, weight_decay=model.config_.weight_decay,
                                    grad_accumulation=config.grad_accumulation, max_epochs=config.max_epochs,
                                    patience=config.patience, monitor="val_auc", mode="max", seed=config.seed,
                                    progress=config.progress))
    result = trainer.fit(net, batches, steps_per_epoch=-(-len(ys) // config.batch_size), loss_fn=loss_fn,
                         evaluate_fn=evaluate)
    module.net = lora.merged(lora_model, ADAPTER) if lora_model is not None else net.eval()
    module.eval()
    model.module_ = module
    model.result_ = result
    model.data_fingerprint_ = data_fingerprint(X_train, train.target)
    model.gradient_kernel_ = TabularMoEGradient.from_module(module.net)

    scorer = copy.copy(base)
    scorer.model_ = model
    before = credit_metrics(valid.target, base.predict_pd(valid.frame), approval_rate=base.policy_.approval_rate)
    scorer.calibrate(train, valid)  # cut-off, references and metrics on the segment
    if base.row_fingerprint_ is not None:  # rows seen: the base's training rows and the segment's
        scorer.row_fingerprint_ = RowFingerprint(base.row_fingerprint_.train.union(scorer.row_fingerprint_.train),
                                                 base.row_fingerprint_.valid.union(scorer.row_fingerprint_.valid))
    parameters = sum(p.numel() for p in module.net.parameters())
    if lora_model is not None:
        trained = lora.describe(lora_model, ADAPTER)["adapter_parameters"]
    metrics = {"method": config.method, **{f"base_{k}": v for k, v in before.items()},
               **scorer.validation_metrics_, "train_rows": len(train), "valid_rows": len(valid),
               "trained_parameters": trained, "parameters": parameters, "trained_share": trained / parameters,
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": result.seconds}
    return CreditAdaptation(scorer, metrics, lora_model)


def save_adapted(adaptation: CreditAdaptation, folder: str | Path) -> Path:
    """The adapted scorer's folder as `CreditScorer.save` writes it, the adapter in model/, then the
    manifest over all of them (written last)."""
    folder = Path(folder)
    adaptation.scorer.save(folder)
    if adaptation.lora_model is not None:
        lora.save_adapter(adaptation.lora_model, folder / "model", ADAPTER)
    (folder / "adaptation.json").write_text(_json(adaptation.metrics))
    write_manifest(folder, unsealed=[p.name for p in folder.iterdir() if p.is_dir() and p.name != "model"])
    return folder


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=1, default=float)
