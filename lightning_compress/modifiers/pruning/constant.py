"""Weight masks held as buffers and enforced after optimizer steps; ``ConstantPruningModifier``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import UNTIL_END, Modifier
from lightning_compress.modifiers.layerwise import check_finite_weights
from lightning_compress.modifiers.pruning.masks import like_weight
from lightning_compress.modifiers.pruning.schedule import INDEX_TOLERANCE
from lightning_compress.modifiers.tied_weights import untie_weights
from lightning_compress.recipe.errors import RecipeError

__all__ = ["MASK_BUFFER", "ConstantPruningModifier", "WeightMaskModifier"]

MASK_BUFFER = "weight_mask"


class WeightMaskModifier(Modifier, register=False):
    """Base of pruning modifiers that hold a mask per layer and enforce it during training.

    Each target layer (it must have a 2-D ``weight``) gets a bool ``weight_mask`` buffer,
    True where the weight is kept. Buffers are created in ``on_initialize``, which runs
    before a checkpoint is restored, so a resumed run loads the saved masks strictly. At
    every OPTIM_POST_STEP inside the schedule (``masks_enforced``), ``weight.mul_(mask)``
    zeroes the pruned weights again, so momentum or Adam cannot revive them. At finalize the
    masks are applied a last time and the buffers removed: the zeros live in the weights,
    and the final ``state_dict`` holds plain weights only.

    A bool mask is exact, takes one byte per weight, and is left alone by ``model.half()`` or
    precision plugins, which convert floating-point buffers only. When a weight is a
    ``DTensor`` (FSDP2), its mask is sharded the same way, so masking stays shard-local.
    """

    def compression_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights this modifier masks (see ``Modifier``)."""
        return self.weight_layers(model)

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.layers_ = self.weight_layers(state.model)
        check_finite_weights(type(self).__name__, self.layers_)
        # a mask on a tied lm_head would prune the input embedding too
        untie_weights(type(self).__name__, state.model, self.layers_, state.optimizer)
        for module in self.layers_.values():
            self.add_buffer(module, MASK_BUFFER, self.initial_mask(module.weight.detach()))

    def initial_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask a layer starts with (before any checkpoint is restored into it).

        Args:
            weight: the layer's weight.

        Returns:
            A bool tensor laid out like ``weight``.
        """
        return torch.ones_like(weight, dtype=torch.bool)

    def weight_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The target layers, each checked to hold a 2-D weight.

        Args:
            model: the model.

        Returns:
            The layers by name.

        Raises:
            RecipeError: if targets match nothing, or a matched layer has no 2-D weight.
        """
        layers = self.resolve_targets(model)
        for name, module in layers.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                found = (
                    f"a weight of shape {tuple(weight.shape)}"
                    if isinstance(weight, torch.Tensor)
                    else "no weight"
                )
                raise RecipeError(
                    f"{type(self).__name__}.targets: layer '{name}' ({type(module).__name__}) "
                    f"has {found}; expected layers with a 2-D weight such as Linear "
                    f"(narrow targets or add the layer to ignore)"
                )
        return layers

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.OPTIM_POST_STEP and self.masks_enforced(event):
            self.apply_masks()

    def masks_enforced(self, event: Event) -> bool:
        """Whether masks are re-applied after the optimizer step at ``event``.

        Decided from the event's index alone, so a resumed run does what an uninterrupted
        one would.

        Args:
            event: an OPTIM_POST_STEP event.

        Returns:
            True from ``start`` through ``enforced_until()``.
        """
        index = event.current_index
        until = self.enforced_until()
        started = self.start is not None and index >= self.start - INDEX_TOLERANCE
        return started and (until is None or index <= until + INDEX_TOLERANCE)

    def enforced_until(self) -> float | None:
        """The last index at which masks are enforced; None: until finalize."""
        return None if self.end in (None, UNTIL_END) else self.end

    def apply_at_finalize(self) -> bool:
        """Whether finalize applies the masks a last time before removing them."""
        return True

    def on_finalize(self, state: State, **kwargs: Any) -> None:
        if self.apply_at_finalize():
            self.apply_masks()
        self.remove_buffers()

    def mask_of(self, module: nn.Module) -> torch.Tensor:
        """The layer's mask, laid out like its weight.

        A mask created before the model was sharded is a plain (full, replicated) tensor;
        the first call after sharding replaces it by its shard.

        Args:
            module: a target layer.

        Returns:
            The mask buffer.
        """
        mask = getattr(module, MASK_BUFFER)
        weight = stored_weight(module)  # not a parametrization's output, computed on access
        if isinstance(weight, DTensor) and not isinstance(mask, DTensor):
            mask = like_weight(mask, weight)
            self.add_buffer(module, MASK_BUFFER, mask)
        return mask

    def set_mask(self, module: nn.Module, mask: torch.Tensor) -> None:
        """Store a full mask into the layer's buffer (in place, sharded like the weight).

        Args:
            module: a target layer.
            mask: the full bool mask.
        """
        self.mask_of(module).copy_(like_weight(mask, stored_weight(module)))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight: ``weight.mul_(mask)`` on each target layer.

        A parametrized weight (e.g. fake-quantized for QAT) is masked in its stored
        original, since ``module.weight`` is then recomputed on every access.
        """
        for module in self.layers_.values():
            stored_weight(module).mul_(self.mask_of(module))


class ConstantPruningModifier(WeightMaskModifier):
    """Keep the zeros of an already sparse model fixed while it is fine-tuned.

    The mask of each target layer is ``weight != 0`` when the modifier is initialized (a
    restored checkpoint's mask replaces it on resume). It is re-applied after every
    optimizer step from ``start`` to ``end`` (-1 or None: until training ends); at finalize
    it is applied once more and the ``weight_mask`` buffers are removed.

    Args:
        targets: layers whose zeros are kept (they must hold a 2-D weight).
        ignore: layers left alone.
        start: the index from which masks are enforced (must be >= 0).
        end: the last index at which they are enforced.
    """

    start: float | None = 0.0

    def validate(self) -> None:
        if self.start is None or self.is_one_shot:
            self.fail("start", "an index >= 0 (the modifier keeps zeros during training)")

    def initial_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return weight != 0


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor ``module`` stores: the parametrization's original when ``weight`` is
    parametrized, else ``module.weight`` itself."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
