import numpy as np
import pytest

from finance.data import Records, load_generated, load_gmsc, load_taiwan
from finance.features import FeaturePipeline, monthly_sequences
from finance.generate import GeneratorConfig, generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Records:
    return load_generated(generate(tmp_path_factory.mktemp("gen"), GeneratorConfig(n_applicants=2_000, seed=2)))


def _check_pipeline(frame, dataset, minimum):
    pipe = FeaturePipeline(dataset=dataset).fit(frame)
    X = pipe.transform(frame)
    assert X.shape == (len(frame), len(pipe.feature_names_)) and X.dtype == np.float32
    assert len(pipe.feature_names_) >= minimum
    catalogue = pipe.catalogue()
    assert catalogue["name"].is_unique and (catalogue["definition"].str.len() > 5).all()
    assert set(catalogue["source"]) >= {"application"}
    one_by_one = np.vstack([pipe.transform(frame.iloc[[i]]) for i in range(5)])
    np.testing.assert_array_equal(one_by_one, X[:5])  # single record = batch, bit for bit
    return pipe, X


def test_taiwan_has_200_plus_features_and_ignores_the_label(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    frame = records.frame.iloc[:3000]
    pipe, X = _check_pipeline(frame, "taiwan", 200)
    # No leakage: the records carry no label, and features correlate with it no better than a
    # strong real model would (a leaked label gives |r| ~ 1).
    assert "default.payment.next.month" not in frame.columns
    y = records.target[:3000]
    filled = np.where(np.isnan(X), np.nanmedian(X, 0), X)
    corr = np.nan_to_num([abs(np.corrcoef(filled[:, j], y)[0, 1]) for j in range(X.shape[1])])
    assert corr.max() < 0.5
    with_label = frame.assign(**{"default.payment.next.month": y})
    np.testing.assert_array_equal(pipe.transform(with_label), X)


def test_generated_has_200_plus_features_from_all_four_sources(generated):
    pipe, _ = _check_pipeline(generated.frame, "generated", 200)
    assert set(pipe.catalogue()["source"]) == {"application", "transactions", "social", "device"}


def test_pipeline_round_trips_and_handles_unseen_levels(generated):
    pipe = FeaturePipeline(dataset="generated").fit(generated.frame)
    again = FeaturePipeline.from_dict(pipe.to_dict())
    np.testing.assert_array_equal(again.transform(generated.frame[:50]), pipe.transform(generated.frame[:50]))
    odd = generated.frame[:3].copy()
    odd["region"] = "region_99"  # a level not seen in training: all its one-hots are 0
    X = pipe.transform(odd)
    region_cols = [j for j, n in enumerate(pipe.feature_names_) if n.startswith("region=")]
    assert X[:, region_cols].sum() == 0


def test_monthly_sequences_are_oldest_first(generated):
    values, channels = monthly_sequences(generated.frame[:10], "generated")
    assert values.shape == (10, 6, 14) and channels[0] == "credit_limit"
    assert values[0, -1, channels.index("days_past_due")] == generated.frame["days_past_due_m1"].iloc[0]


PROTECTED = {"taiwan": {"age", "sex", "marital status"}, "gmsc": {"age", "family status"},
             "generated": {"age", "family status"}}


@pytest.mark.parametrize("dataset", ["taiwan", "gmsc", "generated"])
def test_excluding_protected_attributes_leaves_out_every_feature_built_from_them(dataset, data_root, generated):
    frame = {"taiwan": lambda: load_taiwan(data_root / "taiwan_credit_default").frame.iloc[:2000],
             "gmsc": lambda: load_gmsc(data_root / "give_me_some_credit").frame.iloc[:2000],
             "generated": lambda: generated.frame}[dataset]()
    full = FeaturePipeline(dataset=dataset).fit(frame)
    marked = {s.name: s.protected for s in full.catalogue_ if s.protected}
    assert set(marked.values()) == PROTECTED[dataset] and "age" in marked
    pipe = FeaturePipeline(dataset=dataset, exclude_protected=True).fit(frame)
    assert pipe.excluded_ == list(marked) and not set(pipe.feature_names_) & set(marked)
    assert len(pipe.feature_names_) == len(full.feature_names_) - len(marked)
    assert (pipe.catalogue()["protected"] == "").all()
    kept = [full.feature_names_.index(n) for n in pipe.feature_names_]
    np.testing.assert_array_equal(pipe.transform(frame), full.transform(frame)[:, kept])
    np.testing.assert_array_equal(pipe.transform(frame.iloc[[3]]), full.transform(frame.iloc[[3]])[:, kept])
    again = FeaturePipeline.from_dict(pipe.to_dict())
    assert again.exclude_protected and again.feature_names_ == pipe.feature_names_
    np.testing.assert_array_equal(again.transform(frame.iloc[:20]), pipe.transform(frame.iloc[:20]))
