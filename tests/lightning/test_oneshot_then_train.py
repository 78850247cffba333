"""One recipe, one Trainer.fit: a one-shot stage (GPTQ, RTN, SparseGPT) runs once before the
first optimizer step, then training goes on from its result."""

from __future__ import annotations

import pytest
import torch
from helpers import int8_channel_groups, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from oneshot_then_train_runs import (
    LINEAR_BUT_HEAD,
    CountingCompressor,
    QuantizedState,
    SGDCausalLM,
    gptq_then_qat,
    quantized_state,
    tiny_module,
    token_loader,
)
from torch.utils.data import DataLoader

from lightning_compress import oneshot
from lightning_compress.lightning import Compressor
from lightning_compress.modifiers import (
    AWQModifier,
    ConstantPruningModifier,
    GPTQModifier,
    QuantizationModifier,
    SparseGPTModifier,
)
from lightning_compress.recipe import RecipeError


def one_shot_reference(recipe: list, batches: int = 2) -> dict[str, torch.Tensor]:
    """The same one-shot modifiers through ``oneshot`` on the same first batches."""
    module = tiny_module()
    rows = list(token_loader().dataset[: 4 * batches])
    oneshot(
        model=module.model,
        recipe=recipe,
        dataset=rows,
        num_calibration_samples=len(rows),
        batch_size=4,
        pipeline="sequential",
    )
    return {f"model.{k}": v for k, v in quantized_state(module.model).items()}


def test_gptq_runs_once_before_the_first_step_and_qat_starts_from_its_weights_and_scales():
    module = tiny_module(lr=0.5)
    state = QuantizedState()
    compressor = Compressor(gptq_then_qat(), num_calibration_batches=2)
    quiet_trainer(max_steps=3, callbacks=[compressor, state]).fit(module, token_loader())

    expected = one_shot_reference(gptq_then_qat()[:1])
    assert state.steps_at_first == 0
    assert state.first.keys() == expected.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(state.first[name], tensor, rtol=0, atol=1e-6, msg=name)
    # Training moved the weights, within the one-shot grid: the scales are the one-shot ones.
    final = quantized_state(module)
    moved = 0
    for name in expected:
        if name.endswith(".weight"):
            scale = final[f"{name}_scale"]
            assert torch.equal(scale, state.first[f"{name}_scale"]), name
            codes = final[name].reshape(*scale.shape, -1) / scale.unsqueeze(-1)
            torch.testing.assert_close(codes, codes.round().clamp(-8, 7), rtol=0, atol=1e-4)
            moved += int(not torch.equal(final[name], state.first[name]))
    assert moved > 0


def awq_then_rtn() -> list:
    """AWQ smoothing for W4 g16, then round-to-nearest W4 g16 (one-shot)."""
    groups = {"g": dict(LINEAR_BUT_HEAD)}
    return [
        AWQModifier(weights=LINEAR_BUT_HEAD["weights"], ignore=["lm_head"]),
        QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
    ]


def test_qat_after_awq_and_round_to_nearest_starts_from_their_weights_and_scales():
    groups = {"g": dict(LINEAR_BUT_HEAD)}
    training = QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0)
    state = QuantizedState()
    compressor = Compressor([*awq_then_rtn(), training], num_calibration_batches=2)
    quiet_trainer(max_steps=1, callbacks=[compressor, state]).fit(tiny_module(), token_loader())
    expected = one_shot_reference(awq_then_rtn())
    assert state.first.keys() == expected.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(state.first[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_the_one_shot_stage_reads_the_given_calibration_data():
    data = list(token_loader())[:2]
    module = tiny_module()
    state = QuantizedState()
    compressor = Compressor(gptq_then_qat(), calibration_data=data)
    quiet_trainer(max_steps=1, callbacks=[compressor, state]).fit(module, token_loader(samples=8))
    expected = one_shot_reference(gptq_then_qat()[:1])
    for name, tensor in expected.items():
        torch.testing.assert_close(state.first[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_sparsegpt_masks_hold_through_training():
    recipe = [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["re:.*_proj$"]),
        ConstantPruningModifier(targets=["re:.*_proj$"], start=0),
    ]
    module = tiny_module(lr=0.1)
    quiet_trainer(max_steps=3, callbacks=[Compressor(recipe, num_calibration_batches=2)]).fit(
        module, token_loader()
    )
    for name, layer in module.model.named_modules():
        if name.endswith("_proj"):
            groups = (layer.weight != 0).reshape(-1, 4).sum(dim=1)
            assert (groups <= 2).all(), name


def test_a_training_scheme_other_than_the_one_shot_one_is_refused_naming_the_fields():
    other = {"g": {"targets": ["Linear"], "weights": {**LINEAR_BUT_HEAD["weights"], "num_bits": 8}}}
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RecipeError, match=r"weights\.num_bits"):
        quiet_trainer(max_steps=1, callbacks=[Compressor(gptq_then_qat(qat=other))]).fit(
            module, token_loader()
        )
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_learned_scales_after_a_one_shot_stage_are_refused_before_it_runs():
    gptq, qat = gptq_then_qat()
    qat = QuantizationModifier(
        config_groups=qat.config_groups, ignore=["lm_head"], start=0, learnable_scales=True
    )
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RecipeError, match=r"learnable_scales: expected false .*one-shot"):
        quiet_trainer(max_steps=1, callbacks=[Compressor([gptq, qat])]).fit(module, token_loader())
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_a_one_shot_quantization_without_a_training_one_is_refused():
    recipe = [
        QuantizationModifier(config_groups=int8_channel_groups(["Linear"]), ignore=["lm_head"]),
        ConstantPruningModifier(targets=["re:.*_proj$"], start=0),
    ]
    with pytest.raises(RecipeError, match="no training QuantizationModifier"):
        quiet_trainer(max_steps=1, callbacks=[Compressor(recipe)]).fit(
            tiny_module(), token_loader()
        )


def test_a_one_shot_modifier_after_a_training_one_is_refused():
    recipe = list(reversed(gptq_then_qat()))
    with pytest.raises(RecipeError, match="comes after the training"):
        quiet_trainer(max_steps=1, callbacks=[Compressor(recipe)]).fit(
            tiny_module(), token_loader()
        )


class CrashAt(Callback):
    """Raises at the start of the batch after ``step`` optimizer steps (saved by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # Lightning ends the run; its checkpoint stays


def test_a_run_stopped_while_training_resumes_exactly_without_the_one_shot_stage(tmp_path):
    loader = token_loader(batch_size=8, samples=8)  # one batch per epoch: resumes replay it
    settings = {"max_steps": 4}

    def compressor() -> CountingCompressor:
        return CountingCompressor(gptq_then_qat(), num_calibration_batches=1)

    whole, uninterrupted = compressor(), tiny_module(lr=0.5)
    quiet_trainer(callbacks=[whole], **settings).fit(uninterrupted, loader)
    assert whole.one_shot_steps == [0]

    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    first = compressor()
    with pytest.raises(SystemExit):
        quiet_trainer(
            callbacks=[first, CrashAt(2), saving], enable_checkpointing=True, **settings
        ).fit(tiny_module(lr=0.5), loader)
    assert first.one_shot_steps == [0]

    resumed, module = compressor(), tiny_module(lr=0.5)
    quiet_trainer(callbacks=[resumed], **settings).fit(
        module, loader, ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed.one_shot_steps == []
    expected = uninterrupted.state_dict()
    assert module.state_dict().keys() == expected.keys()
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_resuming_with_another_one_shot_stage_is_refused(tmp_path):
    loader = token_loader(batch_size=8, samples=8)
    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    with pytest.raises(SystemExit):
        quiet_trainer(
            callbacks=[Compressor(gptq_then_qat()), CrashAt(1), saving],
            enable_checkpointing=True,
            max_steps=3,
        ).fit(tiny_module(), loader)
    other = gptq_then_qat(dampening_frac=0.1)
    with pytest.raises(RecipeError, match="different recipe"):
        quiet_trainer(callbacks=[Compressor(other)], max_steps=3).fit(
            tiny_module(), loader, ckpt_path=tmp_path / "last.ckpt"
        )


def test_the_checkpoint_saved_after_training_reloads_with_equal_logits(tmp_path):
    from export_models import tiny_model, token_ids
    from transformers import AutoModelForCausalLM

    module = SGDCausalLM(tiny_model("llama"), lr=0.5)
    groups = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
        }
    }
    recipe = [
        GPTQModifier(config_groups=groups, ignore=["lm_head"]),
        QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0),
    ]
    compressor = Compressor(recipe, num_calibration_batches=2, save_dir=tmp_path / "out")
    data = token_ids(count=16, length=17)
    quiet_trainer(max_steps=3, callbacks=[compressor]).fit(module, DataLoader(data, batch_size=4))

    probe = token_ids(count=2, length=16, seed=5)
    with torch.no_grad():
        expected = module.model.eval()(probe).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(loaded(probe).logits, expected, rtol=0, atol=1e-4)
