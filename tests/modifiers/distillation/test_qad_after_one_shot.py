"""Distillation in the training stage after a one-shot (GPTQ) stage: the teacher is the model
before GPTQ, it runs once per training batch (never during calibration), and a teacher with
another vocabulary is refused before GPTQ runs, naming both logit shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback
from qad_runs import CONFIG, W4_G16, qad_recipe, quiet_trainer, tiny_lm, token_loader

from lightning_compress import Compressor
from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.modifiers import GPTQModifier

STEPS = 3


def gptq_then_qad() -> list:
    """GPTQ W4 g16 on every Linear but lm_head, then QAT on its grid, distilled."""
    gptq = GPTQModifier(config_groups=W4_G16, ignore=["lm_head"], actorder="none")
    return [gptq, *qad_recipe()]


class TeacherCalls(Callback):
    """From the Compressor's setup on, records every input and output of the teacher."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, trainer, pl_module, stage):
        def record(module, args, output):
            self.calls.append((args[0].detach().clone(), output.detach().clone()))

        self.compressor.teacher_model.model.register_forward_hook(record)


def test_the_teacher_is_the_model_before_gptq_and_runs_once_per_training_batch():
    module = tiny_lm()
    before = copy.deepcopy(module.model).eval()
    compressor = Compressor(gptq_then_qad(), teacher="uncompressed", num_calibration_batches=2)
    calls = TeacherCalls(compressor)
    quiet_trainer(max_steps=STEPS, callbacks=[compressor, calls]).fit(module, token_loader())

    # Once per training step, none during the one-shot stage's calibration.
    assert len(calls.calls) == STEPS
    with torch.no_grad():
        for ids, logits in calls.calls:
            # The teacher's logits are the uncompressed model's, which GPTQ changed.
            torch.testing.assert_close(logits, before(ids), rtol=0, atol=1e-5)
            assert not torch.allclose(module.model.eval()(ids), logits, atol=1e-3)


def test_a_teacher_with_another_vocabulary_is_refused_before_gptq_naming_both_shapes():
    module = tiny_lm()
    weights = {name: value.clone() for name, value in module.state_dict().items()}
    torch.manual_seed(1)
    teacher = TinyDecoder(TinyDecoderConfig(**{**vars(CONFIG), "vocab_size": 96}))
    compressor = Compressor(gptq_then_qad(), teacher=teacher, num_calibration_batches=2)
    with pytest.raises(
        ValueError,
        match=r"teacher: its logits have shape \[\.\.\., 96\] and the student's \[\.\.\., 64\]",
    ):
        quiet_trainer(max_steps=1, callbacks=[compressor]).fit(module, token_loader())
    for name, value in module.state_dict().items():
        assert torch.equal(value, weights[name]), name
