"""OutputDistillationModifier: the loss formula, its gradients, and misuse errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning_models import Regressor, regression_loader
from torch import nn

from lightning_compress import Compressor, compression_loss
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import OutputDistillationModifier
from lightning_compress.recipe import RecipeError


def manual_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of softened distributions, one position at a time."""
    total = 0.0
    rows = student.reshape(-1, student.shape[-1])
    targets = teacher.reshape(-1, teacher.shape[-1])
    for s_row, t_row in zip(rows, targets, strict=True):
        p = torch.softmax(t_row / temperature, -1)
        q = torch.softmax(s_row / temperature, -1)
        total = total + (p * (p.log() - q.log())).sum()
    return total / rows.shape[0] * temperature**2


@pytest.mark.parametrize(
    ("comparison", "hardness", "temperature"), [("kl", 0.3, 2.0), ("mse", 0.8, 1.0)]
)
def test_loss_and_gradients_follow_the_formula(comparison, hardness, temperature):
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), nn.Linear(6, 5)
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    session = CompressionSession()
    modifier = OutputDistillationModifier(
        comparison=comparison, hardness=hardness, temperature=temperature
    )
    session.initialize(recipe=modifier, model=student, teacher_model=teacher)
    (built,) = session.lifecycle.recipe.modifiers
    session.event(EventType.BATCH_START, global_step=0)
    task = nn.functional.mse_loss(student(x), y)
    loss = built.modify_loss(session.state, task)
    loss.backward()
    got = student.weight.grad.clone()

    student.zero_grad()
    s_out, t_out = student(x), teacher(x).detach()
    term = (
        manual_kl(s_out, t_out, temperature)
        if comparison == "kl"
        else ((s_out - t_out) ** 2).mean()
    )
    expected_loss = (1 - hardness) * nn.functional.mse_loss(s_out, y) + hardness * term
    expected_loss.backward()
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert torch.allclose(got, student.weight.grad, atol=1e-6)
    assert teacher.weight.grad is None


class DistilledRegressor(Regressor):
    def __init__(self, opt_in: bool = True) -> None:
        super().__init__(lr=0.01, optimizer="adam")
        self.opt_in = opt_in

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return compression_loss(self, loss) if self.opt_in else loss


def train(model, teacher, steps=3, **settings):
    compressor = Compressor(OutputDistillationModifier(**settings), teacher=teacher)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[compressor],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, regression_loader())
    return compressor


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = Regressor()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1)
    x = torch.randn(64, 16)
    before = nn.functional.mse_loss(Regressor()(x), teacher(x)).item()
    pure = DistilledRegressor()
    train(pure, teacher, steps=20, comparison="mse", hardness=1.0)
    after = nn.functional.mse_loss(pure(x), teacher(x)).item()
    assert after < 0.5 * before


def test_forgetting_the_opt_in_line_is_an_error():
    with pytest.raises(RuntimeError, match=r"loss = compression_loss\(self, loss\)"):
        train(DistilledRegressor(opt_in=False), Regressor())


def test_teacher_with_another_output_shape_is_an_error_before_any_step():
    model = DistilledRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"teacher output shape \(4, 3\) differs.*\(4, 4\)"):
        train(model, teacher)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hardness": 1.5}, r"hardness: expected a float in \[0, 1\]"),
        ({"temperature": 0}, "temperature: expected a positive float"),
        ({"start": -1}, "start: expected a training index"),
        ({"comparison": "cosine"}, r"comparison: expected one of \['kl', 'mse'\]"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(RecipeError, match=message):
        OutputDistillationModifier(**settings)


def test_missing_teacher_and_bad_target():
    with pytest.raises(RecipeError, match="needs a teacher"):
        CompressionSession().initialize(recipe=OutputDistillationModifier(), model=nn.Linear(2, 2))
    with pytest.raises(RecipeError, match="targets"):
        CompressionSession().initialize(
            recipe=OutputDistillationModifier(targets="nope"),
            model=nn.Linear(2, 2),
            teacher_model=nn.Linear(2, 2),
        )
