import numpy as np
import torch
import torch.nn.functional as F

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.trainer import (
    Trainer,
    TrainerConfig,
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


def _fit(seed, **overrides):
    config, batches, loss_fn, evaluate, _ = _setup()
    torch.manual_seed(seed)
    model = TabularMoE(config)
    settings = {"learning_rate": 3e-3, "grad_accumulation": 2, "max_epochs": 4, "progress": False,
                "seed": seed, **overrides}
    trainer = Trainer(TrainerConfig(**settings))
    return model, trainer.fit(model, batches, 16, loss_fn, evaluate)


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
