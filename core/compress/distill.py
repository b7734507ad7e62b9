"""Knowledge distillation: a frozen teacher's outputs as soft targets beside the true labels.

Regression (e.g. RUL): loss = alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, target),
both on the same scale (the caller divides by a RUL cap or a standard deviation first).
Classification (Hinton et al. 2015, as DistilBERT / TinyBERT use it): loss = alpha * T^2 *
KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels); the T^2
keeps the soft term's gradient on the scale of the hard term's as T grows. Binary logits (one
column or a 1-D output) use the two-class form, sigmoid instead of softmax.

`Distiller` wraps any teacher (one net, a seed ensemble, anything whose forward returns the
logits or a tuple that starts with them) and hands `core.trainer.Trainer.fit` a loss function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillConfig:
    task: Literal["regression", "classification"] = "regression"
    # Weight of the soft (teacher) term; 1 - alpha goes to the hard (label) term. 0.5 is
    # DistilBERT's balance of the two; a teacher much better than the labels' noise earns more.
    alpha: float = 0.5
    temperature: float = 2.0  # classification only: Hinton et al. found 2-5 best for small students

    def __post_init__(self) -> None:
        if self.task not in ("regression", "classification"):
            raise ValueError(f"DistillConfig: task must be 'regression' or 'classification', got {self.task!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig: alpha must be in [0, 1], got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig: temperature must be > 0, got {self.temperature!r}")


def first_output(output: Any) -> torch.Tensor:
    """The prediction of a forward that returns it alone or first in a tuple (logits, aux...)."""
    return output[0] if isinstance(output, tuple | list) else output


def _same_shape(student: torch.Tensor, other: torch.Tensor, name: str) -> None:
    # mse_loss would broadcast (batch,) against (batch, 1) into a (batch, batch) error, silently
    if student.shape != other.shape:
        raise ValueError(f"distillation: student output {tuple(student.shape)} and {name} {tuple(other.shape)} differ")


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The student's distance to the teacher's outputs (no gradient reaches the teacher)."""
    teacher = teacher.detach()
    if config.task == "regression":
        _same_shape(student, teacher, "teacher")
        return F.mse_loss(student, teacher)
    t = config.temperature
    if student.dim() == 1 or student.shape[-1] == 1:  # binary logits: the two-class softmax is a sigmoid
        student, teacher = student.reshape(-1, 1), teacher.reshape(-1, 1)
        student = torch.cat([torch.zeros_like(student), student], dim=-1)
        teacher = torch.cat([torch.zeros_like(teacher), teacher], dim=-1)
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def hard_loss(student: torch.Tensor, target: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The usual task loss against the true labels."""
    if config.task == "regression":
        _same_shape(student, target, "target")
        return F.mse_loss(student, target)
    if student.dim() == 1 or student.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(student.reshape(-1), target.reshape(-1).to(student.dtype))
    return F.cross_entropy(student, target)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                      config: DistillConfig) -> torch.Tensor:
    """alpha * soft + (1 - alpha) * hard (see the module docstring). Shapes: regression (batch,)
    or (batch, outputs); classification logits (batch, classes) with labels (batch,), or binary
    logits (batch,) / (batch, 1) with 0/1 labels."""
    loss = student.new_zeros(())
    if config.alpha > 0:
        loss = loss + config.alpha * soft_loss(student, teacher, config)
    if config.alpha < 1:
        loss = loss + (1 - config.alpha) * hard_loss(student, target, config)
    return loss


class Distiller:
    """A loss function for `Trainer.fit` that distils `teacher` into the model being trained.

    Args:
        teacher: any module; put in eval mode, its parameters frozen, run under no_grad.
        config: the DistillConfig.
        scale: maps a raw output (teacher's and student's, same units) to the loss's scale, e.g.
            `lambda rul: rul / cap` for RUL; applied to the target too.
        inputs: batch -> the model inputs (a tuple) ; target: batch -> the labels. Defaults read
            batches of (x, y).
        extra_loss: model -> scalar added to the loss (e.g. an L1 penalty for pruning).
    A student whose forward returns (prediction, aux) has its aux loss added, as in normal training.
    """

    def __init__(self, teacher: nn.Module, *, config: DistillConfig,
                 scale: Callable[[torch.Tensor], torch.Tensor] = lambda value: value,
                 inputs: Callable[[Any], tuple] = lambda batch: (batch[0],),
                 target: Callable[[Any], torch.Tensor] = lambda batch: batch[1],
                 extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.config, self.scale, self.inputs, self.target = config, scale, inputs, target
        self.extra_loss = extra_loss

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs = self.inputs(batch)
        with torch.no_grad():
            teacher = first_output(self.teacher(*inputs))
        output = model(*inputs)
        student = first_output(output)
        if self.config.task == "regression":
            student, teacher = self.scale(student), self.scale(teacher)
            target = self.scale(self.target(batch))
        else:
            target = self.target(batch)
        loss = distillation_loss(student, teacher, target, self.config)
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor) \
                and output[1].dim() == 0:
            loss = loss + output[1]  # the student's own auxiliary losses (an MoE's balancing terms)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(model)
        return loss
