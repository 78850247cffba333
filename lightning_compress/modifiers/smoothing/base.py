"""``SmoothingModifier``: what SmoothQuant and AWQ share (one-shot, block by block)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
from loguru import logger
from torch import Tensor, nn

from lightning_compress.core.distributed import all_reduce_min_
from lightning_compress.core.events import Event
from lightning_compress.core.model_layer import module_matches
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import ONE_SHOT, Modifier
from lightning_compress.modifiers.hessian_collector import mask_sources
from lightning_compress.modifiers.layerwise import (
    check_finite_inputs,
    check_finite_weights,
    layers_inside,
    needs_data,
)
from lightning_compress.modifiers.smoothing.calls import CallRecorder
from lightning_compress.modifiers.smoothing.folding import (
    SmoothingMapping,
    apply_smoothing,
    has_weight_matrix,
    is_linear,
    is_norm,
)
from lightning_compress.modifiers.smoothing.mappings import (
    check_mappings,
    check_specs,
    find_mappings,
    parse_mappings,
    resolve_mappings,
)
from lightning_compress.modifiers.smoothing.probe import BlockProbe
from lightning_compress.modifiers.smoothing.statistics import ChannelMagnitudeCollector
from lightning_compress.recipe.errors import RecipeError

__all__ = ["SmoothingModifier"]


class SmoothingModifier(Modifier, register=False):
    """Base of the smoothing modifiers: per mapping, divide a smooth layer's output channels by
    ``s`` and multiply the balance layers' input columns by ``s`` (the model's function does
    not change), with ``s`` chosen by the subclass from calibration statistics.

    At CALIBRATION_EPOCH_START every targeted linear layer gets a hook gathering the
    per-channel input magnitude the subclass needs (:attr:`statistic_kind`, padded tokens
    skipped), and the blocks' calls are recorded. At each SEQUENTIAL_EPOCH_END(subgraph=block)
    the block's mappings are found (or the given ones resolved and checked, see
    :mod:`~lightning_compress.modifiers.smoothing.mappings`), then smoothed one after another
    in the order the balance layers run. Under the basic pipeline (no SEQUENTIAL_EPOCH_END) the
    whole model is one block, at CALIBRATION_EPOCH_END.

    Balance layers are rescaled with :func:`~lightning_compress.modifiers.input_scaling.
    scale_inputs`, so later modifiers of the same recipe that already observed their inputs
    (GPTQ's Hessians) correct their statistics, and the chain runs in one calibration pass.

    ``initialize`` refuses NaN or Inf in the weights of the targeted linear and normalization
    layers, and a block whose layers received NaN or Inf during calibration is refused before it
    is smoothed; either error names the layer.

    Afterwards ``smoothed`` lists each mapping applied as ``(smooth layer, balance layers)``.

    Args:
        mappings: ``[[balance layer patterns], smooth layer pattern]`` entries (or
            ``{balance_layers, smooth_layer}``) instead of finding them; patterns are module
            names or ``re:`` regexes.
        targets: the linear layers that may be smooth or balance layers.
        ignore: layers (linear or normalization) never smoothed.
        start: -1: smoothing is one-shot.
    """

    mappings: list[Any] | None = None

    statistic_kind: ClassVar[Literal["max", "mean"]]
    """The input magnitude :meth:`compute_scale` reads (see ``ChannelMagnitudeCollector``)."""

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if self.start != ONE_SHOT:
            self.fail("start", "-1 (smoothing is one-shot)")
        self._specs = parse_mappings(type(self).__name__, self.mappings)

    @property
    def needs_calibration_data(self) -> bool:
        """Always: the scales come from calibration activations."""
        return True

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        model = state.model
        targeted = self.resolve_targets(model)
        self._linears = {name: module for name, module in targeted.items() if is_linear(module)}
        if not self._linears:
            self.fail("targets", "patterns selecting Linear layers (smoothing folds into them)")
        self._norms = {
            name: module
            for name, module in model.named_modules()
            if is_norm(module) and not any(module_matches(name, module, p) for p in self.ignore)
        }
        check_specs(type(self).__name__, self._specs, model, self._linears, self.ignore)
        check_finite_weights(type(self).__name__, {**self._linears, **self._norms})
        self._names = {module: name for name, module in model.named_modules()}
        self._pending = dict(self._linears)
        self._blocks_seen = 0
        self.smoothed: list[tuple[str, tuple[str, ...]]] = []

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if event is None:
            raise needs_data(type(self).__name__, "finalize ran without calibration")
        self._statistic = ChannelMagnitudeCollector(self.statistic_kind)
        self._statistic.follow_input_scaling(self._linears)
        for name, layer in self._linears.items():
            self.register_hook(layer, self._statistic.layer_hook(name), "forward_pre")
        for module in mask_sources(state.model, self._linears):
            hook = self._statistic.mask_hook(module)
            self.register_hook(module, hook, "forward_pre", with_kwargs=True)
        self._calls = CallRecorder()
        for module in _ancestors(state.model, self._linears):
            self.register_hook(module, self._calls.pre_hook, "forward_pre", with_kwargs=True)
            self.register_hook(module, self._calls.post_hook, "forward", always_call=True)

    def on_sequential_epoch_end(self, state: State, subgraph: nn.Module | None) -> None:
        if not self.active:
            return
        self._blocks_seen += 1
        self._smooth_block(subgraph)

    def skip_block(self, state: State, block: nn.Module) -> None:
        """Forgets the layers inside ``block`` (smoothed by an earlier run).

        Args:
            state: the session's state.
            block: the finished block.
        """
        if not self.active:
            return
        self._blocks_seen += 1
        linears = layers_inside(type(self).__name__, block, self._pending)
        for name in linears:
            del self._pending[name]
        self._statistic.discard(linears)
        self.release_block(linears)

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        try:
            if self._blocks_seen == 0:
                self._smooth_block(state.model)
        finally:
            self._release()

    def abort(self, state: State) -> None:
        """Stop without finishing: free the statistics and recorded calls, then as
        ``Modifier.abort``.

        Args:
            state: the session's state.
        """
        if self.started_:
            self._release()
        super().abort(state)

    # ---------------------------------------------------------- for subclasses
    def compute_scale(self, mapping: SmoothingMapping) -> Tensor:
        """The scale ``s`` for one mapping, ``[channels]``, positive.

        Args:
            mapping: the layers, with the weights of every earlier mapping already smoothed.

        Returns:
            ``s``; the smooth layer's outputs are divided by it.
        """
        raise NotImplementedError

    def compute_scales(self, mappings: Sequence[SmoothingMapping]) -> Iterable[Tensor]:
        """The scales of a block's mappings, in order; by default each computed by
        :meth:`compute_scale` only once every mapping before it is applied.

        Args:
            mappings: the block's mappings, in the order they are applied.

        Returns:
            The scales, lazily.
        """
        return (self.compute_scale(mapping) for mapping in mappings)

    def release_block(self, names: list[str]) -> None:
        """Frees what the subclass gathered for the layers ``names`` of a smoothed block.

        Args:
            names: the block's targeted layers.
        """

    def release_all(self) -> None:
        """Frees everything the subclass gathered (at the end, or on abort)."""

    # ----------------------------------------------------------------- smoothing
    def _smooth_block(self, block: Any) -> None:
        """Finds (or checks) the block's mappings and smooths them; no weight changes before
        every mapping of the block is known to be exact."""
        owner = type(self).__name__
        linears = {name: self._pending[name] for name in layers_inside(owner, block, self._pending)}
        if not linears:
            return
        if block not in self._names:  # the pipeline's group of the modules after the blocks
            logger.info(
                "{}: {} run after the last block; smoothing balances layers inside one block, "
                "so they are not smoothed",
                owner,
                list(linears),
            )
            return
        block_name = self._names.get(block) or "<model>"
        call = self._calls.take(block)
        has_call = all_reduce_min_(torch.tensor([int(call is not None)]))
        if not bool(has_call.item()):
            raise needs_data(owner, f"no calibration batch reached block '{block_name}'")
        for name, statistic in self._statistic.reduced(linears).items():
            check_finite_inputs(owner, [name], statistic.values, "input-magnitude statistic")
        probe = BlockProbe(block, call)
        modules = {self._names[module]: module for module in block.modules()}
        targeted = set(self._linears.values())
        others = {
            name: module
            for name, module in modules.items()
            if has_weight_matrix(module) and module not in targeted
        }
        if self._specs:
            mappings = resolve_mappings(owner, self._specs, block_name, modules, self._linears)
            mappings = check_mappings(
                owner, probe, mappings, linears, others, self._names, block_name
            )
        else:
            inside = set(modules.values())
            norms = {name: norm for name, norm in self._norms.items() if norm in inside}
            mappings = find_mappings(owner, probe, linears, norms, others, block_name)
        if not mappings:
            raise RecipeError(
                f"{owner}: no smoothing mapping in block '{block_name}' (layers "
                f"{list(linears)}): expected a normalization or Linear layer whose output "
                "channels only targeted Linear layers read, directly or through a linear "
                "operation; give mappings, check targets and ignore, or put smoothing before "
                "the modifiers that quantize the block"
            )
        for mapping, scale in zip(mappings, self.compute_scales(mappings), strict=True):
            apply_smoothing(mapping, scale)
            self.smoothed.append((mapping.smooth_name, mapping.balance_names))
        for name in linears:
            del self._pending[name]
        self._statistic.discard(linears)
        self.release_block(list(linears))

    def _release(self) -> None:
        self.remove_hooks()
        self._statistic.clear()
        self._calls.clear()
        self.release_all()


def _ancestors(model: nn.Module, names: dict[str, nn.Module]) -> list[nn.Module]:
    """The model and every module containing one of the layers ``names``, each once."""
    prefixes = {""}
    for name in names:
        parts = name.split(".")
        prefixes.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return list(dict.fromkeys(map(model.get_submodule, sorted(prefixes, key=len))))
