import numpy as np

from finance.data import load_generated
from finance.features import FeaturePipeline, FeatureSpec, _families
from finance.generate import GeneratorConfig, generate
from finance.scorer import top_reasons


def test_one_reason_per_family_ranked_by_push_ties_in_feature_order():
    contrib = np.array([[3.0, 2.9, 1.0, 0.5, 2.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0]])
    families = np.array([0, 0, 1, 1, 2])
    # Row 0: feature 1 (2.9) is second overall but shares feature 0's family: feature 4, then 2.
    np.testing.assert_array_equal(top_reasons(contrib, families, 3), [[0, 4, 2], [0, 2, 4], [0, 2, 4]])
    # Each feature its own family: the plain top 3, ties in feature order.
    np.testing.assert_array_equal(top_reasons(contrib, np.arange(5), 3), [[0, 1, 4], [0, 1, 2], [0, 1, 2]])
    # Two families: two reasons at most.
    assert top_reasons(contrib, np.array([0, 0, 0, 1, 1]), 3).shape == (3, 2)


def test_catalogue_families_and_old_catalogues_without_them(tmp_path):
    old = [FeatureSpec("a", "bureau", "A"), FeatureSpec("b", "bureau", "B")]  # saved before families
    np.testing.assert_array_equal(_families(old), [0, 1])  # each its own: per-feature reasons as before
    records = load_generated(generate(tmp_path, GeneratorConfig(n_applicants=500, seed=0)))
    pipeline = FeaturePipeline(dataset="generated").fit(records.frame)
    family = {s.name: s.family for s in pipeline.catalogue_}
    assert family["days_past_due_last"] == family["n_dpd30_3m"] == family["months_since_dpd"] == "delinquency"
    assert family["payment_ratio_mean3"] == "payments" and family["utilisation_last"] == "card use"
    assert family["is_emulator"] == "device" and all(family.values())
    assert len(set(pipeline.families_)) == len(set(family.values()))
    again = FeaturePipeline.from_dict(pipeline.to_dict())  # saved and loaded: the same families
    np.testing.assert_array_equal(again.families_, pipeline.families_)


def test_a_scorer_trained_without_protected_attributes_keeps_them_out_after_a_reload(tmp_path, data_root):
    from finance.data import load_taiwan
    from finance.scorer import CreditScorer, load_model, split_records

    records = load_taiwan(data_root / "taiwan_credit_default")
    records = records.take(np.arange(3000))
    train, valid = split_records(records, seed=0)
    scorer = CreditScorer(dataset="taiwan", model_name="lightgbm", exclude_protected=True).fit(
        *train.xy, eval_set=[valid.xy])
    loaded = load_model(scorer.save(tmp_path / "m"))
    assert loaded.exclude_protected and loaded.pipeline_.excluded_ == scorer.pipeline_.excluded_
    assert {"age", "female", "marriage=1"} <= set(loaded.pipeline_.excluded_)
    assert not {"age", "female", "limit_per_age"} & set(loaded.model_.features_)
    scored = loaded.score(valid.frame.iloc[:300])
    named = set("|".join(scored["reason_codes"]).split("|")) - {""}
    assert named and not named & set(loaded.pipeline_.excluded_)
    np.testing.assert_array_equal(scored["pd"], scorer.score(valid.frame.iloc[:300])["pd"])
