"""core.compress.distill: the losses against their definitions, and a student that learns from a teacher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.compress.distill import DistillConfig, Distiller, distillation_loss, soft_loss
from core.trainer import Trainer, TrainerConfig


def test_regression_loss_mixes_teacher_and_target():
    student, teacher, target = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]), torch.tensor([0.0, 4.0])
    loss = distillation_loss(student, teacher, target, DistillConfig(alpha=0.25))
    assert loss.item() == pytest.approx(0.25 * (0.25 / 2) + 0.75 * ((1 + 4) / 2))


def test_classification_soft_term_is_temperature_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    config = DistillConfig(task="classification", alpha=1.0, temperature=3.0)
    p_teacher = (teacher / 3).softmax(-1)
    expected = (p_teacher * (p_teacher.log() - (student / 3).log_softmax(-1))).sum(-1).mean() * 9
    assert soft_loss(student, teacher, config).item() == pytest.approx(expected.item(), rel=1e-5)
    labels = torch.tensor([0, 1, 2, 3, 0])
    mixed = distillation_loss(student, teacher, labels,
                              DistillConfig(task="classification", alpha=0.5, temperature=3.0))
    hard = F.cross_entropy(student, labels).item()
    assert mixed.item() == pytest.approx(0.5 * expected.item() + 0.5 * hard, rel=1e-5)


def test_binary_logits_use_the_two_class_form():
    student, teacher = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.5])
    config = DistillConfig(task="classification", alpha=1.0, temperature=2.0)
    two_class = soft_loss(torch.stack([torch.zeros(2), student], 1), torch.stack([torch.zeros(2), teacher], 1), config)
    assert soft_loss(student, teacher, config).item() == pytest.approx(two_class.item())
    labels = torch.tensor([1.0, 0.0])
    hard = distillation_loss(student, teacher, labels, DistillConfig(task="classification", alpha=0.0))
    assert hard.item() == pytest.approx(F.binary_cross_entropy_with_logits(student, labels).item())


def test_mismatched_shapes_are_refused_not_broadcast():
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.zeros(4), torch.zeros(4, 1), torch.zeros(4), DistillConfig())


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"alpha": -0.1}, {"temperature": 0}, {"task": "ranking"}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="DistillConfig"):
        DistillConfig(**bad)


def test_student_learns_the_teacher_through_the_shared_trainer():
    """alpha=1: no labels at all (they are noise here); the student can only learn from the teacher."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(512, 6)
    noise_labels = torch.randn(512)
    student = nn.Linear(6, 1)

    def batches(epoch):
        order = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, 512, 64):
            index = order[start:start + 64]
            yield x[index], noise_labels[index]

    def gap(model):
        with torch.no_grad():
            return F.mse_loss(model(x).squeeze(-1), teacher(x).squeeze(-1)).item()

    before = gap(student)
    distiller = Distiller(nn.Sequential(teacher, nn.Flatten(0)), config=DistillConfig(alpha=1.0))

    def loss_fn(model, batch):
        return distiller(lambda inputs: model(inputs).squeeze(-1), batch)

    Trainer(TrainerConfig(learning_rate=5e-2, grad_accumulation=1, max_epochs=30, patience=30, progress=False)).fit(
        student, batches, 8, loss_fn, lambda model: {"val_loss": gap(model)})
    assert gap(student) < 0.2 * before
    assert all(not p.requires_grad for p in teacher.parameters())  # the teacher is frozen, not trained
