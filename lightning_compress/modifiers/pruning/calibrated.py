"""``CalibratedPruningModifier``: the one-shot flow that SparseGPT and Wanda share."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.hessian_collector import mask_sources
from lightning_compress.modifiers.layerwise import (
    StatisticsCollector,
    check_calibrated,
    check_finite_weights,
    layers_inside,
    linear_layers,
    modules_inside,
    needs_data,
)
from lightning_compress.modifiers.pruning.masks import MaskStructureSetting
from lightning_compress.modifiers.tied_weights import untie_weights

__all__ = ["CalibratedPruningModifier"]


class CalibratedPruningModifier(Modifier, MaskStructureSetting, register=False):
    """Base of one-shot pruning modifiers that choose each ``nn.Linear``'s mask from its inputs.

    At CALIBRATION_EPOCH_START every targeted layer gets a forward pre-hook feeding its
    input to the subclass's collector (and the layers' ancestors that take an
    ``attention_mask`` a hook that keeps padded tokens out); the statistics follow a
    smoothing modifier that rescales the layers' inputs after they were observed. At each
    SEQUENTIAL_EPOCH_END(subgraph=block) the targeted layers inside the block are pruned:
    their statistics are summed over ranks, every layer's pruned weight is computed, and only
    then are the weights changed, the layers' hooks removed and their statistics freed. An
    error leaves the block's layers as they were. CALIBRATION_EPOCH_END prunes the rest
    (every layer, with the basic pipeline). Without calibration data it raises a
    ``RecipeError`` and leaves the model unchanged. ``initialize`` refuses a targeted layer
    whose weight holds NaN or Inf, naming it, and gives a layer whose weight another module
    shares (a tied ``lm_head``) its own copy, with a warning.

    The pruned weights are exact zeros; no buffer is added, so a later stage keeps them with
    ``ConstantPruningModifier``. Per-layer sparsity goes to ``layer_sparsity`` and the
    loggers (``<tag>/sparsity``, ``<tag>/seconds``, and ``<tag>/loss`` where the method has
    one, also kept in ``layer_losses``).

    Subclasses give :meth:`make_collector`, :meth:`prune_layers` and a ``log_tag``, and may
    prune layers that share their statistics together (:meth:`stacks`).

    Args:
        sparsity: the fraction of each layer's weights to prune, in [0, 1); with an N:M
            ``mask_structure`` it must be ``1 - N/M``.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"``: keep N of every M
            consecutive input columns in each row (``in_features`` must be a multiple of M).
        targets: the layers to prune (``Linear`` layers).
        ignore: layers left alone (e.g. ``lm_head``, which the sequential pipeline never runs).
        start: -1: one-shot.
    """

    sparsity: float
    mask_structure: str = "0:0"

    log_tag: ClassVar[str]

    # ----------------------------------------------------------------- settings
    def validate(self) -> None:
        if not self.is_one_shot:
            self.fail(
                "start",
                f"-1 ({type(self).__name__} is one-shot; MagnitudePruningModifier prunes "
                "during training)",
            )
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", "a float in [0, 1)")
        self.check_mask_structure("sparsity")

    @property
    def needs_calibration_data(self) -> bool:
        """True: the masks are chosen from the layers' calibration inputs."""
        return True

    # ----------------------------------------------------- for the subclasses
    def make_collector(self) -> StatisticsCollector:
        """The collector of the input statistics the method needs.

        Returns:
            A fresh collector.
        """
        raise NotImplementedError

    def stacks(
        self, layers: dict[str, nn.Linear], statistics: Mapping[str, Any]
    ) -> list[list[str]]:
        """Groups the layers that one :meth:`prune_layers` call handles together.

        Layers of a group must share their statistics. By default each layer is alone.

        Args:
            layers: the layers to prune, by name.
            statistics: their reduced input statistics, by name.

        Returns:
            The groups of names, covering ``layers``.
        """
        return [[name] for name in layers]

    def prune_layers(
        self, weights: dict[str, Tensor], statistics: Any
    ) -> dict[str, tuple[Tensor, float | None]]:
        """Computes the pruned weights of a group of layers, without changing the layers.

        Args:
            weights: the layers' weights ``[out, in]``, by name.
            statistics: their (shared) reduced input statistics, from the collector.

        Returns:
            By name: the pruned weight (zeros where pruned, the weight's dtype) and the
            method's loss for the layer, or None when it has none.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- lifecycle
    def compression_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linear layers this modifier prunes (see ``Modifier``)."""
        return linear_layers(type(self).__name__, self.resolve_targets(model))

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        targets = self.resolve_targets(state.model)
        owner = type(self).__name__
        self._pending: dict[str, nn.Linear] = linear_layers(owner, targets)
        self.check_widths({name: module.in_features for name, module in self._pending.items()})
        check_finite_weights(owner, self._pending)
        untie_weights(owner, state.model, self._pending)
        self._collector = self.make_collector()
        self._layer_hooks: dict[str, RemovableHandle] = {}
        self.layer_sparsity: dict[str, float] = {}
        self.layer_losses: dict[str, float] = {}

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if event is None:
            raise needs_data(type(self).__name__, "finalize ran without calibration")
        for name, module in self._pending.items():
            hook = self._collector.layer_hook(name)
            self._layer_hooks[name] = self.register_hook(module, hook, "forward_pre")
        for module in mask_sources(state.model, self._pending):
            hook = self._collector.mask_hook(module)
            self.register_hook(module, hook, "forward_pre", with_kwargs=True)
        self._collector.follow_input_scaling(self._pending)

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END and self.active:
            names = layers_inside(type(self).__name__, kwargs.get("subgraph"), self._pending)
            self._prune(state, names)

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        """The pending layers inside ``subgraph``: each is pruned from its own inputs.

        Args:
            subgraph: the block about to be calibrated.

        Returns:
            The layers (none while the modifier is not active).
        """
        return modules_inside(subgraph, list(self._pending.values())) if self.active else []

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        try:
            self._prune(state, list(self._pending))
        finally:
            self._collector.clear()
        self.remove_hooks()

    def abort(self, state: State) -> None:
        """Stop without finishing: free the statistics and remove every hook.

        Layers already pruned stay pruned.

        Args:
            state: the session's state.
        """
        self._collector.clear()
        super().abort(state)

    # ------------------------------------------------------------------ pruning
    def _prune(self, state: State, names: list[str]) -> None:
        """Prunes the pending layers ``names``: every one is computed before any changes.

        Every rank calls it with the same layers in the same order.
        """
        layers = {name: self._pending[name] for name in names}
        statistics = self._collector.reduced(layers)
        check_calibrated(type(self).__name__, statistics, self._collector.num_reads)
        pruned, losses, seconds = {}, {}, {}
        for stack in self.stacks(layers, statistics):
            begin = time.perf_counter()
            weights = {name: layers[name].weight.detach() for name in stack}
            results = self.prune_layers(weights, statistics[stack[0]])
            elapsed = (time.perf_counter() - begin) / len(stack)
            for name, (weight, loss) in results.items():
                pruned[name], seconds[name] = weight, elapsed
                if loss is not None:
                    losses[name] = loss
        sparsity = {}
        for name, weight in pruned.items():
            module = self._pending.pop(name)
            self._layer_hooks.pop(name).remove()
            with torch.no_grad():
                module.weight.copy_(weight)
            sparsity[name] = float((weight == 0).sum() / weight.numel())
        self._collector.discard(names)
        self._log(state, sparsity, losses, seconds)

    def _log(
        self,
        state: State,
        sparsity: dict[str, float],
        losses: dict[str, float],
        seconds: dict[str, float],
    ) -> None:
        self.layer_sparsity.update(sparsity)
        self.layer_losses.update(losses)
        if state.loggers is None or not sparsity:
            return
        state.loggers.log_scalars(f"{self.log_tag}/sparsity", sparsity)
        state.loggers.log_scalars(f"{self.log_tag}/seconds", seconds)
        if losses:
            state.loggers.log_scalars(f"{self.log_tag}/loss", losses)
