"""The one-shot stage before training under a strategy that shards the model (FSDP2)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import ModelParallelStrategy
from oneshot_then_train_runs import gptq_then_qat, tiny_module, token_loader

from lightning_compress.lightning.training_calibration import check_one_shot_strategy, split_recipe
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.recipe import Recipe, RecipeError


def one_shot_part(modifiers: list) -> Recipe:
    return split_recipe(Recipe.create_instance(modifiers))[0]


def test_fsdp2_refuses_a_one_shot_stage_that_reads_data_without_calibration_data():
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    with pytest.raises(RecipeError, match=r"ModelParallelStrategy.*GPTQModifier.*calibration_data"):
        check_one_shot_strategy(strategy, one_shot_part(gptq_then_qat()), tiny_module(), None)
    # Given calibration data, or under a strategy that does not shard, it runs.
    check_one_shot_strategy(
        strategy, one_shot_part(gptq_then_qat()), tiny_module(), list(token_loader())[:1]
    )
    check_one_shot_strategy("ddp", one_shot_part(gptq_then_qat()), tiny_module(), None)


def test_fsdp2_runs_a_data_free_one_shot_stage_but_refuses_weights_on_meta():
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    rtn = one_shot_part(
        [QuantizationModifier(scheme="W8A16", targets=["Linear"], ignore=["lm_head"])]
    )
    check_one_shot_strategy(strategy, rtn, tiny_module(), None)
    module = tiny_module().to_empty(device="meta")
    with pytest.raises(RecipeError, match=r"parameter 'model\..*' is on the meta device"):
        check_one_shot_strategy(strategy, rtn, module, None)
