import numpy as np
import pytest

from core.row_fingerprint import RowFingerprint, SplitFingerprint
from finance.data import load_generated
from finance.generate import GeneratorConfig, generate
from finance.scorer import CreditScorer


def test_a_capped_fingerprint_estimates_the_seen_share_from_a_consistent_sample(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, np.iinfo(np.uint64).max, 200_000, dtype=np.uint64)
    fingerprint = SplitFingerprint.build(train, max_hashes=10_000)
    assert len(fingerprint.hashes) == 10_000 and fingerprint.rows == 200_000
    fresh = rng.integers(0, np.iinfo(np.uint64).max, 100_000, dtype=np.uint64)
    share, exact = fingerprint.share(np.concatenate([train[:30_000], fresh[:70_000]]))
    assert not exact and abs(share - 0.3) < 0.03
    full = SplitFingerprint.build(train[:1000])
    assert full.share(np.concatenate([train[:250], fresh[:750]])) == (0.25, True)
    RowFingerprint(fingerprint, full).save(tmp_path)
    loaded = RowFingerprint.load(tmp_path)
    assert np.array_equal(loaded.train.hashes, fingerprint.hashes) and loaded.train.threshold == fingerprint.threshold
    assert loaded.valid.share(train[:10]) == (1.0, True)


def test_the_same_records_hash_alike_from_parquet_and_csv(tmp_path):
    records = load_generated(generate(tmp_path / "gen", GeneratorConfig(n_applicants=300, seed=2)))
    records.frame.assign(default_12m=records.target).to_csv(tmp_path / "records.csv", index=False)
    from_csv = load_generated(tmp_path / "records.csv")
    scorer = CreditScorer(dataset="generated", model_name="lightgbm")
    parquet_hashes, csv_hashes = scorer.row_hashes(records.frame), scorer.row_hashes(from_csv.frame)
    assert len(np.unique(parquet_hashes)) == 300
    np.testing.assert_array_equal(parquet_hashes, csv_hashes)


@pytest.mark.parametrize("max_hashes", [10_000, 300])  # exact, and the bottom-k sample of each part
def test_union_is_the_fingerprint_of_both_parts(max_hashes):
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 2**63, 1000, dtype=np.uint64), rng.integers(0, 2**63, 700, dtype=np.uint64)
    union = SplitFingerprint.build(first, max_hashes=max_hashes).union(
        SplitFingerprint.build(second, max_hashes=max_hashes), max_hashes=max_hashes)
    together = SplitFingerprint.build(np.concatenate([first, second]), max_hashes=max_hashes)
    assert union.rows == 1700 and union.threshold == together.threshold
    np.testing.assert_array_equal(union.hashes, together.hashes)
