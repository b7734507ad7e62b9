"""Reject-inference methods: train a credit model on accepted loans plus the unlabelled rejects.

Every method wraps any estimator with `fit(X, y, sample_weight=None)` / `predict_proba(X)` (an
sklearn classifier, LightGBM, or a moeworks credit model) and is itself such an estimator. Labels
follow sklearn's semi-supervised convention: `y == -1` (or NaN) marks an applicant whose outcome
the bank never saw (a reject, or any unlabelled applicant such as Give Me Some Credit's cs-test);
0 is good and 1 is bad (default).

Methods (Kozodoi et al. 2019; Siddiqi, Credit Risk Scorecards, ch. 6):
- AcceptedOnly: the baseline, the rejects are ignored.
- HardCutoff: rejects scored by the accepted-only model; the riskiest share is labelled bad, the
  rest good.
- Parcelling: rejects split into score bands; in each band a random share, the accepted bad rate
  of the band times a factor, is labelled bad.
- FuzzyAugmentation: each reject enters twice, as bad with weight p and as good with weight 1 - p.
- BaggedFuzzyAugmentation: fuzzy augmentation with p averaged over models fitted on bootstrap
  resamples of the accepted loans (a lower-variance labeller where it must extrapolate).
- IteratedFuzzyAugmentation: fuzzy augmentation repeated EM-style, each round's model relabelling
  the rejects for the next.
- UpliftedFuzzyAugmentation: fuzzy augmentation whose soft labels' bad odds are raised by a factor
  for the rejects that lie outside the accepted region (estimated by an acceptance model).
- Reweighting: accepted loans weighted by the inverse probability of being accepted (banded).
- SelfTraining: iterated pseudo-labels for the rejects the current model is confident about.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

UNLABELLED = -1


def clone_estimator(estimator: Any) -> Any:
    """A fresh unfitted copy: a factory is called, an sklearn estimator cloned, anything else deep-copied."""
    if callable(estimator) and not hasattr(estimator, "fit"):
        return estimator()
    try:
        from sklearn.base import clone

        return clone(estimator)
    except (TypeError, AttributeError):
        return copy.deepcopy(estimator)


def split_labels(y: Any) -> tuple[np.ndarray, np.ndarray]:
    """y with -1 / NaN for unknown outcomes -> (labels as float with NaN, labelled mask)."""
    labels = np.asarray(y, dtype="float64").copy()
    labels[labels == UNLABELLED] = np.nan
    labelled = ~np.isnan(labels)
    known = labels[labelled]
    if not np.isin(known, (0.0, 1.0)).all():
        bad = np.flatnonzero(labelled)[~np.isin(known, (0.0, 1.0))][0]
        raise ValueError(f"y: row {bad} has label {labels[bad]!r}; expected 0, 1, or -1/NaN for unlabelled")
    if labelled.sum() == 0:
        raise ValueError("y: no labelled rows; reject inference needs the accepted loans' outcomes")
    return labels, labelled


def take(X: Any, index: np.ndarray) -> Any:
    return X.iloc[index] if isinstance(X, pd.DataFrame) else np.asarray(X)[index]


def stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], pd.DataFrame):
        return pd.concat(parts, ignore_index=True)
    return np.concatenate([np.asarray(p) for p in parts])


def fit_weighted(estimator: Any, X: Any, y: np.ndarray, sample_weight: np.ndarray | None) -> Any:
    """estimator.fit with optional weights; an sklearn Pipeline takes them on its last step."""
    if sample_weight is None:
        return estimator.fit(X, y)
    if hasattr(estimator, "steps"):
        return estimator.fit(X, y, **{f"{estimator.steps[-1][0]}__sample_weight": sample_weight})
    return estimator.fit(X, y, sample_weight=sample_weight)


def positive_proba(estimator: Any, X: Any) -> np.ndarray:
    return np.asarray(estimator.predict_proba(X))[:, 1]


def fit_acceptance_model(template: Any, X_lab: Any, X_unl: Any) -> Any:
    """A fresh copy of `template` fitted to tell the labelled rows (1) from the unlabelled (0):
    its positive probability is P(labelled | x), the acceptance model of the reweighting methods."""
    labelled = np.r_[np.ones(len(X_lab), dtype="int64"), np.zeros(len(X_unl), dtype="int64")]
    return clone_estimator(template).fit(stack([X_lab, X_unl]), labelled)


def balanced_probability(p: np.ndarray, prior: float) -> np.ndarray:
    """PD under a 50/50 prior: p / prior against (1 - p) / (1 - prior), normalised."""
    bad, good = p / prior, (1.0 - p) / (1.0 - prior)
    return bad / np.maximum(bad + good, 1e-12)


class RejectInferenceClassifier:
    """Base: fit(X, y with -1 for unknown outcomes) trains `estimator_` on an augmented sample.

    Subclasses implement `_augment(X_labelled, y_labelled, X_unlabelled)` returning the training
    rows, their labels and weights. `predict_proba(X)` -> (n, 2) from the final estimator.
    """

    name = "base"

    def __init__(self, *, estimator: Any) -> None:
        self.estimator = estimator

    def fit(self, X: Any, y: Any) -> RejectInferenceClassifier:
        labels, labelled = split_labels(y)
        X_lab = take(X, np.flatnonzero(labelled))
        y_lab = labels[labelled].astype("int64")
        X_unl = take(X, np.flatnonzero(~labelled))
        self.n_labelled_, self.n_unlabelled_ = int(labelled.sum()), int((~labelled).sum())
        X_train, y_train, weight = self._augment(X_lab, y_lab, X_unl)
        self.estimator_ = fit_weighted(clone_estimator(self.estimator), X_train, y_train, weight)
        self.n_train_rows_ = len(y_train)
        return self

    def _augment(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any) -> tuple[Any, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _accepted_only_scores(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any) -> tuple[Any, np.ndarray]:
        """Fit the accepted-only model (kept as `base_estimator_`) and score the unlabelled rows."""
        base = clone_estimator(self.estimator).fit(X_lab, y_lab)
        self.base_estimator_ = base
        return base, positive_proba(base, X_unl) if len(X_unl) else np.zeros(0)

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.asarray(self.estimator_.predict_proba(X))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AcceptedOnly(RejectInferenceClassifier):
    name = "accepted-only"

    def _augment(self, X_lab, y_lab, X_unl):
        return X_lab, y_lab, None


class HardCutoff(RejectInferenceClassifier):
    """Rejects above a PD cut-off are bad, below it good.

    The cut-off labels as bad the riskiest `bad_rate_factor` x (mean predicted PD of the pool) of
    the rejects: the accepted-only model under-states the risk of the applicants it never saw, and
    practitioners inflate the rejects' bad rate by 1.5-2x for that reason (Siddiqi).
    """

    name = "hard-cutoff"

    def __init__(self, *, estimator: Any, bad_rate_factor: float = 1.5) -> None:
        super().__init__(estimator=estimator)
        self.bad_rate_factor = bad_rate_factor

    def _augment(self, X_lab, y_lab, X_unl):
        _, pd_unl = self._accepted_only_scores(X_lab, y_lab, X_unl)
        bad_share = min(1.0, self.bad_rate_factor * float(pd_unl.mean())) if len(pd_unl) else 0.0
        n_bad = int(round(bad_share * len(pd_unl)))
        inferred = np.zeros(len(pd_unl), dtype="int64")
        inferred[np.argsort(-pd_unl, kind="stable")[:n_bad]] = 1
        self.cutoff_ = float(np.sort(pd_unl)[::-1][n_bad - 1]) if n_bad else 1.0
        return stack([X_lab, X_unl]), np.concatenate([y_lab, inferred]), None


class Parcelling(RejectInferenceClassifier):
    """Score bands from the accepted-only model; each band's rejects get its accepted bad rate x factor."""

    name = "parcelling"

    def __init__(self, *, estimator: Any, n_bands: int = 10, bad_rate_factor: float = 1.5, seed: int = 0) -> None:
        super().__init__(estimator=estimator)
        self.n_bands = n_bands  # deciles: the usual granularity of a score-band report
        self.bad_rate_factor = bad_rate_factor  # same rationale as HardCutoff's
        self.seed = seed

    def _augment(self, X_lab, y_lab, X_unl):
        base, pd_unl = self._accepted_only_scores(X_lab, y_lab, X_unl)
        pd_lab = positive_proba(base, X_lab)
        edges = np.unique(np.quantile(pd_lab, np.linspace(0, 1, self.n_bands + 1)[1:-1]))
        band_lab, band_unl = np.searchsorted(edges, pd_lab), np.searchsorted(edges, pd_unl)
        rng = np.random.default_rng(self.seed)
        inferred = np.zeros(len(pd_unl), dtype="int64")
        rates = []
        for band in range(len(edges) + 1):
            in_lab, in_unl = band_lab == band, np.flatnonzero(band_unl == band)
            rate = min(1.0, self.bad_rate_factor * float(y_lab[in_lab].mean())) if in_lab.any() else 1.0
            rates.append(rate)
            inferred[in_unl] = (rng.random(len(in_unl)) < rate).astype("int64")
        self.band_edges_, self.band_bad_rates_ = edges, np.array(rates)
        return stack([X_lab, X_unl]), np.concatenate([y_lab, inferred]), None


class FuzzyAugmentation(RejectInferenceClassifier):
    """Each reject twice: bad with weight p and good with weight 1 - p (p from the accepted-only model).

    For a logistic regression this leaves the fit unchanged (the expected log-likelihood of the
    duplicated rows is maximised by the model that produced p); for trees it does not.
    """

    name = "fuzzy"

    def __init__(self, *, estimator: Any, reject_weight: float = 1.0) -> None:
        super().__init__(estimator=estimator)
        self.reject_weight = reject_weight  # how much one reject counts relative to one accepted loan

    def _labeller_pd(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any) -> np.ndarray:
        return self._accepted_only_scores(X_lab, y_lab, X_unl)[1]

    def _augment(self, X_lab, y_lab, X_unl):
        return self._soft_rows(X_lab, y_lab, X_unl, self._labeller_pd(X_lab, y_lab, X_unl))

    def _soft_rows(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any,
                   pd_unl: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """The accepted loans, then each reject as bad (weight p) and as good (weight 1 - p)."""
        n = len(pd_unl)
        X_train = stack([X_lab, X_unl, X_unl])
        y_train = np.concatenate([y_lab, np.ones(n, dtype="int64"), np.zeros(n, dtype="int64")])
        weight = np.concatenate([np.ones(len(y_lab)), self.reject_weight * pd_unl,
                                 self.reject_weight * (1.0 - pd_unl)])
        return X_train, y_train, weight


class BaggedFuzzyAugmentation(FuzzyAugmentation):
    """Fuzzy augmentation whose p is the mean PD of `n_labellers` models, each fitted on a bootstrap
    resample of the accepted loans (Breiman's bagging, applied to the labeller only).

    The rejects lie where the accepted-only model has seen few or no loans; there a single tree
    model's PD rests on a handful of leaves fitted to a few defaults, and its errors are copied into
    every reject's soft label. Averaging resampled labellers lowers that variance before the final
    model, still one model of the wrapped kind, is trained on the augmented sample.
    Learned: `labeller_pd_` (the rejects' averaged PD), `labeller_spread_` (mean std across labellers).
    """

    name = "fuzzy-bagged"

    def __init__(self, *, estimator: Any, reject_weight: float = 1.0, n_labellers: int = 10, seed: int = 0) -> None:
        super().__init__(estimator=estimator, reject_weight=reject_weight)
        self.n_labellers = n_labellers  # 10 resamples: the spread of the average is ~1/3 of one model's
        self.seed = seed

    def _labeller_pd(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any) -> np.ndarray:
        assert self.n_labellers >= 1, f"n_labellers must be >= 1, got {self.n_labellers}"
        if not len(X_unl):
            return np.zeros(0)
        rng = np.random.default_rng(self.seed)
        pds = []
        for i in range(self.n_labellers):
            rows = rng.choice(len(y_lab), len(y_lab), replace=True)
            while len(np.unique(y_lab[rows])) < 2:  # a resample needs both outcomes to fit
                rows = rng.choice(len(y_lab), len(y_lab), replace=True)
            labeller = clone_estimator(self.estimator)
            if "random_state" in getattr(labeller, "get_params", dict)():
                labeller.set_params(random_state=self.seed * 1000 + i)  # its own row/column subsamples too
            pds.append(positive_proba(labeller.fit(take(X_lab, rows), y_lab[rows]), X_unl))
        pds = np.stack(pds)  # (n_labellers, n_unlabelled)
        self.labeller_pd_, self.labeller_spread_ = pds.mean(axis=0), float(pds.std(axis=0).mean())
        return self.labeller_pd_


class IteratedFuzzyAugmentation(FuzzyAugmentation):
    """Fuzzy augmentation iterated as an EM algorithm (Feelders 2000's mixture view of reject inference).

    E-step: the current model gives each reject its PD p; M-step: the model is refitted on the
    accepted loans plus every reject as bad with weight p and good with weight 1 - p. Round 1 is
    plain fuzzy augmentation (p from the accepted-only model); each further round relabels the
    rejects with a model that has itself been trained across the reject region, so the soft labels
    move away from the accepted-only model's flat extrapolation there. A fixed point of a logistic
    regression is the accepted-only fit (see FuzzyAugmentation); for trees it is not.
    Learned: `rounds_` (per round: mean reject PD and its mean absolute change from the last round).
    """

    name = "fuzzy-em"

    def __init__(self, *, estimator: Any, reject_weight: float = 1.0, n_rounds: int = 3) -> None:
        super().__init__(estimator=estimator, reject_weight=reject_weight)
        self.n_rounds = n_rounds  # development seeds 10, 11: +4-8 points by round 3; flat at round 4 (seed 10)

    def fit(self, X: Any, y: Any) -> IteratedFuzzyAugmentation:
        assert self.n_rounds >= 1, f"n_rounds must be >= 1, got {self.n_rounds}"
        labels, labelled = split_labels(y)
        X_lab = take(X, np.flatnonzero(labelled))
        y_lab = labels[labelled].astype("int64")
        X_unl = take(X, np.flatnonzero(~labelled))
        self.n_labelled_, self.n_unlabelled_ = int(labelled.sum()), int((~labelled).sum())
        pd_unl = self._labeller_pd(X_lab, y_lab, X_unl)
        self.rounds_ = []
        for round_ in range(1, self.n_rounds + 1):
            X_train, y_train, weight = self._soft_rows(X_lab, y_lab, X_unl, pd_unl)
            self.estimator_ = fit_weighted(clone_estimator(self.estimator), X_train, y_train, weight)
            if round_ < self.n_rounds and len(X_unl):
                updated = positive_proba(self.estimator_, X_unl)
                self.rounds_.append({"round": round_, "mean_pd": float(pd_unl.mean()),
                                     "mean_change": float(np.abs(updated - pd_unl).mean())})
                pd_unl = updated
        self.n_train_rows_ = len(y_train)
        return self


class UpliftedFuzzyAugmentation(FuzzyAugmentation):
    """Fuzzy augmentation with the bad odds raised where the rejects lie outside the accepted region.

    Outside the region the old policy accepted, the accepted-only model has no defaults to learn
    from and extrapolates flat, so it under-states the risk there (the outcomes are missing not at
    random: Ehrhardt et al. 2018 find that of the classic methods only parcelling, through its a-priori
    factors, allows for that).
    Here the factor is applied by how far outside each unlabelled applicant lies: an acceptance model
    a(x) = P(labelled | x), a fresh copy of `acceptance_estimator` (default: the credit model's kind),
    gives r(x) = clip(1 - a(x) / a_typical, 0, 1), a_typical the median a over the labelled loans
    (an unlabelled pool drawn from the whole population, such as GMSC's cs-test, keeps a below 1 even
    inside the accepted region). The soft label's odds become odds(p) x bad_odds_factor ** r(x): as
    plain fuzzy inside the accepted region, raised by the full factor well outside it.
    Learned: `acceptance_model_`, `outside_` (r per unlabelled row), `labeller_pd_` (p before) and
    `uplifted_pd_` (after).
    """

    name = "fuzzy-uplift"

    def __init__(self, *, estimator: Any, reject_weight: float = 1.0, bad_odds_factor: float = 2.0,
                 acceptance_estimator: Any = None) -> None:
        super().__init__(estimator=estimator, reject_weight=reject_weight)
        # 2: best of 1.5 / 2 / 3 on the development seeds (GMSC 10-14); practitioners assume 1.5-2x
        self.bad_odds_factor = bad_odds_factor
        self.acceptance_estimator = acceptance_estimator

    def _labeller_pd(self, X_lab: Any, y_lab: np.ndarray, X_unl: Any) -> np.ndarray:
        assert self.bad_odds_factor >= 1, f"bad_odds_factor must be >= 1, got {self.bad_odds_factor}"
        p = super()._labeller_pd(X_lab, y_lab, X_unl)
        if not len(X_unl):
            return p
        template = self.estimator if self.acceptance_estimator is None else self.acceptance_estimator
        model = self.acceptance_model_ = fit_acceptance_model(template, X_lab, X_unl)
        typical = max(float(np.median(positive_proba(model, X_lab))), 1e-12)
        self.outside_ = np.clip(1.0 - positive_proba(model, X_unl) / typical, 0.0, 1.0)
        odds = p / np.maximum(1.0 - p, 1e-12) * self.bad_odds_factor ** self.outside_
        self.labeller_pd_, self.uplifted_pd_ = p, odds / (1.0 + odds)
        return self.uplifted_pd_


class Reweighting(RejectInferenceClassifier):
    """Accepted loans weighted by 1 / P(accepted | x), banded as in practice, capped at `max_weight`.

    P(accepted | x) comes from an acceptance model (labelled vs unlabelled) fitted with a fresh copy
    of `acceptance_estimator` (default: the same kind of estimator as the credit model), averaged
    in `n_bands` quantile bands of its score so that single rows cannot get extreme weights.
    """

    name = "reweighting"

    def __init__(self, *, estimator: Any, acceptance_estimator: Any = None, n_bands: int = 10,
                 max_weight: float = 10.0) -> None:
        super().__init__(estimator=estimator)
        self.acceptance_estimator = acceptance_estimator
        self.n_bands = n_bands
        self.max_weight = max_weight  # caps the variance that a few near-cutoff loans would add

    def _augment(self, X_lab, y_lab, X_unl):
        if not len(X_unl):
            return X_lab, y_lab, None
        accepted = np.r_[np.ones(len(y_lab), dtype="int64"), np.zeros(len(X_unl), dtype="int64")]
        template = self.estimator if self.acceptance_estimator is None else self.acceptance_estimator
        model = fit_acceptance_model(template, X_lab, X_unl)
        p_accept = positive_proba(model, stack([X_lab, X_unl]))
        edges = np.unique(np.quantile(p_accept, np.linspace(0, 1, self.n_bands + 1)[1:-1]))
        band = np.searchsorted(edges, p_accept)
        total = np.bincount(band, minlength=len(edges) + 1)
        accepted_in_band = np.bincount(band, weights=accepted, minlength=len(edges) + 1)
        band_weight = np.minimum(self.max_weight, total / np.maximum(accepted_in_band, 1))
        weight = band_weight[band[: len(y_lab)]]
        self.acceptance_model_, self.band_weights_ = model, band_weight
        return X_lab, y_lab, weight / weight.mean()


class SelfTraining(RejectInferenceClassifier):
    """Iterated pseudo-labelling of confident rejects (shallow self-learning, Kozodoi et al. 2019).

    Each round fits the model on the labelled rows plus the pseudo-labels so far and scores the
    unlabelled pool. Confidence is read on the prior-balanced probability (the PD re-weighted as if
    goods and bads were equally common), so one `threshold` serves a 3% and a 20% default rate
    alike: a reject is labelled bad when its balanced PD >= threshold and good when <= 1 - threshold.
    At most `max_share_per_round` x (number of labelled rows) are added per round per class, most
    confident first, so that pseudo-labels never swamp the real outcomes however large the pool.
    It stops when no row passes the threshold, the pool is empty, or after `max_rounds`.

    Learned: `rounds_` (list of dicts: round, added_bad, added_good, remaining), `stopped_because_`,
    `pseudo_index_` / `pseudo_label_` (positions within the unlabelled rows, and their labels).
    """

    name = "self-training"

    def __init__(self, *, estimator: Any, threshold: float = 0.9, max_rounds: int = 5,
                 max_share_per_round: float = 0.05) -> None:
        super().__init__(estimator=estimator)
        self.threshold = threshold  # 9:1 balanced odds: confident, yet reached by a fair share of rejects
        self.max_rounds = max_rounds  # each round refits the model: the main cost
        self.max_share_per_round = max_share_per_round  # small steps let the model correct itself

    def fit(self, X: Any, y: Any) -> SelfTraining:
        labels, labelled = split_labels(y)
        assert 0.5 < self.threshold < 1, f"threshold must lie in (0.5, 1), got {self.threshold}"
        bad_rate = float(labels[labelled].mean())
        X_lab = take(X, np.flatnonzero(labelled))
        y_lab = labels[labelled].astype("int64")
        X_unl = take(X, np.flatnonzero(~labelled))
        pool = np.arange(len(X_unl))
        per_round = max(1, int(self.max_share_per_round * len(y_lab)))
        pseudo_index, pseudo_label = np.zeros(0, dtype="int64"), np.zeros(0, dtype="int64")
        self.rounds_, self.stopped_because_ = [], "max_rounds"
        model = clone_estimator(self.estimator).fit(X_lab, y_lab)
        for round_ in range(1, self.max_rounds + 1):
            if not len(pool):
                self.stopped_because_ = "pool empty"
                break
            p = balanced_probability(positive_proba(model, take(X_unl, pool)), bad_rate)
            bad = np.flatnonzero(p >= self.threshold)
            good = np.flatnonzero(p <= 1.0 - self.threshold)
            if not len(bad) and not len(good):
                self.stopped_because_ = "no reject passes the threshold"
                break
            bad = bad[np.argsort(-p[bad], kind="stable")[:per_round]]
            good = good[np.argsort(p[good], kind="stable")[:per_round]]
            pseudo_index = np.r_[pseudo_index, pool[bad], pool[good]]
            pseudo_label = np.r_[pseudo_label, np.ones(len(bad), "int64"), np.zeros(len(good), "int64")]
            pool = np.delete(pool, np.r_[bad, good])
            self.rounds_.append({"round": round_, "added_bad": len(bad), "added_good": len(good),
                                 "remaining": len(pool)})
            model = clone_estimator(self.estimator).fit(stack([X_lab, take(X_unl, pseudo_index)]),
                                                         np.r_[y_lab, pseudo_label])
        self.estimator_ = model
        self.pseudo_index_, self.pseudo_label_ = pseudo_index, pseudo_label
        self.n_labelled_, self.n_unlabelled_ = len(y_lab), len(X_unl)
        self.n_train_rows_ = len(y_lab) + len(pseudo_index)
        return self


METHODS: dict[str, Callable[..., RejectInferenceClassifier]] = {
    cls.name: cls for cls in (AcceptedOnly, HardCutoff, Parcelling, FuzzyAugmentation, BaggedFuzzyAugmentation,
                              IteratedFuzzyAugmentation, UpliftedFuzzyAugmentation, Reweighting, SelfTraining)
}


def make_method(name: str, *, estimator: Any, **params: Any) -> RejectInferenceClassifier:
    """A reject-inference method by its table name (`METHODS`), wrapping `estimator`."""
    if name not in METHODS:
        raise ValueError(f"unknown reject-inference method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name](estimator=estimator, **params)


def train_with_reject_inference(labelled: Any, unlabelled: Any, *, model_name: str, method: str | None, seed: int = 0,
                                policy: Any = None, exclude_protected: bool = False) -> tuple[Any, Any]:
    """Train a credit scorer on accepted loans (`labelled` Records) plus unlabelled applicants
    (`unlabelled` Records: the rejects, or any applicants without outcome) with a reject-inference
    method wrapped around a `CreditScorer` (itself an estimator over raw records). Returns (the
    fitted CreditScorer, the fitted method, for its learned attributes)."""
    from finance.errors import CreditDataError
    from finance.scorer import CreditScorer

    if method not in METHODS:
        raise CreditDataError(f"unknown reject-inference method {method!r}; choose from {list(METHODS)}",
                              field="reject_inference")
    if unlabelled is None or not len(unlabelled.frame):
        raise CreditDataError("reject inference needs applicants without outcome (--unlabelled)", field="unlabelled")
    estimator = CreditScorer(dataset=labelled.dataset, model_name=model_name, seed=seed, policy=policy,
                             exclude_protected=exclude_protected)
    frame = pd.concat([labelled.frame, unlabelled.frame], ignore_index=True)
    y = np.r_[np.asarray(labelled.target, dtype="int64"), np.full(len(unlabelled.frame), UNLABELLED)]
    fitted = make_method(method, estimator=estimator).fit(frame, y)
    return fitted.estimator_, fitted
