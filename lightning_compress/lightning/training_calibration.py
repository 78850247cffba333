"""The one-shot stage of a recipe that then trains: split, checked, run inside ``Trainer.fit``.

A recipe may start with one-shot modifiers (GPTQ, AWQ, SparseGPT, round-to-nearest; ``start:
-1``) and go on with training ones (quantization-aware training, constant masks,
distillation). ``Compressor`` runs the one-shot part with the calibration pipeline ``oneshot``
uses, once, before the first optimizer step, then hands the compressed model to the training
part. A training ``QuantizationModifier`` re-quantizing the one-shot stage's layers must use
the same scheme; it starts from the one-shot weights *and* weight qparams, which stay fixed
(the fake-quantized weights stay on the one-shot grid, so the export after training is exact).
Static input ranges are observed again from the training batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.quantization.runtime import QPARAM_BUFFERS, remove_quantization
from lightning_compress.modifiers.quantization.schemes import QuantizationSchemes
from lightning_compress.pipelines.calibration_data import check_token_batch
from lightning_compress.recipe import Recipe, RecipeError, RecipeStage

__all__ = [
    "calibrated_model",
    "calibration_batches",
    "carried_layers",
    "check_batches",
    "check_one_shot_strategy",
    "freeze_carried_qparams",
    "rewrap_ddp",
    "run_one_shot",
    "shards_at_configure_model",
    "split_recipe",
    "start_from_one_shot",
    "take_one_shot_qparams",
]

# The fields of QuantizationArgs that make up the grid (the others choose how qparams are
# observed, which does not matter once the one-shot qparams are carried over).
_GRID_FIELDS = tuple(
    item.name
    for item in fields(QuantizationArgs)
    if item.name not in {"observer", "averaging_constant", "observer_kwargs", "actorder"}
)
_ARGS = ("weights", "input_activations", "output_activations")
_CARRIED = ("weight_scale", "weight_zero_point", "weight_global_scale")
_INPUT_QPARAMS = ("input_scale", "input_zero_point", "input_global_scale")


def split_recipe(recipe: Recipe) -> tuple[Recipe, Recipe]:
    """Split ``recipe`` into its one-shot part and its training part.

    Args:
        recipe: the whole recipe.

    Returns:
        ``(one_shot, training)``: recipes with the same stage and group names holding the
        one-shot modifiers (``start: -1``) and the others; either may be empty.

    Raises:
        RecipeError: when a one-shot modifier comes after a training one (the one-shot stage
            runs first), naming both.
    """
    first_training = None
    for modifier in recipe.modifiers:
        if not modifier.is_one_shot:
            first_training = first_training or modifier
        elif first_training is not None:
            raise RecipeError(
                f"{type(modifier).__name__} is one-shot (start: -1) but comes after the training "
                f"modifier {type(first_training).__name__}: a Compressor runs the one-shot "
                "modifiers first, before training; put them in an earlier stage"
            )
    return _filtered(recipe, one_shot=True), _filtered(recipe, one_shot=False)


def _filtered(recipe: Recipe, one_shot: bool) -> Recipe:
    stages = []
    for stage in recipe.stages:
        groups = {
            name: kept
            for name, group in stage.groups.items()
            if (kept := [mod for mod in group if mod.is_one_shot == one_shot])
        }
        if groups:
            stages.append(RecipeStage(name=stage.name, groups=groups))
    return Recipe(args=dict(recipe.args), stages=stages, version=recipe.version)


def calibrated_model(pl_module: nn.Module) -> nn.Module:
    """The model the one-shot stage calibrates: the LightningModule's ``model`` when it has
    one (``CausalLMModule``), else the LightningModule itself.

    Args:
        pl_module: the LightningModule being trained.

    Returns:
        The model to calibrate.
    """
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def carried_layers(one_shot: Recipe, training: Recipe, pl_module: nn.Module) -> dict[str, Any]:
    """The layers the one-shot stage quantizes, each checked against the training stage.

    Nothing changes in the model. Every layer a one-shot quantization modifier plans must be
    planned by a training ``QuantizationModifier`` with the same grid (the fields of the
    weights' and activations' arguments but the observer settings and GPTQ's ``actorder``),
    so that training starts from the one-shot weights and qparams and keeps them on that grid.

    Args:
        one_shot: the one-shot part of the recipe.
        training: the training part.
        pl_module: the LightningModule (names are its module names).

    Returns:
        Name (in ``pl_module``) of each such layer → the training modifier that carries it on.

    Raises:
        RecipeError: for a layer the training stage does not quantize, a scheme whose grid
            differs (naming the layer and the fields), GPTQ ``actorder: group`` (its column
            order is not a grid training keeps), or ``freeze_observers`` or
            ``learnable_scales`` on a modifier that carries layers on (their qparams stay
            fixed from the first step).
    """
    names = {id(module): name for name, module in pl_module.named_modules()}
    model = calibrated_model(pl_module)
    trained: dict[int, tuple[Any, QuantizationScheme]] = {}
    for modifier in training.modifiers:
        if isinstance(modifier, QuantizationSchemes):
            for layer in modifier.plan_layers(pl_module).values():
                trained[id(layer.module)] = (modifier, layer.settings)
    carried: dict[str, Any] = {}
    for modifier in one_shot.modifiers:
        if not isinstance(modifier, QuantizationSchemes):
            continue
        where = type(modifier).__name__
        for layer in modifier.plan_layers(model).values():
            name = names[id(layer.module)]
            if _actorder(modifier, layer.settings) == "group":
                raise RecipeError(
                    f"{where}: actorder 'group' (layer '{name}') reorders the quantization "
                    "groups, which quantization-aware training does not keep; use actorder "
                    "'static' or none before a training stage"
                )
            if id(layer.module) not in trained:
                raise RecipeError(
                    f"{where} quantizes '{name}' one-shot, but no training QuantizationModifier "
                    "(start >= 0) of the recipe does: training would move its weights off the "
                    "quantization grid; add a QuantizationModifier with the same scheme and "
                    "start >= 0 (or ignore the layer)"
                )
            follower, scheme = trained[id(layer.module)]
            differ = _grid_differences(layer.settings, scheme)
            if differ:
                raise RecipeError(
                    f"layer '{name}': the training QuantizationModifier's scheme differs from "
                    f"the one-shot {where}'s in {differ}; training starts from the one-shot "
                    "weights and qparams, so both must quantize to the same grid"
                )
            if getattr(follower, "learnable_scales", False):
                raise RecipeError(
                    "QuantizationModifier.learnable_scales: expected false for a training stage "
                    f"after a one-shot one (layer '{name}'): the one-shot weight qparams stay "
                    "fixed, so that training keeps the one-shot grid"
                )
            if follower.freeze_observers is not None:
                raise RecipeError(
                    "QuantizationModifier.freeze_observers: expected None for a training stage "
                    f"after a one-shot one (layer '{name}'): the one-shot weight qparams stay "
                    "fixed from the first step"
                )
            carried[name] = follower
    return carried


def _actorder(modifier: Any, scheme: QuantizationScheme) -> str | None:
    weights = scheme.weights
    return getattr(modifier, "actorder", None) or (weights.actorder if weights else None)


def _grid_differences(one_shot: QuantizationScheme, training: QuantizationScheme) -> list[str]:
    """The fields (``weights.num_bits``, ``input_activations``...) whose values differ."""
    differ = []
    for part in _ARGS:
        first, second = getattr(one_shot, part), getattr(training, part)
        if first is None or second is None:
            if (first is None) != (second is None):
                differ.append(part)
            continue
        differ.extend(
            f"{part}.{name}"
            for name in _GRID_FIELDS
            if getattr(first, name) != getattr(second, name)
        )
    return differ


def calibration_batches(
    trainer: Any, calibration_data: Iterable[Any] | None, num_batches: int
) -> list[Any]:
    """The batches the one-shot stage calibrates on, as this rank sees them.

    Args:
        trainer: the Trainer (its training DataLoader, already sharded across ranks by
            Lightning, is read when ``calibration_data`` is None; before ``fit`` builds it, as
            in ``setup``, the DataLoader its datamodule or LightningModule returns, unsharded).
        calibration_data: the batches to use instead (every rank reads all of them).
        num_batches: how many batches to take.

    Returns:
        Up to ``num_batches`` batches, as the model reads them: mappings (such as
        ``TextDataModule``'s) lose their ``labels`` (calibration reads inputs only). Reading
        them leaves the random state as it was, so the training batches are the same as
        without the one-shot stage.

    Raises:
        ValueError: when the training data is not one DataLoader, or gives no batch, or
            there is none yet.
    """
    source = calibration_data
    if source is None:
        loaders = trainer.train_dataloader
        if loaders is None:
            loaders = _training_data_before_fit(trainer)
        if isinstance(loaders, (list, tuple, dict)):
            raise ValueError(
                "Compressor: the one-shot stage calibrates on the training DataLoader, but the "
                f"Trainer has several ({type(loaders).__name__}); pass calibration_data"
            )
        source = loaders
    with torch.random.fork_rng(devices=[]):
        batches = [_model_inputs(batch) for batch in islice(source, num_batches)]
    if not batches:
        raise ValueError(
            "Compressor: the one-shot stage got no calibration batch (empty calibration_data "
            "or training DataLoader)"
        )
    return batches


def _training_data_before_fit(trainer: Any) -> Any:
    """The training DataLoader(s) as the datamodule or LightningModule (or ``fit``'s
    ``train_dataloaders``) gives them, before ``fit`` builds its own from them."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not source.is_defined():
        raise ValueError(
            f"Compressor: the one-shot stage runs before training under "
            f"{type(trainer.strategy).__name__} and found no training data to calibrate on; "
            "pass calibration_data"
        )
    return source.dataloader()


def _model_inputs(batch: Any) -> Any:
    """``batch`` without the ``labels`` of a mapping (forms the model does not read are left
    for :func:`check_batches` to refuse, naming them)."""
    if isinstance(batch, Mapping) and "labels" in batch:
        return {key: value for key, value in batch.items() if key != "labels"}
    return batch


def check_batches(model: nn.Module, batches: list[Any]) -> None:
    """Refuse token batches ``model`` cannot read (ids beyond its vocabulary), naming one.

    Args:
        model: the model calibrated.
        batches: the calibration batches.

    Raises:
        ValueError: as ``check_token_batch``.
    """
    for index, batch in enumerate(batches):
        check_token_batch(model, batch, index)


def take_one_shot_qparams(pl_module: nn.Module, names: Iterable[str]) -> dict[str, dict]:
    """Remove the one-shot quantization of ``names`` and return their qparams.

    The weights keep their quantized values; the training modifier then adds its own buffers
    and fake quantizer, and :func:`start_from_one_shot` writes these qparams into them.

    Args:
        pl_module: the LightningModule.
        names: the carried layers.

    Returns:
        Name → ``{"weight": the quantized weight, buffer name: qparam}``.
    """
    taken = {}
    for name in names:
        module = pl_module.get_submodule(name)
        state = {"weight": module.weight.detach().clone()}
        buffers = module._buffers
        state.update({key: buffers[key].clone() for key in QPARAM_BUFFERS if key in buffers})
        remove_quantization(module)
        taken[name] = state
    return taken


def start_from_one_shot(pl_module: nn.Module, qparams: dict[str, dict[str, Tensor]]) -> None:
    """Write the one-shot qparams into the training buffers and keep them fixed.

    Args:
        pl_module: the LightningModule, set up for training.
        qparams: :func:`take_one_shot_qparams`'s result.

    Raises:
        RuntimeError: when a layer's fake-quantized weight is not its one-shot weight (a
            grid training cannot reproduce), naming the layer and the largest difference.
    """
    with torch.no_grad():
        for name, state in qparams.items():
            module = pl_module.get_submodule(name)
            for key, value in state.items():
                if key in (*_CARRIED, *_INPUT_QPARAMS) and key in module._buffers:
                    module._buffers[key].copy_(value)
    freeze_carried_qparams(pl_module, qparams)
    for name, state in qparams.items():
        _check_on_grid(name, pl_module.get_submodule(name), state["weight"])


def freeze_carried_qparams(pl_module: nn.Module, names: Iterable[str]) -> None:
    """Keep the weight qparams of the carried layers fixed (their one-shot values).

    Args:
        pl_module: the LightningModule, set up for training.
        names: the carried layers; those already baked (quantization-aware training ended)
            have nothing to freeze.
    """
    for name in names:
        module = pl_module.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            for quantizer in module.parametrizations["weight"]:
                quantizer.frozen = True


def _check_on_grid(name: str, module: nn.Module, expected: Tensor) -> None:
    if not parametrize.is_parametrized(module, "weight"):
        return
    quantizer = module.parametrizations["weight"][0]
    enabled, quantizer.enabled = quantizer.enabled, True
    try:
        with torch.no_grad():
            error = (module.weight.float() - expected.float()).abs().max().item()
    finally:
        quantizer.enabled = enabled
    scale = expected.float().abs().max().item()
    if error > 1e-6 * max(scale, 1.0):
        raise RuntimeError(
            f"layer '{name}': fake quantization with the one-shot qparams moves its weight by "
            f"up to {error:.3g}: training cannot start from the one-shot result"
        )


def run_one_shot(
    recipe: Recipe,
    model: nn.Module,
    batches: list[Any],
    pipeline: str,
    device: torch.device | str | None,
    progress: bool,
) -> None:
    """Run the one-shot part of a recipe on ``model`` with ``oneshot``'s calibration pipeline.

    Under DDP every rank calibrates on its own batches and the modifiers reduce their
    statistics across ranks, so every rank ends with the same model.

    Args:
        recipe: the one-shot part.
        model: the model to compress in place.
        batches: this rank's calibration batches (unused when no modifier reads data).
        pipeline: the pipeline for recipes that read data (``sequential``, ``basic``,
            ``auto``); data-free recipes run ``data_free``.
        device: where blocks run.
        progress: show a progress bar over the blocks.

    Raises:
        Exception: whatever the calibration raised; its hooks are removed first.
    """
    needs_data = any(modifier.needs_calibration_data for modifier in recipe.modifiers)
    module = CalibrationModule(
        model,
        recipe,
        pipeline=pipeline if needs_data else "data_free",
        device=device,
        progress=progress,
    )
    if needs_data:
        check_batches(model, batches)
    module.calibrate(batches if needs_data else ())


def rewrap_ddp(trainer: Any) -> None:
    """Give a DDP-wrapped model a new ``DistributedDataParallel`` wrapper.

    The training stage is set up after the one-shot stage, when Lightning has wrapped the
    model already; registering a weight parametrization replaces the parameter's storage
    (``set_``), after which the first wrapper's gradient hooks no longer fire. A new wrapper
    hooks the parameters as they are now. Other strategies are left as they are.

    Args:
        trainer: the Trainer.
    """
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.model.module
        strategy.configure_ddp()


def shards_at_configure_model(strategy: Any) -> bool:
    """Whether ``strategy`` shards the model in ``configure_model`` (FSDP2's
    ``ModelParallelStrategy``), after a callback's ``setup`` and before training starts.

    Args:
        strategy: the Trainer's strategy.

    Returns:
        True for ``ModelParallelStrategy``.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_one_shot_strategy(strategy: Any, one_shot: Recipe, model: nn.Module) -> None:
    """Refuse a one-shot stage that cannot run under a strategy that shards the model.

    Under ``ModelParallelStrategy`` the one-shot stage runs in ``setup``, on the whole model
    before ``configure_model`` shards it, so the model's weights must be there.

    Args:
        strategy: the Trainer's strategy.
        one_shot: the recipe's one-shot part.
        model: the LightningModule.

    Raises:
        RecipeError: under ``ModelParallelStrategy``, for a model whose weights are on the
            meta device (naming one), saying what to do instead.
    """
    if not one_shot.modifiers or not shards_at_configure_model(strategy):
        return
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        names = [type(modifier).__name__ for modifier in one_shot.modifiers]
        raise RecipeError(
            f"Compressor: under {type(strategy).__name__} the recipe's one-shot stage {names} "
            "runs in the Compressor's setup, on the whole model before configure_model shards "
            f"it, but parameter '{meta}' is on the meta device: build the model with its "
            "weights (not on meta), or run oneshot() first and train from its checkpoint"
        )
