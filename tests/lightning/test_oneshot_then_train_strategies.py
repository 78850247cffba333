"""The one-shot stage before training under a strategy that shards the model (FSDP2): it runs
in ``setup``, before Lightning builds the training DataLoader, on the whole model."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from oneshot_then_train_runs import gptq_then_qat, tiny_module, token_loader

from lightning_compress.lightning.text_data import TextDataModule
from lightning_compress.lightning.training_calibration import (
    calibration_batches,
    check_one_shot_strategy,
    split_recipe,
)
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.recipe import Recipe, RecipeError


def one_shot_part(modifiers: list) -> Recipe:
    return split_recipe(Recipe.create_instance(modifiers))[0]


class BatchesAtSetup(Callback):
    """Reads the calibration batches in ``setup``, as the one-shot stage does under FSDP2."""

    def setup(self, trainer, pl_module, stage):
        assert trainer.train_dataloader is None  # not built yet
        self.batches = calibration_batches(trainer, None, 2)


def test_before_fit_builds_the_training_loader_the_first_batches_come_from_its_source():
    reader = BatchesAtSetup()
    quiet_trainer(max_steps=1, callbacks=[reader]).fit(tiny_module(), token_loader())
    assert all(map(torch.equal, reader.batches, list(token_loader())[:2]))

    data = TextDataModule(tokens=torch.arange(64).view(4, 16) % 60, seq_len=8, batch_size=2)
    reader = BatchesAtSetup()
    quiet_trainer(max_steps=1, callbacks=[reader]).fit(tiny_module(), datamodule=data)
    expected = list(data.train_dataloader())[:2]
    for batch, want in zip(reader.batches, expected, strict=True):
        assert torch.equal(batch["input_ids"], want["input_ids"])


def test_without_any_training_data_the_stage_asks_for_calibration_data():
    class NoData:
        train_dataloader = None
        strategy = ModelParallelStrategy()

        class fit_loop:  # noqa: N801 - the Trainer attribute's name
            _data_source = None

    with pytest.raises(ValueError, match="ModelParallelStrategy.*pass calibration_data"):
        calibration_batches(NoData(), None, 2)


def test_fsdp2_refuses_a_one_shot_stage_on_a_model_whose_weights_are_on_meta():
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    rtn = one_shot_part(
        [QuantizationModifier(scheme="W8A16", targets=["Linear"], ignore=["lm_head"])]
    )
    check_one_shot_strategy(strategy, rtn, tiny_module())
    check_one_shot_strategy(strategy, one_shot_part(gptq_then_qat()), tiny_module())
    module = tiny_module().to_empty(device="meta")
    check_one_shot_strategy("ddp", rtn, module)  # calibrated after loading, not at setup
    with pytest.raises(RecipeError, match=r"parameter 'model\..*' is on the meta device"):
        check_one_shot_strategy(strategy, rtn, module)
