"""Machine failure and its five modes on AI4I 2020: LightGBM beside a small MoE network.

Input columns (the dataset's own names): `Type` (L, M or H), `Air temperature [K]`,
`Process temperature [K]`, `Rotational speed [rpm]`, `Torque [Nm]`, `Tool wear [min]`.
Outputs: `failure` (the dataset's `Machine failure`) and the modes `TWF` (tool wear), `HDF`
(heat dissipation), `PWF` (power), `OSF` (overstrain), `RNF` (random), each a probability.
Failures are rare (3.4%), so quality is PR-AUC and the recall when a fixed share of machines
(the alert rate) is flagged, not accuracy.

Both models see the six inputs plus three physical quantities the failure mechanisms are stated
in (temperature difference, mechanical power, wear x torque); computing them is feature
engineering any maintenance engineer would do, not a use of the labels.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.model_files import verify_manifest, write_manifest
from core.trainer import Trainer, TrainerConfig, data_fingerprint, load_checkpoint, save_checkpoint
from manufacturing.maintenance.errors import MaintenanceDataError

FLOAT32_MAX = float(np.finfo(np.float32).max)
NUMERIC_INPUTS = ["Air temperature [K]", "Process temperature [K]", "Rotational speed [rpm]", "Torque [Nm]",
                  "Tool wear [min]"]
INPUTS = ["Type", *NUMERIC_INPUTS]
LABELS = ["Machine failure", "TWF", "HDF", "PWF", "OSF", "RNF"]
OUTPUTS = ["failure", "TWF", "HDF", "PWF", "OSF", "RNF"]
TYPE_CODES = {"L": 1, "M": 2, "H": 3}  # 0 is kept for an unknown type
FEATURES = [*NUMERIC_INPUTS, "temperature difference [K]", "power [kW]", "wear x torque [kNm min]"]


# -- reading and validating -------------------------------------------------------------------
def read_ai4i(path: str | Path) -> pd.DataFrame:
    """Read ai4i2020.csv (plain or .gz, with or without the BOM) or the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("ai4i2020.csv*")) or sorted(path.glob("*.csv*"))
        if not found:
            raise MaintenanceDataError("no ai4i2020.csv[.gz] in this folder", source=str(path))
        path = found[0]
    if not path.is_file():
        raise MaintenanceDataError("file not found", source=str(path))
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise MaintenanceDataError("empty file: no header and no rows", source=str(path)) from None
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error) as error:
        raise MaintenanceDataError(f"not a readable CSV: {error}", source=str(path)) from None
    if frame.empty:
        raise MaintenanceDataError("no data rows (a header only)", source=str(path))
    return validate_ai4i(frame, source=str(path), labels=all(c in frame.columns for c in LABELS))


def validate_ai4i(rows: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
                  source: str = "rows", labels: bool = False) -> pd.DataFrame:
    """Check the input columns (and the labels when `labels`) and return typed copies.

    Accepts a DataFrame, one dict or a list of dicts. Raises MaintenanceDataError naming the
    missing columns, or the field and 1-based data row of the first bad value.
    """
    if isinstance(rows, Mapping):
        rows = [rows]
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    needed = INPUTS + (LABELS if labels else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise MaintenanceDataError(f"missing column(s) {', '.join(missing)}; expected {', '.join(needed)}",
                                   source=source, field=missing[0])
    out = frame.reset_index(drop=True).copy()
    types = out["Type"].astype(str).str.strip()
    bad = ~types.isin(list(TYPE_CODES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise MaintenanceDataError(f"value {out['Type'].iloc[row]!r} is not one of L, M, H", source=source,
                                   field="Type", row=row + 1)
    out["Type"] = types
    for column in NUMERIC_INPUTS + (LABELS if labels else []):
        values = pd.to_numeric(out[column], errors="coerce")
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        # the networks compute in float32: a larger magnitude would become infinity there
        bad = values.isna() | ~np.isfinite(numbers) | (np.abs(np.nan_to_num(numbers)) > FLOAT32_MAX)
        if column in LABELS:
            bad |= ~values.isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            expected = "0 or 1" if column in LABELS else "a finite number within float32's range"
            raise MaintenanceDataError(f"value {out[column].iloc[row]!r} is not {expected}", source=source,
                                       field=column, row=row + 1)
        out[column] = values.astype(float)
    return out


def features(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(numeric (rows, 8) float32 in FEATURES order, type code (rows,) int64)."""
    numeric = frame[NUMERIC_INPUTS].to_numpy(dtype=np.float64)
    air, process, speed, torque, wear = numeric.T
    power_kw = torque * speed * 2 * math.pi / 60 / 1000
    extra = np.column_stack([process - air, power_kw, wear * torque / 1000])
    codes = frame["Type"].map(TYPE_CODES).fillna(0).to_numpy(dtype=np.int64)
    return np.column_stack([numeric, extra]).astype(np.float32), codes


def split_rows(frame: pd.DataFrame, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified split on `Machine failure` (3.4% positives: an unstratified 20% could hold few)."""
    train, val = train_test_split(frame, test_size=val_fraction, random_state=seed,
                                  stratify=frame["Machine failure"])
    return train.reset_index(drop=True), val.reset_index(drop=True)


def generate_ai4i(num_rows: int, *, seed: int = 0) -> pd.DataFrame:
    """GENERATED rows following the process and failure rules documented with AI4I 2020 (not its data).

    Air temperature is a random walk around 300 K, process temperature air + 10 K plus noise,
    torque ~ N(40, 10), speed from a mechanical power near 6.4 kW, tool wear grows by 5/3/2 min per
    job (H/M/L) until the tool is replaced at a random wear in 200-240 min, where half the tools
    fail (TWF); the other modes follow the documented rules, plus 0.1% random failures.
    """
    rng = np.random.default_rng(seed)
    kind = rng.choice(["L", "M", "H"], size=num_rows, p=[0.6, 0.3, 0.1])
    air = 300 + np.cumsum(rng.normal(0, 0.05, num_rows)).clip(-4, 4) + rng.normal(0, 0.3, num_rows)
    process = air + 10 + rng.normal(0, 0.8, num_rows)
    torque = np.clip(rng.normal(40, 10, num_rows), 3, None)
    speed = rng.normal(6400, 500, num_rows) / (torque * 2 * math.pi / 60) + rng.normal(0, 30, num_rows)
    speed = np.clip(speed, 1150, 2900).round(0)
    step = np.select([kind == "H", kind == "M"], [5, 3], 2)
    wear, tool_failure = np.zeros(num_rows), np.zeros(num_rows, dtype=bool)
    replace_at = rng.integers(200, 241)
    for i in range(1, num_rows):
        wear[i] = 0.0 if wear[i - 1] >= replace_at else wear[i - 1] + step[i]
        if wear[i] >= replace_at:  # the tool is changed after this job; half the time it fails in it
            tool_failure[i] = rng.random() < 0.5
        elif wear[i] == 0.0:
            replace_at = rng.integers(200, 241)
    power = torque * speed * 2 * math.pi / 60
    strain = wear * torque
    limit = np.select([kind == "L", kind == "M"], [11_000, 12_000], 13_000)
    modes = {
        "TWF": tool_failure,
        "HDF": (process - air < 8.6) & (speed < 1380),
        "PWF": (power < 3500) | (power > 9000),
        "OSF": strain > limit,
        "RNF": rng.random(num_rows) < 0.001,
    }
    frame = pd.DataFrame({"UDI": np.arange(1, num_rows + 1), "Type": kind,
                          "Air temperature [K]": air.round(1), "Process temperature [K]": process.round(1),
                          "Rotational speed [rpm]": speed.round(0), "Torque [Nm]": torque.round(1),
                          "Tool wear [min]": wear})
    frame["Machine failure"] = np.any(np.column_stack(list(modes.values())), axis=1).astype(int)
    for name, flag in modes.items():
        frame[name] = flag.astype(int)
    frame.attrs["generated"] = True
    return frame


# -- metrics ---------------------------------------------------------------------------------
def alert_metrics(score: np.ndarray, label: np.ndarray, *, alert_rate: float) -> dict[str, float | None]:
    """PR-AUC, ROC-AUC, and recall/precision when the top `alert_rate` share of rows is flagged."""
    label = np.asarray(label).astype(int)
    if label.sum() == 0 or label.sum() == len(label):
        return {"pr_auc": None, "roc_auc": None, "recall_at_alert": None, "precision_at_alert": None,
                "positives": int(label.sum())}
    flagged = max(1, math.ceil(alert_rate * len(label)))
    top = np.argsort(-np.asarray(score), kind="stable")[:flagged]
    hits = int(label[top].sum())
    return {"pr_auc": float(average_precision_score(label, score)), "roc_auc": float(roc_auc_score(label, score)),
            "recall_at_alert": hits / int(label.sum()), "precision_at_alert": hits / flagged,
            "positives": int(label.sum())}


# -- the model -------------------------------------------------------------------------------
@dataclass
class LightGBMParams:
    n_estimators: int = 400  # with the small learning rate below; the rules are sharp, trees need depth
    learning_rate: float = 0.03
    num_leaves: int = 15  # 6,400 rows and ~270 failures: small trees generalise
    min_child_samples: int = 5  # rare modes (RNF: ~15 training positives) need small leaves
    subsample: float = 0.8
    subsample_freq: int = 1
    colsample_bytree: float = 0.9


@dataclass
class AI4IFailureModel:
    """fit(labelled frame, val_frame=...) -> self; predict_proba(rows) -> failure and mode probabilities.

    Learned: `boosters_` (one LightGBM per output), `moe_` (a TabularMoE with six logits),
    `mean_` / `std_` (feature scaling for the MoE), `default_backend_` ("lightgbm" or "moe": the
    better on the validation rows' failure PR-AUC), `history_`.
    """

    seed: int = 0
    progress: bool = True
    lightgbm: LightGBMParams = field(default_factory=LightGBMParams)
    # Sixteen small experts, two per row: the failure mechanisms are separate regions of the
    # feature space (hot and slow, weak or strong power, worn tools under load).
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=16, top_k=2, hidden_size=32,
                                                             intermediate_size=64))
    max_epochs: int = 60  # ~25 steps per epoch at 6,400 rows; early stopping ends most runs earlier
    learning_rate: float = 3e-3

    def fit(self, frame: pd.DataFrame, *, val_frame: pd.DataFrame | None = None) -> AI4IFailureModel:
        import lightgbm as lgb

        frame = validate_ai4i(frame, source="training rows", labels=True)
        if val_frame is None:
            frame, val_frame = split_rows(frame, seed=self.seed)
        else:
            val_frame = validate_ai4i(val_frame, source="validation rows", labels=True)
        numeric, codes = features(frame)
        labels = frame[LABELS].to_numpy(dtype=np.float32)
        self.boosters_ = {}
        for j, name in enumerate(OUTPUTS):
            classifier = lgb.LGBMClassifier(**asdict(self.lightgbm), random_state=self.seed, n_jobs=1, verbose=-1)
            classifier.fit(self._lgb_frame(numeric, codes), labels[:, j].astype(int))
            self.boosters_[name] = classifier.booster_
        self.mean_, self.std_ = numeric.mean(axis=0), numeric.std(axis=0) + 1e-6
        self._fit_moe(numeric, codes, labels, val_frame)
        val_scores = {b: self.predict_proba(val_frame, backend=b)["failure"].to_numpy() for b in ("lightgbm", "moe")}
        val_pr = {b: alert_metrics(s, val_frame["Machine failure"].to_numpy(), alert_rate=0.05)["pr_auc"] or 0.0
                  for b, s in val_scores.items()}
        self.default_backend_ = max(val_pr, key=val_pr.get)
        self.fingerprint_ = data_fingerprint(frame[INPUTS + LABELS])
        return self

    def _fit_moe(self, numeric: np.ndarray, codes: np.ndarray, labels: np.ndarray, val_frame: pd.DataFrame) -> None:
        torch.manual_seed(self.seed)
        config = TabularMoEConfig(num_numeric=numeric.shape[1], categorical_cardinalities=[len(TYPE_CODES) + 1],
                                  num_outputs=len(OUTPUTS), moe=self.moe)
        model = TabularMoE(config)
        x = torch.from_numpy((numeric - self.mean_) / self.std_).float()
        c, y = torch.from_numpy(codes.copy())[:, None], torch.from_numpy(labels.copy())
        v_num, v_codes = features(val_frame)
        vx = torch.from_numpy((v_num - self.mean_) / self.std_).float()
        vc, vy = torch.from_numpy(v_codes.copy())[:, None], torch.from_numpy(val_frame[LABELS].to_numpy(np.float32))
        batch_size = 256

        def batches(epoch: int):
            order = torch.from_numpy(np.random.default_rng(self.seed + epoch).permutation(len(x)))
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                yield x[index], c[index], y[index]

        def loss_fn(m, batch):
            logits, aux = m(batch[0], batch[1])
            return F.binary_cross_entropy_with_logits(logits, batch[2]) + aux

        def evaluate(m):
            logits, _ = m(vx, vc)
            return {"val_loss": F.binary_cross_entropy_with_logits(logits, vy).item()}

        trainer = Trainer(TrainerConfig(learning_rate=self.learning_rate, grad_accumulation=1,
                                        max_epochs=self.max_epochs, patience=10, seed=self.seed,
                                        progress=self.progress))
        result = trainer.fit(model, batches, steps_per_epoch=-(-len(x) // batch_size), loss_fn=loss_fn,
                             evaluate_fn=evaluate)
        self.moe_config_ = config
        self.moe_ = model.eval()
        self.history_ = result.history
        self.moe_seconds_ = result.seconds

    @staticmethod
    def _lgb_frame(numeric: np.ndarray, codes: np.ndarray) -> np.ndarray:
        return np.column_stack([numeric, codes]).astype(np.float32)

    def moe_inputs(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """The MoE net's inputs: standardised numeric (rows, 8) float32 and type code (rows, 1) int64."""
        numeric, codes = features(rows)
        return torch.from_numpy((numeric - self.mean_) / self.std_).float(), torch.from_numpy(codes.copy())[:, None]

    def predict_proba(self, rows: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
                      backend: str | None = None) -> pd.DataFrame:
        """Probabilities of `failure` and of each mode, one row per input row (columns OUTPUTS, the
        input DataFrame's index).

        rows: a DataFrame, a dict or a list of dicts with the INPUTS columns; backend: "lightgbm",
        "moe" or None for `default_backend_`.
        """
        backend = backend or self.default_backend_
        if backend not in ("lightgbm", "moe"):
            raise MaintenanceDataError(f"unknown backend {backend!r}; expected lightgbm or moe", field="backend")
        index = rows.index if isinstance(rows, pd.DataFrame) else None
        frame = validate_ai4i(rows)
        if backend == "lightgbm":
            numeric, codes = features(frame)
            matrix = self._lgb_frame(numeric, codes)
            probs = np.column_stack([self.boosters_[name].predict(matrix) for name in OUTPUTS])
        else:
            with torch.no_grad():
                logits, _ = self.moe_(*self.moe_inputs(frame))
            probs = torch.sigmoid(logits).numpy()
        return pd.DataFrame(probs, columns=OUTPUTS, index=frame.index if index is None else index)

    def evaluate(self, frame: pd.DataFrame, *, alert_rate: float = 0.05) -> dict[str, Any]:
        """Metrics of both backends on labelled rows: {backend: {"<output>_<metric>": value}}."""
        if not 0 < alert_rate < 1:
            raise MaintenanceDataError(f"alert rate {alert_rate} must be in (0, 1)", field="alert_rate")
        frame = validate_ai4i(frame, source="evaluation rows", labels=True)
        result: dict[str, Any] = {"rows": len(frame), "failures": int(frame["Machine failure"].sum()),
                                  "alert_rate": alert_rate, "default_backend": self.default_backend_}
        for backend in ("lightgbm", "moe"):
            probs = self.predict_proba(frame, backend=backend)
            metrics = {}
            for name, label in zip(OUTPUTS, LABELS, strict=True):
                for key, value in alert_metrics(probs[name].to_numpy(), frame[label].to_numpy(),
                                                alert_rate=alert_rate).items():
                    if name == "failure" or key in ("pr_auc", "roc_auc"):
                        metrics[f"{name}_{key}"] = value
            result[backend] = metrics
        return result

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, booster in self.boosters_.items():
            booster.save_model(str(folder / f"lightgbm_{name}.txt"))
        save_checkpoint(folder / "moe.pt", self.moe_, config=self.moe_config_, metrics=metrics,
                        data_fingerprint=self.fingerprint_)
        state = {"kind": "ai4i", "inputs": INPUTS, "outputs": OUTPUTS, "features": FEATURES,
                 "mean": self.mean_.tolist(), "std": self.std_.tolist(), "default_backend": self.default_backend_,
                 "seed": self.seed, "lightgbm": asdict(self.lightgbm), "metrics": metrics or {}}
        (folder / "ai4i.json").write_text(json.dumps(state, indent=2, default=float))
        write_manifest(folder, unsealed=[p.name for p in folder.iterdir() if p.is_dir()])
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AI4IFailureModel:
        import lightgbm as lgb

        folder = Path(folder)
        if not (folder / "ai4i.json").is_file():
            raise MaintenanceDataError("no ai4i.json here: not an AI4I model folder (make one with "
                                       "`moeworks maintenance ai4i-train`)", source=str(folder))
        try:
            verify_manifest(folder)
            model, metadata = load_checkpoint(folder / "moe.pt", lambda c: TabularMoE(TabularMoEConfig(**c)))
        except ValueError as error:  # ModelFilesError, CheckpointError: one line naming the file
            raise MaintenanceDataError(str(error)) from None  # the message names the file
        state = json.loads((folder / "ai4i.json").read_text())
        self = cls(seed=state["seed"], progress=False, lightgbm=LightGBMParams(**state["lightgbm"]),
                   moe=model.config.moe)
        self.boosters_ = {name: lgb.Booster(model_file=str(folder / f"lightgbm_{name}.txt")) for name in OUTPUTS}
        self.moe_, self.moe_config_ = model, model.config
        self.mean_, self.std_ = np.asarray(state["mean"]), np.asarray(state["std"])
        self.default_backend_ = state["default_backend"]
        self.metrics_ = state.get("metrics", {})
        return self
