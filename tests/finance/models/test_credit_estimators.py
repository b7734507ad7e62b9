"""Every credit model is a scikit-learn estimator: clone, fit(X, y, sample_weight, eval_set), predict_proba."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from core.trainer import TrainerConfig
from finance.models import FitData, available_models, build_model
from finance.models.ensemble import EnsembleConfig
from finance.models.gbdt import LightGBMConfig, LightGBMModel
from finance.models.moe import MoEModelConfig
from finance.models.scorecard import ScorecardConfig, ScorecardModel
from finance.sequence.credit_model import SequenceModelConfig
from finance.sequence.estimator import SequenceTrainingConfig

TINY_MOE = MoEModelConfig(num_experts=4, hidden_size=16, intermediate_size=32, max_epochs=3, patience=2)
TINY_LIGHTGBM = LightGBMConfig(max_rounds=40, early_stopping_rounds=10, min_child_samples=20)
TINY_SEQUENCE = SequenceModelConfig(training=SequenceTrainingConfig(batch_size=128, trainer=TrainerConfig(
    learning_rate=2e-3, grad_accumulation=1, max_epochs=2, patience=2, monitor="val_auc", mode="max",
    progress=False)))
FAMILIES = {  # name -> small config: seconds per fit
    "scorecard": ScorecardConfig(max_candidates=15), "lightgbm": TINY_LIGHTGBM, "moe": TINY_MOE,
    "ensemble": EnsembleConfig(members=["lightgbm", "scorecard"], cross_fit=True),
    "sequence": TINY_SEQUENCE,
    "sequence-ensemble": None,  # its members' defaults: a LightGBM and a two-layer sequence model
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Features (and records) of 2,400 generated applicants: 1,800 to fit, 600 held out."""
    from finance.data import load_generated
    from finance.features import FeaturePipeline
    from finance.generate import GeneratorConfig, generate

    records = load_generated(generate(tmp_path_factory.mktemp("gen"), GeneratorConfig(n_applicants=2400, seed=3)))
    fit, test = records.take(np.arange(1800)), records.take(np.arange(1800, 2400))
    pipeline = FeaturePipeline(dataset="generated").fit(fit.frame)
    return (FitData(pipeline.transform(fit.frame), fit.frame), fit.target,
            FitData(pipeline.transform(test.frame), test.frame), test.target, pipeline.feature_names_)


def test_every_family_is_tested():
    assert set(FAMILIES) == {m for m in available_models() if not m.endswith("-test")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_clone_fit_predict_proba(generated, name):
    X, y, X_test, y_test, names = generated
    model = build_model(name, config=FAMILIES[name], feature_names=names, dataset="generated", seed=1)
    copy = clone(model)
    assert type(copy) is type(model) and copy.get_params().keys() == model.get_params().keys()
    assert copy.get_params()["config"] == model.get_params()["config"]
    assert model.config is None or copy.config is not model.config  # a deep copy, not shared
    if name == "sequence-ensemble":  # fitting is the sequence and ensemble families' (its members train minutes)
        assert copy.needs_records and copy.get_params()["feature_names"] == names
        return
    fitted = copy.fit(X, y)  # no eval_set: the models that early-stop hold out a share of X themselves
    assert fitted is copy and not hasattr(model, "classes_")  # the original is untouched
    proba = copy.predict_proba(X_test)
    assert proba.shape == (len(y_test), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert roc_auc_score(y_test, proba[:, 1]) > 0.6  # learned something (random is 0.5)
    assert copy.features_ == names and copy.n_features_in_ == len(names) and copy.classes_.tolist() == [0, 1]
    assert copy.config_ == (FAMILIES[name] or copy.config_class())
    np.testing.assert_array_equal(copy.predict(X_test), (proba[:, 1] > 0.5).astype(int))
    again = clone(copy)  # a fitted model clones to an unfitted one with the same parameters
    assert not hasattr(again, "features_") and again.get_params()["seed"] == 1


def test_fit_is_seeded_and_eval_set_is_used(generated):
    X, y, X_test, _, names = generated
    a = LightGBMModel(config=TINY_LIGHTGBM, feature_names=names).fit(X, y)
    b = clone(a).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X_test), b.predict_proba(X_test))
    c = clone(a).fit(X.take(np.arange(1400)), y[:1400], eval_set=[(X.take(np.arange(1400, 1800)), y[1400:])])
    assert not np.array_equal(a.predict_proba(X_test), c.predict_proba(X_test))


def test_labels_other_than_0_1_map_to_classes(generated):
    X, y, X_test, _, names = generated
    text = np.where(y == 1, "bad", "good")
    model = ScorecardModel(config=FAMILIES["scorecard"], feature_names=names).fit(X, text)
    assert model.classes_.tolist() == ["bad", "good"]  # column 1 is then "good"
    reference = ScorecardModel(config=FAMILIES["scorecard"], feature_names=names).fit(X, y)
    np.testing.assert_allclose(model.predict_proba(X_test)[:, 0], reference.predict_proba(X_test)[:, 1], rtol=1e-6)


def test_refusals_are_value_errors(generated):
    X, y, X_test, _, names = generated
    with pytest.raises(NotFittedError):
        LightGBMModel().predict_proba(X_test)
    with pytest.raises(ValueError, match="two classes"):
        ScorecardModel().fit(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="feature_names names 2"):
        ScorecardModel(feature_names=["a", "b"]).fit(X, y)
    with pytest.raises(ValueError, match="eval_set must be"):
        LightGBMModel().fit(X, y, eval_set=[(X, y), (X, y)])
    with pytest.raises(ValueError, match="reads the raw records"):
        build_model("sequence", dataset="generated").fit(X.X, y)
    fitted = ScorecardModel(config=FAMILIES["scorecard"], feature_names=names).fit(X, y)
    with pytest.raises(ValueError, match="expecting"):
        fitted.predict_proba(X_test.X[:, :3])


@pytest.mark.parametrize(("config", "message"), [
    (lambda: LightGBMConfig(num_leaves=1), "num_leaves"), (lambda: LightGBMConfig(attribution="lime"), "attribution"),
    (lambda: MoEModelConfig(top_k=8, num_experts=4), "top_k"), (lambda: MoEModelConfig(dropout=1.0), "dropout"),
    (lambda: ScorecardConfig(min_bin_size=0.6), "min_bin_size"), (lambda: EnsembleConfig(members=[]), "members"),
    (lambda: SequenceModelConfig(attribution="shap"), "attribution"),
])
def test_configs_refuse_bad_values(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def _expected_failures(estimator):
    if isinstance(estimator, LightGBMModel):  # row bagging: weight 2 is not the same as a repeated row
        return {"check_sample_weight_equivalence_on_dense_data": "LightGBM bags rows"}
    return {}


@pytest.mark.slow
@parametrize_with_checks([ScorecardModel(),
                          LightGBMModel(config=LightGBMConfig(max_rounds=20, early_stopping_rounds=5,
                                                              min_child_samples=5))],
                         expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
