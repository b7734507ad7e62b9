"""core's tabular Mixture-of-Experts network as a credit model.

The router sees every feature, so experts can take customer segments of their own (students,
the self-employed, thin-file applicants) where one set of weights would average them. Inputs are
imputed with training medians, clipped to training quantiles and standardised inside the module,
so the saved network (and its ONNX export) takes the raw feature matrix, NaNs included.
Attributions for reason codes are integrated gradients from the average applicant.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.trainer import (
    KeepBest,
    Trainer,
    TrainerConfig,
    WeightAveraging,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from finance.models.base import CreditModel, FitData, register_model
from finance.models.input_gradients import TabularMoEGradient


@dataclass
class MoEModelConfig:
    num_experts: int = 16  # the bottom of the engine's 16-128 range: credit sets have 10^4-10^6 rows
    top_k: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    dropout: float = 0.15  # tabular nets overfit before trees do
    learning_rate: float = 2e-3  # from scratch on standardised inputs; early stopping guards the rest
    weight_decay: float = 0.05
    batch_size: int = 512
    max_epochs: int = 25
    patience: int = 4  # epochs without validation-AUC gain before stopping
    # Score (and keep) the mean of the weights at the end of the last `average_last` epochs: the
    # validation AUC of single epochs jumped by up to 0.008 on GMSC, so the best single epoch is partly luck.
    average_last: int = 3
    clip_quantile: float = 0.005  # clip each feature to its [0.5%, 99.5%] training range: heavy tails
    attribution_steps: int = 8  # integrated-gradient steps (midpoint rule) for reason codes
    # Hashed weight sharing of the experts (core.compress.hashed; `moeworks compress hash`): virtual
    # weights per stored value, None dense. The saved folder rebuilds the hashed network from it.
    hashed_compression: float | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"MoEModelConfig: {message}")

        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers", "batch_size",
                     "max_epochs", "patience", "average_last", "attribution_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.num_experts:
            fail(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.dropout < 1:
            fail(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.learning_rate > 0:
            fail(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            fail(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.clip_quantile < 0.5:
            fail(f"clip_quantile must lie in [0, 0.5), got {self.clip_quantile!r}")
        if self.hashed_compression is not None and not (
                isinstance(self.hashed_compression, int | float) and 1 <= self.hashed_compression <= 1024):
            fail(f"hashed_compression must be in [1, 1024], got {self.hashed_compression!r}")


# Integrated-gradient paths of at most this many points (9 per application at the default 8
# steps) take the NumPy forward and backward of finance.models.input_gradients instead of torch autograd.
# CPU time, NumPy / torch, on the credit network's shape (benchmarks/input_gradients.py, two runs,
# 214 and 25 inputs): 9 points 0.39-0.70x, 90 points 0.26-0.37x, 360 points 0.62-0.83x,
# 900 points 0.85-0.96x, 3,600 points 1.24-1.38x.
NUMPY_PATH_ROWS = 512


class StandardisedMoE(nn.Module):
    """Raw features (batch, F) float32, NaN allowed -> logit of default (batch,)."""

    BUFFERS = ("fill", "low", "high", "mean", "scale")  # the standardisation fitted on training features

    def __init__(self, net: TabularMoE, num_features: int) -> None:
        super().__init__()
        self.net = net
        for name in self.BUFFERS:
            self.register_buffer(name, torch.zeros(num_features))

    def around(self, net: TabularMoE) -> StandardisedMoE:
        """`net` behind this module's standardisation (copied), in this module's mode."""
        other = StandardisedMoE(net, len(self.fill))
        for name in self.BUFFERS:
            getattr(other, name).copy_(getattr(self, name))
        return other.train(self.training)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self.fill, x)
        x = torch.minimum(torch.maximum(x, self.low), self.high)
        return (x - self.mean) / self.scale  # (batch, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.net(self.standardise(x))
        return logits[:, 0]

    @torch.no_grad()
    def fit_standardisation(self, X: np.ndarray, clip_quantile: float) -> None:
        """Set the buffers from training features X (n, F), NaN allowed: median fill, clipping to the
        [q, 1 - q] quantiles, then the clipped columns' mean and standard deviation."""
        X = X.astype(np.float64)
        with np.errstate(all="ignore"):
            fill = np.nan_to_num(np.nanmedian(X, axis=0))
            low = np.nan_to_num(np.nanquantile(X, clip_quantile, axis=0))
            high = np.nan_to_num(np.nanquantile(X, 1 - clip_quantile, axis=0))
            clipped = np.clip(np.where(np.isnan(X), fill, X), low, high)
        scale = clipped.std(axis=0)
        for name, value in (("fill", fill), ("low", low), ("high", high), ("mean", clipped.mean(axis=0)),
                            ("scale", np.where(scale > 1e-9, scale, 1.0))):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def dense_copy(self) -> StandardisedMoE:
        """This module with the network's hashed expert weights materialized (for ONNX export);
        itself when nothing is hashed."""
        if self.net.config.hashed_compression is None:
            return self
        return self.around(self.net.dense_copy())


def _proba(logits: np.ndarray) -> np.ndarray:
    """(n, 2) probabilities of no default and default from (n,) float64 logits."""
    pd_ = 1.0 / (1.0 + np.exp(-logits))
    return np.column_stack([1 - pd_, pd_])


class _Probability(nn.Module):
    """The exported graph: features (batch, F) -> probability of default (batch, 1)."""

    def __init__(self, scorer: StandardisedMoE) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scorer(features))[:, None]


def build_module(config: MoEModelConfig, num_features: int) -> StandardisedMoE:
    """The untrained network (with its standardisation buffers) a `moe` credit model of `config` fits."""
    net = TabularMoE(TabularMoEConfig(
        num_numeric=num_features, num_layers=config.num_layers, dropout=config.dropout,
        hashed_compression=config.hashed_compression,
        moe=MoEConfig(num_experts=config.num_experts, top_k=config.top_k, hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size)))
    return StandardisedMoE(net, num_features)


@register_model("moe")
class MoEModel(CreditModel):
    config_class = MoEModelConfig

    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        c = self.config_
        torch.manual_seed(self.seed)
        self.module_ = build_module(c, X.X.shape[1])
        train_X = X.X
        self.module_.fit_standardisation(train_X, c.clip_quantile)
        with torch.no_grad():
            xs = self.module_.standardise(torch.from_numpy(train_X))
            xv = self.module_.standardise(torch.from_numpy(X_valid.X))
        ys = torch.as_tensor(y, dtype=torch.float32)
        ws = torch.as_tensor(sample_weight if sample_weight is not None else np.ones(len(y)), dtype=torch.float32)
        yv = y_valid
        net = self.module_.net

        def batches(epoch: int):
            order = torch.from_numpy(np.random.default_rng(self.seed + epoch).permutation(len(ys)))
            for start in range(0, len(order), c.batch_size):
                idx = order[start:start + c.batch_size]
                yield xs[idx], ys[idx], ws[idx]

        def loss_fn(model: nn.Module, batch) -> torch.Tensor:
            logits, aux = model(batch[0])
            return F.binary_cross_entropy_with_logits(logits[:, 0], batch[1], weight=batch[2]) + aux

        # Early stopping and the weights kept go by the averaged weights' validation AUC.
        averaging = WeightAveraging(net, last=c.average_last)

        def evaluate(model: nn.Module) -> dict[str, float]:
            averaged = averaging.averaged
            logits = torch.cat([averaged(xv[i:i + 8192])[0][:, 0] for i in range(0, len(xv), 8192)])
            loss = F.binary_cross_entropy_with_logits(logits, torch.as_tensor(yv, dtype=torch.float32)).item()
            return {"val_loss": loss, "val_auc": float(roc_auc_score(yv, logits.numpy()))}

        trainer = Trainer(TrainerConfig(learning_rate=c.learning_rate, weight_decay=c.weight_decay,
                                        grad_accumulation=1, max_epochs=c.max_epochs, patience=c.patience,
                                        monitor="val_auc", mode="max", seed=self.seed, progress=self.progress))
        self.result_ = trainer.fit(net, batches, steps_per_epoch=-(-len(ys) // c.batch_size), loss_fn=loss_fn,
                                   evaluate_fn=evaluate, callbacks=[averaging, KeepBest(source=averaging.averaged)])
        self.data_fingerprint_ = data_fingerprint(train_X, y)
        self.module_.eval()
        self.gradient_kernel_ = TabularMoEGradient.from_module(net)

    @torch.inference_mode()
    def logits(self, X: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        return torch.cat([self.module_(x[i:i + 65536]) for i in range(0, len(x), 65536)]).numpy().astype(np.float64)

    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._input(X)
        return _proba(self.logits(data.X))

    def contributions(self, X: FitData | np.ndarray) -> np.ndarray:
        """Integrated gradients of the logit in standardised space, from the average applicant (0)."""
        return self._integrated_gradients(self._input(X).X, with_logits=False)[1]

    def predict_with_contributions(self, X: FitData | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both from one pass: the applicant itself rides along as one more point of the path."""
        logits, contributions = self._integrated_gradients(self._input(X).X, with_logits=True)
        return _proba(logits), contributions

    def _integrated_gradients(self, X: np.ndarray, *, with_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """(logits (n,) or None, contributions (n, F)): `attribution_steps` midpoint-rule steps from
        0 to each standardised applicant z, and with `with_logits` a last point at z whose logit is
        the prediction (its gradient is not used; rows do not interact, so the steps are unchanged)."""
        steps = self.config_.attribution_steps
        alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps  # midpoint rule
        if with_logits:
            alphas = np.append(alphas, np.float32(1.0))
        logits_out, out = [], []
        for start in range(0, len(X), 4096):
            with torch.no_grad():
                z = self.module_.standardise(torch.from_numpy(np.ascontiguousarray(X[start:start + 4096]))).numpy()
            logits, grad = self._path_gradients(z, alphas)  # (points, n), (points, n, F)
            out.append(z * grad[:steps].mean(0))
            logits_out.append(logits[-1])
        logits = np.concatenate(logits_out).astype(np.float64) if with_logits else None
        return logits, np.concatenate(out).astype(np.float64)

    def _path_gradients(self, z: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (points, n) and their gradients (points, n, F) at alpha * z for each alpha.

        Up to NUMPY_PATH_ROWS points (one application's path, a small request) run through
        `finance.models.input_gradients` in NumPy, larger blocks through torch autograd: the same maths, to
        float32 rounding (tests/finance/models/test_input_gradients.py).
        """
        path = (alphas[:, None, None] * z[None]).reshape(-1, z.shape[1])  # (points*n, F)
        if len(path) <= NUMPY_PATH_ROWS:
            logits, grad = self.gradient_kernel_.forward_and_gradient(path)
            logits = logits[:, 0]
        else:
            points = torch.from_numpy(path).requires_grad_(True)
            output, _ = self.module_.net(points)
            (grad,) = torch.autograd.grad(output[:, 0].sum(), points)
            logits, grad = output[:, 0].detach().numpy(), grad.numpy()
        return logits.reshape(len(alphas), len(z)), grad.reshape(len(alphas), *z.shape)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(directory / "moe.pt", self.module_, config=self.config_,
                        metrics=self.result_.best_metrics if hasattr(self, "result_") else {},
                        data_fingerprint=getattr(self, "data_fingerprint_", None),
                        extra={"num_features": len(self.features_)})
        (directory / "moe.json").write_text(json.dumps({"config": asdict(self.config_)}))

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> MoEModel:
        config = MoEModelConfig(**json.loads((directory / "moe.json").read_text())["config"])
        model = cls._restored(config=config, feature_names=feature_names, dataset=dataset)
        model.module_, meta = load_checkpoint(directory / "moe.pt", lambda c: build_module(config, len(feature_names)))
        # a hashed network's kernel reads its dense (materialized) weights
        model.gradient_kernel_ = TabularMoEGradient.from_module(model.module_.net.dense_copy())
        model.metrics_ = meta["metrics"]
        return model

    def summary(self) -> dict[str, Any]:
        result = getattr(self, "result_", None)
        return {"experts": self.config_.num_experts, "top_k": self.config_.top_k,
                **({"epochs": result.epochs_run, "best_epoch": result.best_epoch} if result else {})}

    @torch.no_grad()
    def expert_share(self, X: np.ndarray) -> np.ndarray:
        """(layers, experts) share of routing assignments per expert on X: who does the work."""
        z = self.module_.standardise(torch.from_numpy(np.ascontiguousarray(X)))
        net = self.module_.net
        h = net.input(z)
        shares = []
        for norm, layer in zip(net.norms, net.layers, strict=True):
            routed = layer(norm(h))
            shares.append((routed.expert_load.float() / routed.expert_load.sum()).numpy())
            h = h + routed.output
        return np.stack(shares)

    def export_onnx(self, path: Path) -> Path:
        """ONNX at the feature-matrix level: input `features` (batch, F) float32 (NaN allowed),
        output `probability` (batch, 1)."""
        from core.onnx_export import export_onnx

        example = torch.from_numpy(np.zeros((4, len(self.features_)), dtype=np.float32))
        # hashed experts go out dense: plain weights instead of a gather over a bucket table
        return export_onnx(_Probability(self.module_.dense_copy()), (example,), path, input_names=["features"],
                           output_names=["probability"], metadata={"producer_model": "finance.moe",
                                                                  "features": len(self.features_)})

    def probability_module(self) -> nn.Module:
        return _Probability(self.module_.dense_copy())
