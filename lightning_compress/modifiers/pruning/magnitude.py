"""``MagnitudePruningModifier``: gradual (training-aware) or one-shot magnitude pruning."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from loguru import logger
from torch import nn

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import UNTIL_END
from lightning_compress.modifiers.layerwise import check_finite_weights
from lightning_compress.modifiers.pruning.constant import WeightMaskModifier, stored_weight
from lightning_compress.modifiers.pruning.masks import (
    MaskStructureSetting,
    full_tensor,
    global_masks,
    nm_mask,
    unstructured_mask,
)
from lightning_compress.modifiers.pruning.schedule import (
    INDEX_TOLERANCE,
    interpolate_sparsity,
    update_point,
)

__all__ = ["MagnitudePruningModifier"]

# BATCH_END carries the index reached by the batch's optimizer step (the post-step index).
_SCHEDULE_EVENTS = (EventType.BATCH_START, EventType.BATCH_END)


class MagnitudePruningModifier(WeightMaskModifier, MaskStructureSetting):
    """Prune the smallest-magnitude weights, gradually during training or in one shot.

    Training (``start >= 0``): the target sparsity is ``interpolate_sparsity`` (cubic by
    default, Zhu & Gupta 2017) taken at the latest point of the update grid (``start``,
    multiples of ``update``, ``end``). It is evaluated at each BATCH_START and again at each
    BATCH_END, at the index reached by that batch's optimizer step, so the sparsity due by
    the last step holds when training ends (an ``end`` at the end of training reaches
    ``final_sparsity``) and a checkpoint saved after a step holds the masks due there. When
    the target changes, masks are recomputed from ``|W|`` of the stored float weight (not
    its fake-quantized value under QAT) and applied; weights already pruned score lowest,
    so masks only ever lose entries and recomputing a target gives the same masks. Masks
    are re-applied after every optimizer step, from ``start`` until ``end`` (until finalize
    if ``leave_enabled``). Every decision depends on the step index, the stored weights and
    the mask buffers only, so a run resumed from a checkpoint continues exactly like an
    uninterrupted one.

    One-shot (``start: -1``): the model is pruned straight to ``final_sparsity`` when the
    modifier starts (at calibration, or at finalize when there is none).

    At finalize the masks are applied once more (if ``leave_enabled``) and the
    ``weight_mask`` buffers are removed; the zeros stay in the weights.

    Args:
        init_sparsity: the sparsity at ``start``, in [0, 1).
        final_sparsity: the sparsity reached at ``end``, in [0, 1).
        inter_func: how the sparsity moves from init to final: ``cubic`` or ``linear``.
        mask_structure: ``"0:0"`` (unstructured) or ``"N:M"``: keep N of every M consecutive
            input weights of each row; ``final_sparsity`` must then be ``1 - N/M``, and
            intermediate masks are subsets of an N:M pattern.
        global_sparsity: one magnitude threshold across all target layers instead of the
            same sparsity in each.
        leave_enabled: keep re-applying the masks after ``end``, until finalize.
        targets: layers to prune (they must hold a 2-D weight).
        ignore: layers left alone.
        start: the index where pruning starts (-1: one-shot).
        end: the index where ``final_sparsity`` is reached (required when training).
        update: the interval between mask updates (None or 0: every step).
    """

    init_sparsity: float = 0.0
    final_sparsity: float
    inter_func: Literal["cubic", "linear"] = "cubic"
    mask_structure: str = "0:0"
    global_sparsity: bool = False
    leave_enabled: bool = True

    def validate(self) -> None:
        for name in ("init_sparsity", "final_sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self.fail(name, "a float in [0, 1)")
        if self.init_sparsity > self.final_sparsity:
            self.fail("init_sparsity", f"a float <= final_sparsity={self.final_sparsity}")
        self.check_mask_structure("final_sparsity")
        if self.start is None:
            self.fail("start", "an index >= 0, or -1 for one-shot")
        if not self.is_one_shot and (self.end in (None, UNTIL_END) or self.end <= self.start):
            self.fail("end", f"an index after start={self.start}, where final_sparsity is reached")

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        super().on_initialize(state, **kwargs)
        # The target sparsity the masks were last computed for: a cache that skips
        # recomputing within a step (gradient accumulation) and between grid points.
        self.applied_sparsity_: float | None = None
        # The index the last optimizer step reached (None before any training batch ends).
        self.reached_index_: float | None = None

    def weight_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The target layers, checked to hold 2-D weights that fit ``mask_structure``.

        Args:
            model: the model.

        Returns:
            The layers by name.

        Raises:
            RecipeError: if targets match nothing, a layer has no 2-D weight, or N:M needs
                ``in_features`` divisible by M and a layer's is not.
        """
        layers = super().weight_layers(model)
        self.check_widths({name: module.weight.shape[1] for name, module in layers.items()})
        return layers

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if self.is_one_shot:
            self.prune_to(state, self.final_sparsity, step=None)

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ in _SCHEDULE_EVENTS and not self.is_one_shot:
            self._follow_schedule(state, event)
        if event.type_ == EventType.BATCH_END:
            self.reached_index_ = event.current_index
        super().on_event(state, event, **kwargs)

    def _follow_schedule(self, state: State, event: Event) -> None:
        index = event.current_index
        if not self.start - INDEX_TOLERANCE <= index <= self.end + INDEX_TOLERANCE:
            return
        sparsity = self.target_sparsity(index)
        if sparsity != self.applied_sparsity_:
            self.prune_to(state, sparsity, step=index)

    def target_sparsity(self, index: float) -> float:
        """The schedule's sparsity at ``index`` (held between update points).

        Args:
            index: the schedule index (step, or fractional epoch).

        Returns:
            The target sparsity.
        """
        point = update_point(index, self.start, self.end, self.update)
        return interpolate_sparsity(
            point, self.start, self.end, self.init_sparsity, self.final_sparsity, self.inter_func
        )

    def masks_enforced(self, event: Event) -> bool:
        if self.is_one_shot:
            return self.started_ and self.leave_enabled
        return super().masks_enforced(event)

    def enforced_until(self) -> float | None:
        return None if self.leave_enabled else self.end

    def apply_at_finalize(self) -> bool:
        return self.leave_enabled

    def on_finalize(self, state: State, **kwargs: Any) -> None:
        reached = self.reached_index_
        if reached is not None and reached < self.end - INDEX_TOLERANCE:
            logger.warning(
                "{}: training ended at index {:.4g}, before end={:g} of the schedule; the layers "
                "are pruned to {:.4f} instead of final_sparsity={}",
                type(self).__name__,
                reached,
                self.end,
                self.target_sparsity(reached) if reached >= self.start else 0.0,
                self.final_sparsity,
            )
        super().on_finalize(state, **kwargs)

    # ------------------------------------------------------------------ pruning
    def prune_to(self, state: State, sparsity: float, step: float | None) -> None:
        """Recompute the masks for ``sparsity`` from the weights' magnitudes and apply them.

        Args:
            state: the session's state (for its loggers).
            sparsity: the target sparsity.
            step: the schedule index, for the logs.
        """
        # Training may have diverged since initialize: NaN scores would prune at random.
        check_finite_weights(type(self).__name__, self.layers_)
        masks = self.select_masks(
            {name: self._scores(module) for name, module in self.layers_.items()}, sparsity
        )
        for name, module in self.layers_.items():
            self.set_mask(module, masks[name])
        self.apply_masks()
        self.applied_sparsity_ = sparsity
        _log_sparsity(state, type(self).__name__, masks, sparsity, step)

    def select_masks(
        self, scores: dict[str, torch.Tensor], sparsity: float
    ) -> dict[str, torch.Tensor]:
        """Masks that prune the lowest scores to ``sparsity`` in the configured structure.

        Under N:M, only weights that the N:M mask of the same scores prunes are candidates,
        so at ``sparsity = 1 - N/M`` the result is exactly that N:M mask.

        Args:
            scores: full scores per layer (pruned weights at ``-inf``).
            sparsity: the target sparsity, per layer or global.

        Returns:
            A full bool mask per layer.
        """
        if self.structure is not None:
            n, m = self.structure
            scores = {
                name: value.masked_fill(nm_mask(value, n, m, layer=name), math.inf)
                for name, value in scores.items()
            }
        if self.global_sparsity:
            return global_masks(scores, sparsity)
        return {name: unstructured_mask(value, sparsity) for name, value in scores.items()}

    def _scores(self, module: nn.Module) -> torch.Tensor:
        # Computed shard-locally, then gathered, so every rank selects the same mask.
        # Already-pruned weights score -inf: they stay pruned whatever ties there are.
        # The stored weight is scored: under QAT ``module.weight`` is its fake-quantized
        # value, which depends on the quantizer's switches, not on the weight alone.
        magnitude = stored_weight(module).detach().abs()
        return full_tensor(magnitude.masked_fill(~self.mask_of(module), -math.inf))


def _log_sparsity(
    state: State,
    tag: str,
    masks: dict[str, torch.Tensor],
    target: float,
    step: float | None,
) -> None:
    if state.loggers is None:
        return
    layers = {name: 1.0 - mask.sum().item() / mask.numel() for name, mask in masks.items()}
    state.loggers.log_scalar(f"{tag}/target_sparsity", target, step)
    state.loggers.log_scalars(f"{tag}/sparsity", layers, step)
