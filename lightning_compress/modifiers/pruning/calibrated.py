"""``CalibratedPruningModifier``: the one-shot flow that SparseGPT and Wanda share."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lightning_compress.core.state import State
from lightning_compress.modifiers.layerwise import linear_layers_within
from lightning_compress.modifiers.layerwise_modifier import (
    CompressedLayer,
    LayerwiseModifier,
    PendingLayer,
)
from lightning_compress.modifiers.pruning.masks import MaskStructureSetting, row_mask

__all__ = ["CalibratedPruningModifier"]


class CalibratedPruningModifier(LayerwiseModifier, MaskStructureSetting, register=False):
    """Base of one-shot pruning modifiers that choose each ``nn.Linear``'s mask from its inputs.

    The layer-wise flow (calibration hooks, block-by-block pruning, errors, fallbacks) is
    :class:`~lightning_compress.modifiers.layerwise_modifier.LayerwiseModifier`'s. A layer
    that cannot be pruned from its inputs (too few tokens, a Hessian singular after the
    retries) is pruned by weight magnitude, row by row, with the same sparsity and
    structure, and named in a warning.

    The pruned weights are exact zeros; no buffer is added, so a later stage keeps them with
    ``ConstantPruningModifier``. Per-layer sparsity goes to ``layer_sparsity`` and the
    loggers (``<tag>/sparsity``, ``<tag>/seconds``, and ``<tag>/loss`` where the method has
    one, also kept in ``layer_losses``).

    Subclasses give :meth:`make_collector`, :meth:`compress_stack` and a ``log_tag``, and may
    prune layers that share their statistics together (:meth:`stacks`).

    Args:
        sparsity: the fraction of each layer's weights to prune, in [0, 1); with an N:M
            ``mask_structure`` it must be ``1 - N/M``.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"``: keep N of every M
            consecutive input columns in each row (``in_features`` must be a multiple of M).
        targets: the layers to prune: ``Linear`` layers, or modules whose ``Linear`` layers
            are pruned (``model.layers.0``, ``re:.*model.layers.0$``).
        ignore: layers left alone (e.g. ``lm_head``, which the sequential pipeline never
            runs), also inside a targeted module.
        start: -1: one-shot.
    """

    sparsity: float
    mask_structure: str = "0:0"

    data_free_method: ClassVar[str] = "magnitude pruning (same sparsity and structure)"

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
        super().validate()

    @property
    def needs_calibration_data(self) -> bool:
        """True: the masks are chosen from the layers' calibration inputs."""
        return True

    # ---------------------------------------------------------------- lifecycle
    def plan_layers(self, model: Any) -> dict[str, PendingLayer]:
        """The ``nn.Linear`` layers the targets are or hold, as llm-compressor reads a pruning
        target (``model.layers.0``: the linear layers of that decoder layer).

        Args:
            model: the model.

        Returns:
            The layers, by name, in model order.

        Raises:
            RecipeError: when a targeted module holds no ``Linear`` layer, or an N:M
                structure does not fit a layer's width.
        """
        owner = type(self).__name__
        layers = linear_layers_within(owner, model, self.resolve_targets(model), self.ignore)
        plan = {name: PendingLayer(module) for name, module in layers.items()}
        self.check_widths({name: layer.module.in_features for name, layer in plan.items()})
        return plan

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        super().on_initialize(state, **kwargs)
        self.layer_sparsity: dict[str, float] = {}

    def compress_data_free(self, name: str) -> CompressedLayer:
        """Layer ``name`` pruned by weight magnitude, each row to the same sparsity and
        structure.

        Args:
            name: a pending layer.

        Returns:
            The pruned weight.
        """
        weight = self._pending[name].module.weight.detach()
        mask = row_mask(weight.abs(), self.sparsity, self.structure, layer=name)
        return CompressedLayer(torch.where(mask, weight, 0))

    def log_results(self, state: State, results: dict[str, CompressedLayer]) -> None:
        sparsity = {
            name: float((result.weight == 0).sum() / result.weight.numel())
            for name, result in results.items()
        }
        self.layer_sparsity.update(sparsity)
        if state.loggers is not None and sparsity:
            state.loggers.log_scalars(f"{self.log_tag}/sparsity", sparsity)
