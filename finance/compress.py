"""A smaller credit MoE from a trained credit model (core.compress.tabular): a distilled student
(the teacher: any credit model, the ensemble included), the least-routed experts removed, or the
experts' weights hashed; each fine-tuned and calibrated as `finance train` calibrates a model.

The records are split as `finance train` split them (seeded and stratified, the source's seed), so
the compressed model trains on the source's training rows and reports its metrics on the same
validation rows. The result is a normal `moe` credit folder (`finance evaluate`, `score`,
`export`, the server and bundles load it); compression.json beside it says what was done.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core.compress.tabular import TabularFineTuneConfig, compress_tabular, logits_of
from core.model_files import write_manifest
from core.trainer import data_fingerprint
from finance.data import Records
from finance.errors import CreditDataError
from finance.evaluation import credit_metrics
from finance.models.input_gradients import TabularMoEGradient
from finance.models.moe import MoEModel, MoEModelConfig, build_module
from finance.scorer import CreditScorer, split_records

COMPRESSION_FILE = "compression.json"


def _teacher_logits(teacher: CreditScorer, frame) -> torch.Tensor:
    return logits_of(teacher.model_.predict_proba(teacher.features(frame))[:, 1])


def compress_scorer(source: CreditScorer, records: Records, method: Literal["distill", "prune", "hash"], *,
                    config: TabularFineTuneConfig | None = None, teacher: CreditScorer | None = None,
                    student: dict[str, int] | None = None, keep_experts: int | None = None,
                    mode: Literal["drop", "merge"] = "drop", compression: float = 8.0) -> tuple[CreditScorer, dict]:
    """distill: any credit `source` (its predictions the soft targets) -> a `student`-sized MoE
    (num_experts, hidden_size, intermediate_size, num_layers). prune / hash: a `moe` source.
    Fine-tuning is guided by `teacher` (another credit folder of the same dataset and features) or
    else by the source itself, at config.alpha. Returns (the compressed scorer, metrics)."""
    config = config or TabularFineTuneConfig(monitor="val_auc")
    if records.dataset != source.dataset:
        raise CreditDataError(f"the model scores {source.dataset!r} records, not {records.dataset!r}", field="data")
    if method != "distill" and (source.model_name != "moe" or not isinstance(source.model_, MoEModel)):
        raise CreditDataError(f"{method} needs a `moe` credit folder (it changes the MoE network); this one is "
                              f"{source.model_name!r} (distill takes any credit model as the teacher)", field="model")
    if teacher is not None and (teacher.dataset != source.dataset
                                or teacher.pipeline_.feature_names_ != source.pipeline_.feature_names_):
        raise CreditDataError("the teacher scores other records or features than the model; give a model trained "
                              "on the same dataset", field="teacher")
    train, valid = split_records(records, seed=source.seed)
    X_train = source.pipeline_.transform(train.frame)
    X_valid = source.pipeline_.transform(valid.frame)
    guide = teacher or source
    soft = _teacher_logits(guide, train.frame) if config.alpha > 0 else None
    if method == "distill":
        sizes = {"num_experts": 4, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, **(student or {})}
        model_config = MoEModelConfig(**sizes, top_k=min(2, sizes["num_experts"]))
        module = build_module(model_config, X_train.shape[1])
        module.fit_standardisation(X_train, model_config.clip_quantile)
        base_net = module.net  # only its config (inputs, outputs) is read: distill builds the student
        student = {"num_experts": model_config.num_experts, "hidden_size": model_config.hidden_size,
                   "intermediate_size": model_config.intermediate_size, "num_layers": model_config.num_layers}
    else:
        module = copy.deepcopy(source.model_.module_)  # a dense source (hashed ones are refused below)
        base_net, model_config = module.net, source.model_.config_
    with torch.no_grad():
        xs, xv = module.standardise(torch.from_numpy(X_train)), module.standardise(torch.from_numpy(X_valid))
    try:
        net, details, result = compress_tabular(
            base_net, method, (xs,), torch.as_tensor(train.target), (xv,), torch.as_tensor(valid.target), config,
            teacher_logits=soft, student=student, keep_experts=keep_experts, mode=mode, compression=compression)
    except ValueError as error:  # keep-experts out of range, already hashed: the user's choice of folder or flag
        raise CreditDataError(str(error), field="model") from None
    if method == "distill":
        details.update(teacher_model=guide.model_name, source_parameters=sum(
            p.numel() for p in source.model_.module_.net.parameters()) if isinstance(source.model_, MoEModel) else None)
    elif method == "prune":
        model_config = replace(model_config, num_experts=net.config.moe.num_experts, top_k=net.config.moe.top_k)
    else:
        model_config = replace(model_config, hashed_compression=compression)
    details["guided_by"] = None if soft is None else ("teacher" if teacher is not None else "source")
    compressed = module.around(net).eval()

    model = MoEModel._restored(config=model_config, feature_names=source.pipeline_.feature_names_,
                               dataset=source.dataset)
    model.module_, model.result_ = compressed, result
    model.data_fingerprint_ = data_fingerprint(X_train, train.target)
    model.gradient_kernel_ = TabularMoEGradient.from_module(net.dense_copy())  # hashed: dense weights
    scorer = copy.copy(source)
    scorer.model_name, scorer.model_ = "moe", model
    before = credit_metrics(valid.target, source.predict_pd(valid.frame), approval_rate=source.policy_.approval_rate)
    scorer.calibrate(train, valid)  # cut-off, references, metrics and row fingerprint on the source's split
    metrics = {"method": method, **{f"source_{k}": v for k, v in before.items()}, **scorer.validation_metrics_,
               "train_rows": len(train), "valid_rows": len(valid), **details}
    return scorer, metrics


def save_compressed(scorer: CreditScorer, metrics: dict[str, Any], folder: str | Path) -> Path:
    """The scorer's folder as `CreditScorer.save` writes it, compression.json, then the manifest last."""
    folder = Path(folder)
    scorer.save(folder)
    (folder / COMPRESSION_FILE).write_text(json.dumps(metrics, indent=1, default=_plain))
    write_manifest(folder, unsealed=[p.name for p in folder.iterdir() if p.is_dir() and p.name != "model"])
    return folder


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else float(value)
