import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from finance.data import load_taiwan
from finance.errors import CreditDataError
from finance.models import CreditModel, FitData, available_models, build_model, register_model
from finance.models.ensemble import EnsembleConfig
from finance.models.moe import MoEModelConfig
from finance.scorer import CreditScorer, load_model, split_records

SMALL_MOE = MoEModelConfig(num_experts=16, hidden_size=32, intermediate_size=64, max_epochs=4, patience=2)
CONFIGS = {"moe": SMALL_MOE, "ensemble": EnsembleConfig(members=["lightgbm", "scorecard"])}


@pytest.fixture(scope="module")
def taiwan_sample(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    sample = records.take(np.random.default_rng(0).permutation(len(records))[:5000])
    fit_part, test_part = split_records(sample, valid_share=0.3, seed=1)
    return fit_part, test_part


@pytest.mark.parametrize("name", ["scorecard", "lightgbm", "moe", "ensemble"])
def test_each_model_beats_random_and_round_trips(taiwan_sample, tmp_path, name):
    fit_part, test_part = taiwan_sample
    train, valid = split_records(fit_part, valid_share=0.25, seed=0)
    scorer = CreditScorer(dataset="taiwan", model_name=name, model_config=CONFIGS.get(name)).fit(
        *train.xy, eval_set=[valid.xy])
    pd_ = scorer.predict_pd(test_part.frame)
    assert roc_auc_score(test_part.target, pd_) > 0.70  # random is 0.5; published LR 0.72-0.76 on all rows
    reloaded = load_model(scorer.save(tmp_path / name))
    np.testing.assert_array_equal(reloaded.predict_pd(test_part.frame), pd_)
    scored = reloaded.score(test_part.frame.iloc[:50], reasons="all")
    assert list(scored.columns[:4]) == ["id", "pd", "points", "decision"]
    assert scored["reason_1"].str.len().gt(0).mean() > 0.9  # almost everyone has a factor that raised risk
    worst = scored.sort_values("pd").iloc[-1]
    assert worst["reason_codes"].split("|")[0] in scorer.pipeline_.feature_names_
    family = {spec.name: spec.family for spec in reloaded.pipeline_.catalogue_}
    for codes in scored["reason_codes"]:  # three reasons are three kinds of reason, not one said three ways
        named = codes.split("|") if codes else []
        assert len({family[f] for f in named}) == len(named), codes
    assert ((scored["pd"] <= scorer.cutoff_pd_) == (scored["decision"] == "approve")).all()


def test_points_fall_as_risk_rises_and_pdo_doubles_odds():
    from finance.scaling import PointsScale

    scale = PointsScale(base_score=600, base_odds=50, pdo=20)
    assert scale.points(np.array([1 / 51]))[0] == pytest.approx(600, abs=0.1)
    odds_100 = 1 / 101  # good:bad 100:1, double the base odds
    assert scale.points(np.array([odds_100]))[0] == pytest.approx(620, abs=0.1)
    np.testing.assert_allclose(scale.probability(scale.points(np.array([0.1, 0.3]))), [0.1, 0.3], rtol=1e-3)


def test_onnx_exports_match_the_framework(taiwan_sample, tmp_path):
    from core.onnx_export import inference_session, max_abs_difference
    from finance.features import FeaturePipeline

    fit_part, test_part = taiwan_sample
    train, valid = split_records(fit_part, valid_share=0.25, seed=0)
    pipe = FeaturePipeline(dataset="taiwan").fit(train.frame)
    X_test = pipe.transform(test_part.frame)
    for name, config in (("lightgbm", None), ("moe", SMALL_MOE)):
        model = build_model(name, feature_names=pipe.feature_names_, dataset="taiwan", config=config)
        model.fit(pipe.transform(train.frame), train.target, eval_set=[(pipe.transform(valid.frame), valid.target)])
        path = model.export_onnx(tmp_path / f"{name}.onnx")
        if name == "moe":
            assert max_abs_difference(model.probability_module(), path, {"features": torch.from_numpy(X_test)}) < 1e-5
        else:
            onnx_pd = inference_session(path).run(None, {"features": X_test})[1][:, 1]
            np.testing.assert_allclose(onnx_pd, model.predict_proba(X_test)[:, 1], atol=1e-5)


def test_registry_takes_new_models_without_editing_ours():
    @register_model("constant-test")
    class Constant(CreditModel):
        uses_eval_set = False

        def _fit(self, X, y, sample_weight, X_valid, y_valid):
            self.rate_ = float(np.mean(y))

        def predict_proba(self, X):
            return np.column_stack([np.full(len(X), 1 - self.rate_), np.full(len(X), self.rate_)])

        def contributions(self, X):
            return np.zeros(X.shape)

        def save(self, directory):
            pass

        @classmethod
        def load(cls, directory, *, feature_names, dataset):
            return cls(feature_names=feature_names, dataset=dataset)

    assert "constant-test" in available_models() and {"scorecard", "lightgbm", "moe", "ensemble"} <= set(
        available_models())
    model = build_model("constant-test", feature_names=["a"], dataset="taiwan")
    assert model.fit(np.zeros((4, 1), np.float32), np.array([0, 1, 1, 1])).predict_pd(
        FitData(np.zeros((2, 1), np.float32))) == pytest.approx([0.75, 0.75])
    with pytest.raises(CreditDataError, match="unknown model"):
        build_model("no-such-model", feature_names=["a"], dataset="taiwan")


def test_lightgbm_path_attributions_add_up_to_the_raw_score_and_follow_shap():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 6)).astype(np.float32)
    y = (rng.random(3000) < 1 / (1 + np.exp(-(2 * X[:, 0] - X[:, 1])))).astype(int)
    model = build_model("lightgbm", feature_names=list("abcdef"), dataset="taiwan")
    model.fit(X[:2000], y[:2000], eval_set=[(X[2000:], y[2000:])])
    path = model.contributions(X[:200])
    raw = model.booster_.predict(X[:200], raw_score=True, num_iteration=model.best_iteration_)
    np.testing.assert_allclose(path.sum(1) + model.paths_[2].sum(), raw, atol=1e-9)
    model.config_.attribution = "shap"
    shap = model.contributions(X[:200])
    assert (np.abs(path).mean(0).argmax(), np.abs(shap).mean(0).argmax()) == (0, 0)  # the strongest feature
    assert np.corrcoef(path[:, 0], shap[:, 0])[0, 1] > 0.9


def test_cross_fitted_blend_rows_come_from_copies_stopped_on_the_other_half(taiwan_sample):
    from sklearn.model_selection import StratifiedKFold

    from finance.features import FeaturePipeline
    from finance.models.ensemble import _cross_fitted_logits, _logit

    fit_part, _ = taiwan_sample
    train, valid = split_records(fit_part, valid_share=0.25, seed=0)
    pipe = FeaturePipeline(dataset="taiwan").fit(train.frame)
    X_train, X_valid = pipe.transform(train.frame), pipe.transform(valid.frame)
    names = pipe.feature_names_
    members = [build_model(n, feature_names=names, dataset="taiwan").fit(
        X_train, train.target, eval_set=[(X_valid, valid.target)]) for n in ("lightgbm", "scorecard")]
    logits = _cross_fitted_logits(members, X_train, train.target, None, X_valid, valid.target)
    # The scorecard does not look at the validation part: its copies score exactly as it does.
    np.testing.assert_allclose(logits[:, 1], _logit(members[1].predict_proba(X_valid)[:, 1]), rtol=1e-12)
    # LightGBM's rows of one half come from a booster early-stopped on the other half only.
    stop, blend = next(StratifiedKFold(2, shuffle=True, random_state=0).split(X_valid, valid.target))
    reference = build_model("lightgbm", feature_names=names, dataset="taiwan").fit(
        X_train, train.target, eval_set=[(X_valid[stop], valid.target[stop])])
    np.testing.assert_array_equal(logits[blend, 0], _logit(reference.predict_proba(X_valid[blend])[:, 1]))
    assert not np.allclose(logits[:, 0], _logit(members[0].predict_proba(X_valid)[:, 1]))
