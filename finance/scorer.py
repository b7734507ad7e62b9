"""A trained credit model as a bank runs it: feature pipeline + model + points scale + cut-off.

`CreditScorer.score(records)` takes raw records (a DataFrame in the dataset's original columns) and
returns id, probability of default, points, decision and reason codes in plain words. It is what
`moeworks finance score` runs chunk by chunk and what a serving process loads with
`finance.load_model(directory)`.

Saved layout (one folder): scorer.json (dataset, model name, version, cut-off, scale, reference
distribution for PSI, metrics), reference_features.json (per-feature reference for CSI),
pipeline.json (fitted feature pipeline), model/ (the model's files), row_fingerprint.npz (hashes of
the training and validation rows, so that evaluation can say what share of its rows were seen),
MANIFEST.json (the SHA-256 of each of them, core.model_files: loading refuses a folder whose files
changed, went missing or were added since the save). Every file is a data format (JSON, CSV, NumPy
arrays without objects, LightGBM text, weights-only torch).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from core.model_files import CheckpointError, ModelFilesError, verify_manifest, write_manifest
from core.row_fingerprint import RowFingerprint, SplitFingerprint, row_hashes
from finance.data import Records, check_columns, dataset_spec
from finance.errors import CreditDataError
from finance.features import FeaturePipeline
from finance.models import CreditModel, FitData, build_model, model_class
from finance.models.base import VALIDATION_SHARE
from finance.scaling import PointsScale


@dataclass
class ScoringPolicy:
    approval_rate: float = 0.80  # share of applicants approved; the PD cut-off is set on validation to match
    reason_count: int = 3  # reasons per applicant, as adverse-action notices usually give
    scale: PointsScale = field(default_factory=PointsScale)

    def __post_init__(self) -> None:
        if isinstance(self.scale, dict):
            self.scale = PointsScale(**self.scale)
        if not 0 < self.approval_rate < 1:
            raise ValueError(f"ScoringPolicy: approval_rate must lie in (0, 1), got {self.approval_rate!r}")
        if not isinstance(self.reason_count, int) or not 1 <= self.reason_count <= 100:
            raise ValueError(f"ScoringPolicy: reason_count must be an integer in [1, 100], got {self.reason_count!r}")


class CreditScorer(BaseEstimator):
    """Raw records -> decisions: a scikit-learn estimator over the dataset's raw records (a DataFrame).

    Constructor (keyword-only, parameters only): dataset, model_name (a registered credit model),
    policy (ScoringPolicy; None = its defaults), seed, progress, model_config (the model's config;
    None = its defaults), exclude_protected (train without the features computed from protected
    attributes, see finance.features.FeaturePipeline).
    fit(X, y, *, sample_weight=None, eval_set=None) -> self; predict_proba(X) -> (n, 2).
    Learned: policy_, pipeline_, model_, classes_, cutoff_pd_, reference_edges_/reference_shares_
    (validation PD deciles, the PSI reference), reference_feature_edges_/reference_feature_shares_
    (each feature's validation deciles and missing share, the CSI reference), validation_metrics_, version_.
    """

    def __init__(self, *, dataset: str, model_name: str, policy: ScoringPolicy | None = None, seed: int = 0,
                 progress: bool = False, model_config: Any = None, exclude_protected: bool = False) -> None:
        self.dataset = dataset
        self.model_name = model_name
        self.policy = policy
        self.seed = seed
        self.progress = progress
        self.model_config = model_config
        self.exclude_protected = exclude_protected

    # ------------------------------------------------------------------------------ training
    def fit(self, X: pd.DataFrame, y: Any, *, sample_weight: Any = None,
            eval_set: list[tuple[pd.DataFrame, Any]] | None = None,
            fitted_model: CreditModel | None = None) -> CreditScorer:
        """Fit features and model on the raw records X (n, fields) and labels y (n,) 0/1.

        eval_set: [(X_valid, y_valid)], the records that drive early stopping, the cut-off and the
        PSI reference; None: a stratified, seeded `VALIDATION_SHARE` of X is held out for them.
        fitted_model: a model already fitted on the same split's features (e.g. an ensemble blended
        from fitted members); it is used as it is.
        """
        from sklearn.model_selection import train_test_split

        records = Records(self.dataset, X.reset_index(drop=True), np.asarray(y))
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if eval_set is None:
            train_rows, valid_rows = train_test_split(np.arange(len(records)), test_size=VALIDATION_SHARE,
                                                      stratify=records.target, random_state=self.seed)
            train, valid = records.take(train_rows), records.take(valid_rows)
            weight = None if weight is None else weight[train_rows]
        else:
            if len(eval_set) != 1 or len(eval_set[0]) != 2:
                raise ValueError("eval_set must be [(X_valid, y_valid)]: one validation set")
            train = records
            valid = Records(self.dataset, eval_set[0][0].reset_index(drop=True), np.asarray(eval_set[0][1]))
        self.policy_ = self.policy if self.policy is not None else ScoringPolicy()
        self.classes_ = np.array([0, 1])
        self.pipeline_ = FeaturePipeline(dataset=self.dataset, exclude_protected=self.exclude_protected).fit(
            train.frame)
        fit_train = FitData(self.pipeline_.transform(train.frame), train.frame)
        fit_valid = FitData(self.pipeline_.transform(valid.frame), valid.frame)
        started = time.perf_counter()
        if fitted_model is None:
            self.model_ = build_model(self.model_name, config=self.model_config,
                                      feature_names=self.pipeline_.feature_names_, dataset=self.dataset,
                                      seed=self.seed, progress=self.progress)
            self.model_.fit(fit_train, train.target, sample_weight=weight, eval_set=[(fit_valid, valid.target)])
        else:
            self.model_ = fitted_model
        self.train_seconds_ = time.perf_counter() - started
        return self.calibrate(train, valid, fit_valid=fit_valid)

    def calibrate(self, train: Records, valid: Records, *, fit_valid: FitData | None = None) -> CreditScorer:
        """From the fitted pipeline and model: the PD cut-off, the PSI and CSI references and the
        validation metrics on `valid`, the row fingerprint of `train` and `valid`, a new version.
        (fit ends here; an adapted model (finance.adapt) is calibrated again on its segment.)"""
        from finance.evaluation import characteristic_reference, credit_metrics

        fit_valid = fit_valid if fit_valid is not None else self.features(valid.frame)
        pd_valid = self.model_.predict_proba(fit_valid)[:, 1]
        self.cutoff_pd_ = float(np.quantile(pd_valid, self.policy_.approval_rate))
        self.reference_edges_ = np.unique(np.quantile(pd_valid, np.linspace(0, 1, 11)[1:-1]))
        self.reference_shares_ = np.bincount(np.searchsorted(self.reference_edges_, pd_valid, side="right"),
                                             minlength=len(self.reference_edges_) + 1) / len(pd_valid)
        self.reference_feature_edges_, self.reference_feature_shares_ = characteristic_reference(fit_valid.X)
        self.validation_metrics_ = credit_metrics(valid.target, pd_valid, approval_rate=self.policy_.approval_rate)
        self.training_rows_ = len(train)
        self.row_fingerprint_ = RowFingerprint(SplitFingerprint.build(self.row_hashes(train.frame)),
                                               SplitFingerprint.build(self.row_hashes(valid.frame)))
        self.version_ = f"{self.dataset}-{self.model_name}-{time.strftime('%Y%m%d%H%M%S')}-" + hashlib.sha256(
            pd_valid.tobytes()).hexdigest()[:8]
        return self

    def row_hashes(self, records: pd.DataFrame) -> np.ndarray:
        """(n,) 64-bit hashes of raw records' fields: what the row fingerprint compares."""
        spec = dataset_spec(self.dataset)
        return row_hashes(records, [(f.name, f.kind == "category") for f in spec.fields])

    # ------------------------------------------------------------------------------ scoring
    def features(self, records: pd.DataFrame) -> FitData:
        """What the model scores: the feature matrix (n, F) of raw records (and the records, for
        models that read them)."""
        return FitData(self.pipeline_.transform(records), records if self.model_.needs_records else None)

    def predict_pd(self, records: pd.DataFrame) -> np.ndarray:
        """(n,) probability of default for raw records (validated ones: see finance.data)."""
        return self.model_.predict_proba(self.features(records))[:, 1]

    def predict_proba(self, records: pd.DataFrame) -> np.ndarray:
        """(n, 2) probabilities of no default and of default for raw records."""
        p = self.predict_pd(records.reset_index(drop=True))
        return np.stack([1.0 - p, p], axis=1)

    def score(self, records: pd.DataFrame, *, reasons: str = "all") -> pd.DataFrame:
        """Raw records -> id, pd, points, decision, reason_1..k (words), reason_codes, model_version.

        reasons: "all" (every applicant), "declined" (only where the decision is decline) or "none".
        One record scored alone gets exactly what it gets in a batch (tests/finance/test_finance_fast_path.py):
        features, the scorecard, LightGBM and the reason codes are computed row by row. With reasons
        for all, the probability and the contributions come from one pass of the model
        (`predict_with_contributions`: the MoE network's forward is shared with its attributions).
        """
        assert reasons in ("all", "declined", "none"), f"reasons must be all, declined or none, got {reasons!r}"
        spec = dataset_spec(self.dataset)
        check_columns(records, spec, "records", require_target=False)
        data = self.features(records)
        contributions = None
        if reasons == "all":
            proba, contributions = self.model_.predict_with_contributions(data)
        else:
            proba = self.model_.predict_proba(data)
        pd_ = proba[:, 1]
        decision = np.where(pd_ <= self.cutoff_pd_, "approve", "decline")
        k = self.policy_.reason_count
        texts = np.full((len(pd_), k), "", dtype=object)
        codes = np.full(len(pd_), "", dtype=object)
        rows = np.arange(len(pd_)) if reasons == "all" else (
            np.flatnonzero(decision == "decline") if reasons == "declined" else np.arange(0))
        if len(rows) and len(rows) == len(pd_):
            texts, codes = self.reason_codes(data, contributions)
        elif len(rows):
            texts[rows], codes[rows] = self.reason_codes(data.take(rows))
        # One constructor call: adding columns one by one cost more than the scoring of one record.
        # copy=False: every array is this call's own (pandas' copies cost ~60 us of a single call).
        return pd.DataFrame({"id": records[spec.id_column].to_numpy(), "pd": pd_,
                             "points": self.policy_.scale.points(pd_), "decision": decision,
                             **{f"reason_{j + 1}": texts[:, j] for j in range(k)}, "reason_codes": codes,
                             "model_version": np.full(len(pd_), self.version_, dtype=object)}, copy=False)

    def reason_codes(self, data: FitData, contributions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top factors that raised each applicant's risk (lowered the score), in words.

        Returns texts (n, k) and codes (n,) "feature|feature|feature". Only factors that pushed the
        risk up are named, at most one per reason family (`top_reasons`); an applicant with fewer
        gets empty slots. contributions: the model's (n, F) for `data` when already computed.
        """
        k = self.policy_.reason_count
        # (n, F): each feature's push on the log-odds of default, > 0 raises risk
        contrib = self.model_.contributions(data) if contributions is None else contributions
        top = top_reasons(contrib, self.pipeline_.families_, k)  # (n, <= k)
        push = np.take_along_axis(contrib, top, axis=1)
        values = np.take_along_axis(data.X, top, axis=1)
        definitions = np.array([s.definition for s in self.pipeline_.catalogue_], dtype=object)
        names = np.array(self.pipeline_.feature_names_, dtype=object)
        medians = self.pipeline_.medians_
        texts = np.full((len(contrib), k), "", dtype=object)
        codes = np.full(len(contrib), "", dtype=object)
        for j in range(top.shape[1]):  # k columns; each line below is one pass over the applicants
            keep = push[:, j] > 1e-6
            value_text = np.array(["missing" if v != v else f"{v:.4g}" for v in values[keep, j].tolist()], dtype=object)
            typical = np.array([f"{v:.4g}" for v in medians[top[keep, j]].tolist()], dtype=object)
            texts[keep, j] = definitions[top[keep, j]] + ": " + value_text + " (typical " + typical + ")"
            codes[keep] = np.where(codes[keep] == "", names[top[keep, j]], codes[keep] + "|" + names[top[keep, j]])
        return texts, codes

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "pipeline.json").write_text(json.dumps(self.pipeline_.to_dict()))
        self.model_.save(directory / "model")
        meta = {
            "dataset": self.dataset, "model": self.model_name, "version": self.version_, "seed": self.seed,
            "policy": {"approval_rate": self.policy_.approval_rate, "reason_count": self.policy_.reason_count,
                       "scale": asdict(self.policy_.scale)},
            "cutoff_pd": self.cutoff_pd_, "reference_edges": self.reference_edges_.tolist(),
            "reference_shares": self.reference_shares_.tolist(), "validation_metrics": self.validation_metrics_,
            "training_rows": self.training_rows_, "train_seconds": getattr(self, "train_seconds_", None),
            "model_summary": self.model_.summary(), "features": len(self.pipeline_.feature_names_),
        }
        (directory / "scorer.json").write_text(json.dumps(meta, indent=1, default=float))
        (directory / "reference_features.json").write_text(json.dumps({  # the CSI reference, one entry per feature
            "edges": [e.tolist() for e in self.reference_feature_edges_],
            "shares": [s.tolist() for s in self.reference_feature_shares_]}))
        self.pipeline_.catalogue().to_csv(directory / "feature_catalogue.csv", index=False)
        if getattr(self, "row_fingerprint_", None) is not None:  # which rows it was fitted and validated on
            self.row_fingerprint_.save(directory)
        # Sealed: every file loading reads (top-level files and model/); other folders a user keeps
        # here (the generated data of `finance train`) are never loaded and stay outside.
        write_manifest(directory, unsealed=[p.name for p in directory.iterdir() if p.is_dir() and p.name != "model"])
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CreditScorer:
        directory = Path(directory)
        if not (directory / "scorer.json").is_file():
            raise CreditDataError(f"{directory} is not a saved credit model (no scorer.json)", field="model")
        try:
            verify_manifest(directory)
        except ModelFilesError as error:
            raise CreditDataError(str(error), field="model") from None
        meta = json.loads((directory / "scorer.json").read_text())
        policy = meta["policy"]
        scorer = cls(dataset=meta["dataset"], model_name=meta["model"], seed=meta["seed"],
                     policy=ScoringPolicy(approval_rate=policy["approval_rate"], reason_count=policy["reason_count"],
                                          scale=PointsScale(**policy["scale"])))
        scorer.policy_, scorer.classes_ = scorer.policy, np.array([0, 1])
        scorer.pipeline_ = FeaturePipeline.from_dict(json.loads((directory / "pipeline.json").read_text()))
        scorer.exclude_protected = scorer.pipeline_.exclude_protected
        try:
            scorer.model_ = model_class(meta["model"]).load(
                directory / "model", feature_names=scorer.pipeline_.feature_names_, dataset=meta["dataset"])
        except CheckpointError as error:  # a .pt that is not weights-only: refused unread
            raise CreditDataError(str(error), field="model") from None
        scorer.version_ = meta["version"]
        scorer.cutoff_pd_ = meta["cutoff_pd"]
        scorer.reference_edges_ = np.asarray(meta["reference_edges"])
        scorer.reference_shares_ = np.asarray(meta["reference_shares"])
        scorer.validation_metrics_ = meta["validation_metrics"]
        scorer.training_rows_ = meta["training_rows"]
        scorer.train_seconds_ = meta.get("train_seconds")
        scorer.row_fingerprint_ = RowFingerprint.load(directory)  # None for a model saved before fingerprints
        reference = directory / "reference_features.json"
        scorer.reference_feature_edges_ = scorer.reference_feature_shares_ = None  # saved before CSI: none
        if reference.is_file():
            state = json.loads(reference.read_text())
            scorer.reference_feature_edges_ = [np.asarray(e, dtype=np.float64) for e in state["edges"]]
            scorer.reference_feature_shares_ = [np.asarray(s, dtype=np.float64) for s in state["shares"]]
        return scorer

    @property
    def model(self) -> CreditModel:
        return self.model_


def top_reasons(contrib: np.ndarray, families: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, families)) feature indices: each row's largest pushes, at most one per family.

    contrib: (n, F) pushes; families: (F,) int family of each feature, 0..G-1. A family stands for
    its largest push (of equal pushes, its first feature), families rank by it, and equal pushes
    rank in feature order (of a tie at the k-th place, one is kept). The caller names only the
    pushes above zero.
    """
    n, num_features = contrib.shape
    num_families = int(families.max()) + 1
    if num_families == num_features:  # every feature its own family: the plain top k
        candidates = np.broadcast_to(np.arange(num_features), (n, num_features))
    else:  # (n, G): the strongest feature of each family
        candidates = np.empty((n, num_families), dtype=np.int64)
        for g in range(num_families):
            members = np.flatnonzero(families == g)
            candidates[:, g] = members[np.argmax(contrib[:, members], axis=1)]
    pushes = np.take_along_axis(contrib, candidates, axis=1)
    if candidates.shape[1] > k:  # the k largest, then those k in order: no full sort
        keep = np.argpartition(-pushes, k - 1, axis=1)[:, :k]
        candidates = np.take_along_axis(candidates, keep, axis=1)
    candidates = np.sort(candidates, axis=1)  # feature order first, so that the stable sort below breaks ties by it
    pushes = np.take_along_axis(contrib, candidates, axis=1)
    return np.take_along_axis(candidates, np.argsort(-pushes, axis=1, kind="stable"), axis=1)


def load_model(directory: str | Path) -> CreditScorer:
    """Load a saved credit model; `.score(records_dataframe)` scores raw records."""
    return CreditScorer.load(directory)


def split_records(records: Records, *, valid_share: float = 0.2, seed: int = 0) -> tuple[Records, Records]:
    """A seeded split stratified on the label."""
    from sklearn.model_selection import train_test_split

    train_idx, valid_idx = train_test_split(np.arange(len(records)), test_size=valid_share, random_state=seed,
                                            stratify=records.target)
    return records.take(np.sort(train_idx)), records.take(np.sort(valid_idx))


def train_scorer(records: Records, model_name: str, *, seed: int = 0, valid_share: float = 0.2,
                 policy: ScoringPolicy | None = None, progress: bool = False, model_config: Any = None,
                 exclude_protected: bool = False) -> CreditScorer:
    """Split `records` (seeded, stratified), fit features and model, return the fitted scorer."""
    train, valid = split_records(records, valid_share=valid_share, seed=seed)
    return CreditScorer(dataset=records.dataset, model_name=model_name, policy=policy, seed=seed, progress=progress,
                        model_config=model_config, exclude_protected=exclude_protected).fit(
        train.frame, train.target, eval_set=[(valid.frame, valid.target)])
