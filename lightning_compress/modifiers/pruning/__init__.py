"""Pruning: the shared mask selection, sparsity schedules, magnitude and constant pruning."""

from lightning_compress.modifiers.pruning.constant import (
    MASK_BUFFER,
    ConstantPruningModifier,
    WeightMaskModifier,
)
from lightning_compress.modifiers.pruning.magnitude import MagnitudePruningModifier
from lightning_compress.modifiers.pruning.masks import (
    full_tensor,
    global_masks,
    like_weight,
    nm_mask,
    parse_mask_structure,
    unstructured_mask,
)
from lightning_compress.modifiers.pruning.schedule import interpolate_sparsity, update_point
from lightning_compress.modifiers.pruning.sparsegpt_modifier import SparseGPTModifier
from lightning_compress.modifiers.pruning.wanda import WandaPruningModifier

__all__ = [
    "MASK_BUFFER",
    "ConstantPruningModifier",
    "MagnitudePruningModifier",
    "SparseGPTModifier",
    "WandaPruningModifier",
    "WeightMaskModifier",
    "full_tensor",
    "global_masks",
    "interpolate_sparsity",
    "like_weight",
    "nm_mask",
    "parse_mask_structure",
    "unstructured_mask",
    "update_point",
]
