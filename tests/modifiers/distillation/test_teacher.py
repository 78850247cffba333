"""The uncompressed teacher: a frozen copy of the student made at setup, kept out of it."""

from __future__ import annotations

import pytest
import torch
from qad_runs import W4_G16, qad_recipe, quiet_trainer, tiny_lm, token_loader
from torch import nn

from lightning_compress import Compressor
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.distillation.teacher import copy_as_teacher, make_teacher


class Tied(nn.Module):
    """An embedding tied to its output layer, an integer buffer, and a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
        self.register_buffer("table", torch.randn(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_copy_is_frozen_in_the_asked_dtype_tied_and_shares_no_memory():
    torch.manual_seed(0)
    student = Tied().train()
    student.head.register_forward_hook(lambda *_: None)
    teacher = copy_as_teacher(student, dtype=torch.bfloat16)

    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.head.weight is teacher.embed.weight  # tied stays tied
    assert teacher.embed.weight.dtype == teacher.table.dtype == torch.bfloat16
    assert teacher.steps.dtype == torch.int64  # integers are not cast
    assert torch.equal(teacher.embed.weight, student.embed.weight.to(torch.bfloat16))
    assert not teacher.head._forward_hooks and student.head._forward_hooks
    with torch.no_grad():
        student.embed.weight.add_(1.0)
    assert torch.equal(teacher.embed.weight, (student.embed.weight - 1).to(torch.bfloat16))
    assert all(p.requires_grad for p in student.parameters()) and student.training


@pytest.mark.parametrize(
    ("teacher", "dtype", "message"),
    [
        ("initial", None, "teacher: expected a model.*'uncompressed'.*got 'initial'"),
        ("uncompressed", "int8", "teacher_dtype: expected a floating-point.*got 'int8'"),
        ("uncompressed", "half-ish", "teacher_dtype: expected a floating-point"),
    ],
)
def test_bad_teacher_settings_are_refused_naming_the_field(teacher, dtype, message):
    with pytest.raises(ValueError, match=message):
        make_teacher(teacher, nn.Linear(2, 2), dtype)


def test_a_student_without_loaded_weights_cannot_be_copied():
    with torch.device("meta"):
        student = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"meta device there \(\['weight', 'bias'\]\)"):
        copy_as_teacher(student)


def test_compressor_bad_teacher_is_refused_when_built():
    with pytest.raises(ValueError, match="teacher: expected a model"):
        Compressor(qad_recipe(), teacher="initial")
    with pytest.raises(ValueError, match="teacher_dtype: expected"):
        Compressor(qad_recipe(), teacher="uncompressed", teacher_dtype="int4")


def test_uncompressed_teacher_is_copied_before_the_one_shot_stage_and_kept_out_of_checkpoints(
    tmp_path,
):
    module = tiny_lm()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    one_shot = QuantizationModifier(config_groups=W4_G16, ignore=["lm_head"])  # round to nearest
    compressor = Compressor(
        [one_shot, *qad_recipe()], teacher="uncompressed", teacher_dtype="bfloat16"
    )
    trainer = quiet_trainer(max_steps=2, callbacks=[compressor])
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    teacher = compressor.teacher_model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.model.state_dict().items():  # the weights before rounding
        assert value.dtype == (torch.bfloat16 if initial[name].is_floating_point() else value.dtype)
        assert torch.equal(value, initial[name].to(value.dtype)), name
    ids = {id(p) for p in module.parameters()}
    assert not any(id(p) in ids for p in teacher.parameters())
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert saved["state_dict"].keys() == module.state_dict().keys()
    assert not any("teacher" in key for key in saved["state_dict"])
    for state in saved["callbacks"].values():
        assert not any(isinstance(v, torch.Tensor) for v in state.values())
