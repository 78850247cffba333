"""Compression algorithms as modifiers, registered by class name for recipes."""

from lightning_compress.modifiers.base import ONE_SHOT, Modifier
from lightning_compress.modifiers.distillation import OutputDistillationModifier
from lightning_compress.modifiers.pruning import (
    ConstantPruningModifier,
    MagnitudePruningModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.modifiers.quantization import GPTQModifier, QuantizationModifier
from lightning_compress.modifiers.smoothing import AWQModifier, SmoothQuantModifier

__all__ = [
    "ONE_SHOT",
    "AWQModifier",
    "ConstantPruningModifier",
    "GPTQModifier",
    "MagnitudePruningModifier",
    "Modifier",
    "OutputDistillationModifier",
    "QuantizationModifier",
    "SparseGPTModifier",
    "SmoothQuantModifier",
    "WandaPruningModifier",
]
