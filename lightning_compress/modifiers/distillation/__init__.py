"""Distillation modifiers."""

from lightning_compress.modifiers.distillation.output import (
    OutputDistillationModifier,
    distillation_term,
)

__all__ = ["OutputDistillationModifier", "distillation_term"]
