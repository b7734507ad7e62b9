import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.onnx_export import max_abs_difference
from core.trainer import TrainerConfig
from finance.data import load_taiwan
from finance.sequence import TAIWAN_LAYOUT, SequenceClassifier, SequenceTrainingConfig


def quick_training() -> SequenceTrainingConfig:
    return SequenceTrainingConfig(batch_size=128, trainer=TrainerConfig(
        learning_rate=2e-3, grad_accumulation=1, max_epochs=3, patience=3, monitor="val_auc", mode="max",
        progress=False))


@pytest.fixture(scope="module")
def taiwan(data_root):
    records = load_taiwan(data_root / "taiwan_credit_default")
    return records.frame.iloc[:2400].reset_index(drop=True), records.target[:2400]


@pytest.fixture(scope="module")
def fitted(taiwan):
    X, y = taiwan
    return SequenceClassifier(training=quick_training(), seed=0).fit(X.iloc[:1800], y[:1800])


def test_sequence_model_learns_on_a_small_real_sample(fitted, taiwan):
    X, y = taiwan
    proba = fitted.predict_proba(X.iloc[1800:])
    assert proba.shape == (600, 2)
    assert roc_auc_score(y[1800:], proba[:, 1]) > 0.65
    assert fitted.best_epoch_ >= 1 and "val_auc" in fitted.history_[0]


def test_save_and_load_give_identical_scores(fitted, taiwan, tmp_path):
    X, _ = taiwan
    fitted.save(tmp_path / "model")
    loaded = SequenceClassifier.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(X.iloc[1800:]), fitted.predict_proba(X.iloc[1800:]))


def test_onnx_export_matches_eager_on_real_windows(fitted, taiwan, tmp_path):
    X, _ = taiwan
    windows = X.iloc[1800:2300].copy()
    # Include shorter histories so the padding path is exported and checked too.
    for row, kept in ((0, 2), (1, 4), (2, 1)):
        drop = 6 - kept
        for group in (TAIWAN_LAYOUT.status, TAIWAN_LAYOUT.bill, TAIWAN_LAYOUT.payment):
            windows.iloc[row, [windows.columns.get_loc(c) for c in group[:drop]]] = np.nan
    path = fitted.export_onnx(tmp_path / "sequence.onnx", windows, version="test")
    inputs = fitted.onnx_inputs(windows)
    assert inputs["padding"][:3].any(dim=1).all()
    loads = []  # the parity windows must reach experts across the pool, in every layer
    hooks = [block.moe.register_forward_hook(lambda _m, _i, out: loads.append(out.expert_load))
             for block in fitted.model_.blocks]
    with torch.no_grad():
        fitted.model_(*inputs.values())
    for hook in hooks:
        hook.remove()
    assert all((load > 0).sum() >= len(load) // 2 for load in loads), [load.tolist() for load in loads]
    diff = max_abs_difference(fitted.model_, path, inputs)
    assert diff < 1e-4, f"onnxruntime differs from eager by {diff}"


def test_attributions_name_raw_fields_and_explain_the_log_odds(fitted, taiwan):
    X, _ = taiwan
    rows = X.iloc[1800:1900].reset_index(drop=True)
    pushes, columns = fitted.attributions(rows)
    assert pushes.shape == (100, len(columns)) and len(columns) == 6 * 3 + 2 + 3
    assert {"PAY_0", "BILL_AMT1", "PAY_AMT6", "LIMIT_BAL", "EDUCATION"} <= set(columns)
    assert np.isfinite(pushes).all() and np.abs(pushes).max() > 0
    # The latest repayment status matters: clients 2+ months late there get a positive push.
    late = rows["PAY_0"].to_numpy() >= 2
    if late.any():
        assert pushes[late, columns.index("PAY_0")].mean() > 0


def test_batched_occlusion_is_the_drop_from_setting_one_field_to_its_reference(fitted, taiwan):
    from finance.sequence.estimator import to_tensors
    from finance.sequence.tokens import SequenceBatch

    X, _ = taiwan
    rows = X.iloc[1900:1960].reset_index(drop=True)
    rows.loc[0, ["PAY_6", "BILL_AMT6", "PAY_AMT6"]] = np.nan  # a padded month must push 0
    pushes, columns = fitted.attributions(rows, "occlusion")
    batch = fitted.tokenizer_.transform(rows)
    base = fitted._logits(fitted.model_, to_tensors(batch)).numpy()
    for column, edit in (("PAY_0", lambda a: a[1].__setitem__((slice(None), 5), fitted.tokenizer_.status_mode_)),
                         ("BILL_AMT3", lambda a: a[0].__setitem__((slice(None), 3, [0, 2, 4]), 0.0)),
                         ("AGE", lambda a: a[3].__setitem__((slice(None), 1), 0.0))):
        arrays = [a.copy() for a in batch]
        edit(arrays)
        expected = base - fitted._logits(fitted.model_, to_tensors(SequenceBatch(*arrays))).numpy()
        np.testing.assert_allclose(pushes[:, columns.index(column)], expected, atol=1e-5)
    assert pushes[0, columns.index("PAY_6")] == 0 and pushes[0, columns.index("BILL_AMT6")] == 0


def test_integrated_gradients_add_up_to_the_logit_above_the_reference(fitted, taiwan):
    import torch

    from finance.sequence.estimator import to_tensors

    X, _ = taiwan
    rows = X.iloc[1900:2000].reset_index(drop=True)
    pushes, columns = fitted.attributions(rows, "integrated-gradients", steps=64)
    assert pushes.shape == (100, len(columns)) and np.isfinite(pushes).all()
    inputs = to_tensors(fitted.tokenizer_.transform(rows))
    tokens, status, padding, numeric, categorical = inputs
    reference = (torch.zeros_like(tokens), torch.where(padding, status, fitted.tokenizer_.status_mode_), padding,
                 torch.zeros_like(numeric), torch.tensor(fitted.tokenizer_.static_mode_).expand(len(rows), -1))
    gap = fitted._logits(fitted.model_, inputs).numpy() - fitted._logits(fitted.model_, reference).numpy()
    # Completeness holds up to the jumps where top-k routing switches experts along the path.
    assert np.corrcoef(pushes.sum(axis=1), gap)[0, 1] > 0.95
    assert np.median(np.abs(pushes.sum(axis=1) - gap)) < 0.2 * np.abs(gap).mean() + 1e-3
    occlusion, _ = fitted.attributions(rows, "occlusion")
    agree = (np.argmax(pushes, axis=1) == np.argmax(occlusion, axis=1)).mean()
    assert agree > 0.4, f"integrated gradients and occlusion agree on the top field for only {agree:.0%}"
    with pytest.raises(ValueError, match="attribution method"):
        fitted.attributions(rows, "shapley")
