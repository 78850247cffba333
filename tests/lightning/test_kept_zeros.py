"""One-shot pruning then training: the pruned weights stay zero unless the user lets them
regrow (then a warning names the layers)."""

from __future__ import annotations

import pytest
import torch
from helpers import int8_channel_groups, quiet_trainer
from loguru import logger
from oneshot_then_train_runs import tiny_module, token_loader

from lightning_compress.lightning import Compressor
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.pruning import (
    ConstantPruningModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)

PROJ = ["re:.*_proj$"]


def qat() -> QuantizationModifier:
    """Quantization-aware training (int8 per channel) of every Linear but lm_head."""
    return QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"], start=0)


@pytest.fixture
def messages():
    lines: list[str] = []
    sink = logger.add(
        lambda message: lines.append(f"{message.record['level'].name} {message}"), level="INFO"
    )
    yield lines
    logger.remove(sink)


def zeros_per_group_of_4(module) -> dict[str, torch.Tensor]:
    return {
        name: (layer.weight == 0).reshape(-1, 4).sum(dim=1)
        for name, layer in module.model.named_modules()
        if name.endswith("_proj")
    }


def train_after(recipe: list, **kwargs) -> torch.nn.Module:
    module = tiny_module(lr=0.1)
    compressor = Compressor(recipe, num_calibration_batches=2, **kwargs)
    quiet_trainer(max_steps=3, callbacks=[compressor]).fit(module, token_loader())
    return module


def test_one_shot_zeros_are_kept_through_training_without_a_mask_in_the_recipe(messages):
    module = train_after(
        [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=PROJ), qat()]
    )
    for name, zeros in zeros_per_group_of_4(module).items():
        assert (zeros >= 2).all(), name
    (line,) = [m for m in messages if "keeping the one-shot zeros" in m]
    assert "model.model.layers.0.self_attn.q_proj" in line and "keep_pruned_zeros" in line


def test_one_shot_zeros_regrow_with_a_warning_naming_the_layers_when_asked(messages):
    recipe = [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", targets=PROJ), qat()]
    module = train_after(recipe, keep_pruned_zeros=False)
    assert any((zeros < 2).any() for zeros in zeros_per_group_of_4(module).values())
    (line,) = [m for m in messages if "grow back" in m]
    assert line.startswith("WARNING")
    assert "model.model.layers.0.self_attn.q_proj" in line and "(14 layers)" in line


def test_layers_a_training_mask_covers_get_no_second_mask(messages):
    recipe = [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=PROJ),
        ConstantPruningModifier(targets=["re:.*mlp.*_proj$"], start=0),
        qat(),
    ]
    module = train_after(recipe)
    (line,) = [m for m in messages if "keeping the one-shot zeros" in m]
    assert "self_attn.q_proj" in line and "mlp" not in line
    for name, zeros in zeros_per_group_of_4(module).items():
        assert (zeros >= 2).all(), name
