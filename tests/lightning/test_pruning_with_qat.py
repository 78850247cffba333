"""Pruning masks keep holding once QAT parametrizes (fake-quantizes) the weights."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning_models import Regressor, regression_loader

from lightning_compress.lightning import Compressor
from lightning_compress.modifiers import MagnitudePruningModifier, QuantizationModifier


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_hold_while_qat_fake_quantizes_the_weights(optimizer):
    model = Regressor(optimizer=optimizer)
    recipe = [
        MagnitudePruningModifier(final_sparsity=0.5, start=0, end=1, targets=["fc1", "fc2"]),
        QuantizationModifier(scheme="W8A8", targets=["Linear"], start=2),
    ]
    trainer = Trainer(
        max_epochs=4,
        callbacks=[Compressor(recipe)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, regression_loader())
    for layer in (model.fc1, model.fc2):
        assert (layer.weight == 0).float().mean().item() >= 0.5
