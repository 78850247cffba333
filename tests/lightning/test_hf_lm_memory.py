"""The memory plan: bytes of the student, gradients, AdamW state and teacher, counted by hand."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from export_models import tiny_model
from lightning.pytorch import Trainer
from lightning_models import Regressor, regression_loader
from torch import nn

from lightning_compress.lightning import Compressor, memory_plan
from lightning_compress.lightning.memory_plan import check_memory, plan_memory
from lightning_compress.modifiers import QuantizationModifier

# The tiny Llama (hidden 64, 2 layers, MLP 128, 4 query and 2 key/value heads of 16, vocab 128).
EMBEDDING = 128 * 64
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k+v, o, MLP, norms
PARAMETERS = EMBEDDING + 2 * LAYER + 64 + 128 * 64  # final norm and untied lm_head
ROTARY_BUFFERS = 2 * 8  # inv_freq and original_inv_freq


def test_the_plan_counts_weights_gradients_two_fp32_adamw_states_and_a_bf16_teacher():
    student = tiny_model()
    student.model.embed_tokens.weight.requires_grad_(False)
    teacher = tiny_model().to(torch.bfloat16)
    plan = plan_memory(student, teacher)
    trainable = PARAMETERS - EMBEDDING
    assert plan.student == {torch.float32: 4 * (PARAMETERS + ROTARY_BUFFERS)}
    assert plan.gradients == {torch.float32: 4 * trainable}
    assert plan.optimizer == {torch.float32: 2 * 4 * trainable}
    assert plan.teacher == {torch.bfloat16: 2 * (PARAMETERS + ROTARY_BUFFERS)}
    total = 4 * (PARAMETERS + ROTARY_BUFFERS) + 12 * trainable + 2 * (PARAMETERS + ROTARY_BUFFERS)
    assert plan.total() == total
    assert "optimizer state" in plan.describe()


def test_a_sharded_student_is_divided_among_the_ranks_and_the_teacher_is_not():
    whole = plan_memory(tiny_model(), tiny_model())
    half = plan_memory(tiny_model(), tiny_model(), shards=2)
    assert half.student[torch.float32] == whole.student[torch.float32] // 2
    assert half.optimizer[torch.float32] == whole.optimizer[torch.float32] // 2
    assert half.teacher == whole.teacher


def test_tied_weights_count_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert plan_memory(model).student == {torch.float32: 4 * 40}


def test_more_than_the_free_memory_warns_with_what_is_needed_and_free(monkeypatch):
    plan = plan_memory(tiny_model())
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: plan.total() - 1)
    with pytest.warns(UserWarning, match=r"needs about .* on cpu .* is free"):
        check_memory(plan, torch.device("cpu"))
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: 2 * plan.total())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_memory(plan, torch.device("cpu"))
    with pytest.warns(UserWarning, match="needs about"):  # three ranks on one machine
        check_memory(plan, torch.device("cpu"), ranks_per_device=3)


def test_a_teacher_on_its_own_device_is_checked_against_that_device(monkeypatch):
    plan = plan_memory(tiny_model(), tiny_model())
    student_need = plan.total(teacher=False)
    free = {"cpu": student_need, "meta": 0}
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: free[device.type])
    with pytest.warns(UserWarning, match="on meta"):
        check_memory(plan, torch.device("cpu"), teacher_device=torch.device("meta"))


def test_the_cpu_reports_its_available_memory():
    free = memory_plan.available_memory(torch.device("cpu"))
    assert free is not None and free > 0
    assert memory_plan.available_memory(torch.device("meta")) is None


def test_shards_below_one_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="shards: expected an integer >= 1, got 0"):
        plan_memory(tiny_model(), shards=0)


def test_compressor_setup_logs_the_plan_before_training(caplog):
    model = Regressor()
    recipe = QuantizationModifier(scheme="W8A8", targets=["Linear"], start=0)
    trainer = Trainer(
        max_steps=1,
        callbacks=[Compressor(recipe)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    expected = plan_memory(model).describe()
    with caplog.at_level(logging.INFO):
        trainer.fit(model, regression_loader())
    assert f"Compressor: memory per rank: {expected}" in caplog.text
