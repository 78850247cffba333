"""Quantization-aware distillation losses: chunked KL and per-layer MSE against slow references,
one teacher forward per batch, gradients to the student only, and misuse errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from qad_runs import BLOCKS, qad_recipe, quiet_trainer, tiny_lm, token_loader
from torch import nn

from lightning_compress import Compressor
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import OutputDistillationModifier
from lightning_compress.modifiers.distillation import distillation_term
from lightning_compress.modifiers.distillation.teacher import copy_as_teacher
from lightning_compress.recipe import RecipeError


def slow_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of softened distributions, one position at a time, in float64."""
    rows = student.double().reshape(-1, student.shape[-1])
    targets = teacher.double().reshape(-1, teacher.shape[-1])
    total = 0.0
    for s_row, t_row in zip(rows, targets, strict=True):
        p = torch.softmax(t_row / temperature, -1)
        q = torch.softmax(s_row / temperature, -1)
        total = total + (p * (p.log() - q.log())).sum()
    return total / rows.shape[0] * temperature**2


@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])
def test_chunked_kl_equals_the_reference_in_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, requires_grad=True)
    teacher = torch.randn(3, 5, 11).to(torch.bfloat16)  # a bfloat16 teacher, compared in fp32
    got = distillation_term(student, teacher, "kl", 2.0, chunk_size)
    (grad,) = torch.autograd.grad(got, student)
    reference = slow_kl(student, teacher.float(), 2.0)
    (expected,) = torch.autograd.grad(reference, student)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected.double(), rtol=1e-4, atol=1e-7)


class Blocks(nn.Module):
    """Two blocks of ``width`` outputs, then a head of 5 classes."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, width)])
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def built(student: nn.Module, teacher: nn.Module, **settings) -> tuple:
    session = CompressionSession()
    session.initialize(
        recipe=OutputDistillationModifier(**settings), model=student, teacher_model=teacher
    )
    (modifier,) = session.lifecycle.recipe.modifiers
    session.event(EventType.BATCH_START, global_step=0)
    return session, modifier


def test_layer_mse_is_added_to_kl_as_the_formula_says():
    torch.manual_seed(0)
    student = Blocks()
    teacher = copy_as_teacher(Blocks().requires_grad_(False))
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    session, modifier = built(
        student,
        teacher,
        layer_targets=["re:blocks\\.\\d"],
        layer_weight=0.3,
        hardness=0.7,
        temperature=2.0,
    )
    task = nn.functional.cross_entropy(student(x), y)
    loss = modifier.modify_loss(session.state, task)

    def hidden(model: Blocks) -> list[torch.Tensor]:
        out, h = [], x
        for block in model.blocks:  # the blocks' own outputs, before tanh
            out.append(block(h))
            h = torch.tanh(out[-1])
        return out

    with torch.no_grad():
        t_hidden, t_logits = hidden(teacher), teacher(x)
    s_hidden, s_logits = hidden(student), student(x)
    mse = sum(((s - t) ** 2).mean() for s, t in zip(s_hidden, t_hidden, strict=True)) / 2
    expected = 0.3 * nn.functional.cross_entropy(s_logits, y) + 0.7 * (
        slow_kl(s_logits, t_logits, 2.0) + 0.3 * mse
    )
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_student_only():
    torch.manual_seed(0)
    student, teacher = Blocks(), copy_as_teacher(Blocks())
    session, modifier = built(student, teacher, layer_targets=["Linear"], hardness=1.0)
    x = torch.randn(4, 6)
    student(x)
    modifier.modify_loss(session.state, torch.zeros(())).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


class ForwardCounter:
    """Counts the forward passes of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_teacher_and_student_run_once_per_batch():
    module = tiny_lm()
    compressor = Compressor(qad_recipe(), teacher="uncompressed", teacher_dtype="bfloat16")
    counts: dict[str, ForwardCounter] = {}

    class CountForwards(Callback):
        def on_train_start(self, trainer, pl_module):
            counts["teacher"] = ForwardCounter(compressor.teacher_model.model)
            counts["student"] = ForwardCounter(pl_module.model)

    trainer = quiet_trainer(max_steps=3, callbacks=[compressor, CountForwards()])
    trainer.fit(module, token_loader())
    assert counts["teacher"].count == counts["student"].count == 3
    assert next(compressor.teacher_model.parameters()).dtype == torch.bfloat16


def test_layer_targets_that_match_nothing_are_refused():
    with pytest.raises(RecipeError, match="layer_targets: targets \\['Conv2d'\\] match no module"):
        built(Blocks(), Blocks(), layer_targets=["Conv2d"])
    other = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(RecipeError, match=r"layer_targets: the teacher \(Sequential\) has no"):
        built(Blocks(), other, layer_targets=["re:blocks\\.0"])


def test_a_teacher_layer_of_another_shape_is_named_with_both_shapes():
    student = Blocks()
    session, modifier = built(student, Blocks(width=7), layer_targets=["re:blocks\\.1"])
    student(torch.randn(2, 6))
    with pytest.raises(
        ValueError, match=r"teacher output of layer 'blocks.1' shape \(2, 7\) differs.*\(2, 6\)"
    ):
        modifier.modify_loss(session.state, torch.zeros(()))


def test_layer_targets_match_the_decoder_blocks_of_the_uncompressed_copy():
    module = tiny_lm()
    session, modifier = built(module, copy_as_teacher(module), layer_targets=[BLOCKS])
    assert (
        list(modifier._student_layers)
        == list(modifier._teacher_layers)
        == [
            "model.model.layers.0",
            "model.model.layers.1",
        ]
    )
