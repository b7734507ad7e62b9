import numpy as np
import pytest

from core.trainer import TrainerConfig
from finance.data import Records, load_taiwan
from finance.models import available_models
from finance.scorer import CreditScorer
from finance.sequence.credit_model import SequenceModelConfig
from finance.sequence.estimator import SequenceTrainingConfig


@pytest.fixture(scope="module")
def records(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    return records.take(np.arange(0, 1500)), records.take(np.arange(1500, 1900)), records.take(np.arange(1900, 2400))


def quick() -> SequenceModelConfig:
    return SequenceModelConfig(training=SequenceTrainingConfig(batch_size=128, trainer=TrainerConfig(
        learning_rate=2e-3, grad_accumulation=1, max_epochs=2, patience=2, monitor="val_auc", mode="max",
        progress=False)))


def test_sequence_models_are_registered():
    assert {"sequence", "sequence-ensemble"} <= set(available_models())


def test_sequence_scorer_scores_with_reason_codes_and_round_trips(records, tmp_path):
    train, valid, test = records
    scorer = CreditScorer(dataset="taiwan", model_name="sequence", model_config=quick()).fit(
        *train.xy, eval_set=[valid.xy])
    scored = scorer.score(test.frame)
    assert len(scored) == len(test) and scored["pd"].between(0, 1).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test.target, scored["pd"]) > 0.65
    declined = scored[scored["decision"] == "decline"]
    assert (declined["reason_1"] != "").mean() > 0.8  # the reasons name pipeline features
    assert declined["reason_codes"].str.contains("status_|bill_|paid_|limit|age").mean() > 0.8
    scorer.save(tmp_path / "seq")
    again = CreditScorer.load(tmp_path / "seq")
    np.testing.assert_array_equal(again.predict_pd(test.frame), scorer.predict_pd(test.frame))
    from core.onnx_export import max_abs_difference

    path = again.model_.export_onnx(tmp_path / "seq.onnx")  # what `moeworks finance export` calls
    classifier = again.model_.classifier_
    assert max_abs_difference(classifier.model_, path, classifier.onnx_inputs(test.frame)) < 1e-4


def test_any_credit_model_trains_with_reject_inference(records):
    from finance.reject_inference.methods import train_with_reject_inference

    train, valid, test = records
    accepted = Records("taiwan", train.frame.iloc[:1000], train.target[:1000])
    rejects = Records("taiwan", train.frame.iloc[1000:], None)
    scorer, method = train_with_reject_inference(accepted, rejects, model_name="lightgbm", method="fuzzy")
    assert method.n_unlabelled_ == 500 and method.n_train_rows_ == 1000 + 2 * 500
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test.target, scorer.predict_pd(test.frame)) > 0.65
