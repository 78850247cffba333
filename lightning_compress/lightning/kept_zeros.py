"""Zeros of a one-shot pruning stage kept through the training stage after it.

A recipe that prunes one-shot (SparseGPT, Wanda, one-shot magnitude pruning) and then
trains would let the optimizer grow the pruned weights back unless a training stage masks
them (``ConstantPruningModifier``, or a training pruning modifier on the same layers). A
run that prunes and then trains means to ship a sparse model, so by default the
``Compressor`` keeps the zeros of every pruned layer no training mask covers: its training
part starts with a ``ConstantPruningModifier`` on exactly those layers.
"""

from __future__ import annotations

from loguru import logger
from torch import nn

from lightning_compress.lightning.training_calibration import calibrated_model
from lightning_compress.modifiers.pruning.calibrated import CalibratedPruningModifier
from lightning_compress.modifiers.pruning.constant import (
    ConstantPruningModifier,
    WeightMaskModifier,
)
from lightning_compress.recipe import Recipe, RecipeStage

__all__ = ["KEPT_ZEROS_STAGE", "keep_pruned_zeros", "unmasked_pruned_layers"]

KEPT_ZEROS_STAGE = "kept_zeros_stage"
"""The training stage that keeps the one-shot zeros (its group: ``kept_zeros_modifiers``)."""

_PRUNING = (CalibratedPruningModifier, WeightMaskModifier)


def unmasked_pruned_layers(one_shot: Recipe, training: Recipe, pl_module: nn.Module) -> list[str]:
    """The layers the one-shot stage prunes and no training mask covers.

    Args:
        one_shot: the recipe's one-shot part.
        training: its training part.
        pl_module: the LightningModule (names are its module names).

    Returns:
        Their names in ``pl_module``, in the model's order.
    """
    model = calibrated_model(pl_module)
    pruned = {
        id(module)
        for modifier in one_shot.modifiers
        if isinstance(modifier, _PRUNING)
        for module in modifier.compression_targets(model).values()
    }
    masked = {
        id(module)
        for modifier in training.modifiers
        if isinstance(modifier, WeightMaskModifier)
        for module in modifier.compression_targets(pl_module).values()
    }
    return [
        name
        for name, module in pl_module.named_modules()
        if id(module) in pruned and id(module) not in masked
    ]


def keep_pruned_zeros(
    one_shot: Recipe, training: Recipe, pl_module: nn.Module, keep: bool
) -> Recipe:
    """The training part, with the zeros of the one-shot pruned layers kept (``keep``).

    Args:
        one_shot: the recipe's one-shot part.
        training: its training part.
        pl_module: the LightningModule.
        keep: keep the zeros of the layers no training mask covers (a first stage
            ``kept_zeros`` with a ``ConstantPruningModifier`` on them, logged at INFO); when
            False they regrow, which is logged as a warning naming them.

    The added stage is derived from the recipe alone, so a resumed run adds it too; the
    recipe saved in checkpoints and exports is the one given.

    Returns:
        The training part to run (``training`` itself when every pruned layer is masked,
        or when ``keep`` is False).
    """
    names = unmasked_pruned_layers(one_shot, training, pl_module)
    if not names:
        return training
    shown = names if len(names) <= 8 else [*names[:8], f"... ({len(names)} layers)"]
    if not keep:
        logger.warning(
            "Compressor: the one-shot stage prunes {} but no training stage masks them "
            "(keep_pruned_zeros=False): training lets their pruned weights grow back",
            shown,
        )
        return training
    logger.info(
        "Compressor: keeping the one-shot zeros of {} through training (a "
        "ConstantPruningModifier from step 0; keep_pruned_zeros=False lets them regrow)",
        shown,
    )
    kept = ConstantPruningModifier(targets=names, start=0)
    stage = RecipeStage(name=KEPT_ZEROS_STAGE, groups={"kept_zeros_modifiers": [kept]})
    stages = [stage, *training.stages]
    return Recipe(args=dict(training.args), stages=stages, version=training.version)
