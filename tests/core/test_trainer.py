import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.trainer import (
    EpochCallback,
    KeepBest,
    Trainer,
    TrainerConfig,
    WeightAveraging,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
    warmup_linear_decay,
)
from deploy.synthetic import segmented_classification


def _setup(seed=0):
    numeric, segment, label = segmented_classification(2000, seed=seed)
    num, seg, y = (torch.from_numpy(a) for a in (numeric, segment, label))
    config = TabularMoEConfig(num_numeric=8, categorical_cardinalities=[4],
                              moe=MoEConfig(num_experts=16, top_k=2, hidden_size=16, intermediate_size=16))

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(1600)
        for s in range(0, 1600, 100):
            idx = order[s:s + 100]
            yield num[idx], seg[idx], y[idx]

    def loss_fn(m, b):
        logits, aux = m(b[0], b[1][:, None])
        return F.binary_cross_entropy_with_logits(logits[:, 0], b[2]) + aux

    def evaluate(m):
        logits, _ = m(num[1600:], seg[1600:, None])
        return {"val_loss": F.binary_cross_entropy_with_logits(logits[:, 0], y[1600:]).item()}

    return config, batches, loss_fn, evaluate, (numeric, segment, label)


def _fit(seed, callbacks=None, **overrides):
    config, batches, loss_fn, evaluate, _ = _setup()
    torch.manual_seed(seed)
    model = TabularMoE(config)
    settings = {"learning_rate": 3e-3, "grad_accumulation": 2, "max_epochs": 4, "progress": False,
                "seed": seed, **overrides}
    trainer = Trainer(TrainerConfig(**settings))
    return model, trainer.fit(model, batches, 16, loss_fn, evaluate, callbacks=callbacks)


def test_training_lowers_validation_loss_and_is_seeded():
    model_a, result_a = _fit(0)
    model_b, result_b = _fit(0)
    assert result_a.history[-1]["val_loss"] < result_a.history[0]["val_loss"]
    assert result_a.best_metrics["val_loss"] == result_b.best_metrics["val_loss"]
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_early_stopping_stops_after_patience():
    # A learning rate this large makes validation worse quickly; training stops early.
    _, result = _fit(0, patience=1, max_epochs=20, learning_rate=5.0, max_grad_norm=1e6)
    assert result.epochs_run < 20
    assert result.epochs_run == result.best_epoch + 1


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(total_steps=100, warmup_steps=10)
    assert f(0) == 0.1 and f(9) == 1.0 and f(10) == 1.0
    assert abs(f(55) - 0.5) < 1e-9 and f(100) == 0.0


def test_checkpoint_round_trip_is_exact(tmp_path):
    config, *_, arrays = _setup()
    model, result = _fit(0, max_epochs=1)
    fingerprint = data_fingerprint(*arrays)
    path = save_checkpoint(tmp_path / "m.pt", model, config=config, metrics=result.best_metrics,
                           data_fingerprint=fingerprint)
    loaded, meta = load_checkpoint(path, lambda c: TabularMoE(TabularMoEConfig(**c)))
    x, s = torch.randn(50, 8), torch.randint(0, 4, (50, 1))
    model.eval()
    assert torch.equal(model(x, s)[0], loaded(x, s)[0])
    assert meta["data_fingerprint"] == fingerprint
    assert meta["metrics"]["val_loss"] == result.best_metrics["val_loss"]
    assert meta["config"]["moe"]["num_experts"] == 16


class _Recorder(EpochCallback):
    """Records the calls it gets and the weights after each epoch's training."""

    def __init__(self):
        self.calls, self.weights = [], {}

    def after_training(self, model, epoch):
        self.calls.append(("after_training", epoch))
        self.weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    def on_epoch_end(self, model, epoch, metrics, improved):
        self.calls.append(("on_epoch_end", epoch, improved))

    def on_fit_end(self, model):
        self.calls.append(("on_fit_end",))


def test_callbacks_run_at_each_epoch_end_and_keep_best_restores_the_best_epoch():
    recorder = _Recorder()
    model, result = _fit(0, callbacks=[recorder, KeepBest()], patience=1, max_epochs=20, learning_rate=5.0,
                         max_grad_norm=1e6)
    epochs = result.epochs_run
    improved = [c[2] for c in recorder.calls if c[0] == "on_epoch_end"]
    assert [c[0] for c in recorder.calls] == ["after_training", "on_epoch_end"] * epochs + ["on_fit_end"]
    assert improved.index(True) == 0 and improved[result.best_epoch - 1] and not improved[-1]
    for key, value in model.state_dict().items():  # the weights of the best epoch, not of the last
        assert torch.equal(value, recorder.weights[result.best_epoch][key])
    plain_model, plain = _fit(0, patience=1, max_epochs=20, learning_rate=5.0, max_grad_norm=1e6)
    assert plain.history == result.history  # callbacks=None means [KeepBest()]
    for p, q in zip(plain_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_without_keep_best_the_last_weights_stay():
    recorder = _Recorder()
    model, result = _fit(0, callbacks=[recorder], patience=1, max_epochs=20, learning_rate=5.0, max_grad_norm=1e6)
    assert result.best_epoch < result.epochs_run
    for key, value in model.state_dict().items():
        assert torch.equal(value, recorder.weights[result.epochs_run][key])


def test_weight_averaging_holds_the_mean_of_the_last_epochs():
    recorder = _Recorder()
    config, batches, loss_fn, evaluate, _ = _setup()
    torch.manual_seed(0)
    model = TabularMoE(config)
    averaging = WeightAveraging(model, last=2)
    seen = []

    def evaluate_averaged(m):
        seen.append({k: v.clone() for k, v in averaging.averaged.state_dict().items()})
        return evaluate(averaging.averaged)

    trainer = Trainer(TrainerConfig(learning_rate=3e-3, grad_accumulation=2, max_epochs=3, progress=False))
    trainer.fit(model, batches, 16, loss_fn, evaluate_averaged, callbacks=[recorder, averaging])
    key = "input.weight" if "input.weight" in seen[0] else next(k for k, v in seen[0].items() if v.is_floating_point())
    assert torch.equal(seen[0][key], recorder.weights[1][key])  # one epoch so far: its own weights
    np.testing.assert_allclose(seen[2][key], (recorder.weights[2][key] + recorder.weights[3][key]) / 2, atol=1e-7)
    with pytest.raises(ValueError, match="last must be a positive integer"):
        WeightAveraging(model, last=0)
