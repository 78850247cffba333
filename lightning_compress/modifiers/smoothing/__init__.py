"""Smoothing modifiers (SmoothQuant, AWQ): per-channel scales moved from activations into
weights, with the layer pairs found from each block's structure and calibration data."""

from lightning_compress.modifiers.smoothing.awq import AWQModifier, AWQResult, awq_search
from lightning_compress.modifiers.smoothing.base import SmoothingModifier
from lightning_compress.modifiers.smoothing.folding import SmoothingMapping
from lightning_compress.modifiers.smoothing.mappings import find_mappings
from lightning_compress.modifiers.smoothing.smoothquant import (
    SmoothQuantModifier,
    smoothquant_scale,
)

__all__ = [
    "AWQModifier",
    "AWQResult",
    "SmoothQuantModifier",
    "SmoothingMapping",
    "SmoothingModifier",
    "awq_search",
    "find_mappings",
    "smoothquant_scale",
]
